"""The machines of experiments/comm_model.py: per-device numbers and what a collective costs there.

`Topology` holds one accelerator's peak FLOP/s, memory and interconnect bandwidths; `TOPOLOGIES`
names the ones `moe_jax/targets.py` refers to, each number with its source. The functions below
time one collective (all-to-all, ring all-gather / reduce-scatter) on a Topology under the
interconnect assumptions listed in experiments/comm_model.py's docstring (switched GPU fabric,
near-cubic TPU torus, rings along one torus dimension, one fixed latency per call).
`experiments.comm_model` re-exports every name here.
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping

import numpy as np

from moe_jax import targets
from moe_jax.sharding import MESH_AXES

# ----------------------------------------------------------------------------------- topologies


@dataclasses.dataclass(frozen=True)
class Topology:
  """Per-device compute and interconnect numbers.

  Attributes:
    name: key in TOPOLOGIES.
    peak_flops: dense bf16 FLOP/s per JAX device.
    hbm_bytes: accelerator memory per device, bytes.
    fast_bandwidth: bytes/s one device can send (one direction) over the fast interconnect (TPU ICI,
      GPU NVLink).
    fast_latency: seconds added per collective on the fast interconnect (assumed).
    fast_domain: devices sharing the fast interconnect; None = all devices of the slice.
    slow_bandwidth: bytes/s one device can send (one direction) to another fast domain (GPU:
      its InfiniBand NIC); unused when fast_domain is None.
    slow_latency: seconds added per collective that crosses fast domains (assumed).
    torus_dims: dimensions of the TPU torus (3 for v5p, 2 for v5e); 0 for a switched fabric.
  """
  name: str
  peak_flops: float
  hbm_bytes: float
  fast_bandwidth: float
  fast_latency: float
  fast_domain: int | None = None
  slow_bandwidth: float = 0.0
  slow_latency: float = 0.0
  torus_dims: int = 0

  def scaled(self, bandwidth_factor: float) -> "Topology":
    """The same machine with every link `bandwidth_factor` times faster (sensitivity studies)."""
    return dataclasses.replace(self, fast_bandwidth=self.fast_bandwidth * bandwidth_factor,
                               slow_bandwidth=self.slow_bandwidth * bandwidth_factor)


# Latencies are assumed round numbers (a few microseconds per collective launch and hop), not
# datasheet values; they matter only for small messages.
TOPOLOGIES: dict[str, Topology] = {
    "tpu_v5p": Topology(
        name="tpu_v5p",
        # "Peak compute per chip (bf16) 459 TFLOPs", https://cloud.google.com/tpu/docs/v5p
        peak_flops=459e12,
        # "HBM2e capacity 95 GB", https://cloud.google.com/tpu/docs/v5p
        hbm_bytes=95e9,
        # "Bidirectional inter-chip interconnect (ICI) bandwidth per chip 1200 GBps" (= the page's
        # older "4800 Gbps" per direction), https://cloud.google.com/tpu/docs/v5p; halved for one
        # direction.
        fast_bandwidth=1200e9 / 2,
        fast_latency=5e-6,  # Assumed.
        torus_dims=3,  # "Interconnect topology 3D torus", same page.
    ),
    "tpu_v5e": Topology(
        name="tpu_v5e",
        # "Peak compute per chip (bf16) 197 TFLOPs", https://cloud.google.com/tpu/docs/v5e
        peak_flops=197e12,
        # "HBM2 capacity 16 GB", https://cloud.google.com/tpu/docs/v5e
        hbm_bytes=16e9,
        # "Bidirectional ICI bandwidth (per chip) 400 GBps" (older page: "1600 Gbps" per
        # direction), https://cloud.google.com/tpu/docs/v5e; halved for one direction.
        fast_bandwidth=400e9 / 2,
        fast_latency=5e-6,  # Assumed.
        torus_dims=2,  # "Interconnect topology 2D torus", same page.
    ),
    "h100_sxm": Topology(
        name="h100_sxm",
        # "BF16 Tensor Core 1,979 teraFLOPS" with 2:4 sparsity -> 989 dense, NVIDIA H100 Tensor Core
        # GPU datasheet (SXM), https://www.nvidia.com/en-us/data-center/h100/
        peak_flops=989e12,
        # "GPU memory 80GB", same datasheet.
        hbm_bytes=80e9,
        # "NVLink: 900GB/s" per GPU, same datasheet: NVLink 4, 18 links, counted in both
        # directions (NVIDIA H100 Tensor Core GPU Architecture whitepaper, 2022); 450 GB/s each way,
        # to any peer through the NVSwitches of an HGX/DGX H100 host.
        fast_bandwidth=900e9 / 2,
        fast_latency=10e-6,  # Assumed.
        fast_domain=8,  # 8 GPUs per HGX/DGX H100 host share the NVSwitch fabric.
        # One 400 Gb/s InfiniBand NDR ConnectX-7 port per GPU ("8x NVIDIA ConnectX-7 400Gb/s",
        # NVIDIA DGX H100 datasheet); 400e9 / 8 = 50 GB/s per direction (IB links are full duplex).
        slow_bandwidth=400e9 / 8,
        slow_latency=20e-6,  # Assumed.
    ),
}


def target_topology(target: targets.Target) -> Topology:
  """The Topology of a named target; ValueError for targets without numbers (the CPU emulation)."""
  if target.topology not in TOPOLOGIES:
    raise ValueError(f"Target {target.name!r} has no interconnect numbers; use one of "
                     f"{sorted(n for n, t in targets.TARGETS.items() if t.topology)}.")
  return TOPOLOGIES[target.topology]


# ----------------------------------------------------------------------------------- collectives


def group_locality(sizes: Mapping[str, int], axes: tuple[str, ...],
                   fast_domain: int | None) -> tuple[int, int]:
  """(participants n, participants inside device 0's fast domain) of a collective over `axes`.

  Devices are numbered host-major and the mesh is the row-major reshape of that order over
  MESH_AXES (as `sharding.make_mesh` builds it), so the group's members are explicit indices.
  """
  shape = tuple(sizes[axis] for axis in MESH_AXES)
  ids = np.arange(math.prod(shape)).reshape(shape)
  group = ids[tuple(slice(None) if axis in axes else 0 for axis in MESH_AXES)].ravel()
  if fast_domain is None:
    return group.size, group.size
  return group.size, int(np.sum(group // fast_domain == group[0] // fast_domain))


def torus_mean_hops(n: int, dims: int) -> float:
  """Mean links an all-to-all byte crosses in a near-cubic n-chip torus of `dims` dims (>= 1)."""
  if dims <= 0 or n <= 1:
    return 1.0
  side = n ** (1.0 / dims)
  return max(1.0, dims * side / 4)


def all_to_all_seconds(nbytes: float, n: int, local: int, topo: Topology) -> float:
  """Seconds of one all-to-all where each of n devices sends `nbytes` split evenly over n."""
  if n <= 1:
    return 0.0
  chunk = nbytes / n
  hops = torus_mean_hops(local, topo.torus_dims)
  fast = (local - 1) * chunk * hops / topo.fast_bandwidth
  if local == n:
    return fast + topo.fast_latency
  slow = (n - local) * chunk / topo.slow_bandwidth
  return max(fast, slow) + topo.slow_latency


def ring_seconds(full_bytes: float, n: int, local: int, topo: Topology) -> float:
  """Seconds of one ring all-gather (or reduce-scatter) of a `full_bytes` array over n devices."""
  if n <= 1:
    return 0.0
  if local == n:
    bandwidth = topo.fast_bandwidth / max(1, topo.torus_dims)
    return (n - 1) / n * full_bytes / bandwidth + topo.fast_latency
  return (n - 1) / n * full_bytes / topo.slow_bandwidth + topo.slow_latency
