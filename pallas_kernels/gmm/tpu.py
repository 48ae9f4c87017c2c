"""Grouped matmul kernels for TPU: Pallas with the Mosaic lowering.

Both kernels step through the "visits" of `metadata.tile_visits`: the
(group, aligned row tile) pairs in group order, a tile shared by two groups
being visited once by each. The visit list has a static length (an upper
bound); the kernels skip its inactive tail, whose block indices repeat the
last active visit's, so those grid steps move no data. The group ids, tile
ids, group offsets and visit count are scalar-prefetched into SMEM, where
the BlockSpec index maps read them.

gmm: grid (N / tn, visits, K / tk). Each visit sums `lhs_tile @ rhs[group]`
over the k-steps in a float32 VMEM accumulator and, on the last k-step,
stores the rows that belong to its group. The output tile stays in VMEM over
the consecutive visits of its row tile, so the visits fill it group by group:
rows above the visiting group's first row keep what earlier groups stored,
rows past its last row are set to zero until a later group claims them. Row
tiles past `sum(group_sizes)` get one visit of their own (see `visit_tail`),
so those rows come out as exact zeros.

tgmm: grid (K / tk, N / tn, visits). The [tk, tn] float32 accumulator opens
on a group's first visit, adds `lhs_tile^T @ grad_tile` with both operands
masked to the group's rows (a zeroed row on one side would still let a NaN
or Inf on the other through), and is stored on the group's last visit. Empty
groups get one visit that computes nothing and stores zeros.

Tiling: `(tm, tk, tn)` per pass. For gmm the row tile, the contraction tile
and the output-column tile; for tgmm the row step (the contraction) and the
tiles of the [K, N] result. A tile at least as large as its dimension
becomes the whole dimension; otherwise the wrapper pads the dimension with
zeros up to a multiple of the tile (a copy of the operand, only when it is
not a multiple already) and slices the result. Compiled for a TPU, Mosaic
needs each block's last two dimensions to be multiples of (8, 128) for
32-bit, (16, 128) for 16-bit data, or the whole dimension: so tk and tn must
be multiples of 128 (or cover K, N) and tm a multiple of 8 (16 for 16-bit
data) or cover M. Interpret mode runs any positive tiles; tests use small
ones to exercise many tiles.

Scheme after the megablox kernels (`jax.experimental.pallas.ops.tpu.megablox`,
from "MegaBlocks: Efficient Sparse Training with Mixture-of-Experts", Gale et
al., 2022).
"""

import functools

import jax
from jax import lax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
import numpy as np

from pallas_kernels.gmm import common
from pallas_kernels.gmm import metadata

PASSES = metadata.PASSES

# Untuned: the MXU-shaped megablox default; small problems shrink each tile
# to the whole dimension.
DEFAULT_TILES = (128, 128, 128)
_LANES = 128


def _check_tiles(tiles, where: str) -> tuple[int, int, int]:
  ok = (isinstance(tiles, (tuple, list)) and len(tiles) == 3 and all(
      isinstance(t, (int, np.integer)) and not isinstance(t, bool) and t > 0 for t in tiles))
  if not ok:
    raise ValueError(
        f"tiling{where} for the 'tpu' backend must be (tm, tk, tn), positive ints; got {tiles!r}.")
  return tuple(int(t) for t in tiles)


def normalize_tiling(tiling):
  """Validates a "tpu" `tiling` and makes it hashable (it is a static argument).

  Args:
    tiling: None (`DEFAULT_TILES` for every pass), one `(tm, tk, tn)` for
      every pass, or a mapping from some of `PASSES` ("fwd", "dlhs", "drhs")
      to `(tm, tk, tn)` (missing passes use the defaults).

  Returns:
    None, a `(tm, tk, tn)` tuple, or a tuple of `(pass, tiles)` pairs, which
    this function also accepts.

  Raises:
    ValueError: for anything else.
  """
  return metadata.normalize_pass_tiling(tiling, "tpu", _check_tiles)


def pass_tiles(tiling, pass_name: str) -> tuple[int, int, int]:
  """The `(tm, tk, tn)` that `pass_name` ("fwd", "dlhs" or "drhs") asks for."""
  tiling = normalize_tiling(tiling)
  if isinstance(tiling, tuple) and isinstance(tiling[0], tuple):
    tiling = dict(tiling).get(pass_name)
  return DEFAULT_TILES if tiling is None else tiling


def _fit_tiles(tiles, dims, itemsize: int, interpret: bool) -> tuple[int, int, int]:
  """Shrinks tiles to whole dimensions and checks Mosaic's block rules.

  Args:
    tiles: the requested `(tm, tk, tn)`.
    dims: `(m, k, n)`.
    itemsize: the smallest element size among the blocks' dtypes.
    interpret: interpret mode has no block rules.
  """
  fitted = tuple(min(t, d) for t, d in zip(tiles, dims))
  if not interpret:
    sublanes = 8 * max(1, 4 // itemsize)
    for name, tile, dim, align in zip(("tm", "tk", "tn"), fitted, dims,
                                      (sublanes, _LANES, _LANES)):
      if tile != dim and tile % align:
        raise ValueError(
            f"tiling for the 'tpu' backend: {name}={tile} must be a multiple of {align} or cover "
            f"its dimension ({dim}) for {8 * itemsize}-bit data on TPU (Mosaic block rules); "
            "interpret mode takes any tile.")
  return fitted


def _round_up(dim: int, tile: int) -> int:
  return -(-dim // tile) * tile


def _pad(x: jax.Array, shape) -> jax.Array:
  if x.shape == tuple(shape):
    return x
  return jnp.pad(x, [(0, s - d) for d, s in zip(x.shape, shape)])


def _interpret_params(interpret: bool):
  return pltpu.InterpretParams() if interpret else False


def _visit_rows(group_ids, m_tile_ids, group_offsets, v, tm: int):
  """First row of visit v's tile, and the [lo, hi) rows its group owns there."""
  g = group_ids[v]
  tile_start = m_tile_ids[v] * tm
  lo = jnp.maximum(group_offsets[g], tile_start)
  hi = jnp.minimum(group_offsets[g + 1], tile_start + tm)
  return tile_start, lo, hi


def _gmm_kernel(group_ids, m_tile_ids, group_offsets, num_visits, lhs_ref, rhs_ref, out_ref,
                acc_ref, *, tm: int, transpose_rhs: bool):
  v, kk = pl.program_id(1), pl.program_id(2)
  active = v < num_visits[0]
  tile_start, lo, hi = _visit_rows(group_ids, m_tile_ids, group_offsets, v, tm)
  computes = active & (lo < hi)

  @pl.when(computes & (kk == 0))
  def _zero():
    acc_ref[...] = jnp.zeros_like(acc_ref)

  @pl.when(computes)
  def _accumulate():
    contract = ((1,), (1 if transpose_rhs else 0,))
    acc_ref[...] += lax.dot_general(lhs_ref[...], rhs_ref[...], (contract, ((), ())),
                                    preferred_element_type=acc_ref.dtype)

  @pl.when(active & (kk == pl.num_programs(2) - 1))
  def _store():
    rows = tile_start + lax.broadcasted_iota(jnp.int32, out_ref.shape, 0)
    # Earlier visits of this tile filled the rows above `lo`. On a tile's
    # first visit `lo` is the tile's first row, so nothing stale is kept.
    # Visits without rows (the tail past the last group) store zeros. The
    # select runs in the accumulator's dtype (exact for the narrower output):
    # not every TPU generation has 16-bit vector ALUs.
    acc = acc_ref[...]
    kept = out_ref[...].astype(acc.dtype)
    out_ref[...] = jnp.where(rows < lo, kept,
                             jnp.where(rows < hi, acc, jnp.zeros_like(acc))).astype(out_ref.dtype)


def gmm(lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array, *, out_dtype, tiling=None,
        transpose_rhs: bool = False, interpret: bool = False) -> jax.Array:
  """lhs [M, K] @ rhs [G, K, N] per group -> [M, N]; rows past sum(group_sizes) are zero.

  Args:
    lhs: [M, K], rows sorted by group.
    rhs: [G, K, N], or [G, N, K] with `transpose_rhs` (each group then uses
      `rhs[i].T`, read as [tn, tk] blocks and contracted on their last axis:
      the backward pass's d_lhs, with no transposed copy of rhs).
    group_sizes: [G] int32, rows per group.
    out_dtype: dtype of the result; products are summed in float32.
    tiling: see `normalize_tiling`; this call runs the "dlhs" tiles when
      `transpose_rhs`, else the "fwd" tiles.
    transpose_rhs: see `rhs`.
    interpret: run in Pallas TPU interpret mode (on any backend).
  """
  lhs, rhs = common.promote_operands(lhs, rhs)
  (m, k), num_groups = lhs.shape, rhs.shape[0]
  n = rhs.shape[1] if transpose_rhs else rhs.shape[2]
  itemsize = min(lhs.dtype.itemsize, jnp.dtype(out_dtype).itemsize)
  tm, tk, tn = _fit_tiles(pass_tiles(tiling, "dlhs" if transpose_rhs else "fwd"), (m, k, n),
                          itemsize, interpret)
  mp, kp, np_ = _round_up(m, tm), _round_up(k, tk), _round_up(n, tn)
  lhs = _pad(lhs, (mp, kp))
  rhs = _pad(rhs, (num_groups, np_, kp) if transpose_rhs else (num_groups, kp, np_))
  group_ids, m_tile_ids, group_offsets, num_visits = metadata.tile_visits(
      group_sizes, m, tm, visit_tail=True)
  num_k_tiles = kp // tk

  def k_step(v, kk, num_visits):
    # Inactive visits re-name the last k block, so they fetch nothing new.
    return jnp.where(v < num_visits[0], kk, num_k_tiles - 1)

  def lhs_map(j, v, kk, group_ids, m_tile_ids, group_offsets, num_visits):
    del j, group_ids, group_offsets
    return m_tile_ids[v], k_step(v, kk, num_visits)

  def rhs_map(j, v, kk, group_ids, m_tile_ids, group_offsets, num_visits):
    del m_tile_ids, group_offsets
    kk = k_step(v, kk, num_visits)
    return (group_ids[v], j, kk) if transpose_rhs else (group_ids[v], kk, j)

  def out_map(j, v, kk, group_ids, m_tile_ids, group_offsets, num_visits):
    del kk, group_ids, group_offsets, num_visits
    return m_tile_ids[v], j

  rhs_block = (pl.Squeezed(), tn, tk) if transpose_rhs else (pl.Squeezed(), tk, tn)
  out_itemsize = jnp.dtype(out_dtype).itemsize
  cost = pl.CostEstimate(
      flops=2 * mp * kp * np_, transcendentals=0,
      bytes_accessed=(lhs.size * lhs.dtype.itemsize * (np_ // tn)
                      + rhs.dtype.itemsize * kp * np_ * group_ids.shape[0]
                      + mp * np_ * out_itemsize))
  kernel = pl.pallas_call(
      functools.partial(_gmm_kernel, tm=tm, transpose_rhs=transpose_rhs),
      out_shape=jax.ShapeDtypeStruct((mp, np_), out_dtype),
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=4,
          grid=(np_ // tn, group_ids.shape[0], num_k_tiles),
          in_specs=[pl.BlockSpec((tm, tk), lhs_map), pl.BlockSpec(rhs_block, rhs_map)],
          out_specs=pl.BlockSpec((tm, tn), out_map),
          scratch_shapes=[pltpu.VMEM((tm, tn), common.accumulation_dtype(lhs.dtype))],
      ),
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=("parallel", "arbitrary", "arbitrary")),
      interpret=_interpret_params(interpret),
      cost_estimate=cost,
      name="gmm_transposed_rhs" if transpose_rhs else "gmm",
  )
  out = kernel(group_ids, m_tile_ids, group_offsets, num_visits[None], lhs, rhs)
  return out[:m, :n]


def _tgmm_kernel(group_ids, m_tile_ids, group_offsets, num_visits, lhs_ref, grad_ref, out_ref,
                 acc_ref, *, tm: int):
  v = pl.program_id(2)
  last_active = num_visits[0] - 1
  active = v <= last_active
  g = group_ids[v]
  opens = (v == 0) | (group_ids[jnp.maximum(v - 1, 0)] != g)
  closes = (v == last_active) | (group_ids[jnp.minimum(v + 1, pl.num_programs(2) - 1)] != g)
  tile_start, lo, hi = _visit_rows(group_ids, m_tile_ids, group_offsets, v, tm)

  @pl.when(active & opens)
  def _zero():
    acc_ref[...] = jnp.zeros_like(acc_ref)

  @pl.when(active & (lo < hi))
  def _accumulate():
    def masked(ref):
      rows = tile_start + lax.broadcasted_iota(jnp.int32, ref.shape, 0)
      # Selected in 32 bits: not every TPU generation has 16-bit vector ALUs.
      return jnp.where((rows >= lo) & (rows < hi), ref[...].astype(acc_ref.dtype), 0)

    # A [tm, tk] -> [tk, tm] transpose in 32 bits, then an ordinary matmul:
    # the MXU-friendly form of contracting both operands on their rows.
    x_t = masked(lhs_ref).T.astype(lhs_ref.dtype)
    acc_ref[...] += jnp.dot(x_t, masked(grad_ref).astype(grad_ref.dtype),
                            preferred_element_type=acc_ref.dtype)

  @pl.when(active & closes)
  def _store():
    out_ref[...] = acc_ref[...].astype(out_ref.dtype)


def tgmm(lhs: jax.Array, grad: jax.Array, group_sizes: jax.Array, *, out_dtype, tiling=None,
         interpret: bool = False) -> jax.Array:
  """out[i] = lhs[rows of i].T @ grad[rows of i]: lhs [M, K], grad [M, N] -> [G, K, N].

  Empty groups give exact zeros; rows past sum(group_sizes) are ignored, even
  NaN or Inf ones.

  Args:
    lhs: [M, K], rows sorted by group.
    grad: [M, N].
    group_sizes: [G] int32, rows per group.
    out_dtype: dtype of the result; products are summed in float32.
    tiling: see `normalize_tiling`; this call runs the "drhs" tiles.
    interpret: run in Pallas TPU interpret mode (on any backend).
  """
  lhs, grad = common.promote_operands(lhs, grad)
  (m, k), n, num_groups = lhs.shape, grad.shape[1], group_sizes.shape[0]
  itemsize = min(lhs.dtype.itemsize, jnp.dtype(out_dtype).itemsize)
  tm, tk, tn = _fit_tiles(pass_tiles(tiling, "drhs"), (m, k, n), itemsize, interpret)
  mp, kp, np_ = _round_up(m, tm), _round_up(k, tk), _round_up(n, tn)
  lhs, grad = _pad(lhs, (mp, kp)), _pad(grad, (mp, np_))
  group_ids, m_tile_ids, group_offsets, num_visits = metadata.tile_visits(
      group_sizes, m, tm, visit_empty_groups=True)

  def lhs_map(i, j, v, group_ids, m_tile_ids, group_offsets, num_visits):
    del j, group_ids, group_offsets, num_visits
    return m_tile_ids[v], i

  def grad_map(i, j, v, group_ids, m_tile_ids, group_offsets, num_visits):
    del i, group_ids, group_offsets, num_visits
    return m_tile_ids[v], j

  def out_map(i, j, v, group_ids, m_tile_ids, group_offsets, num_visits):
    del m_tile_ids, group_offsets, num_visits
    return group_ids[v], i, j

  out_itemsize = jnp.dtype(out_dtype).itemsize
  cost = pl.CostEstimate(
      flops=2 * mp * kp * np_, transcendentals=0,
      bytes_accessed=(lhs.size * lhs.dtype.itemsize * (np_ // tn)
                      + grad.size * grad.dtype.itemsize * (kp // tk)
                      + num_groups * kp * np_ * out_itemsize))
  kernel = pl.pallas_call(
      functools.partial(_tgmm_kernel, tm=tm),
      out_shape=jax.ShapeDtypeStruct((num_groups, kp, np_), out_dtype),
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=4,
          grid=(kp // tk, np_ // tn, group_ids.shape[0]),
          in_specs=[pl.BlockSpec((tm, tk), lhs_map), pl.BlockSpec((tm, tn), grad_map)],
          out_specs=pl.BlockSpec((pl.Squeezed(), tk, tn), out_map),
          scratch_shapes=[pltpu.VMEM((tk, tn), common.accumulation_dtype(lhs.dtype))],
      ),
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=("parallel", "parallel", "arbitrary")),
      interpret=_interpret_params(interpret),
      cost_estimate=cost,
      name="tgmm",
  )
  out = kernel(group_ids, m_tile_ids, group_offsets, num_visits[None], lhs, grad)
  return out[:, :k, :n]
