"""Multi-head / grouped-query self-attention with RoPE (Flax NNX): [B, S, D] -> [B, S, D].

One module covers the attention of the decoder families this project trains or imports:
  * MHA (Vaswani et al. 2017) or GQA (Ainslie et al. 2023): `num_kv_heads` key/value heads, kv head
    j serving query heads j*r .. (j+1)*r - 1 (r = num_heads / num_kv_heads);
  * qk-norm (Dehghani et al. 2023): RMSNorm of queries and keys per head over head_dim ("head",
    Qwen3) or over the whole projection before the head split ("projection", OLMoE);
  * optional q/k/v and output biases, and `clip_qkv` clamping q, k, v to [-c, c] after the norm
    (OLMoE);
  * causal or bidirectional, optionally a sliding window (key k visible from query q iff
    q - window < k <= q, Mistral 2023);
  * attention sinks (GPT-OSS 2025; Xiao et al. 2024): a learned per-head logit joins each query's
    softmax as an extra key column and is dropped after it;
  * RoPE variants from `models/rope.py`.
Scores and softmax are float32 whatever the activation dtype; projections accumulate in float32.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from moe_jax import sharding
from moe_jax.models import rope as rope_lib
from moe_jax.models.norms import RMSNorm

QK_NORMS = ("none", "head", "projection")

# A layer's KV cache: {"k": [B, L, H_kv, Dh], "v": [B, L, H_kv, Dh]}; keys are stored with RoPE.
LayerCache = dict[str, jax.Array]


def output_projection(heads: jax.Array, w_o: nnx.Param, b_o: nnx.Param | None, dtype) -> jax.Array:
  """Per-head outputs [B, Q, H, Dv] through w_o [H, Dv, D] (+ b_o [D]), f32-accumulated: [B, Q, D]."""
  y = jnp.einsum("bqhk,hkd->bqd", heads, w_o[...].astype(dtype),
                 preferred_element_type=jnp.float32)
  if b_o is not None:
    y = y + b_o[...].astype(jnp.float32)
  return y.astype(dtype)


class Attention(nnx.Module):
  """Self-attention [B, S, D] -> [B, S, D]; causal unless `causal=False`.

  Parameters: w_q [D, H, Dh], w_k and w_v [D, H_kv, Dh], w_o [H, Dh, D]; with `qkv_bias` b_q
  [H, Dh], b_k and b_v [H_kv, Dh]; with `out_bias` b_o [D]; with `sinks` sinks [H]; with qk-norm
  q_norm and k_norm (RMSNorm scales [Dh], or [H Dh] and [H_kv Dh] for "projection").
  """

  def __init__(self, d_model: int, num_heads: int, head_dim: int, *, rngs: nnx.Rngs,
               num_kv_heads: int = 0, rope_base: float = 10_000.0, rope_scaling=None,
               rope_interleaved: bool = False, qk_norm: str = "none", norm_eps: float = 1e-6,
               qkv_bias: bool = False, out_bias: bool = False, clip_qkv: float | None = None,
               sliding_window: int = 0, sinks: bool = False, softmax_scale: float = 0.0,
               dtype=jnp.float32, param_dtype=jnp.float32, causal: bool = True):
    """`softmax_scale`: the score multiplier; 0 = head_dim^-0.5 (Granite sets its own)."""
    num_kv_heads = num_kv_heads or num_heads
    if head_dim % 2:
      raise ValueError(f"head_dim must be even for RoPE, got {head_dim}.")
    if num_heads % num_kv_heads:
      raise ValueError(f"num_kv_heads={num_kv_heads} must divide num_heads={num_heads}.")
    if qk_norm not in QK_NORMS:
      raise ValueError(f"qk_norm={qk_norm!r} is not one of {QK_NORMS}.")
    self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
    self.rope_base = rope_base
    # Frozen: static metadata of the NNX graph must be hashable.
    self.rope_scaling = None if rope_scaling is None else ml_collections.FrozenConfigDict(
        rope_scaling)
    self.rope_interleaved = rope_interleaved
    self.qk_norm = qk_norm
    self.clip_qkv = clip_qkv
    self.sliding_window = sliding_window
    self.softmax_scale = float(softmax_scale) or head_dim ** -0.5
    self.dtype = dtype
    self.causal = causal
    init_in = sharding.logical(
        nnx.initializers.variance_scaling(1.0, "fan_in", "truncated_normal", in_axis=0,
                                          out_axis=(1, 2)), ("embed", "heads", "kv"))
    init_out = sharding.logical(
        nnx.initializers.variance_scaling(1.0, "fan_in", "truncated_normal", in_axis=(0, 1),
                                          out_axis=2), ("heads", "kv", "embed"))
    kv_shape = (d_model, num_kv_heads, head_dim)
    self.w_q = nnx.Param(init_in(rngs.params(), (d_model, num_heads, head_dim), param_dtype))
    self.w_k = nnx.Param(init_in(rngs.params(), kv_shape, param_dtype))
    self.w_v = nnx.Param(init_in(rngs.params(), kv_shape, param_dtype))
    self.w_o = nnx.Param(init_out(rngs.params(), (num_heads, head_dim, d_model), param_dtype))
    zeros = lambda shape, names: nnx.Param(sharding.logical(nnx.initializers.zeros, names)(
        rngs.params(), shape, param_dtype))
    self.b_q = zeros((num_heads, head_dim), ("heads", "kv")) if qkv_bias else None
    self.b_k = zeros((num_kv_heads, head_dim), ("heads", "kv")) if qkv_bias else None
    self.b_v = zeros((num_kv_heads, head_dim), ("heads", "kv")) if qkv_bias else None
    self.b_o = zeros((d_model,), ("embed",)) if out_bias else None
    # Attention sinks (GPT-OSS): a learned logit per head, a key that every query sees and that
    # contributes no value, so a head can attend to "nothing".
    self.sinks = zeros((num_heads,), ("heads",)) if sinks else None
    if qk_norm == "head":
      self.q_norm = RMSNorm(head_dim, eps=norm_eps, param_dtype=param_dtype, axis_name="kv")
      self.k_norm = RMSNorm(head_dim, eps=norm_eps, param_dtype=param_dtype, axis_name="kv")
    elif qk_norm == "projection":
      self.q_norm = RMSNorm(num_heads * head_dim, eps=norm_eps, param_dtype=param_dtype,
                            axis_name=None)
      self.k_norm = RMSNorm(num_kv_heads * head_dim, eps=norm_eps, param_dtype=param_dtype,
                            axis_name=None)
    else:
      self.q_norm = self.k_norm = None

  def _project(self, x: jax.Array, param: nnx.Param, bias: nnx.Param | None) -> jax.Array:
    # f32 accumulation, rounded once: a bf16 result rounded per shard of a split contraction
    # (embed over fsdp) before the cross-shard sum would differ by mesh (found by moe_jax.fuzz).
    y = jnp.einsum("bsd,dhk->bshk", x, param[...].astype(self.dtype),
                   preferred_element_type=jnp.float32)
    if bias is not None:
      y = y + bias[...].astype(jnp.float32)
    return y.astype(self.dtype)

  def _norm(self, norm: RMSNorm | None, y: jax.Array) -> jax.Array:
    if norm is None:
      return y
    if self.qk_norm == "head":
      return norm(y)
    return norm(y.reshape(*y.shape[:2], -1)).reshape(y.shape)  # over the whole projection

  def _rope(self, y: jax.Array, positions: jax.Array) -> jax.Array:
    inv_freq = rope_lib.inverse_frequencies(self.head_dim, self.rope_base, self.rope_scaling)
    return rope_lib.apply_rope(y, positions, inv_freq, interleaved=self.rope_interleaved,
                               scale=rope_lib.attention_factor(self.rope_scaling))

  def qkv(self, x: jax.Array, positions: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Queries [B, S, H, Dh] and keys [B, S, H_kv, Dh] with RoPE at positions [B, S], values."""
    x = x.astype(self.dtype)
    q = self._norm(self.q_norm, self._project(x, self.w_q, self.b_q))
    k = self._norm(self.k_norm, self._project(x, self.w_k, self.b_k))
    v = self._project(x, self.w_v, self.b_v)
    if self.clip_qkv is not None:
      q, k, v = (jnp.clip(t, -self.clip_qkv, self.clip_qkv) for t in (q, k, v))
    return self._rope(q, positions), self._rope(k, positions), v

  def visible(self, query_positions: jax.Array, key_positions: jax.Array) -> jax.Array:
    """[Q, S] bool: which keys each query may attend to (causal, window)."""
    q, k = query_positions[:, None], key_positions[None, :]
    visible = k <= q if self.causal else jnp.ones((q.shape[0], k.shape[1]), bool)
    if self.sliding_window:
      visible = visible & (q - k < self.sliding_window)
      if not self.causal:
        visible = visible & (k - q < self.sliding_window)
    return visible

  def attend(self, q: jax.Array, k: jax.Array, v: jax.Array, visible: jax.Array) -> jax.Array:
    """Attention of q [B, Q, H, Dh] over k, v [B, S, H_kv, Dh] where visible [Q, S]: -> [B, Q, D]."""
    batch, queries = q.shape[:2]
    groups = q.reshape(batch, queries, self.num_kv_heads, -1, self.head_dim)  # [B, Q, Hkv, r, Dh]
    scores = jnp.einsum("bqgrk,bsgk->bgrqs", groups, k, preferred_element_type=jnp.float32)
    scores = scores * self.softmax_scale
    scores = jnp.where(visible, scores, jnp.finfo(jnp.float32).min)
    if self.sinks is None:
      probs = jax.nn.softmax(scores, axis=-1).astype(self.dtype)
    else:
      sink = self.sinks[...].astype(jnp.float32).reshape(1, self.num_kv_heads, -1, 1, 1)
      sink = jnp.broadcast_to(sink, scores.shape[:-1] + (1,))
      probs = jax.nn.softmax(jnp.concatenate([scores, sink], axis=-1), axis=-1)
      probs = probs[..., :-1].astype(self.dtype)
    out = jnp.einsum("bgrqs,bsgk->bqgrk", probs, v).reshape(batch, queries, self.num_heads,
                                                             self.head_dim)
    return output_projection(out, self.w_o, self.b_o, self.dtype)

  def __call__(self, x: jax.Array, positions: jax.Array) -> jax.Array:
    q, k, v = self.qkv(x, positions)
    seq = jnp.arange(x.shape[1])
    return self.attend(q, k, v, self.visible(seq, seq))

  def init_cache(self, batch: int, max_len: int) -> LayerCache:
    zeros = jnp.zeros((batch, max_len, self.num_kv_heads, self.head_dim), self.dtype)
    return {"k": zeros, "v": zeros}

  def decode(self, x: jax.Array, cache: LayerCache,
             index: jax.Array | int) -> tuple[jax.Array, LayerCache]:
    """Attention of S new tokens over a KV cache: x [B, S, D] at positions index .. index+S-1.

    The new keys (RoPE at their absolute positions) and values are written into the cache at
    `index`; each new token attends to the cache slots `visible` allows up to its own position,
    so slots past it (stale or zero) are never read. `index + S` must not exceed the cache length.

    Args:
      x: [B, S, D] normalised inputs of the new tokens (S = prompt length to prefill, 1 per step).
      cache: {"k", "v"} [B, L, H_kv, Dh] holding positions < index.
      index: scalar int, the absolute position of x[:, 0] (the same for every sequence).

    Returns:
      (y [B, S, D], the updated cache).
    """
    batch, seq, _ = x.shape
    positions = index + jnp.arange(seq)
    q, k, v = self.qkv(x, jnp.broadcast_to(positions, (batch, seq)))
    start = (0, index, 0, 0)
    cache = {"k": jax.lax.dynamic_update_slice(cache["k"], k.astype(cache["k"].dtype), start),
             "v": jax.lax.dynamic_update_slice(cache["v"], v.astype(cache["v"].dtype), start)}
    visible = self.visible(positions, jnp.arange(cache["k"].shape[1]))
    y = self.attend(q, cache["k"].astype(self.dtype), cache["v"].astype(self.dtype), visible)
    return y, cache
