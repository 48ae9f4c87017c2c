"""Workflows on imported models: fine-tuning (configs/finetune.py), tokenised text data, sparse
upcycling from a dense Hugging Face checkpoint, and routing analysis of a converted workdir.

Everything runs offline on tiny random checkpoints (`hf_testing.build_tiny`) and a BPE tokenizer of
under 97 ids trained here on the test's own text files.
"""
import importlib.util
import json
import os
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
import tokenizers
from flax import nnx
from tokenizers import decoders, models, pre_tokenizers, trainers

import hf_testing
from configs import finetune
from moe_jax import convert, data, hf, sample, sharding, train
from moe_jax.validation import ConfigError, validate_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EOS = "<|endoftext|>"


def _import_script(name):
  spec = importlib.util.spec_from_file_location(name, os.path.join(REPO, "experiments",
                                                                   f"{name}.py"))
  module = importlib.util.module_from_spec(spec)
  sys.modules[spec.name] = module  # dataclasses look their module up here
  spec.loader.exec_module(module)
  return module


def _texts():
  words = ("the quick brown fox jumps over a lazy dog while seven wizards quietly hex "
           "jumbled boxes of frozen pizza").split()
  rng = np.random.default_rng(0)
  return {f"doc{i}.txt": "\n".join(" ".join(rng.choice(words, 12)) for _ in range(30 + 5 * i))
          + "\nnaïve café ✓\n" for i in range(8)}


def _write_tokenizer(directory, texts, vocab_size=80):
  """A character-level BPE tokenizer of `vocab_size` ids (<unk> 0, EOS 1) with its EOS named in
  tokenizer_config.json, as a hub checkpoint ships it."""
  tok = tokenizers.Tokenizer(models.BPE(unk_token="<unk>"))
  tok.pre_tokenizer = pre_tokenizers.Whitespace()
  tok.decoder = decoders.BPEDecoder()
  tok.train_from_iterator(list(texts), trainers.BpeTrainer(
      vocab_size=vocab_size, special_tokens=["<unk>", EOS], show_progress=False))
  os.makedirs(directory, exist_ok=True)
  tok.save(os.path.join(directory, "tokenizer.json"))
  with open(os.path.join(directory, "tokenizer_config.json"), "w") as f:
    json.dump({"eos_token": EOS}, f)
  return directory


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
  """(glob of 8 text files, tokenizer directory)."""
  root = tmp_path_factory.mktemp("corpus")
  texts = _texts()
  for name, text in texts.items():
    (root / "text" / name).parent.mkdir(parents=True, exist_ok=True)
    (root / "text" / name).write_text(text)
  tokenizer_dir = _write_tokenizer(str(root / "tokenizer"), texts.values())
  assert tokenizers.Tokenizer.from_file(
      os.path.join(tokenizer_dir, "tokenizer.json")).get_vocab_size() <= hf_testing.VOCAB
  return str(root / "text" / "*.txt"), tokenizer_dir


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, corpus):
  """family -> a tiny hub checkpoint directory that also holds the test tokenizer's files."""
  root = tmp_path_factory.mktemp("hf")
  cache = {}

  def get(family):
    if family not in cache:
      directory = hf_testing.build_tiny(family, str(root / family))
      from moe_jax.hf import tokenizer as hf_tokenizer
      hf_tokenizer.copy_tokenizer_files(corpus[1], directory)
      cache[family] = directory
    return cache[family]

  return get


@pytest.fixture(scope="module")
def converted(checkpoint, tmp_path_factory):
  """The tiny OLMoE checkpoint converted into a workdir (`moe_jax.convert.from_hf`)."""
  return convert.from_hf(checkpoint("olmoe"), str(tmp_path_factory.mktemp("converted") / "w"))


def _finetune_config(corpus, **init):
  config = finetune.get_config()
  for key, value in init.items():
    config.init[key] = value
  config.data.path = corpus[0]
  config.data.reader = "numpy"
  config.data.batch_size = 8
  config.data.seq_len = 16
  config.data.eval_batches = 1
  config.train.steps = 3
  config.train.warmup_steps = 1
  config.train.learning_rate = 1e-2
  config.train.log_every = 1
  config.train.eval_every = 3
  config.train.checkpoint_every = 3
  return config


def _restored(workdir):
  """(config, graphdef, params) of a workdir's latest checkpoint, read onto the test mesh with
  `train.params_from_source` (no random init to compile, unlike `sample.load_params`)."""
  config = sample.load_config(workdir)
  with config.unlocked():
    config.init = finetune.get_config().init
    config.init.workdir = workdir
  graphdef, params, _, _ = train.params_from_source(config, sharding.make_mesh(config.mesh))
  return config, graphdef, params


def _logits(graphdef, params, tokens):
  return np.asarray(jax.jit(lambda p, t: nnx.merge(graphdef, p)(t)[0])(params, jnp.asarray(tokens)))


def _step0_loss(hf_dir, data_config, seed):
  """Cross-entropy of the imported model on training batch 0 (what step 1 of a run reports)."""
  model, _ = hf.from_pretrained(hf_dir, dtype="float32")
  graphdef, params = nnx.split(model)
  batch = data.load_dataset(data_config, "train").train_batch(0, 8, seed)
  ce = optax.softmax_cross_entropy_with_integer_labels(
      _logits(graphdef, params, batch["inputs"]), batch["targets"])
  return float(np.sum(ce * batch["weights"]) / np.sum(batch["weights"])), model


def _leaves(params):
  return {jax.tree_util.keystr(path): np.asarray(x)
          for path, x in jax.tree_util.tree_flatten_with_path(params)[0]}


# ------------------------------------------------------------------------------------ fine-tuning


def test_finetune_olmoe_with_frozen_router_and_experts(checkpoint, corpus, tmp_path):
  """From a hub checkpoint: the step-0 loss is the imported model's, and frozen parameters stay
  bit-identical while attention trains; the tokenizer defaults to the checkpoint's."""
  hf_dir = checkpoint("olmoe")
  config = _finetune_config(corpus, hf_path=hf_dir, freeze_router=True, freeze_experts=True)
  losses = {}
  workdir = str(tmp_path / "ft")
  result = train.train_and_evaluate(config, workdir,
                                    step_callback=lambda s, m: losses.setdefault(s, m))
  assert result["step"] == 3 and all(np.isfinite(float(m["loss"])) for m in losses.values())
  assert np.isfinite(result["eval/loss"]) and np.isfinite(result["eval/bits_per_byte"])

  # The resolved run: the checkpoint's model, its tokenizer, copied next to the checkpoints.
  saved = sample.load_config(workdir)
  assert saved.model.vocab_size == hf_testing.VOCAB and saved.hf.model_type == "olmoe"
  assert saved.data.tokenizer == hf_dir
  assert os.path.isfile(os.path.join(workdir, "tokenizer", "tokenizer.json"))

  # Step 0 ran on the imported parameters: its loss is the imported model's cross-entropy.
  expected, model = _step0_loss(hf_dir, saved.data, config.seed)
  np.testing.assert_allclose(float(losses[1]["loss"]), expected, rtol=1e-5)

  before = _leaves(nnx.to_pure_dict(nnx.state(model, nnx.Param)))
  after = _leaves(_restored(workdir)[2])
  assert before.keys() == after.keys()
  frozen = [k for k in before if "'router'" in k or "'experts'" in k]
  assert len(frozen) == 2 * 3  # 2 layers: router kernel, experts w_gate_up and w_down
  for key in frozen:
    np.testing.assert_array_equal(after[key], before[key], err_msg=key)
  for key in before:
    if "'attn'" in key and "w_" in key or "embed" in key:
      assert np.abs(after[key] - before[key]).max() > 1e-4, key

  # A rerun resumes its own checkpoint: the source's parameters are not read again.
  original = train.params_from_source
  train.params_from_source = lambda *a: pytest.fail("re-imported on resume")
  try:
    assert train.train_and_evaluate(config, workdir)["step"] == 3
  finally:
    train.params_from_source = original


def test_finetune_from_a_converted_workdir(checkpoint, converted, corpus, tmp_path):
  """init.workdir: the model, parameters and tokenizer of a `moe_jax.convert` workdir."""
  config = _finetune_config(corpus, workdir=converted)
  config.train.steps = config.train.eval_every = config.train.checkpoint_every = 1
  losses = {}
  workdir = str(tmp_path / "ft")
  train.train_and_evaluate(config, workdir, step_callback=lambda s, m: losses.setdefault(s, m))
  saved = sample.load_config(workdir)
  assert saved.model == sample.load_config(converted).model and saved.hf.model_type == "olmoe"
  assert saved.data.tokenizer == os.path.join(converted, "tokenizer")
  expected, _ = _step0_loss(checkpoint("olmoe"), saved.data, config.seed)
  np.testing.assert_allclose(float(losses[1]["loss"]), expected, rtol=1e-5)


def test_make_optimizer_freezes_by_name():
  params = {"blocks": {0: {"attn": {"w_q": jnp.ones((2, 2))},
                           "ffn": {"router": {"kernel": jnp.ones((2, 4))},
                                   "experts": {"w_down": jnp.ones((4, 2, 2))},
                                   "shared_experts": {"w_up": jnp.ones((2, 2))}}}}}
  config = finetune.get_config()
  config.init.freeze_router = config.init.freeze_experts = True
  config.train.warmup_steps = 0
  labels = train.param_labels(params, train.frozen_fragments(config))
  assert labels["blocks"][0]["attn"]["w_q"] == "trained"
  assert {labels["blocks"][0]["ffn"]["router"]["kernel"],
          labels["blocks"][0]["ffn"]["experts"]["w_down"],
          labels["blocks"][0]["ffn"]["shared_experts"]["w_up"]} == {"frozen"}
  tx, _ = train.make_optimizer(config.train, frozen=train.frozen_fragments(config))
  grads = jax.tree.map(jnp.ones_like, params)
  updates, _ = tx.update(grads, tx.init(params), params)
  assert float(jnp.abs(updates["blocks"][0]["attn"]["w_q"]).max()) > 0
  assert all(float(jnp.abs(u).max()) == 0 for u in jax.tree.leaves(updates["blocks"][0]["ffn"]))


# --------------------------------------------------------------------------------- tokenised data


def test_tokenizer_batches_agree_between_seqio_and_numpy_readers(corpus):
  pattern, tokenizer_dir = corpus
  tok = data.text_tokenizer(tokenizer_dir)
  assert tok.eos_id == 1
  for split in ("train", "validation"):
    config = lambda reader: ml_collections.ConfigDict(dict(  # noqa: E731
        task="text_files", path=pattern, seq_len=16, reader=reader, tokenizer=tokenizer_dir))
    numpy_data = data.load_dataset(config("numpy"), split)
    seqio_data = data.load_dataset(config("seqio"), split)
    assert len(numpy_data) > 8
    np.testing.assert_array_equal(numpy_data.tokens, seqio_data.tokens)
    np.testing.assert_array_equal(numpy_data.document_starts, seqio_data.document_starts)
    for step in range(2):
      a, b = numpy_data.train_batch(step, 8, 0), seqio_data.train_batch(step, 8, 0)
      for key in a:
        np.testing.assert_array_equal(a[key], b[key])
    # Packed tokenizer ids hold no padding: every target weighs 1, id 0 (<unk>) included.
    assert a["weights"].min() == 1.0
    # The stream is each file's encoding followed by EOS, in name order.
    docs = [d for _, d in data.documents("text_files", pattern, split)]
    expected = np.concatenate([tok.tokenizer.encode(d.decode()).ids + [tok.eos_id] for d in docs])
    n = numpy_data.tokens.size
    np.testing.assert_array_equal(numpy_data.tokens.ravel(), expected[:n])
    assert numpy_data.bytes_per_token == pytest.approx(
        (sum(len(d) for d in docs) + len(docs)) / len(expected))
    assert numpy_data.bits_per_byte(np.log(2)) == pytest.approx(1 / numpy_data.bytes_per_token)


# ----------------------------------------------------------------------------------- validation


def test_validation_names_the_vocabulary_and_init_problems(checkpoint, corpus, tmp_path):
  hf_dir = checkpoint("olmoe")
  big = tmp_path / "big_tokenizer"
  big.mkdir()
  vocab = {EOS: 0, **{f"w{i}": i + 1 for i in range(149)}}
  tokenizers.Tokenizer(models.WordLevel(vocab, unk_token="w0")).save(str(big / "tokenizer.json"))

  config = _finetune_config(corpus, hf_path=hf_dir)
  config.data.tokenizer = str(big)
  with pytest.raises(ConfigError, match=r"config.model.vocab_size=97 .*150 ids"):
    validate_config(config)

  # Without a tokenizer, a model of its own vocabulary is told to name one.
  bare = tmp_path / "bare"
  bare.mkdir()
  for name in ("config.json", "model.safetensors"):
    os.symlink(os.path.join(hf_dir, name), bare / name)
  config = _finetune_config(corpus, hf_path=str(bare))
  with pytest.raises(ConfigError, match=r"model.vocab_size=97 .*data.tokenizer"):
    validate_config(config)

  config = _finetune_config(corpus, hf_path=checkpoint("llama"), freeze_router=True)
  config.model.remat = True
  with pytest.raises(ConfigError) as info:
    validate_config(config)
  assert "changed: model.remat=True" in str(info.value)
  config.model.remat = False
  with pytest.raises(ConfigError, match="freeze_router=True is invalid for a model without MoE"):
    validate_config(config)

  config = _finetune_config(corpus, hf_path=hf_dir, workdir=str(tmp_path))
  with pytest.raises(ConfigError, match="both set"):
    validate_config(config)
  config = _finetune_config(corpus, hf_path=str(tmp_path / "missing"))
  with pytest.raises(ConfigError, match="config.json does not exist"):
    validate_config(config)
  validate_config(_finetune_config(corpus, hf_path=hf_dir))


# ------------------------------------------------------------------------------------ upcycling


def test_upcycle_from_dense_llama_keeps_the_hub_function(checkpoint, corpus, tmp_path):
  """--dense_hf: the upcycled MoE (dropless, renormalised top-2) computes transformers' dense
  logits at step 0, from the checkpoint it writes."""
  upcycle_script = _import_script("upcycle")
  hf_dir = checkpoint("llama")
  base = _finetune_config(corpus)
  dense_config = upcycle_script.dense_hf_config(hf_dir, base)
  moe_config = upcycle_script.moe_config_from_dense_hf(dense_config, num_experts=4, top_k=2,
                                                       moe_every=1)
  assert dense_config.model.num_kv_heads == 2 and dense_config.model.rope_scaling.kind == "llama3"
  assert moe_config.model.rope_scaling.kind == "llama3" and "hf" not in moe_config
  assert moe_config.model.moe.load_balance_loss_weight == 0.01
  validate_config(moe_config)
  moe_dir = str(tmp_path / "moe")
  evals = upcycle_script.upcycle_hf_checkpoint(hf_dir, moe_dir, dense_config, moe_config,
                                               noise_std=0.0, router_init_std=0.02, seed=0)
  assert evals["step"] == 0
  np.testing.assert_allclose(evals["moe"]["eval/loss"], evals["dense"]["eval/loss"], rtol=1e-5)

  saved, graphdef, params = _restored(moe_dir)
  assert saved.model.moe_every == 1 and "experts" in params["blocks"][1]["ffn"]
  tokens = hf_testing.make_tokens(seed=0)
  reference = hf_testing.reference_logits(hf_dir, tokens)
  assert reference.std() > 0.3
  assert np.max(np.abs(_logits(graphdef, params, tokens) - reference)) <= 1e-4


# ------------------------------------------------------------------------------ routing analysis


def test_routing_stats_on_a_converted_workdir(converted, corpus, tmp_path):
  routing_stats = _import_script("routing_stats")
  workdir = converted
  model = sample.load_params(workdir)
  with pytest.raises(ValueError, match="give its tokenizer"):
    routing_stats.compute_routing_stats(model, num_batches=1, batch_size=4)
  data_config = routing_stats.analysis_data_config(workdir, model.config, task="text_files",
                                                   path=corpus[0])
  assert data_config.seq_len == hf_testing.MAX_POSITIONS
  assert data_config.tokenizer == os.path.join(workdir, "tokenizer")
  stats = routing_stats.compute_routing_stats(model, num_batches=1, batch_size=4,
                                              data_config=data_config)
  assert not stats.byte_classes and [l.layer for l in stats.layers] == [0, 1]
  for layer in stats.layers:
    assert layer.assignments.sum() == 4 * 64 * 2 and abs(layer.load.sum() - 1) < 1e-9
  text = routing_stats.to_markdown(stats, workdir)
  assert "Byte classes need the byte vocabulary" in text and "| 1 |" in text
  with pytest.raises(ValueError, match="byte classes need the byte vocabulary"):
    stats.preference(stats.layers[0])
  routing_stats.plot_heatmap(stats, str(tmp_path / "heatmap.png"))
  assert os.path.getsize(tmp_path / "heatmap.png") > 0
