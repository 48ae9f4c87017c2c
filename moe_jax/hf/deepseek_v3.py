"""DeepSeek-V3 (DeepSeek-AI 2024, arXiv:2412.19437): MLA attention (`models/mla.py`) with
interleaved RoPE and YaRN; the first `first_k_dense_replace` layers dense, the rest MoE with
`n_shared_experts` ungated shared experts (one MLP of n x moe_intermediate_size); the router
s = sigmoid(x W) in float32 (eq. 15), selection by s + b with b = `e_score_correction_bias`
(the auxiliary-loss-free bias, eq. 16; our `selection_bias` router state), group-limited to the
`topk_group` of `n_group` groups scored by the sum of their top-2 biased scores, weights the
unbiased s renormalised (`norm_topk_prob`) and times `routed_scaling_factor`.

transformers hard-codes this router whatever `scoring_func` / `topk_method` say; the multi-token
prediction layers of hub checkpoints (model.layers.{num_hidden_layers}.*) are ignored, as
transformers ignores them.
"""
from moe_jax.hf.common import Family, require
from moe_jax.hf.tensors import HubNames


def read_mla_and_layout(hub: dict, model) -> None:
  """What DeepSeek-V2 and V3 share: MLA, the dense/MoE layer layout, expert and shared sizes."""
  layers = hub["num_hidden_layers"]
  model.attention = "mla"
  model.mla.q_lora_rank = hub.get("q_lora_rank") or 0
  model.mla.kv_lora_rank = hub["kv_lora_rank"]
  model.mla.qk_nope_head_dim = hub["qk_nope_head_dim"]
  model.mla.qk_rope_head_dim = hub["qk_rope_head_dim"]
  model.mla.v_head_dim = hub["v_head_dim"]
  model.head_dim = hub["qk_nope_head_dim"] + hub["qk_rope_head_dim"]
  model.num_kv_heads = 0
  model.rope_interleaved = bool(hub.get("rope_interleave", True))
  model.attention_bias = bool(hub.get("attention_bias", False))
  first_dense = hub.get("first_k_dense_replace", 0) or 0
  model.moe_every, model.moe_layers = 1, tuple(range(first_dense, layers))
  moe = model.moe
  moe.num_experts = hub.get("n_routed_experts") or hub["num_local_experts"]
  moe.top_k = hub["num_experts_per_tok"]
  moe.expert_hidden_dim = hub["moe_intermediate_size"]
  moe.num_shared_experts = hub.get("n_shared_experts") or 0
  moe.shared_expert_hidden_dim = 0
  moe.routed_scaling_factor = float(hub.get("routed_scaling_factor", 1.0))


def read(hub: dict, model) -> None:
  require(hub, "num_experts_per_tok", "k >= 2 when norm_topk_prob (our K = 1 keeps the raw score)",
          lambda v: v >= 2 or not hub.get("norm_topk_prob", True))
  read_mla_and_layout(hub, model)
  moe = model.moe
  moe.score_function = "sigmoid"
  moe.normalize_top_k = bool(hub.get("norm_topk_prob", True))
  moe.num_expert_groups = hub.get("n_group") or 1
  moe.top_k_groups = hub.get("topk_group") or 1
  moe.group_score = "top2_sum"
  moe.selection_bias = True
  moe.bias_update_rate = 0.001  # DeepSeek-V3's gamma (Sec. 2.1.2) should training continue
  moe.load_balance_loss_weight = 0.0  # V3 balances with the bias, not an auxiliary loss


def write_mla_and_layout(model, hub: dict) -> None:
  mla, moe = model.mla, model.moe
  moe_layers = sorted(model.moe_layers) if model.get("moe_layers") is not None else list(
      range(model.num_layers))
  first_dense = moe_layers[0] if moe_layers else model.num_layers
  hub.update(
      q_lora_rank=mla.q_lora_rank or None, kv_lora_rank=mla.kv_lora_rank,
      qk_nope_head_dim=mla.qk_nope_head_dim, qk_rope_head_dim=mla.qk_rope_head_dim,
      v_head_dim=mla.v_head_dim, head_dim=mla.qk_rope_head_dim,
      rope_interleave=bool(model.rope_interleaved), attention_bias=bool(model.attention_bias),
      first_k_dense_replace=first_dense, n_routed_experts=moe.num_experts,
      num_experts_per_tok=moe.top_k, moe_intermediate_size=moe.expert_hidden_dim,
      n_shared_experts=moe.num_shared_experts, routed_scaling_factor=moe.routed_scaling_factor)


def write(model, hub: dict) -> None:
  write_mla_and_layout(model, hub)
  moe = model.moe
  hub.update(norm_topk_prob=bool(moe.normalize_top_k), n_group=moe.num_expert_groups,
             topk_group=moe.top_k_groups, scoring_func="sigmoid", topk_method="noaux_tc")


FAMILY = Family("deepseek_v3", "DeepseekV3ForCausalLM",
                HubNames(shared_expert="mlp.shared_experts."), read, write, rope_theta=1e4,
                ignores_extra_layers=True)
