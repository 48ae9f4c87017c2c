"""GPT-OSS (OpenAI 2025, "gpt-oss-120b & gpt-oss-20b Model Card"): every layer MoE with router and
expert biases, top-k on the raw logits then a softmax over the k chosen, fused interleaved gate/up
experts with the clamped SwiGLU (up + 1) * g * sigmoid(1.702 g); attention with q/k/v/o biases and
a learned per-head sink logit, sliding-window and full layers alternating; YaRN RoPE.

Top-k-then-softmax equals our softmax over all experts, top-k, renormalised (exp(l_i) / sum over
the k chosen either way) for k >= 2; for k = 1 GPT-OSS gives weight 1 and we would give p, so
k = 1 is rejected.
"""
from moe_jax.hf.common import Family, require
from moe_jax.hf.tensors import HubNames

SLIDING, FULL = "sliding_attention", "full_attention"


def read(hub: dict, model) -> None:
  require(hub, "num_experts_per_tok", "k >= 2 (see moe_jax/hf/gpt_oss.py)", lambda v: v >= 2)
  layers = hub["num_hidden_layers"]
  types = hub.get("layer_types") or [SLIDING if (i + 1) % 2 else FULL for i in range(layers)]
  model.activation = "swiglu_clamped"
  model.swiglu_alpha = float(hub.get("swiglu_alpha", 1.702))
  model.swiglu_limit = float(hub.get("swiglu_limit", 7.0))
  model.attention_bias = model.attention_out_bias = bool(hub.get("attention_bias", True))
  model.attention_sinks = True
  model.sliding_window = int(hub.get("sliding_window") or 0)
  model.sliding_window_layers = tuple(i for i, t in enumerate(types) if t == SLIDING)
  model.moe_every, model.moe_layers = 1, None
  moe = model.moe
  moe.num_experts = hub["num_local_experts"]
  moe.top_k = hub["num_experts_per_tok"]
  moe.expert_hidden_dim = hub["intermediate_size"]
  moe.normalize_top_k = True
  moe.router_bias = moe.expert_bias = True


def write(model, hub: dict) -> None:
  windowed = set(model.get("sliding_window_layers") or ())
  hub.update(num_local_experts=model.moe.num_experts, num_experts_per_tok=model.moe.top_k,
             intermediate_size=model.moe.expert_hidden_dim, swiglu_alpha=model.swiglu_alpha,
             swiglu_limit=model.swiglu_limit, attention_bias=bool(model.attention_bias),
             sliding_window=model.get("sliding_window", 0) or None,
             layer_types=[SLIDING if i in windowed else FULL for i in range(model.num_layers)],
             router_aux_loss_coef=model.moe.load_balance_loss_weight)


FAMILY = Family("gpt_oss", "GptOssForCausalLM",
                HubNames(router="mlp.router.weight", router_bias="mlp.router.bias",
                         fused_experts="mlp.experts."),
                read, write, rope_theta=1.5e5, layer_types=(SLIDING, FULL))
