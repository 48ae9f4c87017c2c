"""Grouped matmul (gmm) and its weight-gradient form (tgmm).

Layout, one backend per module, all sharing the custom VJP in `ops.py`:
  reference.py  plain `jnp`, every group multiplies every row (G x the FLOPs).
  xla.py        `jax.lax.ragged_dot_general`; native on TPU.
  blocked.py    group-aligned row tiles in XLA loops; the fast path on CPU.
  gpu.py        Pallas kernels, Triton lowering; the fast path on NVIDIA GPUs.
  tpu.py        Pallas kernels, Mosaic lowering, over `metadata.tile_visits`; TPU.
  metadata.py   group offsets and the row-tile schedule.
  common.py     dtype rules.
"""

from pallas_kernels.gmm.ops import BACKENDS
from pallas_kernels.gmm.ops import gmm
from pallas_kernels.gmm.ops import resolve_backend
from pallas_kernels.gmm.ops import tgmm

__all__ = ["BACKENDS", "gmm", "resolve_backend", "tgmm"]
