"""Grouped matmul as a loop over group-aligned row tiles, in plain XLA.

`jax.lax.ragged_dot` on XLA:CPU multiplies every row by every group's weights
(G x the work). Here each group is covered by a few row tiles that start at
the group's first row (see `metadata.py`): one dense [tile, K] @ [K, N] dot
per tile, so the work stays that of a single dense matmul plus less than one
small tile per group, at any number of groups.

Each tile is read straight out of `lhs` with a dynamic slice and written back
through a row mask, so no padded copy of the operands is ever built; on
XLA:CPU that beat both a scatter into a padded [G * tile]-aligned buffer and
a batched einsum over gathered per-tile weights (gathers are slow there).

Operands stay in their own dtype and every dot accumulates in float32
(`preferred_element_type`): bf16 training keeps bf16 operands in all three
passes and makes no float32 copy of the weights (issue #12). XLA:CPU runs
bf16 dots slower than f32 ones, so on CPU an f32 model is the fast choice.
"""

from collections.abc import Sequence

import jax
from jax import lax
import jax.numpy as jnp

from pallas_kernels.gmm import common
from pallas_kernels.gmm import metadata


def _tiles(tiling, num_rows: int) -> Sequence[int]:
  return metadata.row_tiles_for(metadata.normalize_row_tiles(tiling), num_rows)


def gmm(lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array, *, out_dtype, tiling=None,
        transpose_rhs: bool = False) -> jax.Array:
  """lhs [M, K] @ rhs [G, K, N] per group -> [M, N]; rows past sum(group_sizes) are zero.

  Args:
    lhs: [M, K], rows sorted by group.
    rhs: [G, K, N], or [G, N, K] with `transpose_rhs` (each group then uses
      `rhs[i].T`, contracted in place, as the backward pass needs).
    group_sizes: [G] int, rows per group.
    out_dtype: dtype of the result; products are summed in float32 or wider.
    tiling: None, a row tile size, or decreasing row tile sizes.
    transpose_rhs: see `rhs`.
  """
  lhs, rhs = common.promote_operands(lhs, rhs)
  num_rows = lhs.shape[0]
  tiles = _tiles(tiling, num_rows)
  acc_dtype = common.accumulation_dtype(lhs.dtype)
  starts, ends = metadata.group_bounds(group_sizes, num_rows)
  contract = ((1,), (1 if transpose_rhs else 0,))

  def group_body(i, out):
    # Sliced once per group, not per tile.
    w = lax.dynamic_index_in_dim(rhs, i, keepdims=False)

    def tile_body(start, size, out):
      row, mask = metadata.tile_window(start, ends[i], size, num_rows)
      x = lax.dynamic_slice_in_dim(lhs, row, size)
      y = lax.dot_general(x, w, (contract, ((), ())), preferred_element_type=acc_dtype)
      # Keep the rows this tile may not overwrite: the next group's (the
      # last tile overhangs its group) and, near the bottom of lhs, rows
      # above `start` that the in-bounds shift pulled in.
      y = jnp.where(mask, y, lax.dynamic_slice_in_dim(out, row, size))
      return lax.dynamic_update_slice_in_dim(out, y, row, 0)

    return metadata.for_each_row_tile(starts[i], ends[i], tiles, tile_body, out)

  # The loop carries float32 and casts once at the end: with a narrower carry,
  # XLA:CPU converts the whole buffer to float32 and back around every tile's
  # dynamic-update-slice.
  out = common.loop_zeros((num_rows, rhs.shape[1] if transpose_rhs else rhs.shape[2]), acc_dtype,
                          lhs, rhs, group_sizes)
  return lax.fori_loop(0, rhs.shape[0], group_body, out).astype(out_dtype)


def tgmm(lhs: jax.Array, grad: jax.Array, group_sizes: jax.Array, *, out_dtype,
         tiling=None) -> jax.Array:
  """out[i] = lhs[rows of i].T @ grad[rows of i]: lhs [M, K], grad [M, N] -> [G, K, N].

  Each group is full tiles of the largest size plus one tail tile of a size
  picked from a fine ladder (`metadata.split_group`). Every tile writes and
  adds a whole [K, N] product, a fixed cost on top of its rows, so one
  slightly padded tail tile beats a chain of small ones: at 64 experts with
  ~128 rows each, ~18% faster on 2 CPU cores than the earlier schedule
  (greedy tiles of 512, 256, 128 and 64 rows, one [K, N] accumulator add per
  tile) and ~10% faster than gmm's schedule. The tail's dot runs in
  a `lax.switch` over the ladder and returns only its [K, N] product: passing
  the [G, K, N] output through the switch instead copied it on every call
  (over 10x slower). Empty groups come out as exact zeros and rows past
  sum(group_sizes) (even NaN ones) are ignored.
  """
  lhs, grad = common.promote_operands(lhs, grad)
  num_rows, k = lhs.shape
  n = grad.shape[1]
  tiles = _tiles(tiling, num_rows)
  largest, tail_sizes = tiles[0], metadata.tail_tile_sizes(tiles)
  acc_dtype = common.accumulation_dtype(lhs.dtype)
  starts, ends = metadata.group_bounds(group_sizes, num_rows)

  def tile_product(start, end, size, inside=False):
    row, mask = metadata.tile_window(start, end, size, num_rows)
    x = lax.dynamic_slice_in_dim(lhs, row, size)
    g = lax.dynamic_slice_in_dim(grad, row, size)
    if not inside:
      # Both operands are masked: a zeroed row of one side would still let a
      # NaN or Inf in the other side's foreign rows through (0 * inf = nan).
      x, g = jnp.where(mask, x, 0), jnp.where(mask, g, 0)
    return lax.dot_general(x, g, (((0,), (0,)), ((), ())), preferred_element_type=acc_dtype)

  # Branch 0 is the empty group; its zeros vary over the same shard_map axes
  # as the products (see `common.loop_zeros`), as `lax.switch` requires.
  tail_branches = [lambda start, end: common.loop_zeros((k, n), acc_dtype, lhs, grad, group_sizes)]
  tail_branches += [lambda start, end, size=size: tile_product(start, end, size)
                    for size in tail_sizes]

  def group_body(i, out):
    start, end = starts[i], ends[i]
    num_full, tail_start, tail_index = metadata.split_group(start, end, largest, tail_sizes)

    def full_tile(j, acc):
      return acc + tile_product(start + j * largest, end, largest, inside=True)

    acc = lax.switch(tail_index, tail_branches, tail_start, end)
    if largest < num_rows:
      # Otherwise no group has a full tile, and XLA would hoist the
      # loop-invariant dot of the zero-trip loop (see `metadata.row_tiles_for`).
      acc = lax.fori_loop(0, num_full, full_tile, acc)
    return lax.dynamic_update_index_in_dim(out, acc, i, 0)

  # A float32 carry, cast once at the end, for the same reason as in `gmm`.
  out = common.loop_zeros((group_sizes.shape[0], k, n), acc_dtype, lhs, grad, group_sizes)
  return lax.fori_loop(0, group_sizes.shape[0], group_body, out).astype(out_dtype)
