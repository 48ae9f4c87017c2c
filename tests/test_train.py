"""End-to-end training: the loss falls, resume reproduces an uninterrupted run, SIGTERM saves."""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from configs import default
from moe_jax import data, train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_config(**train_overrides):
  config = default.get_config("tiny")
  for key, value in train_overrides.items():
    config.train[key] = value
  return config


def run(config, workdir, stop_at=None):
  """Trains; returns (result, {step: loss}); `stop_at` sends this process SIGTERM after that step."""
  losses = {}

  def callback(step, metrics):
    losses[step] = float(metrics["loss"])
    if step == stop_at:
      os.kill(os.getpid(), signal.SIGTERM)

  return train.train_and_evaluate(config, str(workdir), step_callback=callback), losses


def test_tiny_run_learns_below_unigram_entropy(tmp_path):
  config = tiny_config(steps=80, eval_every=80)
  result, losses = run(config, tmp_path)
  unigram_bits = data.load_dataset(config.data, "validation").unigram_entropy_bits()
  assert losses[80] < 0.6 * losses[1]
  assert result["eval/bits_per_byte"] < unigram_bits - 0.5, (result, unigram_bits)
  saved = json.load(open(tmp_path / "config.json"))
  assert saved["model"]["moe"]["num_experts"] == config.model.moe.num_experts
  assert any(name.startswith("events.out.tfevents") for name in os.listdir(tmp_path))


def test_preempt_and_resume_reproduces_uninterrupted_losses(tmp_path):
  config = tiny_config(steps=24, checkpoint_every=10, eval_every=100)
  _, reference = run(config, tmp_path / "straight")

  first, losses_before = run(config, tmp_path / "resumed", stop_at=13)
  assert first["preempted"] and first["step"] == 13
  assert max(losses_before) == 13
  second, losses_after = run(config, tmp_path / "resumed")
  assert not second["preempted"] and min(losses_after) == 14 and max(losses_after) == 24
  resumed = {**losses_before, **losses_after}
  np.testing.assert_allclose([resumed[s] for s in range(1, 25)],
                             [reference[s] for s in range(1, 25)], rtol=1e-6)


def test_keeps_only_the_newest_checkpoints(tmp_path):
  config = tiny_config(steps=20, checkpoint_every=4, keep_checkpoints=2, eval_every=100)
  run(config, tmp_path)
  assert sorted(int(s) for s in os.listdir(tmp_path / "checkpoints") if s.isdigit()) == [16, 20]


def test_same_losses_on_one_device_and_eight():
  """Data-parallel over 8 devices computes the same function of (params, batch) as 1 device."""
  results = []
  for data_axis in (1, -1):
    config = tiny_config(steps=3, eval_every=100, checkpoint_every=100)
    config.mesh.data = data_axis
    import tempfile
    with tempfile.TemporaryDirectory() as workdir:
      results.append(run(config, workdir)[1])
  np.testing.assert_allclose([results[0][s] for s in (1, 2, 3)],
                             [results[1][s] for s in (1, 2, 3)], rtol=1e-5)


@pytest.mark.slow
def test_sigterm_saves_checkpoint_and_exits_cleanly(tmp_path):
  """The CLI, sent SIGTERM mid-run, saves the current step and exits 0; a rerun restores it."""
  cmd = [sys.executable, "-m", "moe_jax.main", "--config=configs/default.py:tiny",
         f"--workdir={tmp_path}", "--config.train.steps=100000", "--config.train.log_every=1",
         "--config.train.checkpoint_every=100000"]
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")
  proc = subprocess.Popen(cmd, cwd=REPO, env=env, stderr=subprocess.PIPE, text=True)
  deadline = time.time() + 240
  for line in proc.stderr:
    if "step 3/100000" in line or time.time() > deadline:
      break
  proc.send_signal(signal.SIGTERM)
  _, rest = proc.communicate(timeout=120)
  assert proc.returncode == 0, rest
  steps = [int(s) for s in os.listdir(tmp_path / "checkpoints") if s.isdigit()]
  assert len(steps) == 1 and steps[0] >= 3
  assert "Stopping at step" in rest

  resume = subprocess.run(cmd[:-3] + [f"--config.train.steps={steps[0] + 2}"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
  assert resume.returncode == 0, resume.stderr
  assert f"restored step {steps[0]} from" in resume.stderr
