"""Two processes x 4 CPU devices on loopback train exactly like one process x 8 devices."""
import os
import re
import socket
import subprocess
import sys

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LOSS = re.compile(r"step (\d+)/\d+ loss ([0-9.]+)")
COMMON = ["--config=configs/default.py:tiny", "--config.train.steps=4", "--config.train.log_every=1",
          "--config.train.eval_every=100", "--config.mesh.data=2", "--config.mesh.expert=4"]


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _losses(log: str) -> dict[int, float]:
  return {int(step): float(loss) for step, loss in LOSS.findall(log)}


def _env(devices: int) -> dict:
  return dict(os.environ, JAX_PLATFORMS="cpu",
              XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")


@pytest.mark.slow
def test_two_processes_log_the_same_losses_as_one(tmp_path):
  single = subprocess.run([sys.executable, "-m", "moe_jax.main", *COMMON,
                           f"--workdir={tmp_path / 'single'}"], cwd=REPO, env=_env(8),
                          capture_output=True, text=True, timeout=600)
  assert single.returncode == 0, single.stderr[-3000:]

  port = _free_port()
  procs = [subprocess.Popen([sys.executable, "-m", "moe_jax.main", *COMMON,
                             f"--workdir={tmp_path / 'multi'}",
                             f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2",
                             f"--process_id={i}"], cwd=REPO, env=_env(4),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
           for i in range(2)]
  logs = []
  for proc in procs:
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    logs.append(err)
  assert "process 0/2" in logs[0] and "process 1/2" in logs[1]

  expected = _losses(single.stderr)
  assert sorted(expected) == [1, 2, 3, 4]
  for log in logs:
    got = _losses(log)
    assert sorted(got) == sorted(expected)
    np.testing.assert_allclose([got[s] for s in expected], [expected[s] for s in expected],
                               rtol=1e-5)
  assert os.path.isdir(tmp_path / "multi" / "checkpoints" / "4")
