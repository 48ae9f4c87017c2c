"""The user workflows of the Hugging Face importer, end to end against transformers.

1. A hub checkpoint with a tokenizer -> `convert.from_hf` -> a workdir that `sample` reads: greedy
   continuations equal transformers' `generate` token for token.
2. That workdir -> `convert.to_hf` -> a checkpoint transformers loads cleanly, with the original's
   logits and the tokenizer.
3. A model built here (configs/default.py:tiny made expressible) -> `hf.save_pretrained` as
   Mixtral and as Qwen3-MoE -> transformers' logits equal ours.
4. Models a family cannot express raise `UnsupportedConfigError` naming the field, before writing.
5. The `python -m moe_jax.convert` CLI rejects a call without --from_hf / --to_hf.
"""
import json
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

import hf_testing
from configs import default
from moe_jax import convert, hf, sample, train
from moe_jax.models.transformer import Transformer

TOL = 1e-4
MAX_NEW = 8
PROMPT = "the lazy fox jumps over"
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CORPUS = """\
the quick brown fox jumps over the lazy dog
a stitch in time saves nine
all that glitters is not gold
the early bird catches the worm
actions speak louder than words
an apple a day keeps the doctor away
better late than never
birds of a feather flock together
do not count your chickens before they hatch
every cloud has a silver lining
fortune favours the bold
good things come to those who wait
honesty is the best policy
if it is not broken do not fix it
knowledge is power
laughter is the best medicine
look before you leap
necessity is the mother of invention
no pain no gain
practice makes perfect
rome was not built in a day
the pen is mightier than the sword
there is no place like home
time flies when you are having fun
two heads are better than one
when in rome do as the romans do
where there is smoke there is fire
you can not judge a book by its cover
the fox and the dog sleep in the sun
over the hills and far away the fox runs
""".splitlines()


def train_tokenizer() -> Tokenizer:
  """A byte-level BPE tokenizer of at most hf_testing.VOCAB ids, trained offline on CORPUS."""
  tok = Tokenizer(models.BPE(unk_token="<unk>"))
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  tok.train_from_iterator(CORPUS, trainers.BpeTrainer(
      vocab_size=hf_testing.VOCAB, special_tokens=["<unk>", "<s>", "</s>"]))
  assert tok.get_vocab_size() <= hf_testing.VOCAB
  return tok


def max_diff(actual, expected) -> float:
  return float(np.max(np.abs(np.asarray(actual, np.float64) - np.asarray(expected, np.float64))))


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
  """(hub checkpoint dir with tokenizer.json, workdir from convert.from_hf, tokenizer, eos id)."""
  root = tmp_path_factory.mktemp("hf_workflows")
  ckpt = hf_testing.build_tiny("mixtral", str(root / "mixtral"))
  tok = train_tokenizer()
  tok.save(os.path.join(ckpt, "tokenizer.json"))
  eos = tok.token_to_id("</s>")
  assert eos is not None
  hub = hf_testing.read_config(ckpt)
  hub["eos_token_id"] = eos
  hf_testing.write_config(ckpt, hub)
  workdir = convert.from_hf(ckpt, str(root / "workdir"))
  return ckpt, workdir, tok, eos


def hf_greedy(model, prompt_ids, eos) -> list[int]:
  """transformers' greedy continuation of `prompt_ids`, cut after the first eos (when given)."""
  with torch.no_grad():
    out = model.generate(torch.tensor([prompt_ids]), do_sample=False, max_new_tokens=MAX_NEW,
                         eos_token_id=eos, pad_token_id=eos if eos is not None else 0,
                         attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long))
  new = out[0, len(prompt_ids):].tolist()
  return new[:new.index(eos) + 1] if eos is not None and eos in new else new


# ------------------------------------------------------------------ 1. tokenizer, convert, sample

def test_convert_and_sample_match_transformers_generate(converted):
  ckpt, workdir, tok, eos = converted
  assert os.path.isfile(os.path.join(workdir, "config.json"))
  assert os.path.isfile(os.path.join(workdir, "tokenizer", "tokenizer.json"))
  with open(os.path.join(workdir, "config.json")) as f:
    assert json.load(f)["hf"]["model_type"] == "mixtral"

  prompt_ids = tok.encode(PROMPT).ids
  assert len(prompt_ids) >= 3 and max(prompt_ids) < hf_testing.VOCAB
  reference = hf_testing.load_reference_model(ckpt)
  expected = hf_greedy(reference, prompt_ids, eos)
  assert 1 <= len(expected) <= MAX_NEW

  loaded = sample.load_params(workdir)
  ids = sample.generate(loaded, prompt_ids, greedy=True, max_new_tokens=MAX_NEW, eos_id=eos)
  assert ids == expected

  # Without an eos transformers runs the full length; an eos that greedy decoding does reach
  # stops both at the same place.
  full = hf_greedy(reference, prompt_ids, None)
  assert len(full) == MAX_NEW and full[:len(expected)] == expected
  stop = full[2]
  expected_stop = hf_greedy(reference, prompt_ids, stop)
  assert expected_stop == full[:full.index(stop) + 1]
  assert sample.generate(loaded, prompt_ids, greedy=True, max_new_tokens=MAX_NEW,
                         eos_id=stop) == expected_stop

  # sample_text: the workdir's tokenizer and the hub eos; prompt + decoded continuation.
  text = sample.sample_text(workdir, PROMPT, greedy=True, max_new_tokens=MAX_NEW)
  continuation = [i for i in expected if i != eos]
  assert text == PROMPT + tok.decode(continuation)
  assert text.startswith(PROMPT) and len(text) > len(PROMPT)


# --------------------------------------------------------------------------- 2. round trip

def test_round_trip_through_workdir(converted, tmp_path):
  ckpt, workdir, _, eos = converted
  out = str(tmp_path / "exported")
  files = convert.to_hf(workdir, out)
  assert files and all(os.path.isfile(os.path.join(out, f)) for f in files)
  assert os.path.isfile(os.path.join(out, "tokenizer.json"))
  assert hf_testing.read_config(out)["eos_token_id"] == eos
  assert hf_testing.checkpoint_shapes(out) == hf_testing.checkpoint_shapes(ckpt)

  tokens = hf_testing.make_tokens(seed=3)
  reference = hf_testing.reference_logits(ckpt, tokens)
  exported = hf_testing.load_reference_model(out)  # asserts clean loading info
  assert reference.std() > 0.3
  assert max_diff(hf_testing.torch_logits(exported, tokens), reference) <= TOL


# ------------------------------------------------------------------ 3. a model trained here

def _set(config, dotted, value):
  node = config
  *parents, leaf = dotted.split(".")
  for name in parents:
    node = node[name]
  node[leaf] = value


def expressible_config(**model_overrides):
  """configs/default.py:tiny changed so that Mixtral (and, with qk_norm="head", Qwen3-MoE) can
  express it: every layer MoE, untied embeddings; GQA and an explicit head_dim != D / H."""
  config = default.get_config("tiny")
  m = config.model
  m.moe_every = 1
  m.tie_embeddings = False
  m.scale_tied_logits = False  # see test_irrelevant_fields_do_not_block_export
  m.activation = "swiglu"
  m.num_heads, m.num_kv_heads, m.head_dim = 4, 2, 12  # 4 * 12 = 48 != d_model 32
  m.mlp_dim = m.moe.expert_hidden_dim  # see test_irrelevant_fields_do_not_block_export
  for name, value in model_overrides.items():
    _set(m, name, value)
  return config


def build_trained_like(config, seed=0):
  """Our Transformer of `config` from train.build_model, RMSNorm scales moved off 1 (as training
  would), so that a misplaced norm changes the logits."""
  mesh = sample.single_device_mesh()
  graphdef, params, _ = train.build_model(config, mesh)
  rng = np.random.default_rng(seed)

  def perturb(path, leaf):
    if getattr(path[-1], "key", None) == "scale":
      return jnp.asarray(1.0 + 0.3 * rng.normal(size=leaf.shape), leaf.dtype)
    return leaf

  params = jax.tree_util.tree_map_with_path(perturb, params)
  return nnx.merge(graphdef, params)


@pytest.mark.parametrize("model_type,overrides", [
    ("mixtral", {}),
    ("qwen3_moe", {"qk_norm": "head", "num_kv_heads": 4}),
])
def test_model_trained_here_exports(model_type, overrides, tmp_path):
  config = expressible_config(**overrides)
  model = build_trained_like(config)
  out = str(tmp_path / model_type)
  hf.save_pretrained(model, config, out, model_type=model_type)
  hub = hf_testing.read_config(out)
  assert hub["model_type"] == model_type
  assert hub["num_key_value_heads"] == config.model.num_kv_heads
  assert hub["head_dim"] == config.model.head_dim

  theirs, info = transformers.AutoModelForCausalLM.from_pretrained(
      out, output_loading_info=True, attn_implementation="eager",
      experts_implementation="eager", dtype=torch.float32)
  hf_testing.assert_clean_loading_info(info, out)
  tokens = np.random.default_rng(5).integers(0, config.model.vocab_size, (2, 11)).astype(np.int32)
  ours = np.asarray(model(jnp.asarray(tokens))[0])
  reference = hf_testing.torch_logits(theirs, tokens)
  assert ours.shape == reference.shape == (2, 11, config.model.vocab_size)
  assert reference.std() > 0.1
  assert max_diff(ours, reference) <= TOL


# ------------------------------------------------------------- 4. unrepresentable exports

def abstract_model(config):
  """Our Transformer of `config`, shapes only (export must fail before reading any parameter)."""
  return nnx.eval_shape(lambda: Transformer(config.model, rngs=nnx.Rngs(params=0)))


@pytest.mark.parametrize("what,config,model_type,field", [
    ("default tiny (tied, scaled logits)", lambda: default.get_config("tiny"), "mixtral",
     "scale_tied_logits"),
    ("shared expert", lambda: expressible_config(**{"moe.num_shared_experts": 1}), "mixtral",
     "num_shared_experts"),
    ("no model_type", expressible_config, None, "model_type"),
], ids=["scale_tied_logits", "num_shared_experts", "no-model_type"])
def test_unrepresentable_export_raises(what, config, model_type, field, tmp_path):
  del what
  config = config()
  out = str(tmp_path / "out")
  with pytest.raises(hf.UnsupportedConfigError, match=re.escape(field)):
    hf.save_pretrained(abstract_model(config), config, out, model_type=model_type)
  assert not os.path.exists(out) or not os.listdir(out)  # nothing half-written


@pytest.mark.parametrize("model_type", ["mixtral", "qwen3_moe"])
@pytest.mark.parametrize("field,value", [
    ("num_kv_heads", 0),  # the default: 0 means num_heads (MHA)
    ("scale_tied_logits", True),  # the default; only read when the embeddings are tied
    ("mlp_dim", 64),  # the tiny default; no dense layer reads it when every layer is MoE
])
def test_irrelevant_fields_do_not_block_export(model_type, field, value):
  """A field at a value that changes nothing in this model must not make the export fail."""
  config = expressible_config(qk_norm="head" if model_type == "qwen3_moe" else "none")
  _set(config.model, field, value)
  hub = hf.hub_config(config, model_type)
  if field == "num_kv_heads":
    assert hub["num_key_value_heads"] == config.model.num_heads


# -------------------------------------------------------------------------------- 5. the CLI

def test_cli_without_direction_is_a_usage_error(tmp_path):
  env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3")
  result = subprocess.run(
      [sys.executable, "-m", "moe_jax.convert", f"--workdir={tmp_path / 'workdir'}"],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert result.returncode != 0
  message = result.stdout + result.stderr
  assert "--from_hf" in message and "--to_hf" in message
  assert "exactly one" in message
  assert not os.path.exists(tmp_path / "workdir")
