"""Sparse upcycling: initialise an MoE Transformer from a trained dense one.

Komatsuzaki et al., "Sparse Upcycling: Training Mixture-of-Experts from Dense Checkpoints" (2023);
Vavre et al., "Llama 3 Meets MoE: Efficient Upcycling" (2024). Every MoE layer's experts start as
copies of that layer's dense MLP (w_gate and w_up fused into the experts' w_gate_up, w_down),
optionally perturbed; every other parameter
(embedding, attention, norms, output projection, the FFNs that stay dense) is copied unchanged; the
router, which the dense model lacks, is freshly initialised, as in both papers. We draw it from a
zero-mean normal of small std (`router_init_std`, default 0.02), so the first routing decisions are
close to uniform and symmetric. The optimizer state can be upcycled the same way (Komatsuzaki et al.
copy it too): expert moments are copies of the MLP's moments, router moments start at zero.

Function preservation: with dropless (or drop-free) dispatch, top-k weights renormalised to sum to
one (`normalize_top_k=True`, K >= 2) and no noise, every expert computes the dense MLP and the
weights sum to 1, so the upcycled model computes exactly the dense model's function at step 0. With
K = 1 (raw probability as the weight), normalize_top_k=False, or dropped tokens it does not.

Active FLOPs: each token runs K experts of hidden size `expert_hidden_dim`, which upcycling forces
to equal the dense `mlp_dim`; the upcycled MoE therefore does K times the dense FFN FLOPs per token,
unlike the equal-FLOP pairing of configs/default.py (dense mlp_dim = K * expert_hidden_dim).
"""
from __future__ import annotations

from typing import Any
import zlib

import jax
import jax.numpy as jnp
from flax import nnx

from moe_jax.experts import fuse_gate_up
from moe_jax.models import rope
from moe_jax.models.transformer import Transformer, moe_layer_indices

Params = dict[str, Any]

_SHARED_FIELDS = ("vocab_size", "d_model", "num_layers", "num_heads", "head_dim", "activation",
                  "tie_embeddings", "mlp_dim")
# Attention, embedding and norm fields that must match too, with the value a config written before
# the field existed means (an imported Llama / Qwen3 sets them; the MoE config inherits them).
_SHARED_FIELDS_WITH_DEFAULTS = {
    "num_kv_heads": 0, "qk_norm": "none", "attention_bias": False, "attention_out_bias": False,
    "clip_qkv": None, "sliding_window": 0, "rope_base": 10_000.0, "rope_interleaved": False,
    "norm_eps": 1e-6, "scale_tied_logits": True, "causal": True, "embedding_multiplier": 1.0,
    "residual_multiplier": 1.0, "attention_scale": 0.0, "logit_divisor": 1.0, "norm": "rms"}


def _shared_value(model, field):
  value = model.get(field, _SHARED_FIELDS_WITH_DEFAULTS.get(field))
  if field == "num_kv_heads":
    return value or model.num_heads  # 0 = one key/value head per query head
  if isinstance(value, (int, float)) and not isinstance(value, bool):
    return float(value)
  return value


def _rope_scaling(model) -> dict:
  scaling = model.get("rope_scaling")
  if scaling is None or scaling.get("kind", "none") == "none":
    scaling = rope.default_scaling()
  return scaling.to_dict() if hasattr(scaling, "to_dict") else dict(scaling)


def _model_config(config):
  """Accepts an experiment config (with .model) or a model config."""
  return config.model if "model" in config else config


def check_compatible(dense_config, moe_config) -> None:
  """Raises ValueError listing every field that keeps `dense_config` from upcycling to `moe_config`.

  Both may be experiment configs or their `.model`. The models must share every non-FFN shape and
  every attention, RoPE and norm setting (grouped-query heads, qk-norm, biases, clip_qkv, sliding
  window, RoPE base / scaling / interleaving, norm eps, tied-logit scaling, causality); the dense
  model must be dense (no MoE layer), the MoE model must have MoE layers
  (`moe_layer_indices`), no shared experts, and expert_hidden_dim equal to the dense mlp_dim
  (each expert is a copy of the MLP).
  """
  dense, moe = _model_config(dense_config), _model_config(moe_config)
  problems = []
  for field in _SHARED_FIELDS:
    if dense[field] != moe[field]:
      problems.append(f"model.{field}: dense {dense[field]!r} != MoE {moe[field]!r} (must match).")
  for field in _SHARED_FIELDS_WITH_DEFAULTS:
    if _shared_value(dense, field) != _shared_value(moe, field):
      problems.append(f"model.{field}: dense {dense.get(field)!r} != MoE {moe.get(field)!r} "
                      "(must match).")
  if _rope_scaling(dense) != _rope_scaling(moe):
    problems.append(f"model.rope_scaling: dense {_rope_scaling(dense)} != MoE "
                    f"{_rope_scaling(moe)} (must match).")
  if moe_layer_indices(dense):
    problems.append(f"dense model has MoE layers {list(moe_layer_indices(dense))} (moe_every="
                    f"{dense.moe_every}, moe_layers={dense.get('moe_layers')}); the source must "
                    "be dense (moe_every=0).")
  if not moe_layer_indices(moe):
    problems.append(f"MoE model.moe_every={moe.moe_every} (moe_layers={moe.get('moe_layers')}) "
                    "gives no MoE layer; allowed: moe_every >= 1 or explicit moe_layers.")
  if moe.moe.expert_hidden_dim != dense.mlp_dim:
    problems.append(
        f"model.moe.expert_hidden_dim={moe.moe.expert_hidden_dim} must equal the dense "
        f"model.mlp_dim={dense.mlp_dim}: each expert is a copy of the dense MLP.")
  if moe.moe.get("num_shared_experts", 0):
    problems.append(f"model.moe.num_shared_experts={moe.moe.num_shared_experts}; upcycling "
                    "supports 0 (a shared expert has no dense counterpart to copy).")
  if problems:
    raise ValueError("Cannot upcycle the dense model to this MoE model:\n  "
                     + "\n  ".join(problems))


def abstract_params(model_config) -> Params:
  """ShapeDtypeStructs of a Transformer's parameters (nnx pure dict), without computing them."""
  model = nnx.eval_shape(lambda: Transformer(model_config, rngs=nnx.Rngs(params=0)))
  return nnx.to_pure_dict(nnx.state(model, nnx.Param))


def _copy(dense: Any, template: Any, where: str) -> Any:
  """`dense` leaf by leaf, checked against the template's structure, shapes and dtypes."""
  if jax.tree.structure(dense) != jax.tree.structure(template):
    raise ValueError(f"{where}: the dense tree {jax.tree.structure(dense)} does not match the MoE "
                     f"model's {jax.tree.structure(template)}.")

  def copy_leaf(d, t):
    if tuple(d.shape) != tuple(t.shape):
      raise ValueError(f"{where}: dense shape {tuple(d.shape)} != MoE shape {tuple(t.shape)}.")
    return jnp.asarray(d, t.dtype)

  return jax.tree.map(copy_leaf, dense, template)


def _dense_counterpart(dense_ffn: Params, name: str) -> jax.Array:
  """The dense MLP weight (or its moment) that expert parameter `name` copies.

  Experts fuse SwiGLU's gate and up projections (`experts.fuse_gate_up`); the MLP keeps them apart.
  """
  if name == "w_gate_up":
    return fuse_gate_up(jnp.asarray(dense_ffn["w_gate"]), jnp.asarray(dense_ffn["w_up"]))
  return dense_ffn[name]


def _map_tree(dense: Params, template: Params, moe_layers, expert_fn, router_fn) -> Params:
  """Builds a tree shaped like `template` (MoE params) from `dense` (dense params).

  expert_fn(name, dense_weight, template_leaf, layer) -> [E, ...] expert weights;
  router_fn(template_leaf, layer) -> router kernel.
  """
  out = {key: _copy(dense[key], sub, key) for key, sub in template.items() if key != "blocks"}
  blocks = {}
  for i, block_template in template["blocks"].items():
    dense_block = dense["blocks"][i]
    block = {key: _copy(dense_block[key], sub, f"blocks/{i}/{key}")
             for key, sub in block_template.items() if key != "ffn"}
    ffn_template = block_template["ffn"]
    if int(i) in moe_layers:
      dense_ffn = dense_block["ffn"]
      experts = {name: expert_fn(name, _dense_counterpart(dense_ffn, name), leaf, int(i))
                 for name, leaf in ffn_template["experts"].items()}
      router = {"kernel": router_fn(ffn_template["router"]["kernel"], int(i))}
      if "noise_kernel" in ffn_template["router"]:  # learned noisy top-k: W_noise starts at 0
        leaf = ffn_template["router"]["noise_kernel"]
        router["noise_kernel"] = jnp.zeros(leaf.shape, leaf.dtype)
      block["ffn"] = {"router": router, "experts": experts}
      unknown = set(ffn_template) - {"router", "experts"}
      if unknown:
        raise ValueError(f"blocks/{i}/ffn: no upcycling rule for MoE parameters {sorted(unknown)}.")
    else:
      block["ffn"] = _copy(dense_block["ffn"], ffn_template, f"blocks/{i}/ffn")
    blocks[i] = block
  out["blocks"] = blocks
  return out


def upcycle_params(dense_params: Params, dense_config, moe_config, *, noise_std: float = 0.0,
                   rng: jax.Array, router_init_std: float = 0.02) -> Params:
  """Maps a dense Transformer's parameters to the parameters of the MoE Transformer `moe_config`.

  Args:
    dense_params: the dense model's params (nnx pure dict, as in the training state).
    dense_config: the dense experiment config (or its .model).
    moe_config: the MoE experiment config (or its .model); see `check_compatible`.
    noise_std: relative noise on each expert copy: w_e = w * (1 + noise_std * n_e), n_e ~ N(0, 1)
      independently per expert and element (0 = exact copies).
    rng: PRNG key for the router init and the noise.
    router_init_std: std of the zero-mean normal router init.

  Returns:
    The MoE model's params (nnx pure dict; experts [E, D, 2F] / [E, F, D], router [D, E]).

  Raises:
    ValueError: the configs are incompatible (names every field) or a shape does not match.
  """
  check_compatible(dense_config, moe_config)
  moe_model = _model_config(moe_config)
  template = abstract_params(moe_model)
  router_rng, noise_rng = jax.random.split(rng)

  def expert_fn(name, weight, leaf, layer):
    copies = jnp.broadcast_to(jnp.asarray(weight, jnp.float32), leaf.shape)
    if noise_std:
      # crc32, not hash(): str hashes change between processes and the noise must be reproducible.
      name_id = zlib.crc32(name.encode()) % 2 ** 31
      key = jax.random.fold_in(jax.random.fold_in(noise_rng, layer), name_id)
      copies = copies * (1.0 + noise_std * jax.random.normal(key, leaf.shape, jnp.float32))
    return _checked(copies.astype(leaf.dtype), leaf, f"blocks/{layer}/ffn/experts/{name}")

  def router_fn(leaf, layer):
    key = jax.random.fold_in(router_rng, layer)
    return (router_init_std * jax.random.normal(key, leaf.shape, jnp.float32)).astype(leaf.dtype)

  return _map_tree(dense_params, template, set(moe_layer_indices(moe_model)), expert_fn,
                   router_fn)


def _checked(value: jax.Array, leaf, where: str) -> jax.Array:
  if tuple(value.shape) != tuple(leaf.shape):
    raise ValueError(f"{where}: upcycled shape {tuple(value.shape)} != MoE shape "
                     f"{tuple(leaf.shape)}.")
  return value


def upcycle_opt_state(dense_opt_state: Any, moe_opt_state: Any, dense_config, moe_config) -> Any:
  """Upcycles an optimizer state: moments of the experts copy the MLP's, router moments are zero.

  Every sub-tree of `moe_opt_state` (a freshly initialised state of the same optimizer for the
  MoE params, used as the template) that is shaped like the params (Adam's mu and nu) is built
  from the matching sub-tree of `dense_opt_state` without noise; every other leaf (step counts)
  is copied from the dense state, so the schedule and Adam's bias correction continue where the
  dense run stopped.
  """
  check_compatible(dense_config, moe_config)
  moe_model = _model_config(moe_config)
  param_keys = set(abstract_params(moe_model))

  def expert_fn(name, weight, leaf, layer):
    return _checked(jnp.broadcast_to(jnp.asarray(weight, leaf.dtype), leaf.shape), leaf,
                    f"moment blocks/{layer}/ffn/experts/{name}")

  def router_fn(leaf, layer):
    del layer
    return jnp.zeros(leaf.shape, leaf.dtype)

  def walk(dense, template):
    if isinstance(template, dict) and set(template) == param_keys:
      return _map_tree(dense, template, set(moe_layer_indices(moe_model)), expert_fn,
                       router_fn)
    if isinstance(template, dict):
      return {key: walk(dense[key], sub) for key, sub in template.items()}
    if isinstance(template, tuple):
      children = [walk(d, t) for d, t in zip(dense, template)]
      return type(template)(*children) if hasattr(template, "_fields") else tuple(children)
    if isinstance(template, list):
      return [walk(d, t) for d, t in zip(dense, template)]
    if template is None or not hasattr(template, "shape"):
      return template
    return _copy(dense, template, "optimizer state")

  return walk(dense_opt_state, moe_opt_state)
