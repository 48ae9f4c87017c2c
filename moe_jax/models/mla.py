"""Multi-head latent attention (MLA; DeepSeek-V2 2024, Sec. 2.1, eq. 9-19; DeepSeek-V3 2024).

Keys and values of all heads come from one compressed latent per token, c = RMSNorm(x W_kv_a)
[r = kv_lora_rank]: [k_nope | v] = c W_kv_b per head. Position enters through a decoupled RoPE part:
one rotary key k_rope = RoPE(x W_kr) [dr] shared by every head, and per-head rotary queries. Queries
come from x directly (W_q) or through their own low-rank bottleneck q = RMSNorm(x W_q_a) W_q_b
(q_lora_rank > 0). Scores are [q_nope | q_rope] . [k_nope | k_rope] * scale with scale =
(dn + dr)^-0.5 times YaRN's mscale(s, mscale_all_dim)^2 (DeepSeek's long-context correction).

The KV cache holds only what MLA was designed to cache: the normalised latent c [B, L, r] and the
rotary key [B, L, dr]; keys and values are re-expanded from them at each step.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from moe_jax import sharding
from moe_jax.models import rope as rope_lib
from moe_jax.models.attention import output_projection
from moe_jax.models.norms import RMSNorm

LayerCache = dict[str, jax.Array]

# The q_a / kv_a norms use eps 1e-6 in DeepSeek's code whatever the model's norm epsilon is.
LATENT_NORM_EPS = 1e-6


def default_mla() -> ml_collections.ConfigDict:
  """`config.model.mla`: the MLA dimensions (used when model.attention = "mla")."""
  return ml_collections.ConfigDict({
      "q_lora_rank": 0,  # 0 = full-rank queries (W_q); > 0 = the query bottleneck width
      "kv_lora_rank": 64,  # latent width r
      "qk_nope_head_dim": 32,  # dn: per-head non-rotary query/key width
      "qk_rope_head_dim": 16,  # dr: rotary width (one key head shared by all heads)
      "v_head_dim": 32,  # dv
  })


def softmax_scale(qk_head_dim: int, rope_scaling=None) -> float:
  """(dn + dr)^-0.5, times mscale(s, mscale_all_dim)^2 under YaRN with mscale_all_dim set."""
  scale = qk_head_dim ** -0.5
  if rope_scaling is not None and rope_scaling.get("kind", "none") == "yarn":
    weight, factor = rope_scaling.get("mscale_all_dim", 0.0), rope_scaling.get("factor", 1.0)
    if weight and factor > 1:
      scale *= (0.1 * weight * math.log(factor) + 1.0) ** 2
  return scale


class MultiHeadLatentAttention(nnx.Module):
  """MLA self-attention [B, S, D] -> [B, S, D] (causal), with the latent KV cache.

  Parameters: w_q [D, H, dn+dr] or (w_q_a [D, rq], q_a_norm, w_q_b [rq, H, dn+dr]); w_kv_a
  [D, r+dr]; kv_a_norm [r]; w_kv_b [r, H, dn+dv]; w_o [H, dv, D]; with `bias` b_q_a, b_kv_a, b_o.
  """

  def __init__(self, d_model: int, num_heads: int, mla, *, rngs: nnx.Rngs,
               rope_base: float = 10_000.0, rope_scaling=None, rope_interleaved: bool = True,
               bias: bool = False, dtype=jnp.float32, param_dtype=jnp.float32):
    self.num_heads = num_heads
    self.q_lora_rank = mla.q_lora_rank
    self.kv_lora_rank = mla.kv_lora_rank
    self.nope, self.rope_dim, self.v_dim = (mla.qk_nope_head_dim, mla.qk_rope_head_dim,
                                            mla.v_head_dim)
    if self.rope_dim % 2:
      raise ValueError(f"qk_rope_head_dim must be even for RoPE, got {self.rope_dim}.")
    self.rope_base = rope_base
    self.rope_scaling = (None if rope_scaling is None
                         else ml_collections.FrozenConfigDict(rope_scaling))
    self.rope_interleaved = rope_interleaved
    self.dtype = dtype
    self.causal = True
    qk = self.nope + self.rope_dim

    def param(shape, names, in_axes):
      init = nnx.initializers.variance_scaling(1.0, "fan_in", "truncated_normal", in_axis=in_axes,
                                               out_axis=tuple(range(len(in_axes), len(shape))))
      return nnx.Param(sharding.logical(init, names)(rngs.params(), shape, param_dtype))

    def zeros(shape, names):
      return nnx.Param(sharding.logical(nnx.initializers.zeros, names)(
          rngs.params(), shape, param_dtype))

    if self.q_lora_rank:
      self.w_q_a = param((d_model, self.q_lora_rank), ("embed", None), (0,))
      self.b_q_a = zeros((self.q_lora_rank,), (None,)) if bias else None
      self.q_a_norm = RMSNorm(self.q_lora_rank, eps=LATENT_NORM_EPS, param_dtype=param_dtype,
                              axis_name=None)
      self.w_q_b = param((self.q_lora_rank, num_heads, qk), (None, "heads", "kv"), (0,))
      self.w_q = None
    else:
      self.w_q = param((d_model, num_heads, qk), ("embed", "heads", "kv"), (0,))
      self.w_q_a = self.b_q_a = self.q_a_norm = self.w_q_b = None
    self.w_kv_a = param((d_model, self.kv_lora_rank + self.rope_dim), ("embed", None), (0,))
    self.b_kv_a = zeros((self.kv_lora_rank + self.rope_dim,), (None,)) if bias else None
    self.kv_a_norm = RMSNorm(self.kv_lora_rank, eps=LATENT_NORM_EPS, param_dtype=param_dtype,
                             axis_name=None)
    self.w_kv_b = param((self.kv_lora_rank, num_heads, self.nope + self.v_dim),
                        (None, "heads", "kv"), (0,))
    self.w_o = param((num_heads, self.v_dim, d_model), ("heads", "kv", "embed"), (0, 1))
    self.b_o = zeros((d_model,), ("embed",)) if bias else None

  def _dot(self, x, param, spec: str, bias=None):
    y = jnp.einsum(spec, x.astype(self.dtype), param[...].astype(self.dtype),
                   preferred_element_type=jnp.float32)
    return (y if bias is None else y + bias[...].astype(jnp.float32)).astype(self.dtype)

  def _rope(self, y, positions):
    inv_freq = rope_lib.inverse_frequencies(self.rope_dim, self.rope_base, self.rope_scaling)
    return rope_lib.apply_rope(y, positions, inv_freq, interleaved=self.rope_interleaved,
                               scale=rope_lib.attention_factor(self.rope_scaling))

  def queries(self, x, positions):
    """[B, S, H, dn + dr]: the rotary part rotated at positions [B, S]."""
    if self.w_q is not None:
      q = self._dot(x, self.w_q, "bsd,dhk->bshk")
    else:
      q = self.q_a_norm(self._dot(x, self.w_q_a, "bsd,dr->bsr", self.b_q_a))
      q = self._dot(q, self.w_q_b, "bsr,rhk->bshk")
    return jnp.concatenate([q[..., :self.nope], self._rope(q[..., self.nope:], positions)], -1)

  def latents(self, x, positions) -> LayerCache:
    """What the cache holds: {"latent" [B, S, r] (normalised), "k_rope" [B, S, dr] (rotated)}."""
    ckv = self._dot(x, self.w_kv_a, "bsd,dr->bsr", self.b_kv_a)
    k_rope = self._rope(ckv[..., None, self.kv_lora_rank:], positions)[:, :, 0]
    return {"latent": self.kv_a_norm(ckv[..., :self.kv_lora_rank]), "k_rope": k_rope}

  def attend(self, q, kv: LayerCache, visible) -> jax.Array:
    """q [B, Q, H, dn+dr] over the latents of S keys where visible [Q, S] -> [B, Q, D]."""
    kv_heads = self._dot(kv["latent"], self.w_kv_b, "bsr,rhk->bshk")  # [B, S, H, dn + dv]
    k_nope, v = kv_heads[..., :self.nope], kv_heads[..., self.nope:]
    scores = (jnp.einsum("bqhk,bshk->bhqs", q[..., :self.nope], k_nope,
                         preferred_element_type=jnp.float32)
              + jnp.einsum("bqhk,bsk->bhqs", q[..., self.nope:], kv["k_rope"].astype(self.dtype),
                           preferred_element_type=jnp.float32))
    scores = scores * softmax_scale(self.nope + self.rope_dim, self.rope_scaling)
    scores = jnp.where(visible, scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(self.dtype)
    out = jnp.einsum("bhqs,bshk->bqhk", probs, v)
    return output_projection(out, self.w_o, self.b_o, self.dtype)

  def __call__(self, x: jax.Array, positions: jax.Array) -> jax.Array:
    seq = jnp.arange(x.shape[1])
    return self.attend(self.queries(x, positions), self.latents(x, positions),
                       seq[None, :] <= seq[:, None])

  def init_cache(self, batch: int, max_len: int) -> LayerCache:
    return {"latent": jnp.zeros((batch, max_len, self.kv_lora_rank), self.dtype),
            "k_rope": jnp.zeros((batch, max_len, self.rope_dim), self.dtype)}

  def decode(self, x: jax.Array, cache: LayerCache,
             index: jax.Array | int) -> tuple[jax.Array, LayerCache]:
    """S new tokens at positions index .. index+S-1 over the latent cache (see `Attention.decode`)."""
    batch, seq, _ = x.shape
    positions = index + jnp.arange(seq)
    batch_positions = jnp.broadcast_to(positions, (batch, seq))
    new = self.latents(x, batch_positions)
    cache = {name: jax.lax.dynamic_update_slice(cache[name], new[name].astype(cache[name].dtype),
                                                (0, index, 0)) for name in cache}
    visible = jnp.arange(cache["latent"].shape[1])[None, :] <= positions[:, None]
    return self.attend(self.queries(x, batch_positions), cache, visible), cache
