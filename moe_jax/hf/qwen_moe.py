"""Qwen2-MoE and Qwen3-MoE (Qwen team 2024, 2025): softmax top-k, renormalised only with
`norm_topk_prob`; layer i is sparse iff i is not in `mlp_only_layers` and (i + 1) is a multiple
of `decoder_sparse_step`. Qwen2-MoE adds one shared expert whose output is scaled per token by
sigmoid(shared_expert_gate(x)), and q/k/v biases; Qwen3-MoE has per-head qk-norm before RoPE."""
from moe_jax.hf.common import Family, require
from moe_jax.hf.tensors import HubNames


def sparse_layers(hub: dict) -> tuple[int, ...]:
  step, dense = hub.get("decoder_sparse_step", 1) or 1, set(hub.get("mlp_only_layers") or [])
  return tuple(i for i in range(hub["num_hidden_layers"])
               if i not in dense and (i + 1) % step == 0)


def _read_moe(hub: dict, model) -> None:
  require(hub, "use_sliding_window", "False", lambda v: not v, False)
  model.moe_layers = sparse_layers(hub)
  model.moe_every = 1
  model.moe.num_experts = hub.get("num_experts") or hub["num_local_experts"]
  model.moe.top_k = hub["num_experts_per_tok"]
  model.moe.expert_hidden_dim = hub["moe_intermediate_size"]
  model.moe.normalize_top_k = bool(hub.get("norm_topk_prob", False))


def _write_moe(model, hub: dict) -> None:
  moe_layers = set(model.moe_layers if model.get("moe_layers") is not None
                   else range(model.num_layers))
  hub.update(num_experts=model.moe.num_experts, num_experts_per_tok=model.moe.top_k,
             moe_intermediate_size=model.moe.expert_hidden_dim, decoder_sparse_step=1,
             mlp_only_layers=[i for i in range(model.num_layers) if i not in moe_layers],
             norm_topk_prob=bool(model.moe.normalize_top_k), use_sliding_window=False,
             router_aux_loss_coef=model.moe.load_balance_loss_weight)


def read_qwen2(hub: dict, model) -> None:
  _read_moe(hub, model)
  model.attention_bias = bool(hub.get("qkv_bias", True))
  shared = hub.get("shared_expert_intermediate_size", 0) or 0
  model.moe.num_shared_experts = 1 if shared else 0
  model.moe.shared_expert_hidden_dim = shared
  model.moe.shared_expert_gate = bool(shared)


def write_qwen2(model, hub: dict) -> None:
  _write_moe(model, hub)
  moe = model.moe
  shared = moe.get("shared_expert_hidden_dim", 0) or moe.num_shared_experts * moe.expert_hidden_dim
  hub.update(qkv_bias=bool(model.attention_bias),
             shared_expert_intermediate_size=shared if moe.num_shared_experts else 0)


def read_qwen3(hub: dict, model) -> None:
  _read_moe(hub, model)
  model.qk_norm = "head"
  model.attention_bias = model.attention_out_bias = bool(hub.get("attention_bias", False))


def write_qwen3(model, hub: dict) -> None:
  _write_moe(model, hub)
  hub.update(attention_bias=bool(model.attention_bias))


QWEN2_MOE = Family("qwen2_moe", "Qwen2MoeForCausalLM", HubNames(), read_qwen2, write_qwen2,
                   rope_theta=1e4)
QWEN3_MOE = Family("qwen3_moe", "Qwen3MoeForCausalLM", HubNames(), read_qwen3, write_qwen3,
                   rope_theta=1e4)
