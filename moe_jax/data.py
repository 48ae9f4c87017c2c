"""Byte-level LM data: corpora, seqio/NumPy tokenisation, packing and step-addressable batches.

Tokens follow `seqio.ByteVocabulary()`: id = byte + 3, pad 0, eos 1, unk 2 (259 ids), so one token
is one byte. Every document gets EOS appended; documents are concatenated in sorted name order and
the stream is cut into consecutive, non-overlapping chunks of `seq_len + 1` tokens (packing without
padding; the trailing partial chunk is dropped). A chunk gives inputs = chunk[:-1] and
targets = chunk[1:].

Objectives (`config.data.objective`): "lm" (next-token prediction, above) and "mlm", masked-byte
prediction for a bidirectional encoder (BERT 2019; `moe_jax.masking`): inputs are the chunk's first
S tokens with a fraction `config.data.mask_rate` of them corrupted (80% [MASK] = id 259, 10% a
random byte, 10% unchanged), targets the original tokens, weight 1 only at the chosen positions.
Training masks are a function of (seed, step, batch row), evaluation masks of the chunk index
alone, so a resumed run sees the same masks and every model is evaluated on the same positions.
The [MASK] id lies outside the 259-id byte vocabulary: "mlm" needs `model.vocab_size >= 260`.

Corpora (`config.data.task`), none of which downloads anything:
  stdlib_bytes  The running interpreter's standard-library `.py` files, read as bytes, without any
                `site-packages` / `dist-packages` directory.
  text_files    The files matching the glob `config.data.path` (recursive `**` allowed).
  synthetic     A deterministic first-order Markov chain over 16 characters (NumPy, fixed seeds):
                about 1.4 bits/byte of true entropy against about 4 bits/byte for a unigram model.

Split rule for files: a file is in "validation" when `zlib.crc32(relpath.encode()) % 20 == 0`, else
in "train", where relpath is the POSIX path relative to the stdlib root (stdlib_bytes) or to the
glob's leading non-wildcard directory (text_files). So the split of a file never depends on which
other files exist. For text_files, if that leaves a split empty and there are >= 2 files, the last
sorted file moves to validation (or the first to train); a single file is split by bytes, the
first 95% to train and the last 5% to validation.

Readers (`config.data.reader`) build identical arrays: "seqio" tokenises through registered seqio
tasks (TensorFlow is imported only then, see `data_seqio.py`), "numpy" is a plain reimplementation
for hosts without TensorFlow, and "auto" picks seqio when it imports.

Tokenizers (`config.data.tokenizer`): "" is the byte vocabulary above. A path to a Hugging Face
`tokenizer.json` (or a directory holding one, e.g. a checkpoint or a converted workdir's
tokenizer/) encodes every document instead with that tokenizer (`TextTokenizer`, the `tokenizers`
library; seqio wraps the same encoder in a `seqio.Vocabulary`, so both readers still give the same
arrays). A document's bytes are decoded as UTF-8 (invalid bytes become U+FFFD), encoded with the
tokenizer's own special tokens (e.g. Llama's BOS; truncation and padding off), and followed by the
tokenizer's EOS id (`TextTokenizer.eos_id`) exactly once; packing is as above. Chunks hold no
padding, so every target weighs 1 (id 0 is an ordinary token there). Bits per byte are then the
loss per token divided by ln 2 and by the split's bytes per token (`TokenDataset.bytes_per_token`,
which counts each document's EOS as one byte, as the byte vocabulary does). The model's vocabulary
must hold every tokenizer id (`model.vocab_size >= TextTokenizer.vocab_size`, validated).
"""
from collections.abc import Iterator
import glob
import hashlib
import math
import os
import pathlib
import platform
import sysconfig
import json
import zlib

import numpy as np

from moe_jax import masking

TASKS = ("stdlib_bytes", "text_files", "synthetic")
READERS = ("auto", "seqio", "numpy")
SPLITS = ("train", "validation")
VOCAB_SIZE = 259
PAD_ID, EOS_ID, UNK_ID = 0, 1, 2
NUM_SPECIAL_IDS = 3
# The [MASK] id of objective "mlm": the first id past the byte vocabulary.
MASK_ID = VOCAB_SIZE
OBJECTIVES = ("lm", "mlm")
# Leading entries of the per-row mask keys, so train and evaluation masks never share a stream.
_TRAIN_MASK_KEY, _EVAL_MASK_KEY = 0x6D6C6D, 0x6D6C6E

# Built token arrays, the stream offset where each document starts and the bytes per token, keyed
# by (task, path, split, seq_len, reader, tokenizer). Arrays are read-only so that no caller can
# corrupt what later calls get.
_CACHE: dict[tuple[str, str, str, int, str, str], tuple[np.ndarray, np.ndarray, float]] = {}


def bits_per_byte(loss_nats: float, bytes_per_token: float = 1.0) -> float:
  """Converts a per-token loss in nats to bits per byte (byte vocabulary: one token per byte)."""
  return loss_nats / math.log(2) / bytes_per_token


def file_split(relpath: str) -> str:
  """The split of a file: "validation" when crc32(relpath) % 20 == 0, else "train"."""
  return "validation" if zlib.crc32(relpath.encode()) % 20 == 0 else "train"


# ---------------------------------------------------------------------------------------------
# Corpora: each returns the split's documents as (name, bytes), in stream order.


def _stdlib_documents(split: str) -> list[tuple[str, bytes]]:
  root = sysconfig.get_paths()["stdlib"]
  relpaths = []
  for dirpath, dirnames, filenames in os.walk(root):
    dirnames[:] = [d for d in dirnames if d not in ("site-packages", "dist-packages")]
    for filename in filenames:
      full = os.path.join(dirpath, filename)
      if filename.endswith(".py") and os.path.isfile(full):
        relpaths.append(pathlib.Path(os.path.relpath(full, root)).as_posix())
  relpaths = sorted(r for r in relpaths if file_split(r) == split)
  return [(r, pathlib.Path(root, r).read_bytes()) for r in relpaths]


def _glob_root(pattern: str) -> str:
  """The leading directories of `pattern` that hold no wildcard; relpaths are taken from here."""
  parts = pattern.split(os.sep)
  root = []
  for part in parts[:-1]:
    if glob.has_magic(part):
      break
    root.append(part)
  return os.sep.join(root) or ("/" if pattern.startswith("/") else ".")


def _text_file_documents(pattern: str, split: str) -> list[tuple[str, bytes]]:
  pattern = os.path.expanduser(pattern)
  root = _glob_root(pattern)
  files = sorted(
      (pathlib.Path(os.path.relpath(f, root)).as_posix(), f)
      for f in glob.glob(pattern, recursive=True) if os.path.isfile(f))
  if not files:
    raise ValueError(f"data.path={pattern!r} matches no files (task 'text_files').")
  if len(files) == 1:
    name, full = files[0]
    data = pathlib.Path(full).read_bytes()
    cut = len(data) * 95 // 100
    return [(name, data[:cut])] if split == "train" else [(name, data[cut:])]
  in_split = [file_split(name) for name, _ in files]
  if "validation" not in in_split:
    in_split[-1] = "validation"
  if "train" not in in_split:
    in_split[0] = "train"
  return [(name, pathlib.Path(full).read_bytes())
          for (name, full), s in zip(files, in_split) if s == split]


_SYNTHETIC_ALPHABET = np.frombuffer(b"etaoinshrdlcum \n", np.uint8)
_SYNTHETIC_SUCCESSOR_PROBS = (0.7, 0.1, 0.1, 0.1)
_SYNTHETIC_DOC_BYTES = 4096
_SYNTHETIC_DOCS = {"train": 64, "validation": 8}
_SYNTHETIC_SEEDS = {"train": 1, "validation": 2}  # The chain itself comes from seed 0.


def _synthetic_documents(split: str) -> list[tuple[str, bytes]]:
  num_symbols = len(_SYNTHETIC_ALPHABET)
  num_successors = len(_SYNTHETIC_SUCCESSOR_PROBS)
  chain_rng = np.random.default_rng(0)
  successors = np.stack([chain_rng.choice(num_symbols, num_successors, replace=False)
                         for _ in range(num_symbols)]).tolist()
  rng = np.random.default_rng(_SYNTHETIC_SEEDS[split])
  num_docs = _SYNTHETIC_DOCS[split]
  choices = rng.choice(num_successors, size=(num_docs, _SYNTHETIC_DOC_BYTES),
                       p=_SYNTHETIC_SUCCESSOR_PROBS).tolist()
  starts = rng.integers(num_symbols, size=num_docs).tolist()
  docs = []
  for d in range(num_docs):
    state, states = starts[d], []
    for c in choices[d]:  # Sequential by nature; ~300K steps of plain Python take ~0.1 s.
      states.append(state)
      state = successors[state][c]
    docs.append((f"synthetic/{split}/{d:03d}", _SYNTHETIC_ALPHABET[states].tobytes()))
  return docs


def documents(task: str, path: str, split: str) -> list[tuple[str, bytes]]:
  """The raw documents of `split` of `task` as (name, bytes), in stream (sorted name) order."""
  if task == "stdlib_bytes":
    return _stdlib_documents(split)
  if task == "text_files":
    return _text_file_documents(path, split)
  if task == "synthetic":
    return _synthetic_documents(split)
  raise ValueError(f"data.task={task!r} is not one of {TASKS}.")


# ---------------------------------------------------------------------------------------------
# Hugging Face tokenizers (`config.data.tokenizer`).

# Tried in order when a tokenizer directory names no EOS token (tokenizer_config.json,
# generation_config.json, config.json): GPT-2/NeoX/OLMo/Qwen, SentencePiece, Llama 3, Gemma.
_EOS_TOKENS = ("<|endoftext|>", "</s>", "<|end_of_text|>", "<eos>")


def tokenizer_file(path: str) -> str:
  """The tokenizer.json of `path` (the file itself, or DIR/tokenizer.json); FileNotFoundError."""
  path = os.path.expanduser(path)
  file = os.path.join(path, "tokenizer.json") if os.path.isdir(path) else path
  if not os.path.isfile(file):
    raise FileNotFoundError(f"data.tokenizer={path!r}: {file} does not exist; give a Hugging Face "
                            "tokenizer.json or a directory holding one.")
  return file


def _read_json(path: str) -> dict:
  if not os.path.isfile(path):
    return {}
  with open(path) as f:
    return json.load(f)


class TextTokenizer:
  """A Hugging Face tokenizer (`tokenizers.Tokenizer` of a tokenizer.json) that packs documents.

  Attributes:
    file: the tokenizer.json.
    vocab_size: ids the tokenizer can produce (added tokens included): the model needs as many.
    eos_id: the id appended to every document. Found, in order, as `eos_token` of
      tokenizer_config.json, `eos_token_id` of generation_config.json or config.json (next to the
      tokenizer.json), or the first of <|endoftext|>, </s>, <|end_of_text|>, <eos> in the vocab.
    unk_id: the id of the model's unknown token, or None.
  """

  def __init__(self, path: str):
    import tokenizers  # pylint: disable=g-import-not-at-top  (only runs that use a tokenizer)

    self.file = tokenizer_file(path)
    self.tokenizer = tokenizers.Tokenizer.from_file(self.file)
    self.tokenizer.no_truncation()
    self.tokenizer.no_padding()
    self.vocab_size = self.tokenizer.get_vocab_size(with_added_tokens=True)
    self.eos_id = self._find_eos_id(os.path.dirname(self.file))
    unk = getattr(self.tokenizer.model, "unk_token", None)
    self.unk_id = self.tokenizer.token_to_id(unk) if unk else None

  def _find_eos_id(self, directory: str) -> int:
    where = []
    token = _read_json(os.path.join(directory, "tokenizer_config.json")).get("eos_token")
    if isinstance(token, dict):
      token = token.get("content")
    if token:
      if self.tokenizer.token_to_id(token) is None:
        raise ValueError(f"data.tokenizer={self.file!r}: tokenizer_config.json names eos_token "
                         f"{token!r}, which is not in the tokenizer's vocabulary.")
      return self.tokenizer.token_to_id(token)
    for name in ("generation_config.json", "config.json"):
      eos = _read_json(os.path.join(directory, name)).get("eos_token_id")
      if isinstance(eos, list):
        eos = eos[0] if eos else None
      if eos is not None:
        if not 0 <= int(eos) < self.vocab_size:
          where.append(f"{name} eos_token_id={eos} lies outside its {self.vocab_size} ids")
          continue
        return int(eos)
    for token in _EOS_TOKENS:
      if self.tokenizer.token_to_id(token) is not None:
        return self.tokenizer.token_to_id(token)
    raise ValueError(
        f"data.tokenizer={self.file!r}: no EOS token found ({'; '.join(where) or 'none named'}): "
        "put a tokenizer_config.json with \"eos_token\" next to tokenizer.json, or give the "
        f"vocabulary one of {_EOS_TOKENS}.")

  def encode(self, document: bytes | str) -> list[int]:
    """The ids of one document, without the EOS that packing appends."""
    if isinstance(document, bytes):
      document = document.decode("utf-8", errors="replace")
    ids = self.tokenizer.encode(document).ids
    return ids[:-1] if ids and ids[-1] == self.eos_id else ids  # a post-processor's own EOS

  def encode_batch(self, documents: list[bytes]) -> list[list[int]]:
    """`encode` of each document (the tokenizer's threads encode them together)."""
    texts = [d.decode("utf-8", errors="replace") for d in documents]
    out = []
    for encoding in self.tokenizer.encode_batch(texts):
      ids = encoding.ids
      out.append(ids[:-1] if ids and ids[-1] == self.eos_id else ids)
    return out

  def decode(self, ids) -> str:
    return self.tokenizer.decode([int(i) for i in ids])


_TOKENIZERS: dict[str, TextTokenizer] = {}


def text_tokenizer(path: str) -> TextTokenizer:
  """The (cached) `TextTokenizer` of `path`."""
  file = os.path.abspath(tokenizer_file(path))
  if file not in _TOKENIZERS:
    _TOKENIZERS[file] = TextTokenizer(file)
  return _TOKENIZERS[file]


def _tokenized_stream(docs: list[bytes], tokenizer: TextTokenizer) -> np.ndarray:
  """The tokenizer's ids of the docs, each followed by EOS, concatenated: int32 [total]."""
  parts = []
  for ids in tokenizer.encode_batch(docs):
    parts.append(np.asarray(ids + [tokenizer.eos_id], np.int32))
  return np.concatenate(parts) if parts else np.zeros([0], np.int32)


# ---------------------------------------------------------------------------------------------
# Tokenisation and packing.


def _numpy_stream(docs: list[bytes]) -> np.ndarray:
  """ByteVocabulary ids of the docs, each followed by EOS, concatenated: int32 [sum(len+1)]."""
  lengths = np.array([len(d) + 1 for d in docs], np.int64)
  stream = np.full(int(lengths.sum()), EOS_ID, np.int32)
  is_byte = np.ones(len(stream), bool)
  is_byte[np.cumsum(lengths) - 1] = False
  stream[is_byte] = np.frombuffer(b"".join(docs), np.uint8).astype(np.int32) + NUM_SPECIAL_IDS
  return stream


def seqio_task_name(task: str, path: str = "", tokenizer: str = "") -> str:
  """Name of the seqio task serving `task`; text_files tasks carry a hash of their glob, tasks
  with a tokenizer one of its file."""
  name = (f"moe_jax_text_files_{zlib.crc32(path.encode()):08x}" if task == "text_files"
          else f"moe_jax_{task}")
  if tokenizer:
    name += f"_tok{zlib.crc32(os.path.abspath(tokenizer_file(tokenizer)).encode()):08x}"
  return name


def _seqio_stream(task: str, path: str, split: str, tokenizer: str = "") -> np.ndarray:
  from moe_jax import data_seqio  # pylint: disable=g-import-not-at-top  (TensorFlow loads here)
  name = seqio_task_name(task, path, tokenizer)
  vocabulary = data_seqio.TokenizerVocabulary(text_tokenizer(tokenizer)) if tokenizer else None
  data_seqio.register_task(name, lambda s: [d for _, d in documents(task, path, s)], vocabulary)
  return data_seqio.token_stream(name, split)


def _resolve_reader(reader: str) -> str:
  if reader != "auto":
    return reader
  try:
    from moe_jax import data_seqio  # pylint: disable=g-import-not-at-top,unused-import
  except ImportError:
    return "numpy"
  return "seqio"


def _pack(stream: np.ndarray, seq_len: int) -> np.ndarray:
  """Cuts the stream into consecutive chunks of seq_len + 1 tokens: [N, seq_len + 1], uint16
  (uint32 when an id does not fit, e.g. a 128K-token vocabulary)."""
  num_chunks = len(stream) // (seq_len + 1)
  dtype = np.uint16 if len(stream) == 0 or int(stream.max()) < 2 ** 16 else np.uint32
  return stream[:num_chunks * (seq_len + 1)].astype(dtype).reshape(num_chunks, seq_len + 1)


def _document_starts(docs: list[bytes]) -> np.ndarray:
  """Stream offset of each document's first token (each document is len + 1 tokens): int64 [n]."""
  lengths = np.array([len(d) + 1 for d in docs], np.int64)
  return np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)


def _build(task: str, path: str, split: str, seq_len: int, reader: str,
           tokenizer: str = "") -> tuple[np.ndarray, np.ndarray, float]:
  key = (task, path if task == "text_files" else "", split, seq_len, reader, tokenizer)
  if key not in _CACHE:
    docs = [d for _, d in documents(task, key[1], split)]
    if reader == "seqio":
      stream = _seqio_stream(task, key[1], split, tokenizer)
    elif tokenizer:
      stream = _tokenized_stream(docs, text_tokenizer(tokenizer))
    else:
      stream = _numpy_stream(docs)
    if tokenizer:
      # Each document ends with the (only) EOS its encoding gets, so EOS positions delimit them
      # (a document holding the EOS token's literal text counts as two, which only moves
      # which chunks the evaluation sample prefers).
      ends = np.flatnonzero(stream == text_tokenizer(tokenizer).eos_id)
      starts = np.concatenate([[0], ends[:-1] + 1]).astype(np.int64)
    else:
      # Both readers build the same stream (tested), so document offsets come from the bytes.
      starts = _document_starts(docs)
    # Each EOS counts as a byte, so the byte vocabulary has exactly 1.
    num_bytes = sum(len(d) for d in docs) + len(docs)
    bytes_per_token = num_bytes / len(stream) if len(stream) else 1.0
    tokens = _pack(stream, seq_len)
    tokens.setflags(write=False)
    starts.setflags(write=False)
    _CACHE[key] = (tokens, starts, bytes_per_token)
  return _CACHE[key]


def build_tokens(task: str, path: str, split: str, seq_len: int, reader: str,
                 tokenizer: str = "") -> np.ndarray:
  """The packed, read-only token array of a split: uint16 (or uint32) [N, seq_len + 1].

  Cached per process by (task, path, split, seq_len, reader, tokenizer); edits to the files after
  the first call are not seen.
  """
  return _build(task, path, split, seq_len, reader, tokenizer)[0]


def corpus_fingerprint(data_config) -> dict:
  """What names the corpus a number was measured on: task, interpreter, files and bytes per split.

  The stdlib corpus is whatever standard library the running interpreter has, so results change
  with the Python version; every result records this dict. `file_list_sha256` hashes the sorted
  (split, name, size) lines and `content_sha256` the bytes themselves (first 16 hex digits each).

  With `data.tokenizer` set, "tokenizer" holds its path and the sha256 of its tokenizer.json (first
  16 hex digits).

  Returns:
    {"task", "path", "python", "implementation", "splits": {split: {"files", "bytes"}},
     "file_list_sha256", "content_sha256"[, "tokenizer"]}.
  """
  task, path = data_config.task, data_config.get("path", "") or ""
  names, contents = hashlib.sha256(), hashlib.sha256()
  splits = {}
  for split in SPLITS:
    docs = documents(task, path, split)
    splits[split] = {"files": len(docs), "bytes": sum(len(d) for _, d in docs)}
    for name, body in docs:
      names.update(f"{split}\t{name}\t{len(body)}\n".encode())
      contents.update(body)
  fingerprint = {"task": task, "path": path if task == "text_files" else "",
                 "python": platform.python_version(),
                 "implementation": platform.python_implementation(),
                 "splits": splits, "file_list_sha256": names.hexdigest()[:16],
                 "content_sha256": contents.hexdigest()[:16]}
  tokenizer = data_config.get("tokenizer", "") or ""
  if tokenizer:
    file = tokenizer_file(tokenizer)
    fingerprint["tokenizer"] = {"path": file, "sha256": hashlib.sha256(
        pathlib.Path(file).read_bytes()).hexdigest()[:16]}
  return fingerprint


def describe_fingerprint(fingerprint: dict) -> str:
  """One line for logs and tables, e.g. 'stdlib_bytes (CPython 3.11.7): 1690 train files ...'."""
  splits = ", ".join(f"{v['files']} {k} files / {v['bytes']:,} bytes"
                     for k, v in fingerprint["splits"].items())
  where = f" {fingerprint['path']}" if fingerprint.get("path") else ""
  tokenizer = fingerprint.get("tokenizer")
  tokens = (f"; tokenizer {tokenizer['path']} ({tokenizer['sha256']})" if tokenizer else "")
  return (f"{fingerprint['task']}{where} ({fingerprint['implementation']} {fingerprint['python']}): "
          f"{splits}; files {fingerprint['file_list_sha256']}, "
          f"content {fingerprint['content_sha256']}{tokens}")


# ---------------------------------------------------------------------------------------------
# Batching.


class TokenDataset:
  """Fixed token chunks with deterministic, step-addressable batches.

  Attributes:
    tokens: [N, S + 1] integer chunks; objective "lm": inputs are [:, :-1], targets [:, 1:];
      "mlm": inputs are [:, :-1] corrupted (`moe_jax.masking`), targets [:, :-1].
    name: a description ("task/split") used in error messages.
    objective: "lm" or "mlm" (see the module docstring).
    mask_rate: "mlm": the fraction of each sequence's tokens to predict.
    pad_id: targets equal to it weigh 0 ("lm"); None = none (a tokenizer's packed chunks, whose
      id 0 is an ordinary token).
    bytes_per_token: the split's bytes per token (1 for the byte vocabulary), for bits per byte.
  """

  def __init__(self, tokens: np.ndarray, name: str = "dataset",
               document_starts: np.ndarray | None = None, *, objective: str = "lm",
               mask_rate: float = 0.15, pad_id: int | None = PAD_ID,
               bytes_per_token: float = 1.0):
    if tokens.ndim != 2 or tokens.shape[1] < 2:
      raise ValueError(f"{name}: tokens must be [N, S+1] with S >= 1, got shape {tokens.shape}.")
    if objective not in OBJECTIVES:
      raise ValueError(f"data.objective={objective!r} is not allowed; allowed: {OBJECTIVES}.")
    if objective == "mlm" and not 0 < mask_rate <= 1:
      raise ValueError(f"data.mask_rate={mask_rate!r} is not allowed; allowed: a number in (0, 1].")
    self.tokens = tokens
    self.name = name
    self.objective = objective
    self.mask_rate = mask_rate
    self.pad_id = pad_id
    self.bytes_per_token = bytes_per_token
    # Stream offset of each document's first token; None = one document (no file boundaries).
    self.document_starts = (np.zeros((1,), np.int64) if document_starts is None
                            else np.asarray(document_starts, np.int64))
    self._permutations: dict[tuple[int, int], np.ndarray] = {}

  def __len__(self) -> int:
    return self.tokens.shape[0]

  def _permutation(self, seed: int, epoch: int) -> np.ndarray:
    key = (seed, epoch)
    if key not in self._permutations:
      if len(self._permutations) >= 4:  # A batch touches at most two epochs when B <= N.
        self._permutations.pop(next(iter(self._permutations)))
      self._permutations[key] = np.random.default_rng([seed, epoch]).permutation(len(self))
    return self._permutations[key]

  def _batch(self, rows: np.ndarray) -> dict[str, np.ndarray]:
    """The "lm" batch of chunks `rows`."""
    chunks = self.tokens[rows].astype(np.int32)
    targets = chunks[:, 1:]
    weights = (np.ones(targets.shape, np.float32) if self.pad_id is None
               else (targets != self.pad_id).astype(np.float32))
    return {"inputs": chunks[:, :-1], "targets": targets, "weights": weights}

  def _masked_batch(self, rows: np.ndarray, keys: np.ndarray,
                    real_rows: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """The "mlm" batch of chunks `rows`, row b corrupted by keys[b]; rows off `real_rows` weigh 0."""
    tokens = self.tokens[rows, :-1].astype(np.int32)
    valid = tokens != PAD_ID
    if real_rows is not None:
      valid &= real_rows[:, None]
    return masking.mask_tokens(tokens, valid, keys, rate=self.mask_rate, mask_id=MASK_ID,
                               random_ids=(NUM_SPECIAL_IDS, NUM_SPECIAL_IDS + 256))

  def train_batch(self, step: int, batch_size: int, seed: int,
                  rows: slice | None = None) -> dict[str, np.ndarray]:
    """Batch `step` of an endless shuffled stream; a pure function of (step, batch_size, seed).

    Position p = step * B + i (i < B) of the stream is chunk perm_e[p % N] with epoch
    e = p // N and perm_e = default_rng([seed, e]).permutation(N), so a batch may straddle two
    epochs and a resumed run sees exactly the batches it would have seen.

    Args:
      step: the batch index, >= 0.
      batch_size: B, > 0.
      seed: a non-negative integer seed for the epoch permutations.
      rows: only these rows of the global batch (a process's shard in multi-process training);
        default all B.

    Returns:
      {"inputs": int32 [R, S], "targets": int32 [R, S], "weights": float32 [R, S]} for the R
      requested rows; "lm": weights are 0 on pad targets (none occur with packing) and 1
      elsewhere; "mlm": 1 at the masked positions, which row i of the global batch draws from
      the key (seed, step, i), so they do not depend on `rows`.
    """
    if step < 0 or batch_size <= 0 or seed < 0:
      raise ValueError(f"{self.name}: need step >= 0, batch_size > 0, seed >= 0; got "
                       f"step={step}, batch_size={batch_size}, seed={seed}.")
    global_rows = np.arange(batch_size, dtype=np.int64)[rows or slice(None)]
    positions = step * batch_size + global_rows
    epochs, offsets = np.divmod(positions, len(self))
    chunk_ids = np.empty(len(positions), np.int64)
    for epoch in np.unique(epochs):
      in_epoch = epochs == epoch
      chunk_ids[in_epoch] = self._permutation(seed, int(epoch))[offsets[in_epoch]]
    if self.objective == "mlm":
      keys = np.stack([np.full_like(global_rows, _TRAIN_MASK_KEY), np.full_like(global_rows, seed),
                       np.full_like(global_rows, step), global_rows], axis=1)
      return self._masked_batch(chunk_ids, keys)
    return self._batch(chunk_ids)

  def document_chunks(self) -> tuple[np.ndarray, np.ndarray]:
    """First and last chunk holding a token of each document: (int64 [n], int64 [n]).

    A document that lies wholly in the dropped trailing partial chunk has first > last.
    """
    chunk_len = self.tokens.shape[1]
    stream_len = len(self) * chunk_len
    ends = np.append(self.document_starts[1:], max(stream_len, self.document_starts[-1] + 1))
    first = self.document_starts // chunk_len
    last = np.minimum((ends - 1) // chunk_len, len(self) - 1)
    return first, last

  def eval_chunks(self, num_chunks: int) -> np.ndarray:
    """The evaluation sample: `num_chunks` chunk indices spread over the whole split, sorted.

    A systematic sample (chunk floor((i + 1/2) N / n) for i < n, one per equal stretch of the
    split), in which every document with a token in the packed split is represented: a document
    that no sampled chunk touches gets the chunk holding its middle token instead of a systematic
    one. Deterministic: a function of the split and n only. With n >= N it is the whole split.
    When there are more documents than chunks to sample, a plain systematic sample is returned
    (not every document can be represented).
    """
    total = len(self)
    if num_chunks >= total:
      return np.arange(total)
    first, last = self.document_chunks()
    in_split = first <= last
    middles = ((first + last) // 2)[in_split]
    first, last = first[in_split], last[in_split]

    def systematic(count):
      return np.floor((np.arange(count) + 0.5) * total / count).astype(np.int64)

    if len(middles) > num_chunks:
      return systematic(num_chunks)
    systematic_count = num_chunks
    while True:
      picked = systematic(systematic_count)
      # A document is touched when a picked chunk lies in [first, last].
      touched = np.searchsorted(picked, last, side="right") > np.searchsorted(picked, first)
      chosen = np.union1d(picked, middles[~touched])
      if len(chosen) <= num_chunks:
        break
      systematic_count -= len(chosen) - num_chunks
    if len(chosen) < num_chunks:  # Duplicated middles left room: top up with unpicked chunks.
      spare = np.setdiff1d(systematic(num_chunks), chosen)
      chosen = np.union1d(chosen, spare[:num_chunks - len(chosen)])
    return chosen

  def eval_batches(self, batch_size: int, num_batches: int) -> Iterator[dict[str, np.ndarray]]:
    """`num_batches` batches of the evaluation sample (`eval_chunks(batch_size * num_batches)`).

    The sampled chunks are put in a fixed shuffled order (seed 0), so that every batch mixes
    all regions of the split and per-batch losses are comparable (their spread gives the standard
    error). When the split has fewer chunks than asked, it is evaluated whole: fewer batches, the
    last one padded with rows of weight 0. Objective "mlm" masks each chunk by a key of its chunk
    index alone, so any model, seed or batch size is evaluated on the same masked positions.

    Args:
      batch_size: B, > 0.
      num_batches: batches to yield (the sample holds B * num_batches chunks).

    Returns:
      An iterator of batches shaped like `train_batch`'s.
    """
    if batch_size <= 0 or num_batches <= 0:
      raise ValueError(f"{self.name}: need batch_size > 0 and num_batches > 0; got "
                       f"batch_size={batch_size}, num_batches={num_batches}.")
    chunks = self.eval_chunks(batch_size * num_batches)
    chunks = chunks[np.random.default_rng(0).permutation(len(chunks))]
    return (self._padded_batch(chunks[start:start + batch_size], batch_size)
            for start in range(0, len(chunks), batch_size))

  def _padded_batch(self, rows: np.ndarray, batch_size: int) -> dict[str, np.ndarray]:
    """The batch of `rows`, padded to `batch_size` rows of weight 0."""
    padding = batch_size - len(rows)
    padded = np.concatenate([rows, np.zeros(padding, np.int64)]).astype(np.int64)
    if self.objective == "mlm":
      keys = np.stack([np.full_like(padded, _EVAL_MASK_KEY), padded], axis=1)
      return self._masked_batch(padded, keys, real_rows=np.arange(batch_size) < len(rows))
    batch = self._batch(padded)
    if padding:
      batch["weights"][len(rows):] = 0.0
    return batch

  def bits_per_byte(self, loss_nats: float) -> float:
    """A per-token loss on this split in bits per byte (`bytes_per_token`)."""
    return bits_per_byte(loss_nats, self.bytes_per_token)

  def unigram_entropy_bits(self) -> float:
    """Entropy (bits/token) of the targets' empirical token distribution: the unigram baseline."""
    counts = np.bincount(self.tokens[:, 1:].ravel().astype(np.int64), minlength=VOCAB_SIZE)
    probs = counts[counts > 0] / counts.sum()
    return float(-(probs * np.log2(probs)).sum())


def load_dataset(data_config, split: str) -> TokenDataset:
  """Loads `split` of the task named by `data_config` (task, path, seq_len, reader, objective).

  Args:
    data_config: an ml_collections.ConfigDict like `config.data` in configs/default.py (with
      `tokenizer`, a missing field is the byte vocabulary).
    split: "train" or "validation".

  Returns:
    A TokenDataset whose tokens are [N, seq_len + 1].

  Raises:
    ValueError: naming the field, its value and what is allowed, for an unknown task, split,
      reader or objective, a mask_rate outside (0, 1], a non-positive seq_len, a glob matching
      no file, a split too small for one chunk, a tokenizer with objective "mlm" or without EOS.
    FileNotFoundError: `data.tokenizer` names no tokenizer.json.
  """
  task, reader = data_config.task, data_config.reader
  path, seq_len = data_config.get("path", "") or "", data_config.seq_len
  if task not in TASKS:
    raise ValueError(f"data.task={task!r} is not allowed; allowed: {TASKS}.")
  if split not in SPLITS:
    raise ValueError(f"split={split!r} is not allowed; allowed: {SPLITS}.")
  if reader not in READERS:
    raise ValueError(f"data.reader={reader!r} is not allowed; allowed: {READERS}.")
  if not isinstance(seq_len, int) or seq_len < 1:
    raise ValueError(f"data.seq_len={seq_len!r} is not allowed; allowed: an integer >= 1.")
  if task == "text_files" and not path:
    raise ValueError(f"data.path={path!r} is empty; task 'text_files' needs a glob of files.")
  tokenizer = data_config.get("tokenizer", "") or ""
  objective = data_config.get("objective", "lm")
  if tokenizer and objective != "lm":
    raise ValueError(f"data.objective={objective!r} needs the byte vocabulary (its [MASK] id is "
                     f"{MASK_ID}); with data.tokenizer={tokenizer!r} only 'lm' is allowed.")
  tokens, document_starts, bytes_per_token = _build(task, path, split, seq_len,
                                                    _resolve_reader(reader), tokenizer)
  name = f"task {task!r} split {split!r}" + (
      f" (data.path={path!r})" if task == "text_files" else "")
  if len(tokens) == 0:
    raise ValueError(f"{name} is too small for one chunk of data.seq_len + 1 = {seq_len + 1} "
                     "tokens; lower data.seq_len or add data.")
  return TokenDataset(tokens, name, document_starts, objective=objective,
                      mask_rate=data_config.get("mask_rate", 0.15),
                      pad_id=None if tokenizer else PAD_ID, bytes_per_token=bytes_per_token)
