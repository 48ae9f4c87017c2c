"""Plain `jnp` grouped matmul: every group multiplies every row, masks keep its own.

G x the FLOPs of the grouped product; the yardstick the fast backends are
tested against, and a fallback that works everywhere.
"""

import jax
from jax import lax
import jax.numpy as jnp

from pallas_kernels.gmm import common
from pallas_kernels.gmm import metadata


def _row_masks(group_sizes: jax.Array, num_rows: int):
  """Returns `mask(i)`: a [M, 1] bool mask of group i's rows."""
  starts, ends = metadata.group_bounds(group_sizes, num_rows)
  rows = jnp.arange(num_rows, dtype=jnp.int32)
  return lambda i: ((rows >= starts[i]) & (rows < ends[i]))[:, None]


def gmm(lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array, *, out_dtype, tiling=None,
        transpose_rhs: bool = False) -> jax.Array:
  """lhs [M, K] @ rhs [G, K, N] per group -> [M, N]; rows past sum(group_sizes) are zero.

  With `transpose_rhs`, rhs is [G, N, K] and each group uses `rhs[i].T`.
  `tiling` is ignored.
  """
  del tiling
  lhs, rhs = common.promote_operands(lhs, rhs)
  if transpose_rhs:
    rhs = jnp.swapaxes(rhs, 1, 2)
  acc_dtype = common.accumulation_dtype(lhs.dtype)
  mask = _row_masks(group_sizes, lhs.shape[0])

  def add_group(i, out):
    y = jnp.dot(lhs, rhs[i], preferred_element_type=acc_dtype)
    return out + jnp.where(mask(i), y, 0)

  out = common.loop_zeros((lhs.shape[0], rhs.shape[2]), acc_dtype, lhs, rhs, group_sizes)
  return lax.fori_loop(0, rhs.shape[0], add_group, out).astype(out_dtype)


def tgmm(lhs: jax.Array, grad: jax.Array, group_sizes: jax.Array, *, out_dtype,
         tiling=None) -> jax.Array:
  """out[i] = lhs[rows of i].T @ grad[rows of i]: lhs [M, K], grad [M, N] -> [G, K, N].

  Empty groups give exact zeros; rows past sum(group_sizes) are ignored.
  `tiling` is ignored.
  """
  del tiling
  lhs, grad = common.promote_operands(lhs, grad)
  acc_dtype = common.accumulation_dtype(lhs.dtype)
  mask = _row_masks(group_sizes, lhs.shape[0])
  num_groups = group_sizes.shape[0]

  def set_group(i, out):
    x = jnp.where(mask(i), lhs, 0)
    g = jnp.where(mask(i), grad, 0)
    prod = jnp.dot(x.T, g, preferred_element_type=acc_dtype)
    return lax.dynamic_update_index_in_dim(out, prod, i, 0)

  out = common.loop_zeros((num_groups, lhs.shape[1], grad.shape[1]), acc_dtype, lhs, grad,
                          group_sizes)
  return lax.fori_loop(0, num_groups, set_group, out).astype(out_dtype)
