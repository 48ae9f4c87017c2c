"""Grouped matmul kernels for NVIDIA GPUs: Pallas with the Triton lowering.

gmm: one program per [tm, tn] output tile, grid (M / tm, N / tn). Rows are
sorted by group, so an aligned row tile meets few groups, usually one or
two; `metadata.tile_group_ranges` lists them. For each such group the
program runs the whole k-loop `lhs_tile @ rhs[group]_tile` in float32 and
keeps only that group's rows of the result. Each program owns its output
tile, so nothing is written twice and no atomics are needed; rows past
`sum(group_sizes)` belong to no group and come out as zeros. A tile that
straddles a boundary runs its k-loop once per group it meets: the price of
reading aligned tiles, at most one extra tile of work per group.

tgmm: one program per [tk, tn] tile of one group's weight gradient, grid
(G, K / tk, N / tn). It walks the aligned row tiles that hold the group's
rows and sums `lhs_tile^T @ grad_tile` in float32, with both operands masked
to the group (a zeroed row on one side still lets a NaN or Inf on the other
through). An empty group runs no step and writes zeros.

The wrapper pads M, K and N to tile multiples with zeros (a copy only when a
dimension is not already a multiple), so every tile read stays in bounds
and the kernels need no load masks, then slices the result.

Tiles are `(tm, tk, tn)`: for gmm the row tile, the contraction tile and the
output-column tile; for tgmm the row step (the contraction), and the tiles
of the [K, N] result. Triton needs power-of-two tiles of at least 16 for its
dots. Each is clipped to the next power of two at or above its dimension
(and at least 16), so a small problem does not pad up to a large tile.

Float32 operands follow `jax_default_matmul_precision`, like XLA's own dots:
TF32 on the tensor cores by default, IEEE float32 under "highest".
Accumulation is always float32 (or wider).

Not here: a Mosaic GPU (Hopper WGMMA + TMA) kernel. JAX ships no public
interpret mode for Mosaic GPU, so it could not be tested on the CPU-only
machines this code is developed and tested on.

Reference for the scheme: the megablox TPU kernels
(`jax.experimental.pallas.ops.tpu.megablox`) and "MegaBlocks: Efficient
Sparse Training with Mixture-of-Experts" (Gale et al., 2022).
"""

import functools

import jax
from jax import lax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.gmm import common
from pallas_kernels.gmm import metadata

PASSES = metadata.PASSES

# Untuned starting points in the range of Triton's H100 matmul configurations,
# not yet measured here. 16-bit: 128 x 128 output tiles with 64-deep k-steps
# (tgmm: 128 x 128 weight-gradient tiles, 64 rows a step), 32 KiB of shared
# memory per pipeline stage; float32 elements are twice as wide, so smaller
# tiles keep every stage at 16 KiB.
DEFAULT_TILES_16BIT = {"fwd": (128, 64, 128), "dlhs": (128, 64, 128), "drhs": (64, 128, 128)}
DEFAULT_TILES_32BIT = {"fwd": (64, 32, 64), "dlhs": (64, 32, 64), "drhs": (32, 64, 64)}
NUM_WARPS = 4
NUM_STAGES = 3

_MIN_TILE = 16  # Triton's smallest dot operand dimension.


def _check_tiles(tiles, where: str) -> tuple[int, int, int]:
  ok = (isinstance(tiles, (tuple, list)) and len(tiles) == 3 and all(
      isinstance(t, int) and not isinstance(t, bool) and t >= _MIN_TILE and t & (t - 1) == 0
      for t in tiles))
  if not ok:
    raise ValueError(
        f"tiling{where} for the 'gpu' backend must be (tm, tk, tn), powers of two >= "
        f"{_MIN_TILE}; got {tiles!r}.")
  return tuple(tiles)


def normalize_tiling(tiling):
  """Validates a "gpu" `tiling` and makes it hashable (it is a static argument).

  Args:
    tiling: None (defaults per pass and dtype), one `(tm, tk, tn)` for every
      pass, or a mapping from some of `PASSES` ("fwd", "dlhs", "drhs") to
      `(tm, tk, tn)` (missing passes, or None, use the defaults). Each tile
      is a power of two >= 16.

  Returns:
    None, a `(tm, tk, tn)` tuple, or a tuple of `(pass, tiles)` pairs, which
    this function also accepts.

  Raises:
    ValueError: for anything else.
  """
  return metadata.normalize_pass_tiling(tiling, "gpu", _check_tiles, none_means_default=True)


def pass_tiles(tiling, pass_name: str, dtype) -> tuple[int, int, int]:
  """The `(tm, tk, tn)` that `pass_name` ("fwd", "dlhs" or "drhs") runs with.

  Args:
    tiling: any form `normalize_tiling` accepts.
    pass_name: one of `PASSES`.
    dtype: the operand dtype, which picks the defaults.
  """
  tiling = normalize_tiling(tiling)
  if tiling is not None and isinstance(tiling[0], tuple):
    tiling = dict(tiling).get(pass_name)
  if tiling is not None:
    return tiling
  defaults = DEFAULT_TILES_16BIT if jnp.dtype(dtype).itemsize <= 2 else DEFAULT_TILES_32BIT
  return defaults[pass_name]


def _fit(tile: int, dim: int) -> int:
  return min(tile, max(_MIN_TILE, pl.next_power_of_2(dim)))


def _round_up(dim: int, tile: int) -> int:
  return pl.cdiv(dim, tile) * tile


def _pad(x: jax.Array, shape: tuple[int, ...]) -> jax.Array:
  if x.shape == shape:
    return x
  return jnp.pad(x, [(0, s - d) for d, s in zip(x.shape, shape)])


def _whole(x: jax.Array) -> pl.BlockSpec:
  """Hands the kernel all of `x`; the kernel reads its own tiles with `pl.ds`."""
  return pl.BlockSpec(x.shape, lambda *_: (0,) * x.ndim)


def _compiler_params() -> plgpu.CompilerParams:
  return plgpu.CompilerParams(num_warps=NUM_WARPS, num_stages=NUM_STAGES)


def _gmm_kernel(starts_ref, ends_ref, first_ref, last_ref, lhs_ref, rhs_ref, out_ref, *,
                tk: int, num_k: int, transpose_rhs: bool, acc_dtype):
  """Computes one [tm, tn] output tile; see the module docstring."""
  tm, tn = out_ref.shape
  row0 = pl.program_id(0) * tm
  col0 = pl.program_id(1) * tn
  rows = row0 + lax.iota(jnp.int32, tm)
  if transpose_rhs:
    contract = (((1,), (1,)), ((), ()))
  else:
    contract = (((1,), (0,)), ((), ()))

  def group_body(g, acc):
    start, end = starts_ref[g], ends_ref[g]

    def k_body(kk, part):
      x = lhs_ref[pl.ds(row0, tm), pl.ds(kk * tk, tk)]
      if transpose_rhs:
        w = rhs_ref[g, pl.ds(col0, tn), pl.ds(kk * tk, tk)]
      else:
        w = rhs_ref[g, pl.ds(kk * tk, tk), pl.ds(col0, tn)]
      return part + lax.dot_general(x, w, contract, preferred_element_type=acc_dtype)

    # An empty group on a boundary inside the tile owns no row: skip its k-loop.
    steps = jnp.where(end > start, num_k, 0)
    part = lax.fori_loop(0, steps, k_body, jnp.zeros((tm, tn), acc_dtype))
    # Selecting (not masking the operands) keeps the other groups' rows, and
    # any NaN in rows past the end, out of this tile's result.
    mine = (rows >= start) & (rows < end)
    return jnp.where(mine[:, None], part, acc)

  acc = lax.fori_loop(first_ref[pl.program_id(0)], last_ref[pl.program_id(0)], group_body,
                      jnp.zeros((tm, tn), acc_dtype))
  out_ref[...] = acc.astype(out_ref.dtype)


def gmm(lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array, *, out_dtype, tiling=None,
        transpose_rhs: bool = False, interpret: bool = False) -> jax.Array:
  """lhs [M, K] @ rhs [G, K, N] per group -> [M, N]; rows past sum(group_sizes) are zero.

  Args:
    lhs: [M, K], rows sorted by group.
    rhs: [G, K, N], or [G, N, K] with `transpose_rhs`: each group then uses
      `rhs[i].T`, read as transposed tiles (the backward pass's d_lhs).
    group_sizes: [G] int32, rows per group.
    out_dtype: dtype of the result; products are summed in float32 or wider.
    tiling: see `normalize_tiling`; this call runs the "dlhs" tiles when
      `transpose_rhs`, else the "fwd" tiles.
    transpose_rhs: see `rhs`.
    interpret: run the kernel in Pallas interpret mode (any backend).
  """
  lhs, rhs = common.promote_operands(lhs, rhs)
  (m, k), num_groups = lhs.shape, rhs.shape[0]
  n = rhs.shape[1] if transpose_rhs else rhs.shape[2]
  if 0 in (m, k, n, num_groups):
    return jnp.zeros((m, n), out_dtype)
  tm, tk, tn = pass_tiles(tiling, "dlhs" if transpose_rhs else "fwd", lhs.dtype)
  tm, tk, tn = _fit(tm, m), _fit(tk, k), _fit(tn, n)
  mp, kp, np_ = _round_up(m, tm), _round_up(k, tk), _round_up(n, tn)
  lhs = _pad(lhs, (mp, kp))
  rhs = _pad(rhs, (num_groups, np_, kp) if transpose_rhs else (num_groups, kp, np_))
  starts, ends = metadata.group_bounds(group_sizes, m)
  first, last = metadata.tile_group_ranges(group_sizes, m, tm)
  kernel = functools.partial(_gmm_kernel, tk=tk, num_k=kp // tk, transpose_rhs=transpose_rhs,
                             acc_dtype=common.accumulation_dtype(lhs.dtype))
  operands = (starts, ends, first, last, lhs, rhs)
  out = pl.pallas_call(
      kernel,
      out_shape=jax.ShapeDtypeStruct((mp, np_), out_dtype),
      grid=(mp // tm, np_ // tn),
      in_specs=[_whole(x) for x in operands],
      out_specs=pl.BlockSpec((tm, tn), lambda i, j: (i, j)),
      compiler_params=_compiler_params(),
      interpret=interpret,
      name="gmm_gpu_dlhs" if transpose_rhs else "gmm_gpu",
  )(*operands)
  return out[:m, :n]


def _tgmm_kernel(starts_ref, ends_ref, lhs_ref, grad_ref, out_ref, *, tm: int, acc_dtype):
  """Computes one [tk, tn] tile of one group's weight gradient."""
  tk, tn = out_ref.shape
  g = pl.program_id(0)
  col_k = pl.program_id(1) * tk
  col_n = pl.program_id(2) * tn
  start, end = starts_ref[g], ends_ref[g]
  first = lax.div(start, tm)
  last = jnp.where(end > start, lax.div(end + tm - 1, tm), first)

  def body(t, acc):
    rows = t * tm + lax.iota(jnp.int32, tm)
    mine = ((rows >= start) & (rows < end))[:, None]
    x = jnp.where(mine, lhs_ref[pl.ds(t * tm, tm), pl.ds(col_k, tk)], 0)
    d = jnp.where(mine, grad_ref[pl.ds(t * tm, tm), pl.ds(col_n, tn)], 0)
    return acc + lax.dot_general(x, d, (((0,), (0,)), ((), ())), preferred_element_type=acc_dtype)

  acc = lax.fori_loop(first, last, body, jnp.zeros((tk, tn), acc_dtype))
  out_ref[...] = acc.astype(out_ref.dtype)


def tgmm(lhs: jax.Array, grad: jax.Array, group_sizes: jax.Array, *, out_dtype, tiling=None,
         interpret: bool = False) -> jax.Array:
  """out[i] = lhs[rows of i].T @ grad[rows of i]: lhs [M, K], grad [M, N] -> [G, K, N].

  Empty groups give exact zeros; rows past sum(group_sizes) (even NaN or Inf
  ones) are ignored.

  Args:
    lhs: [M, K], rows sorted by group.
    grad: [M, N].
    group_sizes: [G] int32, rows per group.
    out_dtype: dtype of the result; products are summed in float32 or wider.
    tiling: see `normalize_tiling`; this call runs the "drhs" tiles.
    interpret: run the kernel in Pallas interpret mode (any backend).
  """
  lhs, grad = common.promote_operands(lhs, grad)
  (m, k), n, num_groups = lhs.shape, grad.shape[1], group_sizes.shape[0]
  if 0 in (m, k, n, num_groups):
    return jnp.zeros((num_groups, k, n), out_dtype)
  tm, tk, tn = pass_tiles(tiling, "drhs", lhs.dtype)
  tm, tk, tn = _fit(tm, m), _fit(tk, k), _fit(tn, n)
  mp, kp, np_ = _round_up(m, tm), _round_up(k, tk), _round_up(n, tn)
  lhs, grad = _pad(lhs, (mp, kp)), _pad(grad, (mp, np_))
  starts, ends = metadata.group_bounds(group_sizes, m)
  kernel = functools.partial(_tgmm_kernel, tm=tm, acc_dtype=common.accumulation_dtype(lhs.dtype))
  operands = (starts, ends, lhs, grad)
  out = pl.pallas_call(
      kernel,
      out_shape=jax.ShapeDtypeStruct((num_groups, kp, np_), out_dtype),
      grid=(num_groups, kp // tk, np_ // tn),
      in_specs=[_whole(x) for x in operands],
      out_specs=pl.BlockSpec((None, tk, tn), lambda g, a, b: (g, a, b)),
      compiler_params=_compiler_params(),
      interpret=interpret,
      name="tgmm_gpu",
  )(*operands)
  return out[:, :k, :n]
