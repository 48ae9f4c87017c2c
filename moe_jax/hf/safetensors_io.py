"""Reading and writing safetensors checkpoints one tensor at a time, in NumPy.

A checkpoint directory holds `model.safetensors`, or shards `model-0000i-of-0000n.safetensors` with
`model.safetensors.index.json` ({"metadata": {"total_size": N}, "weight_map": {name: file}}).

The format (https://github.com/huggingface/safetensors) is an 8-byte little-endian header length,
a JSON header {name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}} and
the raw little-endian data. This module reads one tensor at a time from its file offset (only when
it is converted) and writes tensors directly: the `safetensors` package's NumPy API
raises TypeError on BF16 tensors (safetensors 0.8.0; NumPy has no bfloat16), which are most
published checkpoints. `ml_dtypes.bfloat16` (a JAX dependency) stands in for it here.
"""
from __future__ import annotations

import json
import os
import struct
from typing import Iterable

import ml_dtypes
import numpy as np

from moe_jax.hf.errors import CheckpointMismatchError

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
          "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
          "BOOL": np.bool_}
_CODES = {np.dtype(v): k for k, v in DTYPES.items()}


def _read_header(path: str) -> tuple[dict, int]:
  with open(path, "rb") as f:
    (length,) = struct.unpack("<Q", f.read(8))
    header = json.loads(f.read(length))
  return header, 8 + length


class CheckpointReader:
  """The tensors of a safetensors checkpoint directory (single file or sharded with an index)."""

  def __init__(self, directory: str):
    self.directory = directory
    index = os.path.join(directory, INDEX_FILE)
    if os.path.isfile(index):
      with open(index) as f:
        files = sorted(set(json.load(f)["weight_map"].values()))
    elif os.path.isfile(os.path.join(directory, SINGLE_FILE)):
      files = [SINGLE_FILE]
    else:
      raise FileNotFoundError(f"{directory} holds neither {SINGLE_FILE} nor {INDEX_FILE}.")
    self._entries: dict[str, tuple[str, dict, int]] = {}
    for name in files:
      path = os.path.join(directory, name)
      header, data_start = _read_header(path)
      header.pop("__metadata__", None)
      for tensor, entry in header.items():
        self._entries[tensor] = (path, entry, data_start)

  @property
  def names(self) -> list[str]:
    return sorted(self._entries)

  def __contains__(self, name: str) -> bool:
    return name in self._entries

  def shape(self, name: str) -> tuple[int, ...]:
    return tuple(self._entry(name)[1]["shape"])

  def dtype(self, name: str) -> np.dtype:
    code = self._entry(name)[1]["dtype"]
    if code not in DTYPES:
      raise CheckpointMismatchError(f"tensor {name!r} has dtype {code}, which is not supported "
                                    f"({', '.join(DTYPES)}).")
    return np.dtype(DTYPES[code])

  def _entry(self, name: str):
    if name not in self._entries:
      raise CheckpointMismatchError(f"tensor {name!r} is missing from the checkpoint in "
                                    f"{self.directory}.")
    return self._entries[name]

  def read(self, name: str) -> np.ndarray:
    """The tensor, read from its file into a new array.

    Read, not memory-mapped: pages of a mapping stay resident (and counted in the process's
    memory) until it is closed, so mapping every file would hold the whole checkpoint beside the
    converted parameters.
    """
    path, entry, data_start = self._entry(name)
    begin, end = entry["data_offsets"]
    dtype = self.dtype(name)
    count = (end - begin) // dtype.itemsize
    return np.fromfile(path, dtype=dtype, count=count, offset=data_start + begin).reshape(
        self.shape(name))


def _write_file(path: str, tensors: list[tuple[str, np.ndarray]]) -> None:
  header, offset = {"__metadata__": {"format": "pt"}}, 0
  for name, array in tensors:
    header[name] = {"dtype": _CODES[array.dtype], "shape": list(array.shape),
                    "data_offsets": [offset, offset + array.nbytes]}
    offset += array.nbytes
  encoded = json.dumps(header, separators=(",", ":")).encode()
  encoded += b" " * (-len(encoded) % 8)  # the data starts 8-byte aligned
  with open(path, "wb") as f:
    f.write(struct.pack("<Q", len(encoded)))
    f.write(encoded)
    for _, array in tensors:
      f.write(np.ascontiguousarray(array).tobytes())


def write_checkpoint(tensors: Iterable[tuple[str, np.ndarray]], directory: str, *,
                     max_shard_bytes: int = 5 * 2 ** 30) -> list[str]:
  """Writes (name, array) pairs as safetensors files of at most `max_shard_bytes` each.

  One file is `model.safetensors`; more are `model-0000i-of-0000n.safetensors` plus the index.
  Arrays are consumed in order and held only until their shard is written, so host memory stays
  within one shard. Returns the file names.
  """
  os.makedirs(directory, exist_ok=True)
  shards, current, size = [], [], 0
  temporary = []

  def flush():
    nonlocal current, size
    name = f"shard-{len(temporary):05d}.tmp"
    _write_file(os.path.join(directory, name), current)
    temporary.append((name, [n for n, _ in current], size))
    current, size = [], 0

  for name, array in tensors:
    if array.dtype not in _CODES:
      raise ValueError(f"tensor {name!r} has dtype {array.dtype}, which safetensors cannot hold.")
    if current and size + array.nbytes > max_shard_bytes:
      flush()
    current.append((name, array))
    size += array.nbytes
  if current or not temporary:
    flush()
  total = sum(s for _, _, s in temporary)
  if len(temporary) == 1:
    os.replace(os.path.join(directory, temporary[0][0]), os.path.join(directory, SINGLE_FILE))
    return [SINGLE_FILE]
  weight_map = {}
  for i, (tmp, names, _) in enumerate(temporary):
    final = f"model-{i + 1:05d}-of-{len(temporary):05d}.safetensors"
    os.replace(os.path.join(directory, tmp), os.path.join(directory, final))
    shards.append(final)
    weight_map.update({n: final for n in names})
  with open(os.path.join(directory, INDEX_FILE), "w") as f:
    json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
  return shards


