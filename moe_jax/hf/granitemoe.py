"""Granite-MoE (IBM, "Power Scheduler" 2024, arXiv:2408.13359; the granite-3.0 MoE models): a
Mixtral-like decoder, every layer MoE, with muP-style scales: embeddings times
`embedding_multiplier`, every attention and MoE branch times `residual_multiplier` before it joins
the residual stream, attention scores times `attention_multiplier` (instead of head_dim^-0.5) and
logits divided by `logits_scaling`. The router takes top-k of the raw logits, then a softmax over
the k chosen, which equals our softmax over all experts, top-k, renormalised for k >= 2 (k = 1:
Granite's weight is 1, ours would be p, so k = 1 is rejected). Experts are stored concatenated:
input_linear [E, 2F, D] (gate rows, then up rows), output_linear [E, D, F].
"""
from moe_jax.hf.common import Family, require
from moe_jax.hf.tensors import HubNames


def read(hub: dict, model) -> None:
  require(hub, "num_experts_per_tok", "k >= 2 (see moe_jax/hf/granitemoe.py)", lambda v: v >= 2)
  model.moe_every, model.moe_layers = 1, None
  model.attention_bias = model.attention_out_bias = bool(hub.get("attention_bias", False))
  model.embedding_multiplier = float(hub.get("embedding_multiplier", 1.0))
  model.residual_multiplier = float(hub.get("residual_multiplier", 1.0))
  model.attention_scale = float(hub.get("attention_multiplier", 1.0))
  model.logit_divisor = float(hub.get("logits_scaling", 1.0))
  moe = model.moe
  moe.num_experts = hub["num_local_experts"]
  moe.top_k = hub["num_experts_per_tok"]
  moe.expert_hidden_dim = hub["intermediate_size"]
  moe.normalize_top_k = True


def write(model, hub: dict) -> None:
  hub.update(num_local_experts=model.moe.num_experts, num_experts_per_tok=model.moe.top_k,
             intermediate_size=model.moe.expert_hidden_dim,
             attention_bias=bool(model.attention_bias),
             embedding_multiplier=float(model.get("embedding_multiplier", 1.0)),
             residual_multiplier=float(model.get("residual_multiplier", 1.0)),
             attention_multiplier=float(model.get("attention_scale", 0.0)
                                        or model.head_dim ** -0.5),
             logits_scaling=float(model.get("logit_divisor", 1.0)),
             router_aux_loss_coef=model.moe.load_balance_loss_weight)


FAMILY = Family("granitemoe", "GraniteMoeForCausalLM",
                HubNames(router="block_sparse_moe.router.layer.weight",
                         concatenated_experts="block_sparse_moe."),
                read, write, rope_theta=1e4)
