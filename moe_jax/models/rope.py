"""Rotary position embeddings (RoPE, Su et al. 2021) and their context-extension scalings.

The rotation frequencies are a static function of the config (`inverse_frequencies`, NumPy at trace
time); `apply_rope` rotates query/key heads by them. Scalings (`rope_scaling.kind`):
  "none"    theta_i = base^(-2i/d) (Su et al. 2021, eq. 15).
  "llama3"  Llama 3.1's frequency-dependent interpolation: wavelengths above
            original_max_len / low_freq_factor are divided by `factor`, those below
            original_max_len / high_freq_factor kept, a linear blend in between.
  "yarn"    YaRN (Peng et al. 2023, eq. 15-20): per-dimension blend of interpolation (theta / s) and
            extrapolation (theta) by a ramp between the dimensions that complete beta_fast and
            beta_slow rotations in the original context, and cos/sin scaled by
            `attention_factor` = 0.1 ln(s) + 1 (sqrt(1/t) of eq. 22), or by DeepSeek's
            mscale(s, mscale) / mscale(s, mscale_all_dim) when both are set.
Pairings: half-split (dimension i rotates with i + d/2, GPT-NeoX / Llama) or interleaved (2i with
2i + 1, the paper's and DeepSeek's layout).
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

SCALINGS = ("none", "llama3", "yarn")


def default_scaling() -> ml_collections.ConfigDict:
  """`config.model.rope_scaling`: kind "none" and every field the other kinds read."""
  return ml_collections.ConfigDict({
      "kind": "none",  # "none" | "llama3" | "yarn"
      "factor": 1.0,  # Context extension factor s.
      "original_max_len": 0,  # Context length of pre-training (llama3, yarn).
      "low_freq_factor": 1.0,  # llama3.
      "high_freq_factor": 4.0,  # llama3.
      "beta_fast": 32.0,  # yarn: rotations below which dimensions are interpolated ...
      "beta_slow": 1.0,  # ... and above which they are extrapolated.
      "mscale": 0.0,  # yarn (DeepSeek): attention factor numerator weight; 0 = unused.
      "mscale_all_dim": 0.0,  # yarn (DeepSeek): ... and denominator weight; 0 = unused.
      "attention_factor": 0.0,  # yarn: explicit cos/sin scale; 0 = derived from factor.
      "truncate": True,  # yarn: round the ramp's ends to whole dimensions.
  })


def _yarn_mscale(scale: float, weight: float = 1.0) -> float:
  return 1.0 if scale <= 1 else 0.1 * weight * math.log(scale) + 1.0


def inverse_frequencies(head_dim: int, base: float, scaling=None) -> np.ndarray:
  """The rotation frequencies theta_i, i < head_dim / 2, as float32 [head_dim / 2]."""
  kind = "none" if scaling is None else scaling.get("kind", "none")
  if kind not in SCALINGS:
    raise ValueError(f"rope_scaling.kind={kind!r} is not one of {SCALINGS}.")
  # float32 as the reference implementations compute them (transformers, the Llama code).
  exponents = np.arange(0, head_dim, 2, dtype=np.float32) / np.float32(head_dim)
  inv_freq = (np.float32(1.0) / (np.float32(base) ** exponents)).astype(np.float32)
  if kind == "none":
    return inv_freq
  factor, original = float(scaling.factor), float(scaling.original_max_len)
  if original <= 0:
    raise ValueError(f"rope_scaling.kind={kind!r} needs rope_scaling.original_max_len > 0.")
  if kind == "llama3":
    low_wavelen = original / scaling.low_freq_factor
    high_wavelen = original / scaling.high_freq_factor
    wavelen = 2 * np.pi / inv_freq
    scaled = np.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (original / wavelen - scaling.low_freq_factor) / (
        scaling.high_freq_factor - scaling.low_freq_factor)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return np.where(medium, blended, scaled).astype(np.float32)
  # yarn
  def correction_dim(rotations):
    return head_dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(base))

  low, high = correction_dim(scaling.beta_fast), correction_dim(scaling.beta_slow)
  if scaling.get("truncate", True):
    low, high = math.floor(low), math.ceil(high)
  low, high = max(low, 0), min(high, head_dim - 1)
  if low == high:
    high += 0.001  # a one-dimension ramp
  ramp = np.clip((np.arange(head_dim // 2, dtype=np.float32) - low) / (high - low), 0, 1)
  extrapolation = 1 - ramp
  return (inv_freq / factor * (1 - extrapolation) + inv_freq * extrapolation).astype(np.float32)


def attention_factor(scaling=None) -> float:
  """The factor cos and sin are multiplied by (1 except under YaRN)."""
  if scaling is None or scaling.get("kind", "none") != "yarn":
    return 1.0
  if scaling.get("attention_factor", 0.0):
    return float(scaling.attention_factor)
  factor = float(scaling.factor)
  if scaling.get("mscale", 0.0) and scaling.get("mscale_all_dim", 0.0):
    return _yarn_mscale(factor, scaling.mscale) / _yarn_mscale(factor, scaling.mscale_all_dim)
  return _yarn_mscale(factor)


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: np.ndarray | jax.Array, *,
               interleaved: bool = False, scale: float = 1.0) -> jax.Array:
  """Rotates x [B, S, H, Dh] at positions [B, S] by `inv_freq` [Dh / 2], in float32.

  Half-split: (x_i, x_{i+Dh/2}) is rotated by angle position * inv_freq[i]; interleaved:
  (x_{2i}, x_{2i+1}). `scale` multiplies cos and sin (YaRN's attention factor).
  """
  angle = positions.astype(jnp.float32)[..., None, None] * jnp.asarray(inv_freq, jnp.float32)
  sin, cos = jnp.sin(angle) * scale, jnp.cos(angle) * scale  # [B, S, 1, Dh/2]
  x32 = x.astype(jnp.float32)
  if interleaved:
    x1, x2 = x32[..., 0::2], x32[..., 1::2]
    rotated = jnp.stack([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return rotated.reshape(x.shape).astype(x.dtype)
  x1, x2 = jnp.split(x32, 2, axis=-1)
  return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)
