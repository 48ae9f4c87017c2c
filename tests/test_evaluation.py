"""The evaluation sample spans the validation split; its error bar; the corpus fingerprint."""
import json
import math

import jax
import ml_collections
import numpy as np
import pytest

from configs import default
from moe_jax import data, train


def _text_config(pattern: str, seq_len: int = 16) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(
      {"task": "text_files", "path": pattern, "seq_len": seq_len, "reader": "numpy"})


def _write_files(root, sizes, seed=0):
  """Files f000.txt ... of the given byte sizes with random printable content."""
  rng = np.random.default_rng(seed)
  for i, size in enumerate(sizes):
    body = rng.integers(32, 127, size=size, dtype=np.uint8).tobytes()
    (root / f"f{i:03d}.txt").write_bytes(body)


def _documents_touched(dataset: data.TokenDataset, chunks: np.ndarray) -> np.ndarray:
  """Per document with a token in the packed split: is any of `chunks` holding one of its tokens?

  Computed from token positions, independently of `document_chunks`.
  """
  chunk_len = dataset.tokens.shape[1]
  covered = np.zeros(len(dataset) * chunk_len, bool)
  for c in chunks:
    covered[c * chunk_len:(c + 1) * chunk_len] = True
  starts = list(dataset.document_starts) + [None]
  touched = []
  for start, end in zip(starts[:-1], starts[1:]):
    span = covered[start:end if end is not None else len(covered)]
    if start < len(covered):
      touched.append(span.any())
  return np.array(touched)


@pytest.fixture(scope="module")
def stdlib_validation():
  config = default.get_config().data
  return data.load_dataset(config, "validation")


def test_default_evaluation_sample_spans_the_stdlib_split(stdlib_validation):
  """The default 32 x 16 chunks touch every validation file and every stretch of the split."""
  config = default.get_config()
  num = config.data.eval_batches * config.data.batch_size
  chunks = stdlib_validation.eval_chunks(num)
  assert len(chunks) == num == len(np.unique(chunks))
  assert _documents_touched(stdlib_validation, chunks).all()
  # Spread: every tenth of the split holds close to a tenth of the sample (the old evaluation
  # took its first 128 chunks, all in one file).
  tenths = np.bincount(chunks * 10 // len(stdlib_validation), minlength=10)
  assert tenths.min() >= 0.6 * num / 10, tenths
  batches = list(stdlib_validation.eval_batches(config.data.batch_size, config.data.eval_batches))
  assert len(batches) == config.data.eval_batches
  rows = np.concatenate([b["inputs"] for b in batches])
  expected = stdlib_validation.tokens[np.sort(chunks), :-1].astype(np.int32)
  np.testing.assert_array_equal(np.sort(rows.view([("", rows.dtype)] * rows.shape[1]), axis=0),
                                np.sort(expected.view([("", expected.dtype)] * rows.shape[1]),
                                        axis=0))


def test_small_files_are_represented_and_sample_is_deterministic(tmp_path):
  # One large file and many small ones: a plain systematic sample would miss small files.
  _write_files(tmp_path, [20_000] + [40] * 30 + [3_000, 0, 7])
  dataset = data.load_dataset(_text_config(str(tmp_path / "*.txt")), "train")
  for num in (40, 64, 100):
    chunks = dataset.eval_chunks(num)
    assert len(chunks) == num == len(np.unique(chunks))
    assert np.all(np.diff(chunks) > 0) and chunks[-1] < len(dataset)
    assert _documents_touched(dataset, chunks).all(), num
    np.testing.assert_array_equal(chunks, dataset.eval_chunks(num))


def test_more_files_than_chunks_gives_a_plain_systematic_sample(tmp_path):
  _write_files(tmp_path, [50] * 60)
  dataset = data.load_dataset(_text_config(str(tmp_path / "*.txt"), seq_len=8), "train")
  chunks = dataset.eval_chunks(10)
  np.testing.assert_array_equal(chunks, np.floor((np.arange(10) + 0.5) * len(dataset) / 10))


def test_whole_split_when_small_with_padded_last_batch():
  tokens = np.arange(7 * 5, dtype=np.uint16).reshape(7, 5) + 3
  dataset = data.TokenDataset(tokens, "seven chunks")
  batches = list(dataset.eval_batches(batch_size=3, num_batches=10))
  assert len(batches) == 3
  weights = np.concatenate([b["weights"] for b in batches])
  assert weights.sum() == 7 * 4 and np.all(weights[-2:] == 0)
  seen = np.concatenate([b["inputs"][b["weights"][:, 0] > 0] for b in batches])
  np.testing.assert_array_equal(np.sort(seen[:, 0]), tokens[:, 0])
  with pytest.raises(ValueError, match="num_batches"):
    dataset.eval_batches(batch_size=3, num_batches=0)


def test_evaluate_reports_mean_and_standard_error_over_batches():
  """Against a NumPy computation from per-row losses of a fake model."""
  rng = np.random.default_rng(0)
  tokens = rng.integers(3, 259, size=(53, 9)).astype(np.uint16)
  tokens[:, 0] = np.arange(53) + 3  # unique: names the chunk
  dataset = data.TokenDataset(tokens, "random")
  row_loss = rng.uniform(1.0, 3.0, size=53)

  def eval_fn(params, batch):  # the first input token names the chunk
    del params
    first = np.asarray(batch["inputs"])[:, 0]
    losses = np.array([row_loss[np.flatnonzero(tokens[:, 0] == f)[0]] for f in first])
    weights = np.asarray(batch["weights"])
    return {"ce_sum": np.sum(losses[:, None] * weights), "weight_sum": np.sum(weights)}

  config = ml_collections.ConfigDict({"data": {"batch_size": 4, "eval_batches": 6}})
  one_device = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("data",))
  batch_sharding = jax.sharding.NamedSharding(one_device, jax.sharding.PartitionSpec("data"))
  out = train.evaluate(None, dataset, config, eval_fn=eval_fn, batch_sharding=batch_sharding)
  chunks = dataset.eval_chunks(24)
  order = chunks[np.random.default_rng(0).permutation(24)]
  per_batch = row_loss[order].reshape(6, 4).mean(axis=1)
  assert out["eval/loss"] == pytest.approx(row_loss[chunks].mean(), rel=1e-6)
  assert out["eval/loss_stderr"] == pytest.approx(per_batch.std(ddof=1) / math.sqrt(6), rel=1e-6)
  assert out["eval/bits_per_byte_stderr"] == pytest.approx(
      out["eval/loss_stderr"] / math.log(2), rel=1e-9)
  assert out["eval/batches"] == 6 and out["eval/tokens"] == 24 * 8


def test_corpus_fingerprint_names_files_sizes_and_content(tmp_path):
  _write_files(tmp_path, [300, 500, 800, 50, 20])
  config = _text_config(str(tmp_path / "*.txt"))
  first = data.corpus_fingerprint(config)
  splits = first["splits"]
  assert splits["train"]["files"] + splits["validation"]["files"] == 5
  assert splits["train"]["bytes"] + splits["validation"]["bytes"] == 1670
  assert first["python"].count(".") == 2
  # Same size, other content: the file list hash stays, the content hash changes.
  (tmp_path / "f001.txt").write_bytes(b"x" * 500)
  data._CACHE.clear()
  second = data.corpus_fingerprint(config)
  assert second["file_list_sha256"] == first["file_list_sha256"]
  assert second["content_sha256"] != first["content_sha256"]
  (tmp_path / "f005.txt").write_bytes(b"new file")
  third = data.corpus_fingerprint(config)
  assert third["file_list_sha256"] != second["file_list_sha256"]
  assert first["file_list_sha256"] in data.describe_fingerprint(first)


def test_training_writes_the_fingerprint_and_error_bars(tmp_path):
  config = default.get_config("tiny")
  config.train.steps = 4
  config.train.eval_every = 4
  result = train.train_and_evaluate(config, str(tmp_path))
  saved = json.load(open(tmp_path / "config.json"))
  assert saved["corpus"] == data.corpus_fingerprint(config.data) == result["corpus"]
  assert result["eval/batches"] == config.data.eval_batches
  assert np.isfinite(result["eval/bits_per_byte_stderr"]) and result["eval/bits_per_byte_stderr"] > 0
  step, loss, bpb, stderr = result["eval_history"][-1]
  assert step == 4 and bpb == pytest.approx(loss / math.log(2))
  assert stderr == result["eval/bits_per_byte_stderr"]
