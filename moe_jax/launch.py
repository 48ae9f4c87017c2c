"""Builds (and with --run, executes) the per-host commands of a multi-host training run.

    python -m moe_jax.launch --target=tpu-pod --tpu_name=NAME --zone=us-east5-a \
        --config=configs/mixtral_like.py:v5p-64 --workdir=gs://BUCKET/mixtral [--run]
    python -m moe_jax.launch --target=gpu-hosts --hosts=h1,h2,...,h8 --coordinator_port=1234 \
        --config=configs/deepseek_like.py:h100x64 --workdir=/shared/deepseek [--run]
    python -m moe_jax.launch --target=local-cpu --num_processes=2 --devices_per_process=4 \
        --config=configs/mixtral_like.py:cpu8 --workdir=/tmp/mixtral_2proc [--run]

Without --run it prints the commands, one per line, ready to paste into a shell. Every process runs
`python -m moe_jax.main` with the same --config and --workdir:
  * tpu-pod: one `gcloud compute tpus tpu-vm ssh NAME --worker=all --command=...` runs it on every
    host of the slice; JAX on Cloud TPU finds the coordinator and the process ids itself, so main
    passes no flags to `jax.distributed.initialize()`.
  * gpu-hosts: one `ssh HOST ...` per host with --coordinator_address=FIRST_HOST:PORT,
    --num_processes=N and --process_id=i (i = the host's position in --hosts).
  * local-cpu: N local processes on the loopback address, each with JAX_PLATFORMS=cpu and
    XLA_FLAGS=--xla_force_host_platform_device_count=D, i.e. N x D emulated devices: the multi-host
    code path on one machine.
The workdir must be storage every process can reach (gs:// for TPUs; a shared filesystem for GPU
hosts): checkpoints are written collectively. The repository must already be on every host at
--repo_dir (relative paths are relative to the ssh login directory).

Before launching, the config is validated for the run's device count when it is known (local-cpu,
gpu-hosts, or a tpu-pod config whose variant names a target in moe_jax/targets.py).

The command builders are pure functions so that tests check the exact strings.
"""
from __future__ import annotations

import os
import shlex
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from typing import NamedTuple

TARGETS = ("tpu-pod", "gpu-hosts", "local-cpu")


class LocalCommand(NamedTuple):
  """One local process: extra environment variables and the argv."""
  env: dict[str, str]
  argv: list[str]


def shell_line(argv: Sequence[str], env: Mapping[str, str] | None = None) -> str:
  """A shell-safe, copy-pasteable line: `K=V ... arg arg` with shlex quoting."""
  prefix = [f"{key}={shlex.quote(value)}" for key, value in (env or {}).items()]
  return " ".join(prefix + [shlex.join(argv)])


def main_argv(config: str, workdir: str, *, python: str = "python",
              overrides: Sequence[str] = (), coordinator_address: str | None = None,
              num_processes: int | None = None, process_id: int | None = None,
              distributed: bool = False) -> list[str]:
  """The argv of one training process: `python -m moe_jax.main --config=... --workdir=...`.

  Args:
    config: --config value, "path.py[:variant]".
    workdir: --workdir value.
    python: interpreter on the host that runs it.
    overrides: config overrides "path.to.field=value", passed as --config.path.to.field=value.
    coordinator_address, num_processes, process_id: jax.distributed flags of moe_jax.main; omitted
      when None (a TPU pod or a single process finds them itself).
    distributed: pass --distributed (jax.distributed.initialize() with no arguments: TPU pods).
  """
  if not config:
    raise ValueError("--config is required (e.g. --config=configs/mixtral_like.py:v5p-64).")
  if not workdir:
    raise ValueError("--workdir is required (storage every process can reach).")
  argv = [python, "-m", "moe_jax.main", f"--config={config}", f"--workdir={workdir}"]
  for override in overrides:
    field, sep, _ = override.partition("=")
    if not sep or not field:
      raise ValueError(f"Override {override!r} must look like path.to.field=value.")
    argv.append(f"--config.{override}")
  if coordinator_address is not None:
    argv.append(f"--coordinator_address={coordinator_address}")
  if num_processes is not None:
    argv.append(f"--num_processes={num_processes}")
  if process_id is not None:
    argv.append(f"--process_id={process_id}")
  if distributed:
    argv.append("--distributed")
  return argv


def remote_shell(repo_dir: str, argv: Sequence[str], env: Mapping[str, str] | None = None) -> str:
  """The command a remote login shell runs: `cd REPO && K=V ... python -m moe_jax.main ...`."""
  if not repo_dir:
    raise ValueError("--repo_dir must name the repository checkout on the hosts.")
  return f"cd {shlex.quote(repo_dir)} && {shell_line(argv, env)}"


def tpu_pod_commands(tpu_name: str, zone: str, config: str, workdir: str, *,
                     project: str | None = None, repo_dir: str = "moe_jax",
                     python: str = "python", overrides: Sequence[str] = (),
                     env: Mapping[str, str] | None = None) -> list[str]:
  """The gcloud argv that starts training on every worker of a Cloud TPU pod slice.

  One command covers all hosts (--worker=all); `jax.distributed.initialize()` needs no arguments on
  Cloud TPU, so only --distributed is passed, no coordinator flags.
  """
  missing = [flag for flag, value in (("--tpu_name", tpu_name), ("--zone", zone)) if not value]
  if missing:
    raise ValueError(f"--target=tpu-pod needs {' and '.join(missing)} (the TPU VM's name and "
                     "zone).")
  remote = remote_shell(repo_dir, main_argv(config, workdir, python=python, overrides=overrides,
                                            distributed=True), env)
  argv = ["gcloud", "compute", "tpus", "tpu-vm", "ssh", tpu_name, f"--zone={zone}"]
  if project:
    argv.append(f"--project={project}")
  return argv + ["--worker=all", f"--command={remote}"]


def coordinator_host(ssh_host: str) -> str:
  """The network name in an ssh destination: "user@h1" -> "h1"."""
  return ssh_host.rpartition("@")[2]


def gpu_host_commands(hosts: Sequence[str], config: str, workdir: str, *,
                      coordinator_port: int = 1234, coordinator: str | None = None,
                      repo_dir: str = "moe_jax", python: str = "python",
                      overrides: Sequence[str] = (),
                      env: Mapping[str, str] | None = None) -> list[list[str]]:
  """One `ssh HOST 'cd REPO && python -m moe_jax.main ...'` argv per GPU host.

  Process i runs on hosts[i]; all processes share --coordinator_address=COORDINATOR:PORT, where
  COORDINATOR defaults to the first host's network name (it runs process 0, which hosts the
  coordination service).
  """
  hosts = [host.strip() for host in hosts if host.strip()]
  if not hosts:
    raise ValueError("--target=gpu-hosts needs --hosts=h1,h2,... (one entry per host, process 0 "
                     "first).")
  if len(set(hosts)) != len(hosts):
    raise ValueError(f"--hosts lists a host twice: {hosts}.")
  if not 0 < coordinator_port < 65536:
    raise ValueError(f"--coordinator_port={coordinator_port} is not a TCP port (1-65535).")
  address = f"{coordinator or coordinator_host(hosts[0])}:{coordinator_port}"
  commands = []
  for process_id, host in enumerate(hosts):
    argv = main_argv(config, workdir, python=python, overrides=overrides,
                     coordinator_address=address, num_processes=len(hosts), process_id=process_id)
    commands.append(["ssh", host, remote_shell(repo_dir, argv, env)])
  return commands


def local_cpu_commands(num_processes: int, devices_per_process: int, config: str, workdir: str, *,
                       coordinator_port: int = 1234, python: str = "python",
                       overrides: Sequence[str] = (),
                       env: Mapping[str, str] | None = None) -> list[LocalCommand]:
  """N local processes on 127.0.0.1, each emulating `devices_per_process` CPU devices."""
  if num_processes < 1:
    raise ValueError(f"--num_processes={num_processes} must be >= 1.")
  if devices_per_process < 1:
    raise ValueError(f"--devices_per_process={devices_per_process} must be >= 1.")
  if not 0 < coordinator_port < 65536:
    raise ValueError(f"--coordinator_port={coordinator_port} is not a TCP port (1-65535).")
  base_env = {"JAX_PLATFORMS": "cpu",
              "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices_per_process}"}
  base_env.update(env or {})
  address = f"127.0.0.1:{coordinator_port}"
  return [LocalCommand(dict(base_env),
                       main_argv(config, workdir, python=python, overrides=overrides,
                                 coordinator_address=address, num_processes=num_processes,
                                 process_id=process_id))
          for process_id in range(num_processes)]


def parse_env(items: Sequence[str]) -> dict[str, str]:
  """["K=V", ...] -> {"K": "V"}; ValueError for an item without '='."""
  env = {}
  for item in items:
    key, sep, value = item.partition("=")
    if not sep or not key:
      raise ValueError(f"--env item {item!r} must look like NAME=VALUE.")
    env[key] = value
  return env


def expected_devices(target: str, config: str, *, hosts: Sequence[str] = (),
                     gpus_per_host: int = 8, num_processes: int = 0,
                     devices_per_process: int = 0) -> int | None:
  """Device count of the run when it is known before launching, else None."""
  if target == "local-cpu":
    return num_processes * devices_per_process
  if target == "gpu-hosts":
    return len(hosts) * gpus_per_host
  from moe_jax import targets  # local: keeps command building free of imports

  _, variant = targets.split_config_spec(config)
  return targets.TARGETS[variant].num_devices if variant in targets.TARGETS else None


def validate_before_launch(config: str, num_devices: int, repo_dir: str = ".") -> None:
  """Loads the config file (relative to `repo_dir`) and runs `validate_config` for num_devices.

  Also requires the mesh to use every device: `make_mesh` would leave the rest idle, and in a
  multi-process run a process whose devices are all outside the mesh has nothing to run.
  Raises ConfigError (naming every bad field) or FileNotFoundError.
  """
  import math

  from moe_jax import sharding, targets
  from moe_jax.validation import ConfigError, validate_config

  path, variant = targets.split_config_spec(config)
  local = path if os.path.isabs(path) else os.path.join(repo_dir, path)
  spec = local + (f":{variant}" if variant is not None else "")
  loaded = targets.load_config_file(spec)
  validate_config(loaded, num_devices=num_devices)
  sizes = sharding.resolve_mesh_shape(loaded.mesh, num_devices)
  if math.prod(sizes.values()) != num_devices:
    raise ConfigError(f"config.mesh={sizes} uses {math.prod(sizes.values())} of the {num_devices} "
                      "devices of this launch; make one axis -1 or match the sizes.")


def run_all(commands: Sequence[tuple[list[str], Mapping[str, str] | None]],
            cwd: str | None = None, poll_seconds: float = 0.5) -> int:
  """Starts every command at once and waits; when one fails, stops the others (they would wait on
  the coordinator forever). Returns the first nonzero exit status, else 0."""
  processes = []
  for argv, env in commands:
    full_env = dict(os.environ, **env) if env else None
    processes.append(subprocess.Popen(argv, env=full_env, cwd=cwd))
  status = 0
  try:
    while True:
      codes = [p.poll() for p in processes]  # a list, not any(): poll every process each round
      failed = [code for code in codes if code not in (None, 0)]
      if failed:
        status = failed[0]
        break
      if all(code is not None for code in codes):
        break
      time.sleep(poll_seconds)
  finally:
    for p in processes:
      if p.poll() is None:
        p.terminate()
    for p in processes:
      try:
        p.wait(timeout=30)
      except subprocess.TimeoutExpired:
        p.kill()
        p.wait()
  return status or next((p.returncode for p in processes if p.returncode), 0)


def main(argv):
  from absl import app

  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  target = _TARGET.value
  python = _PYTHON.value or (sys.executable if target == "local-cpu" else "python")
  try:
    env = parse_env(_ENV.value)
    common = dict(python=python, overrides=_OVERRIDE.value, env=env)
    if target == "tpu-pod":
      commands = [(tpu_pod_commands(_TPU_NAME.value, _ZONE.value, _CONFIG.value, _WORKDIR.value,
                                    project=_PROJECT.value, repo_dir=_REPO_DIR.value, **common),
                   None)]
    elif target == "gpu-hosts":
      commands = [(c, None) for c in gpu_host_commands(
          _HOSTS.value or [], _CONFIG.value, _WORKDIR.value,
          coordinator_port=_COORDINATOR_PORT.value, coordinator=_COORDINATOR.value,
          repo_dir=_REPO_DIR.value, **common)]
    else:
      commands = [(c.argv, c.env) for c in local_cpu_commands(
          _NUM_PROCESSES.value, _DEVICES_PER_PROCESS.value, _CONFIG.value, _WORKDIR.value,
          coordinator_port=_COORDINATOR_PORT.value, **common)]
  except ValueError as e:
    raise app.UsageError(str(e)) from None

  if _VALIDATE.value:
    num_devices = expected_devices(target, _CONFIG.value, hosts=_HOSTS.value or [],
                                   gpus_per_host=_GPUS_PER_HOST.value,
                                   num_processes=_NUM_PROCESSES.value,
                                   devices_per_process=_DEVICES_PER_PROCESS.value)
    if num_devices is not None:
      from moe_jax.validation import ConfigError
      try:
        validate_before_launch(_CONFIG.value, num_devices)
      except (ConfigError, FileNotFoundError) as e:
        sys.exit(f"Not launching: {e}")  # the config, not the flags, is wrong: no usage text

  for command, env in commands:
    print(shell_line(command, env))
  if _RUN.value:
    sys.exit(run_all(commands))


if __name__ == "__main__":
  from absl import app as _app
  from absl import flags as _flags

  _TARGET = _flags.DEFINE_enum("target", None, list(TARGETS), "Where the processes run.")
  _CONFIG = _flags.DEFINE_string("config", None, "--config of moe_jax.main: path.py[:variant].")
  _WORKDIR = _flags.DEFINE_string("workdir", None, "--workdir of moe_jax.main (shared storage).")
  _OVERRIDE = _flags.DEFINE_multi_string(
      "override", [], "Config override path.to.field=value (repeatable), passed as --config.X.")
  _ENV = _flags.DEFINE_multi_string("env", [], "NAME=VALUE set for every process (repeatable).")
  _PYTHON = _flags.DEFINE_string("python", None,
                                 "Interpreter (default: python remotely, this one locally).")
  _REPO_DIR = _flags.DEFINE_string("repo_dir", "moe_jax",
                                   "Repository checkout on the remote hosts (tpu-pod, gpu-hosts).")
  _TPU_NAME = _flags.DEFINE_string("tpu_name", None, "tpu-pod: the TPU VM name.")
  _ZONE = _flags.DEFINE_string("zone", None, "tpu-pod: the TPU's zone.")
  _PROJECT = _flags.DEFINE_string("project", None,
                                   "tpu-pod: the Cloud project (default: gcloud's).")
  _HOSTS = _flags.DEFINE_list("hosts", None, "gpu-hosts: ssh destinations, process 0 first.")
  _GPUS_PER_HOST = _flags.DEFINE_integer("gpus_per_host", 8, "gpu-hosts: GPUs per host.")
  _COORDINATOR = _flags.DEFINE_string(
      "coordinator", None, "gpu-hosts: coordinator host name (default: the first host's).")
  _COORDINATOR_PORT = _flags.DEFINE_integer("coordinator_port", 1234,
                                            "gpu-hosts, local-cpu: coordinator TCP port.")
  _NUM_PROCESSES = _flags.DEFINE_integer("num_processes", 2, "local-cpu: processes.")
  _DEVICES_PER_PROCESS = _flags.DEFINE_integer("devices_per_process", 4,
                                               "local-cpu: emulated CPU devices per process.")
  _VALIDATE = _flags.DEFINE_bool("validate", True,
                                 "Validate the config for the run's device count when known.")
  _RUN = _flags.DEFINE_bool("run", False, "Execute the commands instead of only printing them.")
  _flags.mark_flags_as_required(["target", "config", "workdir"])
  _app.run(main)
