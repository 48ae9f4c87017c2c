"""Named hardware targets: how many JAX devices a recipe runs on and how they group into hosts.

The recipe configs (`configs/mixtral_like.py:v5p-64`, ...) pick their mesh for one of these targets;
`experiments/comm_model.py` adds each target's bandwidth and FLOP/s numbers; tests check that every
variant validates on its target's device count.

TPU names follow `gcloud compute tpus tpu-vm create --accelerator-type`, whose number counts
TensorCores: a v5p chip has two TensorCores that JAX shows as one device (megacore), so `v5p-64` is
32 chips = 32 JAX devices on 8 hosts of 4 chips (https://cloud.google.com/tpu/docs/v5p, table of
slice shapes: 2x4x4 = 64 cores, 32 chips, 8 hosts). A v5e chip has one TensorCore, 8 chips per host
(https://cloud.google.com/tpu/docs/v5e).
"""
from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Target:
  """A machine shape.

  Attributes:
    name: the variant name used in configs and flags.
    num_devices: JAX devices (`jax.device_count()`) across all hosts.
    devices_per_host: JAX devices attached to one host (one JAX process per host).
    topology: key of the interconnect/FLOP numbers in `experiments/comm_model.TOPOLOGIES`
      ("" for the emulated CPU target, which has none).
  """
  name: str
  num_devices: int
  devices_per_host: int
  topology: str

  @property
  def num_hosts(self) -> int:
    return max(1, self.num_devices // self.devices_per_host)


TARGETS: dict[str, Target] = {t.name: t for t in (
    Target("v5p-64", num_devices=32, devices_per_host=4, topology="tpu_v5p"),
    Target("v5p-128", num_devices=64, devices_per_host=4, topology="tpu_v5p"),
    Target("v5e-256", num_devices=256, devices_per_host=8, topology="tpu_v5e"),
    Target("h100x8", num_devices=8, devices_per_host=8, topology="h100_sxm"),
    Target("h100x64", num_devices=64, devices_per_host=8, topology="h100_sxm"),
    Target("cpu8", num_devices=8, devices_per_host=8, topology=""),
)}


def get_target(name: str) -> Target:
  """The target called `name`; ValueError listing the known names otherwise."""
  if name not in TARGETS:
    raise ValueError(f"Unknown target {name!r}; allowed: {sorted(TARGETS)}.")
  return TARGETS[name]


def split_config_spec(spec: str) -> tuple[str, str | None]:
  """Splits a --config value "path/to/file.py:variant" into (path, variant or None)."""
  path, sep, variant = spec.partition(".py:")
  if sep:
    return path + ".py", variant or None
  return spec, None


def load_config_file(spec: str):
  """Loads a config the way `--config=path.py[:variant]` does: `get_config(variant)` of that file.

  For tools that take a config by name without defining an ml_collections config flag (the
  launcher validates before launching; the communication model reads shapes).
  """
  import importlib.util  # local: only the tools need it
  import os

  path, variant = split_config_spec(spec)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"Config file {path!r} (from {spec!r}) does not exist.")
  module_spec = importlib.util.spec_from_file_location(
      f"_config_{os.path.basename(path)[:-3]}", path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(variant) if variant is not None else module.get_config()
