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

  def _weight(self, param: nnx.Param) -> jax.Array:
    return param[...].astype(self.dtype)

  def grouped(self, x_sorted: jax.Array, group_sizes: jax.Array) -> jax.Array:
    """Expert FFN on rows sorted by expert: x_sorted [M, D], group_sizes [E] -> [M, D].

    Rows past sum(group_sizes) come out as zeros (gmm semantics).
    """
    x_sorted = x_sorted.astype(self.dtype)

    def gmm(lhs, rhs):
      return pallas_kernels.gmm(lhs, rhs, group_sizes, preferred_element_type=jnp.float32,
                                backend=self.gmm_backend)

    up = gmm(x_sorted, self._weight(self.w_up))
    gate = gmm(x_sorted, self._weight(self.w_gate)) if self.w_gate is not None else None
    hidden = apply_activation(self.activation, gate, up).astype(self.dtype)
    return gmm(hidden, self._weight(self.w_down))

  def batched(self, x_buffers: jax.Array) -> jax.Array:
    """Expert FFN on per-expert buffers: x_buffers [E, R, D] -> [E, R, D] float32."""
    x_buffers = x_buffers.astype(self.dtype)

    def bmm(lhs, rhs):
      return jnp.einsum("erd,edf->erf", lhs, rhs, preferred_element_type=jnp.float32)

    up = bmm(x_buffers, self._weight(self.w_up))
    gate = bmm(x_buffers, self._weight(self.w_gate)) if self.w_gate is not None else None
    hidden = apply_activation(self.activation, gate, up).astype(self.dtype)
    return bmm(hidden, self._weight(self.w_down))
