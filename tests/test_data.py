"""Tests for moe_jax.data: corpora, reader parity, packing, batching and errors."""
import math
import os
import pathlib
import subprocess
import sys
import sysconfig
import zlib

import ml_collections
import numpy as np
import pytest
import seqio  # a hard dependency (setup.py): a broken install fails here, not skips

from moe_jax import data


def _config(task, seq_len=16, reader="numpy", path=""):
  return ml_collections.ConfigDict(dict(task=task, path=path, seq_len=seq_len, reader=reader))


def _expected_split(relpath):
  return "validation" if zlib.crc32(relpath.encode()) % 20 == 0 else "train"


@pytest.fixture(name="text_dir")
def fixture_text_dir(tmp_path):
  """A few files: UTF-8, non-UTF-8 bytes, an empty file, a nested file; names chosen to hit both
  splits under the crc32 rule."""
  files = {
      "a.txt": "héllo wörld\n".encode() * 30,
      "latin1.bin": bytes(range(256)) + b"\xff\xfe\xc3\x28" * 10,  # Not valid UTF-8.
      "empty.txt": b"",
      "sub/deep.txt": b"def f(x):\n  return x + 1\n" * 20,
  }
  for name, content in files.items():
    (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
    (tmp_path / name).write_bytes(content)
  return tmp_path, files


def _text_split_names(files):
  """Independent statement of the text_files split rule, with its empty-split fallbacks."""
  names = sorted(files)
  splits = [_expected_split(n) for n in names]
  if "validation" not in splits:
    splits[-1] = "validation"
  if "train" not in splits:
    splits[0] = "train"
  return {s: [n for n, t in zip(names, splits) if t == s] for s in ("train", "validation")}


def _stream(docs):
  """The ByteVocabulary stream written out the slow, obvious way."""
  out = []
  for content in docs:
    out.extend(b + 3 for b in content)
    out.append(1)
  return np.array(out)


# --- Reader parity -----------------------------------------------------------------------------


@pytest.mark.parametrize("split", ["train", "validation"])
def test_readers_agree_on_synthetic(split):
  numpy_tokens = data.load_dataset(_config("synthetic", 32, "numpy"), split).tokens
  seqio_tokens = data.load_dataset(_config("synthetic", 32, "seqio"), split).tokens
  assert numpy_tokens.shape[1] == 33 and len(numpy_tokens) > 100
  np.testing.assert_array_equal(numpy_tokens, seqio_tokens)


@pytest.mark.parametrize("split", ["train", "validation"])
def test_readers_agree_on_text_files_with_binary_and_empty_files(text_dir, split):
  root, _ = text_dir
  pattern = str(root / "**" / "*")
  numpy_tokens = data.load_dataset(_config("text_files", 8, "numpy", pattern), split).tokens
  seqio_tokens = data.load_dataset(_config("text_files", 8, "seqio", pattern), split).tokens
  assert len(numpy_tokens) > 0
  np.testing.assert_array_equal(numpy_tokens, seqio_tokens)


@pytest.mark.parametrize("split", ["validation", "train"])
def test_readers_agree_on_stdlib(split):
  numpy_tokens = data.load_dataset(_config("stdlib_bytes", 128, "numpy"), split).tokens
  seqio_tokens = data.load_dataset(_config("stdlib_bytes", 128, "seqio"), split).tokens
  assert len(numpy_tokens) > 1000
  np.testing.assert_array_equal(numpy_tokens, seqio_tokens)


def test_numpy_ids_match_seqio_byte_vocabulary():
  text = "héllo, wörld ✓\n"
  docs = data._numpy_stream([text.encode()])
  assert docs.tolist() == seqio.ByteVocabulary().encode(text) + [1]


def test_auto_reader_equals_numpy_reader():
  auto = data.load_dataset(_config("synthetic", 24, "auto"), "validation").tokens
  plain = data.load_dataset(_config("synthetic", 24, "numpy"), "validation").tokens
  np.testing.assert_array_equal(auto, plain)


def test_numpy_reader_never_imports_tensorflow():
  code = ("import sys, ml_collections; from moe_jax import data; "
          "c = ml_collections.ConfigDict(dict(task='synthetic', path='', seq_len=8, reader='numpy')); "
          "data.load_dataset(c, 'train'); print('tensorflow' in sys.modules, 'seqio' in sys.modules)")
  repo = pathlib.Path(__file__).resolve().parents[1]
  out = subprocess.run([sys.executable, "-c", code], cwd=repo, capture_output=True, text=True,
                       check=True, env={**os.environ, "PYTHONPATH": str(repo)})
  assert out.stdout.split() == ["False", "False"]


# --- Splits and packing ------------------------------------------------------------------------


def test_stdlib_splits_are_disjoint_cover_all_files_and_follow_the_crc_rule():
  root = pathlib.Path(sysconfig.get_paths()["stdlib"])
  expected = {
      p.relative_to(root).as_posix() for p in root.rglob("*.py")
      if p.is_file() and not {"site-packages", "dist-packages"} & set(p.relative_to(root).parts)}
  names = {s: [n for n, _ in data.documents("stdlib_bytes", "", s)]
           for s in ("train", "validation")}
  train, validation = set(names["train"]), set(names["validation"])
  assert not train & validation
  assert train | validation == expected
  assert names["train"] == sorted(train) and names["validation"] == sorted(validation)
  assert all(_expected_split(n) == "validation" for n in validation)
  assert 0.02 < len(validation) / len(expected) < 0.10


def test_loading_twice_rebuilds_identical_arrays(monkeypatch):
  monkeypatch.setattr(data, "_CACHE", {})
  first = data.load_dataset(_config("stdlib_bytes", 64), "validation").tokens
  data._CACHE.clear()
  second = data.load_dataset(_config("stdlib_bytes", 64), "validation").tokens
  assert first is not second
  np.testing.assert_array_equal(first, second)
  assert data.load_dataset(_config("stdlib_bytes", 64), "validation").tokens is second


def test_text_files_split_tokens_and_eos_decode_to_the_files(text_dir):
  root, files = text_dir
  pattern = str(root / "**" / "*")
  expected_names = _text_split_names(files)
  for split in ("train", "validation"):
    docs = data.documents("text_files", pattern, split)
    assert [n for n, _ in docs] == expected_names[split]
    seq_len = 8
    tokens = data.load_dataset(_config("text_files", seq_len, "numpy", pattern), split).tokens
    expected = _stream([files[n] for n in expected_names[split]])
    n = len(expected) // (seq_len + 1)
    assert tokens.shape == (n, seq_len + 1)
    # Chunks are consecutive pieces of the stream; splitting it at EOS gives the files back.
    np.testing.assert_array_equal(tokens.ravel(), expected[:n * (seq_len + 1)])
    pieces = bytes((expected[expected != 1] - 3).astype(np.uint8))
    assert pieces == b"".join(files[n] for n in expected_names[split])
    boundaries = np.flatnonzero(expected == 1)
    starts = np.concatenate([[0], boundaries[:-1] + 1])
    for name, start, stop in zip(expected_names[split], starts, boundaries):
      assert bytes((expected[start:stop] - 3).astype(np.uint8)) == files[name]
  assert set(expected_names["train"]) | set(expected_names["validation"]) == set(files)


def test_single_text_file_is_split_95_5_by_bytes(tmp_path):
  content = bytes(np.random.default_rng(0).integers(0, 256, 1000, dtype=np.uint8))
  (tmp_path / "only.bin").write_bytes(content)
  pattern = str(tmp_path / "*.bin")
  (_, train), = data.documents("text_files", pattern, "train")
  (_, validation), = data.documents("text_files", pattern, "validation")
  assert train == content[:950] and validation == content[950:]


def test_synthetic_corpus_is_learnable_below_unigram_entropy():
  tokens = data.load_dataset(_config("synthetic", 32), "train").tokens.ravel().astype(np.int64)
  pairs = np.zeros((data.VOCAB_SIZE, data.VOCAB_SIZE))
  np.add.at(pairs, (tokens[:-1], tokens[1:]), 1)
  joint = pairs[pairs > 0] / pairs.sum()
  marginal = pairs.sum(1)[pairs.sum(1) > 0] / pairs.sum()
  conditional_bits = -(joint * np.log2(joint)).sum() + (marginal * np.log2(marginal)).sum()
  unigram_bits = data.TokenDataset(tokens[:len(tokens) // 33 * 33].reshape(-1, 33)
                                  ).unigram_entropy_bits()
  assert conditional_bits < 2.0 and unigram_bits > 3.0


# --- Batching ----------------------------------------------------------------------------------


def _indexed_dataset(num_chunks=10, seq_len=6):
  """Chunk i starts with token 1000 + i, so a batch row names its chunk."""
  tokens = np.arange(num_chunks * (seq_len + 1)).reshape(num_chunks, seq_len + 1) % 200 + 3
  tokens[:, 0] = 1000 + np.arange(num_chunks)
  return data.TokenDataset(tokens, "indexed")


def test_train_batch_is_a_pure_function_of_step():
  ds, fresh = _indexed_dataset(), _indexed_dataset()
  later = fresh.train_batch(7, 4, seed=3)  # Out of order on a fresh object, as after a resume.
  for key in ("inputs", "targets", "weights"):
    np.testing.assert_array_equal(ds.train_batch(7, 4, seed=3)[key], later[key])
    np.testing.assert_array_equal(ds.train_batch(7, 4, seed=3)[key], ds.train_batch(7, 4, 3)[key])


def test_train_batch_epochs_cover_every_chunk_once_even_across_batch_boundaries():
  ds = _indexed_dataset(num_chunks=10)
  # B = 4 does not divide N = 10, so batch 2 straddles epochs 0 and 1.
  rows = np.concatenate([ds.train_batch(s, 4, seed=0)["inputs"][:, 0] - 1000 for s in range(5)])
  assert sorted(rows[:10]) == list(range(10)) and sorted(rows[10:]) == list(range(10))
  assert rows[:10].tolist() != rows[10:].tolist()  # A fresh permutation each epoch.
  np.testing.assert_array_equal(rows, ds.train_batch(0, 20, seed=0)["inputs"][:, 0] - 1000)
  np.testing.assert_array_equal(
      rows[:10], np.random.default_rng([0, 0]).permutation(10))


def test_train_batch_seeds_change_the_order():
  ds = _indexed_dataset(num_chunks=50)
  a = ds.train_batch(0, 50, seed=0)["inputs"][:, 0]
  b = ds.train_batch(0, 50, seed=1)["inputs"][:, 0]
  assert sorted(a) == sorted(b) and a.tolist() != b.tolist()


def test_train_batch_shapes_dtypes_and_shift():
  ds = data.load_dataset(_config("synthetic", 32), "train")
  batch = ds.train_batch(3, 8, seed=0)
  assert batch["inputs"].shape == batch["targets"].shape == batch["weights"].shape == (8, 32)
  assert batch["inputs"].dtype == batch["targets"].dtype == np.int32
  assert batch["weights"].dtype == np.float32 and np.all(batch["weights"] == 1)
  np.testing.assert_array_equal(batch["inputs"][:, 1:], batch["targets"][:, :-1])
  assert batch["inputs"].min() >= 1 and batch["inputs"].max() < data.VOCAB_SIZE


def test_eval_batches_cover_the_whole_small_split_once_and_sample_a_large_one():
  ds = _indexed_dataset(num_chunks=10)
  batches = list(ds.eval_batches(batch_size=3, num_batches=8))  # asks for more than the split
  assert len(batches) == 4  # the whole split: 3 full batches and one with 2 padding rows
  kept = np.concatenate([b["inputs"][b["weights"][:, 0] > 0, 0] for b in batches]) - 1000
  np.testing.assert_array_equal(np.sort(kept), np.arange(10))
  assert batches[-1]["weights"][1:].sum() == 0
  sample = np.concatenate([b["inputs"][:, 0] for b in ds.eval_batches(3, 2)]) - 1000
  np.testing.assert_array_equal(np.sort(sample), [0, 2, 4, 5, 7, 9])  # floor((i + .5) * 10 / 6)
  one = list(ds.eval_batches(batch_size=11, num_batches=1))
  assert len(one) == 1 and one[0]["weights"].sum() == 10 * one[0]["weights"].shape[1]
  with pytest.raises(ValueError, match="indexed"):
    ds.eval_batches(batch_size=0, num_batches=1)


def test_unigram_entropy_matches_hand_count():
  tokens = np.array([[250, 5, 5, 5, 7], [251, 7, 3, 3, 3]])  # Column 0 is never a target.
  counts = {5: 3, 7: 2, 3: 3}
  total = sum(counts.values())
  expected = -sum(c / total * math.log2(c / total) for c in counts.values())
  assert data.TokenDataset(tokens).unigram_entropy_bits() == pytest.approx(expected, rel=1e-12)


def test_bits_per_byte():
  assert data.bits_per_byte(3 * math.log(2)) == pytest.approx(3.0)


# --- Errors ------------------------------------------------------------------------------------


@pytest.mark.parametrize("field,value,split", [
    ("task", "wikipedia", "train"),
    ("reader", "tfds", "train"),
    ("split", "test", "test"),
])
def test_unknown_names_raise_with_field_and_value(field, value, split):
  config = _config("synthetic")
  if field != "split":
    config[field] = value
  with pytest.raises(ValueError) as info:
    data.load_dataset(config, split)
  assert field in str(info.value) and repr(value) in str(info.value)


def test_empty_glob_raises_with_field_and_value(tmp_path):
  pattern = str(tmp_path / "nothing" / "*.txt")
  with pytest.raises(ValueError) as info:
    data.load_dataset(_config("text_files", path=pattern), "train")
  assert "data.path" in str(info.value) and pattern in str(info.value)


def test_corpus_too_small_for_one_chunk_raises(tmp_path):
  (tmp_path / "tiny.txt").write_bytes(b"x" * 100)
  config = _config("text_files", seq_len=512, path=str(tmp_path / "*.txt"))
  with pytest.raises(ValueError, match="seq_len"):
    data.load_dataset(config, "train")
