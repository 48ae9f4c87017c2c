"""`from_pretrained` and `save_pretrained`: Hugging Face checkpoints into our Transformer and back.

Import streams: each parameter is made from its hub tensors (memory-mapped, see
`safetensors_io`), converted to the parameter dtype and placed on the mesh with the project's
logical sharding rules before the next one is read, so the host holds the placed parameters plus
about one parameter's worth of temporaries. Export gathers one parameter at a time and writes
safetensors shards of bounded size.
"""
from __future__ import annotations

import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from flax import nnx

from moe_jax import sharding
from moe_jax.router_state import RouterState
from moe_jax.hf import (common, dbrx, deepseek_v2, deepseek_v3, gpt_oss, granitemoe, llama, mixtral, olmoe, qwen_moe,
                        safetensors_io, tensors)
from moe_jax.hf.errors import CheckpointMismatchError, UnsupportedConfigError
from moe_jax.models.transformer import Transformer, moe_layer_indices, sliding_window_of

FAMILIES: dict[str, common.Family] = {
    f.model_type: f for f in (mixtral.FAMILY, qwen_moe.QWEN3_MOE, olmoe.FAMILY, qwen_moe.QWEN2_MOE,
                              deepseek_v3.FAMILY, gpt_oss.FAMILY, llama.LLAMA, llama.QWEN3,
                              deepseek_v2.FAMILY, granitemoe.FAMILY, dbrx.FAMILY)}
DTYPES = ("float32", "bfloat16", "float16")
# Hub tensors transformers itself ignores on load.
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def family_of(model_type: str | None) -> common.Family:
  """The `Family` of a hub `model_type`; UnsupportedConfigError for any other."""
  if model_type not in FAMILIES:
    raise UnsupportedConfigError(f"model_type={model_type!r} is not supported; supported: "
                                 f"{', '.join(FAMILIES)}.")
  return FAMILIES[model_type]


def read_hub_config(path: str) -> dict:
  """PATH/config.json as a dict."""
  file = os.path.join(path, "config.json")
  if not os.path.isfile(file):
    raise FileNotFoundError(f"{file} does not exist: a Hugging Face checkpoint directory holds "
                            "config.json and model*.safetensors.")
  with open(file) as f:
    return json.load(f)


def config_from_hub(hub: dict, *, dtype: str | None = None) -> ml_collections.ConfigDict:
  """Our experiment config (configs/default.py with `model` from the hub config, plus `hf`).

  `dtype`: the parameter and compute dtype; default the checkpoint's (`dtype` / `torch_dtype`),
  else float32.
  """
  family = family_of(hub.get("model_type"))
  config = common.default_experiment_config()
  model = config.model
  original, hub = hub, family.flatten(hub) if family.flatten else hub
  common.read_common(hub, model, family)
  family.read(hub, model)
  dtype = dtype or hub.get("dtype") or hub.get("torch_dtype") or "float32"
  if dtype not in DTYPES:
    raise UnsupportedConfigError(f"dtype={dtype!r} is not supported; supported: {DTYPES}.")
  model.dtype = model.param_dtype = dtype
  config.hf = ml_collections.ConfigDict({"model_type": family.model_type,
                                         "config_json": json.dumps(original, sort_keys=True)})
  return config


def _abstract_model(config):
  create = lambda: Transformer(config.model, rngs=nnx.Rngs(params=0))
  return create, nnx.eval_shape(create)


def _set(tree: dict, path: tuple, value) -> None:
  for key in path[:-1]:
    tree = tree[key]
  tree[path[-1]] = value


def _get(tree: dict, path: tuple):
  for key in path:
    tree = tree[key]
  return tree


def model_specs(config) -> list[tensors.TensorSpec]:
  family = family_of(config.hf.model_type)
  return tensors.model_specs(config.model, moe_layer_indices(config.model), family.names)


def load_state(path: str, config, mesh: jax.sharding.Mesh | None = None) -> dict:
  """{"params", "router_state"} of `config`'s model from the checkpoint in `path` (pure dicts,
  placed on `mesh`: parameters by the logical rules, router state replicated).

  Every tensor name and shape is checked before anything is converted.

  Raises:
    CheckpointMismatchError: a tensor is missing, unexpected, or of the wrong shape.
  """
  _, abstract = _abstract_model(config)
  abstract = {"params": nnx.state(abstract, nnx.Param),
              "router_state": nnx.state(abstract, RouterState)}
  targets = {name: nnx.to_pure_dict(state) for name, state in abstract.items()}
  shardings = None
  if mesh is not None:
    shardings = {"params": sharding.state_shardings(mesh, abstract["params"]),
                 "router_state": jax.tree.map(lambda _: sharding.replicated(mesh),
                                              targets["router_state"])}
  dtype = jnp.dtype(config.model.param_dtype)
  reader = safetensors_io.CheckpointReader(path)
  specs = model_specs(config)
  used = set()
  for spec in specs:
    for name, shape in zip(spec.sources, spec.hub_shapes):
      if reader.shape(name) != shape:  # reader.shape raises for a missing tensor
        raise CheckpointMismatchError(f"tensor {name!r} has shape {reader.shape(name)}; the "
                                      f"config expects {shape}.")
    used.update(spec.sources)
  family = family_of(config.hf.model_type)
  unexpected = [n for n in reader.names if n not in used and not n.endswith(IGNORED_SUFFIXES)
                and not family.ignored(n, config.model.num_layers)]
  if unexpected:
    raise CheckpointMismatchError(
        f"{len(unexpected)} tensor(s) in {path} do not belong to the configured model, e.g. "
        f"{unexpected[:5]}.")
  loaded = jax.tree.map(lambda _: None, targets)
  for spec in specs:
    values = spec.ours([reader.read(n) for n in spec.sources])
    for path, value in zip(spec.paths, values):
      target = _get(targets[spec.collection], path)
      value = np.asarray(value).astype(dtype if spec.collection == "params" else target.dtype)
      assert value.shape == target.shape, (path, value.shape, target.shape)
      where = None if shardings is None else _get(shardings[spec.collection], path)
      _set(loaded[spec.collection], path,
           jax.device_put(value, where) if where is not None else jnp.asarray(value))
    del values, value
  return loaded


def load_params(path: str, config, mesh: jax.sharding.Mesh | None = None) -> dict:
  """The parameters alone (pure dict) of `load_state`."""
  return load_state(path, config, mesh)["params"]


def from_pretrained(path: str, *, dtype: str | None = None,
                    mesh: jax.sharding.Mesh | None = None) -> tuple[Transformer, Any]:
  """Loads a Hugging Face checkpoint directory as (our Transformer, its experiment config).

  Args:
    path: a directory with config.json and model.safetensors (or shards with the index).
    dtype: parameter and compute dtype; default the checkpoint's.
    mesh: place parameters on this mesh (experts over `expert`, etc.); None = the default device.
      Call the model under `jax.set_mesh(mesh)`.

  Raises:
    UnsupportedConfigError: unknown model_type or an unsupported config value (named).
    CheckpointMismatchError: a missing, unexpected or wrongly shaped tensor (named).
  """
  config = config_from_hub(read_hub_config(path), dtype=dtype)
  loaded = load_state(path, config, mesh)
  params = loaded["params"]
  _, abstract = _abstract_model(config)
  graphdef, param_state, router_state, rest = nnx.split(abstract, nnx.Param, RouterState, ...)
  nnx.replace_by_pure_dict(param_state, params)
  nnx.replace_by_pure_dict(router_state, loaded["router_state"])
  if jax.tree.leaves(rest):
    raise NotImplementedError(f"{config.hf.model_type}: the model holds variables that are "
                              "neither parameters nor router state.")
  model = nnx.merge(graphdef, param_state, router_state, rest)
  logging.info("Loaded %s (%s) from %s: %d parameters.", config.hf.model_type,
               config.model.param_dtype, path,
               sum(x.size for x in jax.tree.leaves(params)))
  return model, config


def hub_config(config, model_type: str | None = None) -> dict:
  """The hub config.json of our `config` as family `model_type` (default: where it came from).

  Raises:
    UnsupportedConfigError: the family cannot express a field of our model (named).
  """
  imported = config.get("hf")
  model_type = model_type or (imported.model_type if imported else None)
  if model_type is None:
    raise UnsupportedConfigError("model_type is needed to export a model trained here (e.g. "
                                 "model_type='mixtral' or 'qwen3_moe').")
  family = family_of(model_type)
  hub = (json.loads(imported.config_json)
         if imported and imported.model_type == model_type else {})
  for legacy in ("rope_theta", "rope_scaling", "torch_dtype"):
    hub.pop(legacy, None)
  common.write_common(config.model, hub, family)
  family.write(config.model, hub)
  check_representable(config, hub)
  return hub


def check_representable(config, hub: dict) -> None:
  """Raises UnsupportedConfigError naming every math field the hub config does not reproduce."""
  again = config_from_hub(hub, dtype=config.model.param_dtype).model
  ours, problems = config.model, []
  for name in common.MATH_FIELDS:
    if _effective(ours, name) != _effective(again, name):
      problems.append(f"model.{name}={ours.get(name)!r} (the export would give "
                      f"{again.get(name)!r})")
  has_bias = lambda m: bool(m.moe.get("selection_bias") or m.moe.get("bias_update_rate", 0) > 0)
  if moe_layer_indices(ours) and has_bias(ours) != has_bias(again):
    problems.append(f"a loss-free selection bias: {has_bias(ours)} (the export would give "
                    f"{has_bias(again)})")
  if moe_layer_indices(ours):
    for name in common.MOE_MATH_FIELDS:
      if _norm(ours.moe.get(name)) != _norm(again.moe.get(name)):
        problems.append(f"model.moe.{name}={ours.moe.get(name)!r} (the export would give "
                        f"{again.moe.get(name)!r})")
  windows = lambda m: [sliding_window_of(m, i) for i in range(m.num_layers)]
  if windows(ours) != windows(again):
    problems.append(f"per-layer sliding windows {windows(ours)} (the export would give "
                    f"{windows(again)})")
  if moe_layer_indices(ours) != moe_layer_indices(again):
    problems.append(f"MoE layers {moe_layer_indices(ours)} (the export would give "
                    f"{moe_layer_indices(again)})")
  if (ours.get("rope_scaling") or {}) != (again.get("rope_scaling") or {}):
    problems.append(f"model.rope_scaling={ours.get('rope_scaling')}")
  if problems:
    raise UnsupportedConfigError(f"{hub['model_type']!r} cannot express this model: "
                                 + "; ".join(problems) + ".")
  if ours.moe.get("capacity_factor") is not None and moe_layer_indices(ours):
    logging.warning("model.moe.capacity_factor=%s: the exported model routes dropless, like "
                    "every Hugging Face MoE at inference.", ours.moe.capacity_factor)


def _effective(model, name: str):
  """A config.model field's value as it acts on the model (None where it has no effect)."""
  value = model.get(name)
  if name == "num_kv_heads":
    return value or model.num_heads
  if name == "scale_tied_logits" and not model.tie_embeddings:
    return None
  if name == "mlp_dim" and len(moe_layer_indices(model)) == model.num_layers:
    return None  # no dense layer uses it
  if name == "mla" and model.get("attention", "mha") != "mla":
    return None
  if name in ("swiglu_alpha", "swiglu_limit") and model.get("activation") != "swiglu_clamped":
    return None
  if name == "head_dim" and model.get("attention", "mha") == "mla":
    return None  # MLA's head sizes are model.mla's
  if name == "norm":
    return value or "rms"
  if name == "attention_scale" and model.get("attention", "mha") != "mla":
    return float(value or model.head_dim ** -0.5)
  if name in ("embedding_multiplier", "residual_multiplier", "logit_divisor"):
    return 1.0 if value is None else float(value)
  return _norm(value)


def _norm(value):
  return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else value


def save_pretrained(model: Transformer, config, out_dir: str, *, model_type: str | None = None,
                    max_shard_bytes: int = 5 * 2 ** 30) -> list[str]:
  """Writes `model` as a Hugging Face checkpoint: config.json + safetensors in the hub layout.

  Args:
    model: our Transformer (e.g. from `from_pretrained`, or trained here).
    config: its experiment config (`config.model`; `config.hf` when imported).
    out_dir: the directory to write.
    model_type: the family to write as; default the one it was imported from.
    max_shard_bytes: largest safetensors file; more files get `model.safetensors.index.json`.

  Returns:
    The safetensors file names written.
  """
  hub = hub_config(config, model_type)
  export_config = ml_collections.ConfigDict(config)
  export_config.hf = ml_collections.ConfigDict({"model_type": hub["model_type"],
                                                "config_json": json.dumps(hub)})
  state = {"params": nnx.to_pure_dict(nnx.state(model, nnx.Param)),
           "router_state": nnx.to_pure_dict(nnx.state(model, RouterState))}

  def stream():
    for spec in model_specs(export_config):
      values = [np.asarray(jax.device_get(_get(state[spec.collection], path)))
                for path in spec.paths]
      for name, tensor in zip(spec.sources, spec.hub(values)):
        yield name, np.ascontiguousarray(tensor)

  files = safetensors_io.write_checkpoint(stream(), out_dir, max_shard_bytes=max_shard_bytes)
  with open(os.path.join(out_dir, "config.json"), "w") as f:
    json.dump(hub, f, indent=2, sort_keys=True)
  return files
