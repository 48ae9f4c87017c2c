"""OLMoE (Muennighoff et al. 2024): every layer MoE, softmax top-k (renormalised only with
`norm_topk_prob`), qk-norm over the whole q and k projections before the head split, then
`clip_qkv` clamps q, k, v, then RoPE."""
from moe_jax.hf.common import Family
from moe_jax.hf.tensors import HubNames


def read(hub: dict, model) -> None:
  model.moe_every, model.moe_layers = 1, None
  model.qk_norm = "projection"
  model.clip_qkv = None if hub.get("clip_qkv") is None else float(hub["clip_qkv"])
  model.attention_bias = model.attention_out_bias = bool(hub.get("attention_bias", False))
  model.moe.num_experts = hub["num_experts"]
  model.moe.top_k = hub["num_experts_per_tok"]
  model.moe.expert_hidden_dim = hub["intermediate_size"]
  model.moe.normalize_top_k = bool(hub.get("norm_topk_prob", False))


def write(model, hub: dict) -> None:
  hub.update(num_experts=model.moe.num_experts, num_experts_per_tok=model.moe.top_k,
             intermediate_size=model.moe.expert_hidden_dim, clip_qkv=model.get("clip_qkv"),
             norm_topk_prob=bool(model.moe.normalize_top_k),
             attention_bias=bool(model.attention_bias),
             router_aux_loss_coef=model.moe.load_balance_loss_weight)


FAMILY = Family("olmoe", "OlmoeForCausalLM", HubNames(), read, write, rope_theta=1e4)
