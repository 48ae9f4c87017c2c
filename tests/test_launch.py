"""moe_jax/launch.py: the exact per-host commands for each target, quoting, and clear errors."""
import math
import os
import re
import shlex
import socket
import subprocess
import sys
import time

import pytest

from moe_jax import launch
from moe_jax.validation import ConfigError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = "configs/mixtral_like.py:v5p-64"


def _remote_argv(remote: str, repo_dir: str = "moe_jax") -> list[str]:
  """The training argv inside a remote `cd REPO && ...` command string."""
  words = shlex.split(remote)
  assert words[:3] == ["cd", repo_dir, "&&"]
  return words[3:]


# ------------------------------------------------------------------------------- tpu-pod


def test_tpu_pod_command_exact():
  argv = launch.tpu_pod_commands("my-tpu", "us-east5-a", CONFIG, "gs://bucket/run")
  assert argv == [
      "gcloud", "compute", "tpus", "tpu-vm", "ssh", "my-tpu", "--zone=us-east5-a", "--worker=all",
      "--command=cd moe_jax && python -m moe_jax.main --config=configs/mixtral_like.py:v5p-64 "
      "--workdir=gs://bucket/run --distributed"]
  assert launch.shell_line(argv) == (
      "gcloud compute tpus tpu-vm ssh my-tpu --zone=us-east5-a --worker=all "
      "'--command=cd moe_jax && python -m moe_jax.main --config=configs/mixtral_like.py:v5p-64 "
      "--workdir=gs://bucket/run --distributed'")


def test_tpu_pod_passes_no_coordinator_and_keeps_project_overrides_env():
  argv = launch.tpu_pod_commands("t", "z", CONFIG, "gs://b/r", project="proj", repo_dir="src/m",
                                 python="python3", overrides=["train.steps=10"],
                                 env={"LIBTPU_INIT_ARGS": "--xla_tpu_x=true"})
  assert "--project=proj" in argv and argv.index("--project=proj") < argv.index("--worker=all")
  remote = argv[-1].removeprefix("--command=")
  inner = _remote_argv(remote, "src/m")
  assert inner == ["LIBTPU_INIT_ARGS=--xla_tpu_x=true", "python3", "-m", "moe_jax.main",
                   f"--config={CONFIG}", "--workdir=gs://b/r", "--config.train.steps=10",
                   "--distributed"]
  assert not any("coordinator" in word or "process" in word for word in inner)


def test_workdir_with_spaces_survives_two_shells():
  workdir = "gs://bucket/my run's dir"
  line = launch.shell_line(launch.tpu_pod_commands("t", "z", CONFIG, workdir))
  argv = shlex.split(line)  # the local shell
  remote = argv[-1].removeprefix("--command=")
  assert f"--workdir={workdir}" in _remote_argv(remote)  # the remote shell


@pytest.mark.parametrize("tpu_name,zone,missing", [("", "z", "--tpu_name"), ("t", "", "--zone"),
                                                   (None, None, "--tpu_name and --zone")])
def test_tpu_pod_missing_flags(tpu_name, zone, missing):
  with pytest.raises(ValueError, match=missing):
    launch.tpu_pod_commands(tpu_name, zone, CONFIG, "gs://b/r")


def test_missing_config_or_workdir():
  with pytest.raises(ValueError, match="--config is required"):
    launch.tpu_pod_commands("t", "z", "", "gs://b/r")
  with pytest.raises(ValueError, match="--workdir is required"):
    launch.gpu_host_commands(["h1"], CONFIG, "")
  with pytest.raises(ValueError, match="path.to.field=value"):
    launch.main_argv(CONFIG, "w", overrides=["train.steps"])


# ------------------------------------------------------------------------------- gpu-hosts


def test_gpu_hosts_one_command_per_host_same_coordinator():
  hosts = ["alice@h1", "h2", "h3"]
  commands = launch.gpu_host_commands(hosts, "configs/deepseek_like.py:h100x64", "/shared/w",
                                      coordinator_port=4321)
  assert len(commands) == 3
  for i, (command, host) in enumerate(zip(commands, hosts)):
    assert command[:2] == ["ssh", host]
    assert _remote_argv(command[2]) == [
        "python", "-m", "moe_jax.main", "--config=configs/deepseek_like.py:h100x64",
        "--workdir=/shared/w", "--coordinator_address=h1:4321", "--num_processes=3",
        f"--process_id={i}"]
  assert launch.shell_line(commands[1]) == (
      "ssh h2 'cd moe_jax && python -m moe_jax.main --config=configs/deepseek_like.py:h100x64 "
      "--workdir=/shared/w --coordinator_address=h1:4321 --num_processes=3 --process_id=1'")


def test_gpu_hosts_coordinator_override_and_quoted_workdir():
  commands = launch.gpu_host_commands(["h1", "h2"], CONFIG, "/shared/my run",
                                      coordinator="10.0.0.1", env={"NCCL_DEBUG": "WARN"})
  for command in commands:
    inner = _remote_argv(command[2])
    assert inner[0] == "NCCL_DEBUG=WARN"
    assert "--workdir=/shared/my run" in inner
    assert "--coordinator_address=10.0.0.1:1234" in inner


@pytest.mark.parametrize("hosts,port,match", [([], 1234, "--hosts"), ([" ", ""], 1234, "--hosts"),
                                              (["h1", "h1"], 1234, "twice"),
                                              (["h1"], 0, "--coordinator_port=0"),
                                              (["h1"], 70000, "TCP port")])
def test_gpu_hosts_errors(hosts, port, match):
  with pytest.raises(ValueError, match=match):
    launch.gpu_host_commands(hosts, CONFIG, "/w", coordinator_port=port)


# ------------------------------------------------------------------------------- local-cpu


def test_local_cpu_commands():
  commands = launch.local_cpu_commands(2, 4, "configs/mixtral_like.py:cpu8", "/tmp/w",
                                       coordinator_port=5555, python="python")
  assert len(commands) == 2
  for i, command in enumerate(commands):
    assert command.env == {"JAX_PLATFORMS": "cpu",
                           "XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
    assert command.argv[-3:] == ["--coordinator_address=127.0.0.1:5555", "--num_processes=2",
                                 f"--process_id={i}"]
  assert launch.shell_line(commands[0].argv, commands[0].env) == (
      "JAX_PLATFORMS=cpu XLA_FLAGS=--xla_force_host_platform_device_count=4 python -m "
      "moe_jax.main --config=configs/mixtral_like.py:cpu8 --workdir=/tmp/w "
      "--coordinator_address=127.0.0.1:5555 --num_processes=2 --process_id=0")


@pytest.mark.parametrize("processes,devices,match", [(0, 4, "--num_processes=0"),
                                                     (2, 0, "--devices_per_process=0")])
def test_local_cpu_errors(processes, devices, match):
  with pytest.raises(ValueError, match=match):
    launch.local_cpu_commands(processes, devices, CONFIG, "/w")


# ------------------------------------------------------------------------------- validation


def test_expected_devices():
  assert launch.expected_devices("local-cpu", CONFIG, num_processes=2, devices_per_process=4) == 8
  assert launch.expected_devices("gpu-hosts", CONFIG, hosts=["a", "b"], gpus_per_host=8) == 16
  assert launch.expected_devices("tpu-pod", CONFIG) == 32  # v5p-64 = 32 chips
  assert launch.expected_devices("tpu-pod", "configs/default.py") is None


def test_validate_before_launch(tmp_path):
  launch.validate_before_launch("configs/mixtral_like.py:cpu8", 8, repo_dir=REPO)
  with pytest.raises(ConfigError, match="uses 8 of the 16 devices"):
    launch.validate_before_launch("configs/mixtral_like.py:cpu8", 16, repo_dir=REPO)
  with pytest.raises(ConfigError, match="config.mesh"):
    launch.validate_before_launch("configs/mixtral_like.py:cpu8", 4, repo_dir=REPO)
  with pytest.raises(FileNotFoundError, match="nope.py"):
    launch.validate_before_launch("configs/nope.py:cpu8", 8, repo_dir=REPO)


def _launch(*args, timeout=120):
  return subprocess.run([sys.executable, "-m", "moe_jax.launch", *args], cwd=REPO,
                        capture_output=True, text=True, timeout=timeout)


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def test_cli_prints_the_built_commands():
  result = _launch("--target=gpu-hosts", "--hosts=h1,h2", "--python=python",
                   "--config=configs/deepseek_like.py:h100x8", "--workdir=/shared/w",
                   "--gpus_per_host=4")
  assert result.returncode == 0, result.stderr
  expected = [launch.shell_line(c) for c in launch.gpu_host_commands(
      ["h1", "h2"], "configs/deepseek_like.py:h100x8", "/shared/w")]
  assert result.stdout.splitlines() == expected


def test_cli_errors_name_the_missing_flag_or_the_config_problem():
  result = _launch("--target=tpu-pod", f"--config={CONFIG}", "--workdir=gs://b/r", "--zone=z")
  assert result.returncode != 0 and "--tpu_name" in result.stderr
  result = _launch("--target=gpu-hosts", "--hosts=h1,h2", "--workdir=/w",
                   "--config=configs/deepseek_like.py:h100x8")  # 16 GPUs, mesh of 8
  assert result.returncode != 0 and "uses 8 of the 16 devices" in result.stderr
  assert result.stdout == ""  # nothing printed to run


# ------------------------------------------------------------------------------- running


def test_run_all_stops_the_others_when_one_fails():
  sleeper = [sys.executable, "-c", "import time; time.sleep(60)"]
  failing = [sys.executable, "-c", "import sys; sys.exit(3)"]
  start = time.monotonic()
  assert launch.run_all([(sleeper, None), (failing, None)], poll_seconds=0.05) == 3
  assert time.monotonic() - start < 30
  ok = [sys.executable, "-c", "import os, sys; sys.exit(os.environ['X'] != 'y')"]
  assert launch.run_all([(ok, {"X": "y"}), (ok, {"X": "y"})], poll_seconds=0.05) == 0


@pytest.mark.slow
def test_local_cpu_two_processes_train(tmp_path):
  """Two local processes x 4 CPU devices train the cpu8 recipe for 2 steps over loopback: both
  join one 8-device run, and both log the same (global) train and eval losses."""
  result = _launch("--target=local-cpu", "--num_processes=2", "--devices_per_process=4",
                   f"--coordinator_port={_free_port()}", "--config=configs/mixtral_like.py:cpu8",
                   f"--workdir={tmp_path}", "--override=train.steps=2",
                   "--override=train.eval_every=2", "--override=train.checkpoint_every=2",
                   "--override=data.eval_batches=1", "--override=data.task=synthetic", "--run",
                   timeout=900)  # two processes compiling on a shared 2-core machine
  assert result.returncode == 0, result.stderr[-3000:]
  assert os.path.exists(tmp_path / "config.json")
  assert os.path.isdir(tmp_path / "checkpoints" / "2")
  log = result.stderr
  # Each process sees the 8 global devices and its own index: the processes joined one run.
  for process_id in (0, 1):
    assert f"8 devices, process {process_id}/2." in log, log[-3000:]
  train_losses = re.findall(r"step 2/2 loss (\S+) ", log)
  eval_losses = re.findall(r"step 2/2 eval loss (\S+) ", log)
  assert len(train_losses) == 2 and len(eval_losses) == 2, log[-3000:]
  # The losses are global means over the whole batch, so both processes report the same ones.
  assert train_losses[0] == train_losses[1] and eval_losses[0] == eval_losses[1]
  assert all(math.isfinite(float(v)) for v in train_losses + eval_losses)
