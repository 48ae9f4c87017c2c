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
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "host:port of process 0 for multi-process runs (GPU hosts, CPU "
    "loopback). TPU pods need none: jax.distributed finds its peers there.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Processes in a multi-process run.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index in [0, num_processes).")
_DISTRIBUTED = flags.DEFINE_bool(
    "distributed", False, "Call jax.distributed.initialize() with no arguments (TPU pods, SLURM, "
    "or JAX_COORDINATOR_ADDRESS in the environment).")
flags.mark_flags_as_required(["config", "workdir"])


def _initialize_distributed() -> None:
  """Joins the multi-process run described by the flags, before any device is touched."""
  if _COORDINATOR.value is None and not _DISTRIBUTED.value:
    return
  if os.environ.get("JAX_PLATFORMS", "") == "cpu":
    # XLA:CPU needs gloo for cross-process collectives (loopback tests, CPU clusters).
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(coordinator_address=_COORDINATOR.value,
                             num_processes=_NUM_PROCESSES.value, process_id=_PROCESS_ID.value)


class _QuietLibraries(logging_std.Filter):
  """Drops INFO chatter of orbax and TensorFlow from the absl log; warnings still pass."""

  def filter(self, record: logging_std.LogRecord) -> bool:
    noisy = any(part in record.pathname for part in ("orbax", "tensorflow", "seqio"))
    return record.levelno >= logging_std.WARNING or not noisy


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  logging.get_absl_logger().addFilter(_QuietLibraries())
  _initialize_distributed()
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
