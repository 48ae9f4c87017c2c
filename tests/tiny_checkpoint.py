"""A tiny trained checkpoint shared by the sampling and routing-analysis tests (trained once)."""
import atexit
import functools
import shutil
import tempfile

from configs import default
from moe_jax import train

STEPS = 30


@functools.lru_cache(maxsize=None)
def trained_workdir() -> tuple[str, dict]:
  """Trains configs/default.py:tiny for STEPS steps once per process; returns (workdir, result).

  Callers must not write into the workdir.
  """
  workdir = tempfile.mkdtemp(prefix="moe_jax_tiny_ckpt_")
  atexit.register(shutil.rmtree, workdir, ignore_errors=True)
  config = default.get_config("tiny")
  config.train.steps = STEPS
  config.train.eval_every = STEPS
  config.train.checkpoint_every = STEPS
  result = train.train_and_evaluate(config, workdir)
  return workdir, result
