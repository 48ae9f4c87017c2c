"""seqio tasks for the byte-level corpora: the only module that imports TensorFlow and seqio.

`data.py` imports this lazily, for `config.data.reader = "seqio"` (or "auto" when it imports).
TensorFlow is told to see no GPU, so it never takes accelerator memory from JAX.
"""
from collections.abc import Callable, Sequence
import functools

import numpy as np
import tensorflow as tf

try:
  tf.config.set_visible_devices([], "GPU")
except RuntimeError:  # TensorFlow already ran before this import: too late to hide the GPU.
  pass

import seqio  # pylint: disable=g-import-not-at-top,g-bad-import-order  (after hiding the GPU)

VOCABULARY = seqio.ByteVocabulary()
SPLITS = ("train", "validation")


def register_task(name: str, documents_fn: Callable[[str], Sequence[bytes]]) -> seqio.Task:
  """(Re-)registers seqio task `name` whose "targets" are documents_fn(split), byte-tokenised.

  Registering again replaces the task, so a task always serves the current `documents_fn`.

  Args:
    name: the seqio task name.
    documents_fn: split -> raw documents (bytes) in stream order.

  Returns:
    The registered task; each example is {"targets": int32 [len(document) + 1]} ending in EOS.
  """
  def dataset_fn(split: str, shuffle_files: bool) -> tf.data.Dataset:
    del shuffle_files  # Documents are packed in name order; chunks are shuffled later, in NumPy.
    # tf.string holds arbitrary bytes, so non-UTF-8 files reach ByteVocabulary unchanged.
    docs = tf.constant(list(documents_fn(split)), dtype=tf.string)
    return tf.data.Dataset.from_tensor_slices({"targets": docs})

  seqio.TaskRegistry.remove(name)
  return seqio.TaskRegistry.add(
      name,
      source=seqio.FunctionDataSource(dataset_fn, splits=SPLITS),
      output_features={"targets": seqio.Feature(VOCABULARY, add_eos=True)},
      preprocessors=[
          functools.partial(seqio.preprocessors.tokenize, copy_pretokenized=False),
          seqio.preprocessors.append_eos,
      ])


def token_stream(name: str, split: str) -> np.ndarray:
  """All examples of task `name` / `split`, concatenated in order: int32 [total tokens]."""
  ds = seqio.get_mixture_or_task(name).get_dataset(
      split=split, shuffle=False, sequence_length=None, trim_output_features=False)
  # Ragged batches cut the per-example Python overhead of iterating thousands of documents.
  ds = ds.map(lambda ex: ex["targets"]).ragged_batch(256).map(lambda batch: batch.flat_values)
  parts = list(ds.as_numpy_iterator())
  return np.concatenate(parts).astype(np.int32) if parts else np.zeros([0], np.int32)
