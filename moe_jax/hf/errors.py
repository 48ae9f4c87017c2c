"""The errors of the Hugging Face importer and exporter."""


class UnsupportedConfigError(ValueError):
  """An unknown `model_type`, or a config field whose value changes the math and is not implemented.

  The message names the field (or the model_type) and what is supported: an import never builds a
  silently different model.
  """


class CheckpointMismatchError(ValueError):
  """A tensor missing from the checkpoint, an unexpected one, or one with the wrong shape."""
