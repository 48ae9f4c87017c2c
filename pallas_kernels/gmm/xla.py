"""Grouped matmul through `jax.lax.ragged_dot_general`.

Native and fast on TPU. On XLA:CPU (and XLA:GPU today) the op is expanded
into a dense product per group, i.e. G x the FLOPs: use "blocked" there.
"""

import jax
from jax import lax

from pallas_kernels.gmm import common


def gmm(lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array, *, out_dtype, tiling=None,
        transpose_rhs: bool = False) -> jax.Array:
  """lhs [M, K] @ rhs [G, K, N] per group -> [M, N]; rows past sum(group_sizes) are zero.

  With `transpose_rhs`, rhs is [G, N, K] and each group uses `rhs[i].T`
  (contracted in place, not materialized). `tiling` is ignored.
  """
  del tiling
  lhs, rhs = common.promote_operands(lhs, rhs)
  dims = lax.RaggedDotDimensionNumbers(
      dot_dimension_numbers=(([1], [2 if transpose_rhs else 1]), ([], [])),
      lhs_ragged_dimensions=[0],
      rhs_group_dimensions=[0])
  out = lax.ragged_dot_general(lhs, rhs, group_sizes.astype("int32"), dims,
                               preferred_element_type=common.accumulation_dtype(lhs.dtype))
  return out.astype(out_dtype)


def tgmm(lhs: jax.Array, grad: jax.Array, group_sizes: jax.Array, *, out_dtype,
         tiling=None) -> jax.Array:
  """out[i] = lhs[rows of i].T @ grad[rows of i]: lhs [M, K], grad [M, N] -> [G, K, N].

  The ragged dimension is the contracting one (ragged_dot_general's second
  mode), which yields one output per group. `tiling` is ignored.
  """
  del tiling
  lhs, grad = common.promote_operands(lhs, grad)
  dims = lax.RaggedDotDimensionNumbers(
      dot_dimension_numbers=(([0], [0]), ([], [])),
      lhs_ragged_dimensions=[0],
      rhs_group_dimensions=[])
  out = lax.ragged_dot_general(lhs, grad, group_sizes.astype("int32"), dims,
                               preferred_element_type=common.accumulation_dtype(lhs.dtype))
  return out.astype(out_dtype)
