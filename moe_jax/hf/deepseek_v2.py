"""DeepSeek-V2 (DeepSeek-AI 2024, arXiv:2405.04434; V2-Lite without the query compression): MLA
attention (`models/mla.py`, interleaved RoPE, YaRN with mscale); the first
`first_k_dense_replace` layers dense, the rest MoE with `n_shared_experts` ungated shared experts;
the router s = softmax(x W) in float32 (eq. 21), top-k of s (`topk_method="greedy"`) or
device-limited routing approximated as in transformers by `group_limited_greedy`: the
`topk_group` best of `n_group` groups scored by their largest s, then top-k inside them; the
weights are the chosen s, never renormalised (transformers ignores `norm_topk_prob` here), times
`routed_scaling_factor`.
"""
from moe_jax.hf import deepseek_v3
from moe_jax.hf.common import Family, require
from moe_jax.hf.errors import UnsupportedConfigError
from moe_jax.hf.tensors import HubNames

TOPK_METHODS = ("greedy", "group_limited_greedy")


def read(hub: dict, model) -> None:
  require(hub, "topk_method", f"one of {TOPK_METHODS}", lambda v: v in TOPK_METHODS, "greedy")
  require(hub, "n_shared_experts", "at least one shared expert (transformers builds them always)",
          lambda v: bool(v))
  deepseek_v3.read_mla_and_layout(hub, model)
  model.rope_interleaved = True  # V2 rotates (2i, 2i+1) pairs as complex numbers, always
  moe = model.moe
  moe.score_function = "softmax"
  moe.normalize_top_k = False
  grouped = hub.get("topk_method", "greedy") == "group_limited_greedy"
  if grouped and not (hub.get("n_group") and hub.get("topk_group")):
    raise UnsupportedConfigError("'deepseek_v2' topk_method='group_limited_greedy' needs n_group "
                                 "and topk_group.")
  moe.num_expert_groups = hub["n_group"] if grouped else 1
  moe.top_k_groups = hub["topk_group"] if grouped else 1
  moe.group_score = "max"
  moe.selection_bias = False
  moe.bias_update_rate = 0.0


def write(model, hub: dict) -> None:
  deepseek_v3.write_mla_and_layout(model, hub)
  moe = model.moe
  grouped = moe.num_expert_groups > 1
  hub.update(norm_topk_prob=False, topk_method="group_limited_greedy" if grouped else "greedy",
             n_group=moe.num_expert_groups if grouped else None,
             topk_group=moe.top_k_groups if grouped else None)


FAMILY = Family("deepseek_v2", "DeepseekV2ForCausalLM",
                HubNames(shared_expert="mlp.shared_experts."), read, write, rope_theta=1e4)
