"""Decoder-only Transformer LM with a dense or MoE FFN in each block (Flax NNX).

Pre-norm blocks (RMSNorm, Zhang & Sennrich 2019), rotary position embeddings (RoPE, Su et al. 2021),
causal multi-head attention, and an FFN that is an `MLP` or, every `moe_every`-th layer, a `MoELayer`.
Parameters carry logical axis names (embed, mlp, heads, kv, vocab, expert) for `sharding.py`.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from moe_jax import sharding

from moe_jax.moe import MLP, MoELayer


def is_moe_layer(layer: int, moe_every: int) -> bool:
  """Layer `layer` (0-based) has an MoE FFN: layers moe_every-1, 2*moe_every-1, ...; never if 0."""
  return moe_every > 0 and (layer + 1) % moe_every == 0


class RMSNorm(nnx.Module):
  """RMSNorm over the last axis [..., D], computed in float32."""

  def __init__(self, dim: int, *, eps: float = 1e-6, param_dtype=jnp.float32):
    self.eps = eps
    init = sharding.logical(nnx.initializers.ones, ("embed",))
    self.scale = nnx.Param(init(jax.random.key(0), (dim,), param_dtype))

  def __call__(self, x: jax.Array) -> jax.Array:
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 ** 2, axis=-1, keepdims=True) + self.eps)
    return (normed * self.scale[...].astype(jnp.float32)).astype(x.dtype)


def apply_rope(x: jax.Array, positions: jax.Array, base: float) -> jax.Array:
  """Rotary embedding (Su et al. 2021, eq. 34) on x [B, S, H, Dh] at positions [B, S].

  Uses the half-split pairing (dimension i rotates with i + Dh/2), computed in float32.
  """
  half = x.shape[-1] // 2
  inv_freq = base ** (-jnp.arange(half, dtype=jnp.float32) / half)
  angle = positions.astype(jnp.float32)[..., None, None] * inv_freq  # [B, S, 1, half]
  sin, cos = jnp.sin(angle), jnp.cos(angle)
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


class Attention(nnx.Module):
  """Causal multi-head self-attention with RoPE: [B, S, D] -> [B, S, D]."""

  def __init__(self, d_model: int, num_heads: int, head_dim: int, *, rngs: nnx.Rngs,
               rope_base: float = 10_000.0, dtype=jnp.float32, param_dtype=jnp.float32):
    if head_dim % 2:
      raise ValueError(f"head_dim must be even for RoPE, got {head_dim}.")
    self.rope_base = rope_base
    self.dtype = dtype
    init_in = sharding.logical(
        nnx.initializers.variance_scaling(1.0, "fan_in", "truncated_normal", in_axis=0,
                                          out_axis=(1, 2)), ("embed", "heads", "kv"))
    init_out = sharding.logical(
        nnx.initializers.variance_scaling(1.0, "fan_in", "truncated_normal", in_axis=(0, 1),
                                          out_axis=2), ("heads", "kv", "embed"))
    shape_in = (d_model, num_heads, head_dim)
    self.w_q = nnx.Param(init_in(rngs.params(), shape_in, param_dtype))
    self.w_k = nnx.Param(init_in(rngs.params(), shape_in, param_dtype))
    self.w_v = nnx.Param(init_in(rngs.params(), shape_in, param_dtype))
    self.w_o = nnx.Param(init_out(rngs.params(), (num_heads, head_dim, d_model), param_dtype))

  def __call__(self, x: jax.Array, positions: jax.Array) -> jax.Array:
    x = x.astype(self.dtype)

    def project(param):
      return jnp.einsum("bsd,dhk->bshk", x, param[...].astype(self.dtype))

    q = apply_rope(project(self.w_q), positions, self.rope_base)
    k = apply_rope(project(self.w_k), positions, self.rope_base)
    v = project(self.w_v)
    # Scores and softmax in float32 whatever the activation dtype.
    scores = jnp.einsum("bqhk,bshk->bhqs", q, k, preferred_element_type=jnp.float32)
    scores = scores * (q.shape[-1] ** -0.5)
    seq = x.shape[1]
    causal = jnp.tril(jnp.ones((seq, seq), bool))
    scores = jnp.where(causal, scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(self.dtype)
    out = jnp.einsum("bhqs,bshk->bqhk", probs, v)
    return jnp.einsum("bqhk,hkd->bqd", out, self.w_o[...].astype(self.dtype))


class Block(nnx.Module):
  """Pre-norm decoder block: x + attn(norm(x)), then x + ffn(norm(x)); returns (x, aux or None)."""

  def __init__(self, config, layer: int, *, rngs: nnx.Rngs):
    dtype, param_dtype = jnp.dtype(config.dtype), jnp.dtype(config.param_dtype)
    self.attn_norm = RMSNorm(config.d_model, eps=config.norm_eps, param_dtype=param_dtype)
    self.attn = Attention(config.d_model, config.num_heads, config.head_dim, rngs=rngs,
                          rope_base=config.rope_base, dtype=dtype, param_dtype=param_dtype)
    self.ffn_norm = RMSNorm(config.d_model, eps=config.norm_eps, param_dtype=param_dtype)
    self.is_moe = is_moe_layer(layer, config.moe_every)
    if self.is_moe:
      self.ffn = MoELayer(config.moe, config.d_model, rngs=rngs, activation=config.activation,
                          dtype=dtype, param_dtype=param_dtype)
    else:
      self.ffn = MLP(config.d_model, config.mlp_dim, rngs=rngs, activation=config.activation,
                     dtype=dtype, param_dtype=param_dtype)

  def __call__(self, x, positions, mask):
    x = x + self.attn(self.attn_norm(x), positions).astype(x.dtype)
    h = self.ffn_norm(x)
    if self.is_moe:
      y, aux = self.ffn(h, mask)
    else:
      y, aux = self.ffn(h), None
    return x + y.astype(x.dtype), aux


def _run_block(block: Block, x, positions, mask):
  return block(x, positions, mask)


class Transformer(nnx.Module):
  """Decoder-only LM: tokens [B, S] int -> (logits [B, S, V] float32, aux).

  aux["loss"] is the sum over MoE layers of their weighted auxiliary losses (0 for a dense model);
  aux also holds, averaged over MoE layers, `load_balance_loss`, `router_z_loss`, `dropped_fraction`,
  `router_entropy`, and per layer `layer{i}/expert_load` [E].
  """

  def __init__(self, config, *, rngs: nnx.Rngs):
    param_dtype = jnp.dtype(config.param_dtype)
    self.dtype = jnp.dtype(config.dtype)
    self.tie_embeddings = config.tie_embeddings
    self.embed = nnx.Embed(
        config.vocab_size, config.d_model, param_dtype=param_dtype, dtype=self.dtype, rngs=rngs,
        embedding_init=sharding.logical(nnx.initializers.normal(1.0), ("vocab", "embed")))
    self.blocks = nnx.List([Block(config, i, rngs=rngs) for i in range(config.num_layers)])
    self.final_norm = RMSNorm(config.d_model, eps=config.norm_eps, param_dtype=param_dtype)
    if not self.tie_embeddings:
      init = sharding.logical(nnx.initializers.variance_scaling(1.0, "fan_in",
                                                                     "truncated_normal"),
                                   ("embed", "vocab"))
      self.unembed = nnx.Param(init(rngs.params(), (config.d_model, config.vocab_size),
                                    param_dtype))
    self.run_block = nnx.remat(_run_block) if config.remat else _run_block

  def __call__(self, tokens: jax.Array, mask: jax.Array | None = None,
               positions: jax.Array | None = None) -> tuple[jax.Array, dict]:
    batch, seq = tokens.shape
    if positions is None:
      positions = jnp.broadcast_to(jnp.arange(seq), (batch, seq))
    x = self.embed(tokens)
    layer_aux = {}
    for i, block in enumerate(self.blocks):
      x, aux = self.run_block(block, x, positions, mask)
      if aux is not None:
        layer_aux[i] = aux
    x = self.final_norm(x)
    if self.tie_embeddings:
      # The embedding has unit-variance rows; 1/sqrt(D) keeps initial logits O(1).
      logits = self.embed.attend(x.astype(self.dtype)).astype(jnp.float32) * x.shape[-1] ** -0.5
    else:
      logits = jnp.dot(x, self.unembed[...].astype(self.dtype), preferred_element_type=jnp.float32)
    return logits, summarize_aux(layer_aux)


def summarize_aux(layer_aux: dict[int, dict]) -> dict:
  """Sums the weighted losses over MoE layers, averages the scalar metrics, keeps per-layer loads."""
  if not layer_aux:
    return {"loss": jnp.zeros((), jnp.float32)}
  out = {"loss": sum(aux["loss"] for aux in layer_aux.values())}
  for name in ("load_balance_loss", "router_z_loss", "dropped_fraction", "router_entropy"):
    out[name] = sum(aux[name] for aux in layer_aux.values()) / len(layer_aux)
  for i, aux in layer_aux.items():
    out[f"layer{i}/expert_load"] = aux["expert_load"]
  return out
