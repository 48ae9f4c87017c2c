"""Hugging Face import / export (`moe_jax.hf`) against transformers on tiny random checkpoints.

Every family's checkpoint is built once per session (`hf_testing.build_tiny`), and its reference
logits come from transformers (eager attention and experts, float32). Our logits must match them to
1e-4 at a logit scale of ~0.6-0.9, from the plain forward pass, from KV-cached decoding, after an
export that transformers loads back, and on a data x expert mesh.
"""
import os
import re
import shutil

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

import hf_testing
from hf_testing import FAMILIES, MOE_FAMILIES
from moe_jax import hf, sharding

TOKENS = hf_testing.make_tokens(seed=0)  # [2, 13] int32
TOL = 1e-4
PREFILL = 7

# Config fields an export must carry over (compared as transformers reads them back).
ROUND_TRIP_FIELDS = (
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "hidden_act", "rms_norm_eps", "max_position_embeddings",
    "tie_word_embeddings", "rope_parameters", "num_experts", "num_local_experts",
    "num_experts_per_tok", "moe_intermediate_size", "shared_expert_intermediate_size",
    "norm_topk_prob", "decoder_sparse_step", "mlp_only_layers", "clip_qkv", "qkv_bias",
    "attention_bias", "sliding_window")


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory):
  """family -> (checkpoint directory, transformers' reference logits on TOKENS), built lazily once."""
  root = tmp_path_factory.mktemp("hf_checkpoints")
  cache = {}

  def get(family: str):
    if family not in cache:
      directory = hf_testing.build_tiny(family, str(root / family))
      cache[family] = directory, hf_testing.reference_logits(directory, TOKENS)
    return cache[family]

  return get


@pytest.fixture(scope="session")
def imported(checkpoints):
  """family -> (model, config) from `hf.from_pretrained` of its checkpoint, loaded lazily once."""
  cache = {}

  def get(family: str):
    if family not in cache:
      directory, _ = checkpoints(family)
      cache[family] = hf.from_pretrained(directory, dtype="float32")
    return cache[family]

  return get


def max_diff(actual, expected) -> float:
  return float(np.max(np.abs(np.asarray(actual, np.float64) - np.asarray(expected, np.float64))))


def forward(model, tokens=TOKENS) -> np.ndarray:
  logits, _ = model(jnp.asarray(tokens, jnp.int32))
  return np.asarray(logits)


# --------------------------------------------------------------------------------- import parity


@pytest.mark.parametrize("family", FAMILIES)
def test_logits_match_transformers(family, checkpoints, imported):
  _, reference = checkpoints(family)
  model, config = imported(family)
  assert config.model.vocab_size == hf_testing.VOCAB
  # The comparison only means something if the logits are O(1).
  assert reference.std() > 0.3, f"reference logits too small to compare: std {reference.std()}"
  logits = forward(model)
  assert logits.shape == reference.shape
  assert logits.dtype == np.float32
  assert max_diff(logits, reference) <= TOL


@pytest.mark.parametrize("family", FAMILIES)
def test_cached_decode_matches_forward(family, imported):
  """Prefill of PREFILL tokens at index 0, then one token per step, equals the full forward."""
  model, _ = imported(family)
  full = forward(model)
  tokens = jnp.asarray(TOKENS, jnp.int32)
  batch, seq = tokens.shape
  cache = model.init_cache(batch, seq)
  logits, cache = model.decode(tokens[:, :PREFILL], cache, 0)
  steps = [np.asarray(logits)]
  for t in range(PREFILL, seq):
    logits, cache = model.decode(tokens[:, t:t + 1], cache, t)
    steps.append(np.asarray(logits))
  cached = np.concatenate(steps, axis=1)
  assert cached.shape == full.shape
  assert max_diff(cached, full) <= TOL


def test_sharded_checkpoint_files(checkpoints, tmp_path):
  """A checkpoint split into shards with a model.safetensors.index.json loads like a single file."""
  family = "qwen2_moe"
  directory, reference = checkpoints(family)
  sharded = str(tmp_path / "sharded")
  hf_testing.load_reference_model(directory).save_pretrained(sharded, max_shard_size="40KB")
  assert os.path.exists(os.path.join(sharded, "model.safetensors.index.json"))
  assert len(hf_testing.checkpoint_files(sharded)) > 1
  model, _ = hf.from_pretrained(sharded, dtype="float32")
  assert max_diff(forward(model), reference) <= TOL


def torch_bf16_model(directory):
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  model, info = transformers.AutoModelForCausalLM.from_pretrained(
      directory, output_loading_info=True, attn_implementation="eager",
      experts_implementation="eager", dtype=torch.bfloat16)
  hf_testing.assert_clean_loading_info(info, directory)
  return model.eval()


def test_bfloat16_checkpoint(checkpoints, tmp_path):
  """A bf16 checkpoint loads as bf16 by default and, with dtype="float32", gives the logits that
  transformers computes in float32 from the same (bf16-rounded) weights; it exports as bf16."""
  import torch  # pylint: disable=g-import-not-at-top
  directory, _ = checkpoints("mixtral")
  bf16_dir = str(tmp_path / "bf16")
  hf_testing.load_reference_model(directory).to(torch.bfloat16).save_pretrained(bf16_dir)
  assert hf_testing.read_config(bf16_dir)["dtype"] == "bfloat16"
  reference = hf_testing.reference_logits(bf16_dir, TOKENS)  # loaded as float32
  model, config = hf.from_pretrained(bf16_dir, dtype="float32")
  assert max_diff(forward(model), reference) <= TOL
  native, native_config = hf.from_pretrained(bf16_dir)
  assert native_config.model.param_dtype == "bfloat16"
  leaves = jax.tree.leaves(nnx.state(native, nnx.Param))
  assert {leaf.dtype for leaf in leaves} == {jnp.dtype(jnp.bfloat16)}
  # bf16 compute against transformers' own bf16 compute (relative norm; measured 1.2e-2 here,
  # while either bf16 result is 8e-2 from the float32 logits on this tiny random model).
  reference_bf16 = hf_testing.torch_logits(torch_bf16_model(bf16_dir), TOKENS)
  ours = forward(native)
  assert np.linalg.norm(ours - reference_bf16) / np.linalg.norm(reference_bf16) < 3e-2
  out = str(tmp_path / "bf16_export")
  hf.save_pretrained(native, native_config, out)
  with safe_open(os.path.join(out, "model.safetensors"), "pt") as f:
    assert all(f.get_slice(name).get_dtype() == "BF16" for name in f.keys())


# ------------------------------------------------------------------------------------ export


@pytest.mark.parametrize("family", FAMILIES)
def test_export_loads_in_transformers(family, checkpoints, imported, tmp_path):
  directory, reference = checkpoints(family)
  model, config = imported(family)
  out = str(tmp_path / "export")
  hf.save_pretrained(model, config, out)

  original, exported = hf_testing.read_config(directory), hf_testing.read_config(out)
  assert exported["model_type"] == original["model_type"]
  assert exported["architectures"] == original["architectures"]
  # The family's hub layout: the same tensor names and shapes as transformers writes.
  assert hf_testing.checkpoint_shapes(out) == hf_testing.checkpoint_shapes(directory)

  theirs = hf_testing.load_reference_model(out)  # asserts no missing / unexpected / mismatched
  ours = hf_testing.transformers_config(directory)
  for field in ROUND_TRIP_FIELDS:
    if hasattr(ours, field):
      assert getattr(theirs.config, field) == getattr(ours, field), field
  head_dim = lambda c: getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
  assert head_dim(theirs.config) == head_dim(ours)
  assert max_diff(hf_testing.torch_logits(theirs, TOKENS), reference) <= TOL


# ---------------------------------------------------------------------------------- sharded load


def expert_sharded(model) -> bool:
  """Whether some parameter of `model` is sharded over the "expert" mesh axis."""
  for leaf in jax.tree.leaves(nnx.state(model, nnx.Param)):
    for entry in getattr(getattr(leaf, "sharding", None), "spec", ()) or ():
      names = entry if isinstance(entry, tuple) else (entry,)
      if "expert" in names:
        return True
  return False


@pytest.mark.parametrize("family", FAMILIES)
def test_sharded_load(family, checkpoints):
  """Loaded onto data=2 x expert=4 (experts over "expert"), the jitted forward gives the
  single-device logits. (Jitted: eager dispatch on 8 devices costs ~45 s a model on 2 cores.)"""
  directory, reference = checkpoints(family)
  mesh = sharding.make_mesh(ml_collections.ConfigDict(dict(data=2, fsdp=1, expert=4, tensor=1)))
  model, _ = hf.from_pretrained(directory, dtype="float32", mesh=mesh)
  if family in MOE_FAMILIES:
    assert expert_sharded(model), "no parameter is sharded over the 'expert' mesh axis"
  for leaf in jax.tree.leaves(nnx.state(model, nnx.Param)):
    assert leaf.sharding.mesh.shape == mesh.shape
  with jax.set_mesh(mesh):
    logits = nnx.jit(lambda m, x: m(x)[0])(model, jnp.asarray(TOKENS, jnp.int32))
  assert max_diff(logits, reference) <= TOL


# ------------------------------------------------------------------------------------ errors


def test_error_types():
  assert issubclass(hf.UnsupportedConfigError, ValueError)
  assert issubclass(hf.CheckpointMismatchError, ValueError)


@pytest.fixture
def mixtral_copy(checkpoints, tmp_path):
  """A writable copy of the Mixtral checkpoint directory."""
  directory, _ = checkpoints("mixtral")
  copy = str(tmp_path / "mixtral")
  shutil.copytree(directory, copy)
  return copy


def rewrite_tensors(directory: str, edit) -> None:
  """Applies `edit(tensors: dict[name, np.ndarray])` in place to the single-file checkpoint."""
  path = os.path.join(directory, "model.safetensors")
  tensors = load_file(path)
  edit(tensors)
  save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, path,
            metadata={"format": "pt"})


def edit_config(directory: str, **fields) -> None:
  config = hf_testing.read_config(directory)
  config.update(fields)
  hf_testing.write_config(directory, config)


def test_missing_tensor(mixtral_copy):
  name = "model.layers.1.block_sparse_moe.experts.5.w3.weight"
  rewrite_tensors(mixtral_copy, lambda tensors: tensors.pop(name))
  with pytest.raises(hf.CheckpointMismatchError, match=re.escape(name)):
    hf.from_pretrained(mixtral_copy)


def test_wrong_shape_tensor(mixtral_copy):
  name = "model.layers.0.self_attn.k_proj.weight"

  def edit(tensors):
    tensors[name] = tensors[name][:, :-1]

  rewrite_tensors(mixtral_copy, edit)
  with pytest.raises(hf.CheckpointMismatchError, match=re.escape(name)):
    hf.from_pretrained(mixtral_copy)


def test_unexpected_tensor(mixtral_copy):
  # A ninth expert where config.json says eight.
  name = "model.layers.0.block_sparse_moe.experts.8.w1.weight"

  def edit(tensors):
    tensors[name] = tensors["model.layers.0.block_sparse_moe.experts.0.w1.weight"].copy()

  rewrite_tensors(mixtral_copy, edit)
  with pytest.raises(hf.CheckpointMismatchError, match=re.escape(name)):
    hf.from_pretrained(mixtral_copy)


def test_unknown_model_type(mixtral_copy):
  edit_config(mixtral_copy, model_type="not_a_model")
  with pytest.raises(hf.UnsupportedConfigError, match=re.escape("not_a_model")):
    hf.from_pretrained(mixtral_copy)


def test_unsupported_activation(mixtral_copy):
  edit_config(mixtral_copy, hidden_act="gelu")
  with pytest.raises(hf.UnsupportedConfigError, match=re.escape("hidden_act")):
    hf.from_pretrained(mixtral_copy)
