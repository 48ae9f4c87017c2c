"""seqio tasks for the corpora: the only module that imports TensorFlow and seqio.

Documents are tokenised with `seqio.ByteVocabulary` or, with `config.data.tokenizer`, with
`TokenizerVocabulary`: a seqio vocabulary around the very encoder the NumPy reader calls
(`data.TextTokenizer`), so both readers give the same tokens.

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


class TokenizerVocabulary(seqio.Vocabulary):
  """A seqio vocabulary that encodes with a Hugging Face tokenizer (`data.TextTokenizer`).

  `encode` is `TextTokenizer.encode` (UTF-8 decoding of the document bytes, the tokenizer's own
  special tokens, no EOS); seqio's `append_eos` then adds `eos_id`. In TensorFlow it runs the same
  Python encoder through `tf.numpy_function`.
  """

  def __init__(self, text_tokenizer):
    super().__init__(extra_ids=0)
    self._tokenizer = text_tokenizer

  @property
  def eos_id(self) -> int:
    return self._tokenizer.eos_id

  @property
  def unk_id(self):
    return self._tokenizer.unk_id

  @property
  def _base_vocab_size(self) -> int:
    return self._tokenizer.vocab_size

  def _encode(self, s):
    return self._tokenizer.encode(s)

  def _decode(self, ids):
    return self._tokenizer.decode(ids)

  def _encode_tf(self, s):
    ids = tf.numpy_function(lambda text: np.asarray(self._tokenizer.encode(text), np.int32), [s],
                            tf.int32, stateful=False)
    ids.set_shape([None])
    return ids

  def _decode_tf(self, ids):
    text = tf.numpy_function(lambda x: np.array(self._tokenizer.decode(x.tolist()).encode(),
                                                dtype=object), [ids], tf.string, stateful=False)
    text.set_shape([])
    return text

  def __eq__(self, other):
    return (isinstance(other, TokenizerVocabulary)
            and other._tokenizer.file == self._tokenizer.file)  # pylint: disable=protected-access

  def __hash__(self):
    return hash(self._tokenizer.file)


def register_task(name: str, documents_fn: Callable[[str], Sequence[bytes]],
                  vocabulary: seqio.Vocabulary | None = None) -> seqio.Task:
  """(Re-)registers seqio task `name` whose "targets" are documents_fn(split), tokenised.

  Registering again replaces the task, so a task always serves the current `documents_fn`.

  Args:
    name: the seqio task name.
    documents_fn: split -> raw documents (bytes) in stream order.
    vocabulary: the tokenisation; default `VOCABULARY` (bytes).

  Returns:
    The registered task; each example is {"targets": int32 [tokens + 1]} ending in EOS.
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
      output_features={"targets": seqio.Feature(vocabulary or VOCABULARY, add_eos=True)},
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
