"""Dtype rules shared by every gmm backend."""

import jax
import jax.numpy as jnp


def accumulation_dtype(dtype) -> jnp.dtype:
  """The dtype products are summed in: float32, or wider when the inputs are."""
  return jnp.promote_types(dtype, jnp.float32)


def promote_operands(a: jax.Array, b: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Casts both matmul operands to their common dtype (a no-op when they match)."""
  dtype = jnp.result_type(a, b)
  return a.astype(dtype), b.astype(dtype)


def loop_zeros(shape, dtype, *operands: jax.Array) -> jax.Array:
  """Zeros to start a loop carry that the operands will be accumulated into.

  Inside `shard_map` the carry must vary over the same manual mesh axes as the values added to it
  (the union of the operands'), or the loop does not type-check. Adding each operand's empty sum
  (exactly 0, even for NaN data) gives the zeros that type without naming the axes, on every JAX
  version; outside `shard_map` it is `jnp.zeros`.
  """
  zeros = jnp.zeros(shape, dtype)
  for x in operands:
    zeros = zeros + jnp.sum(x.reshape(-1)[:0]).astype(dtype)
  return zeros
