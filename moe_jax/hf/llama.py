"""Dense Llama (Grattafiori et al. 2024, llama3 RoPE scaling) and Qwen3 (per-head qk-norm, often
tied embeddings): the starting points of sparse upcycling ("Llama 3 Meets MoE", 2024)."""
from moe_jax.hf.common import Family, require
from moe_jax.hf.tensors import HubNames


def read_llama(hub: dict, model) -> None:
  require(hub, "pretraining_tp", "1", lambda v: v in (None, 1), 1)
  model.moe_every, model.moe_layers = 0, None
  model.attention_bias = model.attention_out_bias = bool(hub.get("attention_bias", False))


def write_llama(model, hub: dict) -> None:
  hub.update(attention_bias=bool(model.attention_bias), mlp_bias=False, pretraining_tp=1)


def read_qwen3(hub: dict, model) -> None:
  require(hub, "use_sliding_window", "False", lambda v: not v, False)
  read_llama(hub, model)
  model.qk_norm = "head"


def write_qwen3(model, hub: dict) -> None:
  hub.update(attention_bias=bool(model.attention_bias), use_sliding_window=False)


LLAMA = Family("llama", "LlamaForCausalLM", HubNames(), read_llama, write_llama, rope_theta=1e4)
QWEN3 = Family("qwen3", "Qwen3ForCausalLM", HubNames(), read_qwen3, write_qwen3, rope_theta=1e4)
