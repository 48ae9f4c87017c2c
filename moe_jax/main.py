"""Entry point: python -m moe_jax.main --config=configs/default.py --workdir=DIR [--config.x.y=v].

The config is validated before anything is computed or written; the resolved config is saved as
DIR/config.json; training resumes from DIR/checkpoints when there are any.
"""
import logging as logging_std
import os

# TensorFlow (pulled in by seqio and clu) must not grab an accelerator or flood the log.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from absl import app  # noqa: E402
from absl import flags  # noqa: E402
from absl import logging  # noqa: E402
import jax  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from moe_jax import train  # noqa: E402
from moe_jax.validation import ConfigError, validate_config  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file (get_config()).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, summaries and config.")
flags.mark_flags_as_required(["config", "workdir"])


class _QuietLibraries(logging_std.Filter):
  """Drops INFO chatter of orbax and TensorFlow from the absl log; warnings still pass."""

  def filter(self, record: logging_std.LogRecord) -> bool:
    noisy = any(part in record.pathname for part in ("orbax", "tensorflow", "seqio"))
    return record.levelno >= logging_std.WARNING or not noisy


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  logging.get_absl_logger().addFilter(_QuietLibraries())
  config = _CONFIG.value
  try:
    validate_config(config)
  except ConfigError as e:
    # A clean one-screen message instead of a traceback; nothing has been written yet.
    raise app.UsageError(str(e)) from None
  logging.info("JAX %s, backend %s, %d devices, process %d/%d.", jax.__version__,
               jax.default_backend(), jax.device_count(), jax.process_index(), jax.process_count())
  result = train.train_and_evaluate(config, _WORKDIR.value)
  logging.info("Done: %s", result)


if __name__ == "__main__":
  app.run(main)
