"""Expert weights and the expert computation: grouped matmul (dropless) or batched buffers (capacity)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

import pallas_kernels
from moe_jax import sharding

ACTIVATIONS = ("swiglu", "gelu", "swiglu_clamped")
# An activation is its name, or for "swiglu_clamped" the hashable ("swiglu_clamped", alpha, limit).
Activation = str | tuple


def activation_of(model_config) -> Activation:
  """The experts' and MLPs' activation of `config.model` (with GPT-OSS's alpha and limit)."""
  name = model_config.activation
  if name == "swiglu_clamped":
    return (name, float(model_config.get("swiglu_alpha", 1.702)),
            float(model_config.get("swiglu_limit", 7.0)))
  return name


def activation_name(activation: Activation) -> str:
  return activation[0] if isinstance(activation, tuple) else activation


def is_gated(activation: Activation) -> bool:
  """Whether the activation takes a gate and an up projection (the SwiGLU family)."""
  return activation_name(activation) in ("swiglu", "swiglu_clamped")


def ffn_init(batch_axis: tuple[int, ...] = ()):
  """Fan-in scaled truncated normal; `batch_axis` excludes the expert axis from the fan."""
  return nnx.initializers.variance_scaling(1.0, "fan_in", "truncated_normal", in_axis=-2,
                                           out_axis=-1, batch_axis=batch_axis)


def apply_activation(activation: Activation, gate: jax.Array | None, up: jax.Array) -> jax.Array:
  """The FFN nonlinearity, computed in float32.

  * "swiglu" (Shazeer 2020): silu(gate) * up.
  * "gelu": gelu(up).
  * ("swiglu_clamped", alpha, limit) (GPT-OSS 2025): with gate clamped above at `limit` and up to
    [-limit, limit], (up + 1) * gate * sigmoid(alpha * gate).
  """
  name = activation_name(activation)
  if name == "swiglu":
    return jax.nn.silu(gate.astype(jnp.float32)) * up.astype(jnp.float32)
  if name == "gelu":
    return jax.nn.gelu(up.astype(jnp.float32))
  if name == "swiglu_clamped":
    _, alpha, limit = activation
    gate = jnp.minimum(gate.astype(jnp.float32), limit)
    up = jnp.clip(up.astype(jnp.float32), -limit, limit)
    return (up + 1) * gate * jax.nn.sigmoid(alpha * gate)
  raise ValueError(f"activation={activation!r} is not one of {ACTIVATIONS}.")


def fuse_gate_up(w_gate: jax.Array, w_up: jax.Array) -> jax.Array:
  """Interleaves gate and up projections [..., D, F] into one [..., D, 2F] weight.

  Column 2j is gate column j and column 2j+1 is up column j (the layout of GPT-OSS's
  `gate_up_proj`), so any even-sized contiguous split of the last axis, as tensor parallelism over
  `mlp` makes, holds matching gate/up pairs.
  """
  return jnp.stack([w_gate, w_up], axis=-1).reshape(*w_gate.shape[:-1], 2 * w_gate.shape[-1])


def split_gate_up(gate_up: jax.Array) -> tuple[jax.Array, jax.Array]:
  """The inverse of `fuse_gate_up` on [..., 2F] (weights or activations): (gate, up) [..., F]."""
  pairs = gate_up.reshape(*gate_up.shape[:-1], gate_up.shape[-1] // 2, 2)
  return pairs[..., 0], pairs[..., 1]


def _fused_gate_up_init(init):
  """An initializer of [..., D, 2F] from `init` of [..., D, F]: two independent draws, fused.

  The same distribution as separate gate and up weights (the fan-in is D either way).
  """
  def fused(key, shape, dtype=jnp.float32):
    half = tuple(shape[:-1]) + (shape[-1] // 2,)
    gate_key, up_key = jax.random.split(key)
    return fuse_gate_up(init(gate_key, half, dtype), init(up_key, half, dtype))
  return fused


class Experts(nnx.Module):
  """E independent FFNs (logical axes expert/embed/mlp).

  SwiGLU experts hold `w_gate_up` [E, D, 2F] (gate and up interleaved, see `fuse_gate_up`: one
  grouped matmul computes both) and `w_down` [E, F, D]; GELU experts hold `w_up` [E, D, F] and
  `w_down`. `grouped` runs expert-sorted rows through `pallas_kernels.gmm` (dropless dispatch);
  `batched` runs fixed-size per-expert buffers through a batched matmul (capacity dispatch).
  `gmm_tiling` is passed to the grouped matmul (see `pallas_kernels.gmm`; None = the backend's
  default).
  """

  def __init__(self, num_experts: int, d_model: int, hidden_dim: int, *, activation: Activation,
               rngs: nnx.Rngs, dtype=jnp.float32, param_dtype=jnp.float32,
               gmm_backend: str = "auto", gmm_tiling=None, bias: bool = False):
    if activation_name(activation) not in ACTIVATIONS:
      raise ValueError(f"activation={activation!r} is not one of {ACTIVATIONS}.")
    self.activation = activation
    self.dtype = dtype
    self.gmm_backend = gmm_backend
    self.gmm_tiling = gmm_tiling
    init_in = sharding.logical(ffn_init(batch_axis=(0,)), ("expert", "embed", "mlp"))
    init_out = sharding.logical(ffn_init(batch_axis=(0,)), ("expert", "mlp", "embed"))
    shape_in, shape_out = (num_experts, d_model, hidden_dim), (num_experts, hidden_dim, d_model)
    if is_gated(activation):
      init_gate_up = sharding.logical(_fused_gate_up_init(ffn_init(batch_axis=(0,))),
                                      ("expert", "embed", "mlp"))
      self.w_gate_up = nnx.Param(init_gate_up(rngs.params(), shape_in[:2] + (2 * hidden_dim,),
                                              param_dtype))
      self.w_up = None
    else:
      self.w_gate_up = None
      self.w_up = nnx.Param(init_in(rngs.params(), shape_in, param_dtype))
    self.w_down = nnx.Param(init_out(rngs.params(), shape_out, param_dtype))
    if bias:  # GPT-OSS: b_in [E, 2F or F] after the input projection, b_down [E, D] after w_down
      in_width = 2 * hidden_dim if is_gated(activation) else hidden_dim
      zeros = nnx.initializers.zeros
      self.b_in = nnx.Param(sharding.logical(zeros, ("expert", "mlp"))(
          rngs.params(), (num_experts, in_width), param_dtype))
      self.b_down = nnx.Param(sharding.logical(zeros, ("expert", "embed"))(
          rngs.params(), (num_experts, d_model), param_dtype))
    else:
      self.b_in = self.b_down = None

  def weights(self) -> tuple[jax.Array, ...]:
    """(w_in, w_down), or with biases (w_in, b_in, b_down, w_down), in the compute dtype.

    w_in = w_gate_up [E, D, 2F] (SwiGLU) or w_up [E, D, F]; w_in comes first and w_down last
    either way (the expert-parallel code reads the expert count and hidden size from them).
    """
    w_in = self.w_gate_up if self.w_gate_up is not None else self.w_up
    w_in, w_down = w_in[...].astype(self.dtype), self.w_down[...].astype(self.dtype)
    if self.b_in is None:
      return w_in, w_down
    return w_in, self.b_in[...].astype(jnp.float32), self.b_down[...].astype(jnp.float32), w_down

  def grouped(self, x_sorted: jax.Array, group_sizes: jax.Array) -> jax.Array:
    """Expert FFN on rows sorted by expert: x_sorted [M, D], group_sizes [E] -> [M, D] float32."""
    return grouped_ffn(x_sorted, group_sizes, self.weights(), activation=self.activation,
                       dtype=self.dtype, backend=self.gmm_backend, tiling=self.gmm_tiling)

  def batched(self, x_buffers: jax.Array) -> jax.Array:
    """Expert FFN on per-expert buffers: x_buffers [E, R, D] -> [E, R, D] float32."""
    return batched_ffn(x_buffers, self.weights(), activation=self.activation, dtype=self.dtype)


def unpack_weights(weights) -> tuple[jax.Array, jax.Array, jax.Array | None, jax.Array | None]:
  """(w_in, w_down, b_in or None, b_down or None) of an `Experts.weights()` tuple."""
  if len(weights) == 2:
    return weights[0], weights[1], None, None
  w_in, b_in, b_down, w_down = weights
  return w_in, w_down, b_in, b_down


def _hidden(activation: Activation, projected: jax.Array, dtype) -> jax.Array:
  """The activation of the input projection [..., F or 2F] (f32) -> [..., F] in `dtype`."""
  if is_gated(activation):
    gate, up = split_gate_up(projected)
    return apply_activation(activation, gate, up).astype(dtype)
  return apply_activation(activation, None, projected).astype(dtype)


def grouped_ffn(x_sorted: jax.Array, group_sizes: jax.Array, weights, *, activation: Activation,
                dtype, backend: str = "auto", tiling=None) -> jax.Array:
  """E FFNs on expert-sorted rows with `pallas_kernels.gmm`: [M, D] -> [M, D] float32.

  `weights` = `Experts.weights()`: (w_in [E, D, 2F or F], w_down [E, F, D]) with E =
  len(group_sizes), or with per-expert biases (w_in, b_in, b_down, w_down). Two grouped matmuls
  (SwiGLU's gate and up share one). Operands stay in `dtype` and accumulate in float32 in all
  three passes (see `pallas_kernels.gmm.ops`). Rows past sum(group_sizes) come out as zeros (gmm
  semantics; biases are not added to them).
  """
  w_in, w_down, b_in, b_down = unpack_weights(weights)
  x_sorted = x_sorted.astype(dtype)

  def gmm(lhs, rhs):
    return pallas_kernels.gmm(lhs, rhs, group_sizes, preferred_element_type=jnp.float32,
                              backend=backend, tiling=tiling)

  if b_in is None:
    return gmm(_hidden(activation, gmm(x_sorted, w_in), dtype), w_down)
  # Each row's expert: the group its index falls in (E for the rows past every group).
  ends = jnp.cumsum(group_sizes)
  row_expert = jnp.searchsorted(ends, jnp.arange(x_sorted.shape[0]), side="right")
  in_group = (row_expert < len(group_sizes))[:, None]
  row_expert = jnp.minimum(row_expert, len(group_sizes) - 1)
  projected = gmm(x_sorted, w_in) + jnp.where(in_group, b_in[row_expert], 0.0)
  return gmm(_hidden(activation, projected, dtype), w_down) + jnp.where(
      in_group, b_down[row_expert], 0.0)


def batched_ffn(x_buffers: jax.Array, weights, *, activation: Activation, dtype) -> jax.Array:
  """E FFNs on fixed-size per-expert buffers: [E, R, D] -> [E, R, D] float32 (biases as above)."""
  w_in, w_down, b_in, b_down = unpack_weights(weights)
  x_buffers = x_buffers.astype(dtype)

  def bmm(lhs, rhs):
    return jnp.einsum("erd,edf->erf", lhs, rhs, preferred_element_type=jnp.float32)

  projected = bmm(x_buffers, w_in)
  if b_in is not None:
    projected = projected + b_in[:, None, :]
  y = bmm(_hidden(activation, projected, dtype), w_down)
  return y if b_down is None else y + b_down[:, None, :]
