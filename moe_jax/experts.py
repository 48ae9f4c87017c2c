"""Expert weights and the expert computation: grouped matmul (dropless) or batched buffers (capacity)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

import pallas_kernels
from moe_jax import sharding

ACTIVATIONS = ("swiglu", "gelu")


def ffn_init(batch_axis: tuple[int, ...] = ()):
  """Fan-in scaled truncated normal; `batch_axis` excludes the expert axis from the fan."""
  return nnx.initializers.variance_scaling(1.0, "fan_in", "truncated_normal", in_axis=-2,
                                           out_axis=-1, batch_axis=batch_axis)


def apply_activation(activation: str, gate: jax.Array | None, up: jax.Array) -> jax.Array:
  """SwiGLU (Shazeer 2020): silu(gate) * up; GELU: gelu(up). Computed in float32."""
  if activation == "swiglu":
    return jax.nn.silu(gate.astype(jnp.float32)) * up.astype(jnp.float32)
  if activation == "gelu":
    return jax.nn.gelu(up.astype(jnp.float32))
  raise ValueError(f"activation={activation!r} is not one of {ACTIVATIONS}.")


class Experts(nnx.Module):
  """E independent FFNs with weights [E, D, F] and [E, F, D] (logical axes expert/embed/mlp).

  `grouped` runs expert-sorted rows through `pallas_kernels.gmm` (dropless dispatch); `batched` runs
  fixed-size per-expert buffers through a batched matmul (capacity dispatch).
  """

  def __init__(self, num_experts: int, d_model: int, hidden_dim: int, *, activation: str,
               rngs: nnx.Rngs, dtype=jnp.float32, param_dtype=jnp.float32,
               gmm_backend: str = "auto"):
    if activation not in ACTIVATIONS:
      raise ValueError(f"activation={activation!r} is not one of {ACTIVATIONS}.")
    self.activation = activation
    self.dtype = dtype
    self.gmm_backend = gmm_backend
    init_in = sharding.logical(ffn_init(batch_axis=(0,)), ("expert", "embed", "mlp"))
    init_out = sharding.logical(ffn_init(batch_axis=(0,)), ("expert", "mlp", "embed"))
    shape_in, shape_out = (num_experts, d_model, hidden_dim), (num_experts, hidden_dim, d_model)
    self.w_up = nnx.Param(init_in(rngs.params(), shape_in, param_dtype))
    self.w_gate = (nnx.Param(init_in(rngs.params(), shape_in, param_dtype))
                   if activation == "swiglu" else None)
    self.w_down = nnx.Param(init_out(rngs.params(), shape_out, param_dtype))

  def weights(self) -> tuple[jax.Array, jax.Array | None, jax.Array]:
    """(w_up [E, D, F], w_gate [E, D, F] or None, w_down [E, F, D]) in the compute dtype."""
    cast = lambda p: None if p is None else p[...].astype(self.dtype)
    return cast(self.w_up), cast(self.w_gate), cast(self.w_down)

  def grouped(self, x_sorted: jax.Array, group_sizes: jax.Array) -> jax.Array:
    """Expert FFN on rows sorted by expert: x_sorted [M, D], group_sizes [E] -> [M, D] float32."""
    return grouped_ffn(x_sorted, group_sizes, self.weights(), activation=self.activation,
                       dtype=self.dtype, backend=self.gmm_backend)

  def batched(self, x_buffers: jax.Array) -> jax.Array:
    """Expert FFN on per-expert buffers: x_buffers [E, R, D] -> [E, R, D] float32."""
    return batched_ffn(x_buffers, self.weights(), activation=self.activation, dtype=self.dtype)


def grouped_ffn(x_sorted: jax.Array, group_sizes: jax.Array, weights, *, activation: str, dtype,
                backend: str = "auto") -> jax.Array:
  """E FFNs on expert-sorted rows with `pallas_kernels.gmm`: [M, D] -> [M, D] float32.

  `weights` = (w_up, w_gate or None, w_down) with a leading expert axis E = len(group_sizes).
  Rows past sum(group_sizes) come out as zeros (gmm semantics).
  """
  w_up, w_gate, w_down = weights
  x_sorted = x_sorted.astype(dtype)

  def gmm(lhs, rhs):
    return pallas_kernels.gmm(lhs, rhs, group_sizes, preferred_element_type=jnp.float32,
                              backend=backend)

  gate = gmm(x_sorted, w_gate) if w_gate is not None else None
  hidden = apply_activation(activation, gate, gmm(x_sorted, w_up)).astype(dtype)
  return gmm(hidden, w_down)


def batched_ffn(x_buffers: jax.Array, weights, *, activation: str, dtype) -> jax.Array:
  """E FFNs on fixed-size per-expert buffers: [E, R, D] -> [E, R, D] float32."""
  w_up, w_gate, w_down = weights
  x_buffers = x_buffers.astype(dtype)

  def bmm(lhs, rhs):
    return jnp.einsum("erd,edf->erf", lhs, rhs, preferred_element_type=jnp.float32)

  gate = bmm(x_buffers, w_gate) if w_gate is not None else None
  hidden = apply_activation(activation, gate, bmm(x_buffers, w_up)).astype(dtype)
  return bmm(hidden, w_down)
