"""Norms over the last axis: RMSNorm (Zhang & Sennrich 2019), x / sqrt(mean(x^2) + eps) * w, and
the bias-free LayerNorm (Ba et al. 2016) of DBRX, (x - mean(x)) / sqrt(var(x) + eps) * w."""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from moe_jax import sharding


def rms_normalize(x: jax.Array, eps: float) -> jax.Array:
  """x [..., D] divided by its root mean square over the last axis, in float32."""
  x32 = x.astype(jnp.float32)
  return x32 * jax.lax.rsqrt(jnp.mean(x32 ** 2, axis=-1, keepdims=True) + eps)


class RMSNorm(nnx.Module):
  """RMSNorm over the last axis [..., D] with a learned scale w [D] (not 1 + w), in float32.

  `axis_name` is the scale's logical axis ("embed" for the residual stream, "kv" for a per-head
  qk-norm, None for a norm over a whole projection).
  """

  def __init__(self, dim: int, *, eps: float = 1e-6, param_dtype=jnp.float32,
               axis_name: str | None = "embed"):
    self.eps = eps
    init = sharding.logical(nnx.initializers.ones, (axis_name,))
    self.scale = nnx.Param(init(jax.random.key(0), (dim,), param_dtype))

  def __call__(self, x: jax.Array) -> jax.Array:
    return (rms_normalize(x, self.eps) * self.scale[...].astype(jnp.float32)).astype(x.dtype)


class LayerNorm(RMSNorm):
  """Bias-free LayerNorm over the last axis [..., D] with a learned scale w [D], in float32."""

  def __call__(self, x: jax.Array) -> jax.Array:
    x32 = x.astype(jnp.float32)
    centred = x32 - jnp.mean(x32, axis=-1, keepdims=True)
    normed = centred * jax.lax.rsqrt(jnp.mean(centred ** 2, axis=-1, keepdims=True) + self.eps)
    return (normed * self.scale[...].astype(jnp.float32)).astype(x.dtype)


NORMS = {"rms": RMSNorm, "layer": LayerNorm}


def residual_norm(config, dim: int, *, param_dtype) -> RMSNorm:
  """The block and final norm of `config.model`: `norm` "rms" (default) or "layer"."""
  return NORMS[config.get("norm", "rms")](dim, eps=config.norm_eps, param_dtype=param_dtype)
