"""Transformer LM with a dense or MoE FFN in each block (Flax NNX): a causal decoder or an encoder.

Pre-norm blocks (RMSNorm, Zhang & Sennrich 2019), rotary position embeddings (RoPE, Su et al. 2021),
multi-head attention, and an FFN that is an `MLP` or, every `moe_every`-th layer, a `MoELayer`.
Attention is causal by default (a decoder-only LM); `config.causal=False` drops the mask, which
makes the same stack a bidirectional encoder (BERT, Devlin et al. 2019), trained with masked-byte
prediction (`config.data.objective="mlm"`, `moe_jax.masking`).
Parameters carry logical axis names (embed, mlp, heads, kv, vocab, expert) for `sharding.py`.

`Transformer.decode` is the incremental (KV-cached) form of `__call__` used for sampling: it
computes the logits of new tokens given a cache of the keys and values of all earlier positions
(decoders only).
"""
from __future__ import annotations


import jax
import jax.numpy as jnp
from flax import nnx

from moe_jax import dispatch, routing, sharding

from moe_jax.moe import MLP, MoELayer

# A layer's KV cache: {"k": [B, L, H, Dh], "v": [B, L, H, Dh]}; keys are stored with RoPE applied.
LayerCache = dict[str, jax.Array]


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
  """Multi-head self-attention with RoPE: [B, S, D] -> [B, S, D]; causal unless `causal=False`."""

  def __init__(self, d_model: int, num_heads: int, head_dim: int, *, rngs: nnx.Rngs,
               rope_base: float = 10_000.0, dtype=jnp.float32, param_dtype=jnp.float32,
               causal: bool = True):
    if head_dim % 2:
      raise ValueError(f"head_dim must be even for RoPE, got {head_dim}.")
    self.rope_base = rope_base
    self.dtype = dtype
    self.causal = causal
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

  def _project(self, x: jax.Array, param: nnx.Param) -> jax.Array:
    # f32 accumulation, rounded once: a bf16 result rounded per shard of a split contraction
    # (embed over fsdp) before the cross-shard sum would differ by mesh (found by moe_jax.fuzz).
    return jnp.einsum("bsd,dhk->bshk", x, param[...].astype(self.dtype),
                      preferred_element_type=jnp.float32).astype(self.dtype)

  def _attend(self, q: jax.Array, k: jax.Array, v: jax.Array, visible: jax.Array) -> jax.Array:
    """Attention of q [B, Q, H, Dh] over k, v [B, S, H, Dh] where visible [Q, S]: -> [B, Q, D]."""
    # Scores and softmax in float32 whatever the activation dtype.
    scores = jnp.einsum("bqhk,bshk->bhqs", q, k, preferred_element_type=jnp.float32)
    scores = scores * (q.shape[-1] ** -0.5)
    scores = jnp.where(visible, scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(self.dtype)
    out = jnp.einsum("bhqs,bshk->bqhk", probs, v)
    return jnp.einsum("bqhk,hkd->bqd", out, self.w_o[...].astype(self.dtype),
                      preferred_element_type=jnp.float32).astype(self.dtype)

  def __call__(self, x: jax.Array, positions: jax.Array) -> jax.Array:
    x = x.astype(self.dtype)
    q = apply_rope(self._project(x, self.w_q), positions, self.rope_base)
    k = apply_rope(self._project(x, self.w_k), positions, self.rope_base)
    v = self._project(x, self.w_v)
    seq = x.shape[1]
    visible = jnp.ones((seq, seq), bool)
    return self._attend(q, k, v, jnp.tril(visible) if self.causal else visible)

  def decode(self, x: jax.Array, cache: LayerCache,
             index: jax.Array | int) -> tuple[jax.Array, LayerCache]:
    """Attention of S new tokens over a KV cache: x [B, S, D] at positions index .. index+S-1.

    The new keys (RoPE at their absolute positions) and values are written into the cache at
    `index`; each new token attends to cache slots 0 .. its own position, so slots past it (stale
    or zero) are never read. `index + S` must not exceed the cache length L.

    Args:
      x: [B, S, D] normalised inputs of the new tokens (S = prompt length to prefill, 1 per step).
      cache: {"k", "v"} [B, L, H, Dh] holding positions < index.
      index: scalar int, the absolute position of x[:, 0] (the same for every sequence).

    Returns:
      (y [B, S, D], the updated cache).
    """
    x = x.astype(self.dtype)
    batch, seq, _ = x.shape
    positions = index + jnp.arange(seq)
    batch_positions = jnp.broadcast_to(positions, (batch, seq))
    q = apply_rope(self._project(x, self.w_q), batch_positions, self.rope_base)
    k = apply_rope(self._project(x, self.w_k), batch_positions, self.rope_base)
    v = self._project(x, self.w_v)
    start = (0, index, 0, 0)
    cache = {"k": jax.lax.dynamic_update_slice(cache["k"], k.astype(cache["k"].dtype), start),
             "v": jax.lax.dynamic_update_slice(cache["v"], v.astype(cache["v"].dtype), start)}
    visible = jnp.arange(cache["k"].shape[1])[None, :] <= positions[:, None]  # [S, L]
    y = self._attend(q, cache["k"].astype(self.dtype), cache["v"].astype(self.dtype), visible)
    return y, cache


def moe_decode_ffn(layer: MoELayer, x: jax.Array) -> jax.Array:
  """The MoE FFN for decoding, always dropless: x [B, S, D] -> [B, S, D].

  Each new token is routed by the layer's own router (`MoELayer.route`) and computed by its
  experts through the grouped matmul; nothing is dropped. For a model trained with capacity
  dispatch this is deliberate: capacity groups are defined over whole training sequences, which
  do not exist one token at a time, so decoding computes the model's drop-free function.
  Expert choice and soft MoE route by comparing tokens of a group, which has no token-at-a-time
  form, so they cannot decode.
  """
  if layer.config.router in routing.GROUP_ROUTERS:
    raise NotImplementedError(f"router={layer.config.router!r} routes whole groups of tokens and "
                              "has no token-by-token decoding.")
  batch, seq, d_model = x.shape
  tokens = x.reshape(batch * seq, d_model)
  decision = layer.route(tokens, jnp.ones((batch * seq,), bool), seq)
  y = layer.dropless_output(tokens, decision).reshape(batch, seq, d_model)
  if layer.shared_experts is not None:
    y = y + layer.shared_experts(x).astype(jnp.float32)
  return y.astype(x.dtype)


class Block(nnx.Module):
  """Pre-norm decoder block: x + attn(norm(x)), then x + ffn(norm(x)); returns (x, aux or None)."""

  def __init__(self, config, layer: int, *, rngs: nnx.Rngs):
    dtype, param_dtype = jnp.dtype(config.dtype), jnp.dtype(config.param_dtype)
    self.attn_norm = RMSNorm(config.d_model, eps=config.norm_eps, param_dtype=param_dtype)
    self.attn = Attention(config.d_model, config.num_heads, config.head_dim, rngs=rngs,
                          rope_base=config.rope_base, dtype=dtype, param_dtype=param_dtype,
                          causal=config.get("causal", True))
    self.ffn_norm = RMSNorm(config.d_model, eps=config.norm_eps, param_dtype=param_dtype)
    self.is_moe = is_moe_layer(layer, config.moe_every)
    if self.is_moe:
      self.ffn = MoELayer(config.moe, config.d_model, rngs=rngs, activation=config.activation,
                          dtype=dtype, param_dtype=param_dtype)
    else:
      self.ffn = MLP(config.d_model, config.mlp_dim, rngs=rngs, activation=config.activation,
                     dtype=dtype, param_dtype=param_dtype)

  def __call__(self, x, positions, mask, rng=None, *, train: bool = False, global_load=None):
    x = x + self.attn(self.attn_norm(x), positions).astype(x.dtype)
    h = self.ffn_norm(x)
    if self.is_moe:
      y, aux = self.ffn(h, mask, train=train, rng=rng, global_load=global_load)
    else:
      y, aux = self.ffn(h), None
    return x + y.astype(x.dtype), aux

  def decode(self, x: jax.Array, cache: LayerCache,
             index: jax.Array | int) -> tuple[jax.Array, LayerCache]:
    """Incremental block: x [B, S, D] of new tokens at positions index.. -> (x, updated cache)."""
    attn_out, cache = self.attn.decode(self.attn_norm(x), cache, index)
    x = x + attn_out.astype(x.dtype)
    h = self.ffn_norm(x)
    y = moe_decode_ffn(self.ffn, h) if self.is_moe else self.ffn(h)
    return x + y.astype(x.dtype), cache


def _run_block(block: Block, x, positions, mask, rng, train: bool, global_load=None):
  return block(x, positions, mask, rng, train=train, global_load=global_load)


class Transformer(nnx.Module):
  """Transformer LM: tokens [B, S] int -> (logits [B, S, V] float32, aux).

  A decoder-only LM; a bidirectional encoder with `config.causal=False`.
  aux["loss"] is the sum over MoE layers of their weighted auxiliary losses (0 for a dense model);
  aux also holds, averaged over MoE layers, every scalar metric the layers share
  (`load_balance_loss`, `router_z_loss`, `dropped_fraction`, `router_entropy`,
  `experts_per_token`, router-specific terms), and per layer `layer{i}/expert_load` [E'],
  `layer{i}/expert_counts` [E'] and (ReLU routing) `layer{i}/gate_sparsity`: the statistics
  gradient accumulation sums over micro-batches (`moe_jax.grad_accum`).
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
    self.remat = config.remat
    self.causal = config.get("causal", True)

  def __call__(self, tokens: jax.Array, mask: jax.Array | None = None,
               positions: jax.Array | None = None, *, train: bool = False,
               rng: jax.Array | None = None,
               global_load: dict[int, jax.Array] | None = None) -> tuple[jax.Array, dict]:
    """tokens [B, S] -> (logits [B, S, V], aux).

    Args:
      train: MoE layers update their router state (loss-free bias, ReMoE's L1 coefficient).
      rng: PRNG key for training-time routing noise; None (evaluation) = no noise.
      global_load: {layer: [E'] expert load of the global batch} for micro-batches of gradient
        accumulation (see `MoELayer`); None = each layer uses this batch's own load.
    """
    batch, seq = tokens.shape
    if positions is None:
      positions = jnp.broadcast_to(jnp.arange(seq), (batch, seq))
    x = self.embed(tokens)
    layer_aux = {}
    run_block = nnx.remat(_run_block, static_argnums=(5,)) if self.remat else _run_block
    for i, block in enumerate(self.blocks):
      block_rng = None if rng is None else jax.random.fold_in(rng, i)
      load = None if global_load is None else global_load.get(i)
      x, aux = run_block(block, x, positions, mask, block_rng, train, load)
      if aux is not None:
        layer_aux[i] = aux
    return self._logits(x), summarize_aux(layer_aux)

  def update_router_state(self, layer_stats: dict[int, dict]) -> None:
    """Rule-based router updates from whole-batch statistics, once per optimizer step.

    `layer_stats[i]` = {"expert_counts": [E'], "gate_sparsity": scalar or absent} of MoE layer i
    summed (counts) or averaged (sparsity) over the micro-batches of a global batch.
    """
    for i, stats in layer_stats.items():
      self.blocks[i].ffn.update_router_state(stats["expert_counts"], stats.get("gate_sparsity"))

  def _logits(self, x: jax.Array) -> jax.Array:
    """Final norm and output projection: [B, S, D] -> float32 logits [B, S, V]."""
    x = self.final_norm(x)
    if self.tie_embeddings:
      # The embedding has unit-variance rows; 1/sqrt(D) keeps initial logits O(1).
      # Accumulated in f32 (not Embed.attend's compute dtype), like the untied projection.
      logits = jnp.dot(x.astype(self.dtype), self.embed.embedding[...].astype(self.dtype).T,
                       preferred_element_type=jnp.float32)
      return logits * x.shape[-1] ** -0.5
    return jnp.dot(x, self.unembed[...].astype(self.dtype), preferred_element_type=jnp.float32)

  def init_cache(self, batch: int, max_len: int) -> list[LayerCache]:
    """An empty KV cache for `batch` sequences of up to `max_len` tokens: k, v [B, L, H, Dh]."""
    caches = []
    for block in self.blocks:
      _, num_heads, head_dim = block.attn.w_k[...].shape
      zeros = jnp.zeros((batch, max_len, num_heads, head_dim), self.dtype)
      caches.append({"k": zeros, "v": zeros})
    return caches

  def decode(self, tokens: jax.Array, cache: list[LayerCache],
             index: jax.Array | int) -> tuple[jax.Array, list[LayerCache]]:
    """KV-cached forward pass of new tokens [B, S] at positions index .. index+S-1.

    Prefill with the whole prompt at index 0, then feed one token per step. The logits equal those
    of `__call__` on the full sequence at the same positions, except that MoE layers always route
    dropless here (see `moe_decode_ffn`). No auxiliary losses are computed.

    Args:
      tokens: [B, S] int token ids.
      cache: from `init_cache` or a previous `decode`, holding positions < index.
      index: scalar int position of tokens[:, 0].

    Returns:
      (logits [B, S, V] float32, the updated cache).

    Raises:
      ValueError: the model is a bidirectional encoder (`config.causal=False`).
    """
    if not self.causal:
      # Every position of an encoder attends to later ones, which a cache of the past cannot hold.
      raise ValueError("Transformer.decode needs a causal decoder; this model has "
                       "model.causal=False (a bidirectional encoder sees later tokens, so it has "
                       "no token-by-token decoding).")
    x = self.embed(tokens)
    new_cache = []
    for block, layer_cache in zip(self.blocks, cache):
      x, layer_cache = block.decode(x, layer_cache, index)
      new_cache.append(layer_cache)
    return self._logits(x), new_cache


def summarize_aux(layer_aux: dict[int, dict]) -> dict:
  """Sums the weighted losses over MoE layers, averages the scalar metrics, keeps per-layer loads."""
  if not layer_aux:
    return {"loss": jnp.zeros((), jnp.float32)}
  out = {"loss": sum(aux["loss"] for aux in layer_aux.values())}
  names = set.intersection(*(set(aux) for aux in layer_aux.values()))
  for name in sorted(names - {"loss", "expert_load", "expert_counts"}):
    out[name] = sum(aux[name] for aux in layer_aux.values()) / len(layer_aux)
  for i, aux in layer_aux.items():
    for name in ("expert_load", "expert_counts", "gate_sparsity"):
      if name in aux:
        out[f"layer{i}/{name}"] = aux[name]
  return out
