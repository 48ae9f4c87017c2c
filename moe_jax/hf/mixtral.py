"""Mixtral (Jiang et al. 2024, "Mixtral of Experts"): every layer MoE, softmax over all experts,
top-k, always renormalised; GQA, half-split RoPE (theta 1e6), optional sliding window."""
from moe_jax.hf.common import Family, require
from moe_jax.hf.tensors import HubNames


def read(hub: dict, model) -> None:
  require(hub, "router_jitter_noise", "0 (Mixtral's training-time jitter of the expert inputs)",
          lambda v: not v, 0.0)
  model.sliding_window = int(hub.get("sliding_window") or 0)
  model.moe_every, model.moe_layers = 1, None
  model.moe.num_experts = hub["num_local_experts"]
  model.moe.top_k = hub["num_experts_per_tok"]
  model.moe.expert_hidden_dim = hub["intermediate_size"]
  model.moe.normalize_top_k = True


def write(model, hub: dict) -> None:
  hub.update(num_local_experts=model.moe.num_experts, num_experts_per_tok=model.moe.top_k,
             intermediate_size=model.moe.expert_hidden_dim,
             sliding_window=model.get("sliding_window", 0) or None, router_jitter_noise=0.0,
             router_aux_loss_coef=model.moe.load_balance_loss_weight)


FAMILY = Family("mixtral", "MixtralForCausalLM",
                HubNames(router="block_sparse_moe.gate.weight",
                         expert="block_sparse_moe.experts.{e}.",
                         expert_projections=("w1", "w3", "w2")),
                read, write, rope_theta=1e6)
