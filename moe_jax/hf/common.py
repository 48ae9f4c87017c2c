"""What the Hugging Face families share: the `Family` record and the config fields common to all.

A family maps a hub `config.json` onto our `config.model` (`read`) and back (`write`); the model code
knows no family names. `read` raises `UnsupportedConfigError` naming any field whose value would
change the math in a way the model does not implement.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import os
from typing import Any, Callable

import ml_collections

from moe_jax.hf.errors import UnsupportedConfigError
from moe_jax.hf.tensors import HubNames
from moe_jax.models import rope

# Fields of config.model / config.model.moe that change what the model computes at inference; an
# export must reproduce every one of them (see `api.check_representable`).
MATH_FIELDS = ("vocab_size", "d_model", "num_layers", "num_heads", "num_kv_heads", "head_dim",
               "mlp_dim", "activation", "tie_embeddings", "scale_tied_logits", "rope_base",
               "rope_interleaved", "norm_eps", "qk_norm", "attention_bias", "attention_out_bias",
               "clip_qkv", "causal", "attention_sinks", "swiglu_alpha", "swiglu_limit",
               "attention", "mla", "embedding_multiplier", "residual_multiplier",
               "attention_scale", "logit_divisor", "norm")
MOE_MATH_FIELDS = ("router", "num_experts", "top_k", "expert_hidden_dim", "num_shared_experts",
                   "shared_expert_hidden_dim", "shared_expert_gate", "normalize_top_k",
                   "score_function", "num_expert_groups", "top_k_groups", "group_score",
                   "routed_scaling_factor", "num_zero_experts",
                   "num_copy_experts", "num_constant_experts", "num_null_experts",
                   "router_bias", "expert_bias")


@dataclasses.dataclass(frozen=True)
class Family:
  """One hub model type: its names, and the config mapping both ways."""
  model_type: str
  architecture: str  # e.g. "MixtralForCausalLM"
  names: HubNames
  read: Callable[[dict, Any], None]  # (hub config, our config.model to fill) -> None
  write: Callable[[Any, dict], None]  # (our config.model, hub config to fill) -> None
  rope_theta: float  # transformers' default when config.json omits it
  layer_types: tuple[str, ...] = ("full_attention",)  # `layer_types` entries it implements
  # Hub tensors of layers >= num_hidden_layers that transformers ignores (DeepSeek-V3's MTP).
  ignores_extra_layers: bool = False
  # Maps a hub config with its own field names (DBRX's nested attn/ffn configs) onto the
  # standard names `read_common` and `read` take; None = already standard.
  flatten: Callable[[dict], dict] | None = None

  def ignored(self, name: str, num_layers: int) -> bool:
    """Whether transformers ignores hub tensor `name` on load (so do we)."""
    if not self.ignores_extra_layers or not name.startswith("model.layers."):
      return False
    return int(name.split(".")[2]) >= num_layers


def default_experiment_config() -> ml_collections.ConfigDict:
  """configs/default.py's config (every field at its default), from the repository checkout."""
  repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  path = os.path.join(repo, "configs", "default.py")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path} is missing: moe_jax.hf needs the repository's configs/ "
                            "(install with pip install -e . from a checkout).")
  spec = importlib.util.spec_from_file_location("moe_jax_default_config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def require(hub: dict, field: str, allowed: str, predicate: Callable[[Any], bool],
            default: Any = None) -> None:
  """Raises UnsupportedConfigError unless `predicate(hub.get(field, default))`."""
  value = hub.get(field, default)
  if not predicate(value):
    raise UnsupportedConfigError(
        f"{hub.get('model_type')!r} config field {field}={value!r} is not supported: moe_jax "
        f"implements only {allowed}.")


def rope_parameters(hub: dict, default_theta: float) -> dict:
  """The hub's RoPE parameters in transformers 5's `rope_parameters` form (legacy keys read too)."""
  params = dict(hub.get("rope_parameters") or {})
  legacy = hub.get("rope_scaling") or {}
  for key, value in legacy.items():
    params.setdefault("rope_type" if key == "type" else key, value)
  params.setdefault("rope_theta", hub.get("rope_theta", default_theta))
  params.setdefault("rope_type", "default")
  return params


def read_rope(hub: dict, model, default_theta: float) -> None:
  params = rope_parameters(hub, default_theta)
  model.rope_base = float(params["rope_theta"])
  kind = params["rope_type"]
  scaling = rope.default_scaling()
  if params.get("partial_rotary_factor", 1.0) != 1.0:
    raise UnsupportedConfigError(
        f"rope_parameters.partial_rotary_factor={params['partial_rotary_factor']!r} is not "
        "supported: moe_jax rotates the whole head (factor 1.0).")
  original = params.get("original_max_position_embeddings") or hub.get(
      "max_position_embeddings", 0)
  if kind == "llama3":
    scaling.update(kind="llama3", factor=float(params["factor"]), original_max_len=int(original),
                   low_freq_factor=float(params["low_freq_factor"]),
                   high_freq_factor=float(params["high_freq_factor"]))
  elif kind == "yarn":
    scaling.update(kind="yarn", factor=float(params["factor"]), original_max_len=int(original),
                   beta_fast=float(params.get("beta_fast") or 32.0),
                   beta_slow=float(params.get("beta_slow") or 1.0),
                   mscale=float(params.get("mscale") or 0.0),
                   mscale_all_dim=float(params.get("mscale_all_dim") or 0.0),
                   attention_factor=float(params.get("attention_factor") or 0.0),
                   truncate=bool(params.get("truncate", True)))
  elif kind != "default":
    raise UnsupportedConfigError(
        f"rope_parameters.rope_type={kind!r} is not supported: moe_jax implements 'default', "
        "'llama3' and 'yarn'.")
  model.rope_scaling = scaling


def write_rope(model, hub: dict) -> None:
  scaling = model.get("rope_scaling") or rope.default_scaling()
  params = {"rope_theta": float(model.rope_base), "rope_type": "default"}
  if scaling.kind == "llama3":
    params.update(rope_type="llama3", factor=scaling.factor,
                  low_freq_factor=scaling.low_freq_factor,
                  high_freq_factor=scaling.high_freq_factor,
                  original_max_position_embeddings=scaling.original_max_len)
  elif scaling.kind == "yarn":
    params.update(rope_type="yarn", factor=scaling.factor, beta_fast=scaling.beta_fast,
                  beta_slow=scaling.beta_slow,
                  original_max_position_embeddings=scaling.original_max_len)
    if not scaling.truncate:  # transformers' default is True
      params["truncate"] = False
    for key in ("mscale", "mscale_all_dim", "attention_factor"):
      if scaling[key]:
        params[key] = scaling[key]
  hub["rope_parameters"] = params


def read_common(hub: dict, model, family: Family) -> None:
  """The fields every supported family shares: sizes, GQA, RoPE, norms, embeddings."""
  require(hub, "hidden_act", "'silu' (SwiGLU)", lambda v: v == "silu", "silu")
  require(hub, "mlp_bias", "False", lambda v: not v, False)
  require(hub, "layer_types", f"layers of types {family.layer_types}",
          lambda v: all(t in family.layer_types for t in (v or [])))
  heads = hub["num_attention_heads"]
  model.vocab_size = hub["vocab_size"]
  model.d_model = hub["hidden_size"]
  model.num_layers = hub["num_hidden_layers"]
  model.num_heads = heads
  model.num_kv_heads = hub.get("num_key_value_heads") or heads
  model.head_dim = hub.get("head_dim") or hub["hidden_size"] // heads
  model.mlp_dim = hub.get("intermediate_size") or model.mlp_dim
  model.max_len = hub.get("max_position_embeddings", model.max_len)
  model.activation = "swiglu"
  model.norm_eps = float(hub.get("rms_norm_eps", 1e-6))
  model.tie_embeddings = bool(hub.get("tie_word_embeddings", False))
  model.scale_tied_logits = False
  model.causal = True
  read_rope(hub, model, family.rope_theta)
  moe = model.moe
  moe.router = "token_choice"
  moe.capacity_factor = None
  moe.load_balance_loss_weight = float(hub.get("router_aux_loss_coef", 0.0) or 0.0)
  moe.router_z_loss_weight = 0.0


def write_common(model, hub: dict, family: Family) -> None:
  hub.update(
      model_type=family.model_type, architectures=[family.architecture],
      vocab_size=model.vocab_size, hidden_size=model.d_model, num_hidden_layers=model.num_layers,
      num_attention_heads=model.num_heads,
      num_key_value_heads=model.get("num_kv_heads", 0) or model.num_heads,
      head_dim=model.head_dim, intermediate_size=model.mlp_dim, hidden_act="silu",
      max_position_embeddings=model.max_len, rms_norm_eps=model.norm_eps,
      tie_word_embeddings=bool(model.tie_embeddings), dtype=model.param_dtype)
  write_rope(model, hub)
