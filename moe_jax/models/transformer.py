"""Transformer LM with a dense or MoE FFN in each block (Flax NNX): a causal decoder or an encoder.

Pre-norm blocks (RMSNorm, Zhang & Sennrich 2019, or DBRX's bias-free LayerNorm: `models/norms.py`), multi-head or grouped-query
attention with RoPE and its variants (`models/attention.py`, `models/rope.py`), and an FFN that is an
`MLP` or, in the MoE layers (every `moe_every`-th, or the explicit `moe_layers`), a `MoELayer`.
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

from moe_jax.experts import activation_of
from moe_jax.models.attention import Attention, LayerCache
from moe_jax.models.mla import MultiHeadLatentAttention
from moe_jax.models.norms import residual_norm
from moe_jax.moe import MLP, MoELayer


def is_moe_layer(layer: int, moe_every: int) -> bool:
  """Layer `layer` (0-based) has an MoE FFN: layers moe_every-1, 2*moe_every-1, ...; never if 0."""
  return moe_every > 0 and (layer + 1) % moe_every == 0


def moe_layer_indices(config) -> tuple[int, ...]:
  """The MoE layers of `config.model`: `moe_layers` when set, else every `moe_every`-th layer."""
  explicit = config.get("moe_layers")
  if explicit is not None:
    return tuple(sorted(int(i) for i in explicit))
  return tuple(i for i in range(config.num_layers) if is_moe_layer(i, config.moe_every))


def sliding_window_of(config, layer: int) -> int:
  """Layer `layer`'s attention window: `sliding_window` in the `sliding_window_layers` (all layers
  when None; GPT-OSS alternates), else 0 (no window)."""
  window = config.get("sliding_window", 0) or 0
  layers = config.get("sliding_window_layers")
  return window if layers is None or layer in tuple(layers) else 0


def build_attention(config, layer: int, *, rngs: nnx.Rngs) -> Attention | MultiHeadLatentAttention:
  """The attention of block `layer` from `config.model`: `Attention` (MHA/GQA), or MLA when
  `attention="mla"` (missing fields take the defaults)."""
  if config.get("attention", "mha") == "mla":
    return MultiHeadLatentAttention(
        config.d_model, config.num_heads, config.mla, rngs=rngs, rope_base=config.rope_base,
        rope_scaling=config.get("rope_scaling"),
        rope_interleaved=config.get("rope_interleaved", False),
        bias=config.get("attention_bias", False), dtype=jnp.dtype(config.dtype),
        param_dtype=jnp.dtype(config.param_dtype))
  return Attention(
      config.d_model, config.num_heads, config.head_dim, rngs=rngs,
      num_kv_heads=config.get("num_kv_heads", 0) or 0, rope_base=config.rope_base,
      rope_scaling=config.get("rope_scaling"),
      rope_interleaved=config.get("rope_interleaved", False),
      qk_norm=config.get("qk_norm", "none"), norm_eps=config.norm_eps,
      qkv_bias=config.get("attention_bias", False),
      out_bias=config.get("attention_out_bias", False), clip_qkv=config.get("clip_qkv"),
      sliding_window=sliding_window_of(config, layer), sinks=config.get("attention_sinks", False),
      softmax_scale=config.get("attention_scale", 0.0), dtype=jnp.dtype(config.dtype),
      param_dtype=jnp.dtype(config.param_dtype), causal=config.get("causal", True))


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
    y = y + layer.shared_output(x)
  return y.astype(x.dtype)


class Block(nnx.Module):
  """Pre-norm decoder block: x + attn(norm(x)), then x + ffn(norm(x)); returns (x, aux or None)."""

  def __init__(self, config, layer: int, *, rngs: nnx.Rngs):
    dtype, param_dtype = jnp.dtype(config.dtype), jnp.dtype(config.param_dtype)
    self.attn_norm = residual_norm(config, config.d_model, param_dtype=param_dtype)
    self.attn = build_attention(config, layer, rngs=rngs)
    self.ffn_norm = residual_norm(config, config.d_model, param_dtype=param_dtype)
    self.is_moe = layer in moe_layer_indices(config)
    # Granite's muP-style branch scale: x + m * f(norm(x)); 1 elsewhere.
    self.residual_multiplier = float(config.get("residual_multiplier", 1.0))
    if self.is_moe:
      self.ffn = MoELayer(config.moe, config.d_model, rngs=rngs,
                          activation=activation_of(config), dtype=dtype, param_dtype=param_dtype)
    else:
      self.ffn = MLP(config.d_model, config.mlp_dim, rngs=rngs,
                     activation=activation_of(config), dtype=dtype, param_dtype=param_dtype)

  def __call__(self, x, positions, mask, rng=None, *, train: bool = False, global_load=None):
    x = self._residual(x, self.attn(self.attn_norm(x), positions))
    h = self.ffn_norm(x)
    if self.is_moe:
      y, aux = self.ffn(h, mask, train=train, rng=rng, global_load=global_load)
    else:
      y, aux = self.ffn(h), None
    return self._residual(x, y), aux

  def _residual(self, x: jax.Array, branch: jax.Array) -> jax.Array:
    if self.residual_multiplier != 1.0:
      branch = branch * self.residual_multiplier
    return x + branch.astype(x.dtype)

  def decode(self, x: jax.Array, cache: LayerCache,
             index: jax.Array | int) -> tuple[jax.Array, LayerCache]:
    """Incremental block: x [B, S, D] of new tokens at positions index.. -> (x, updated cache)."""
    attn_out, cache = self.attn.decode(self.attn_norm(x), cache, index)
    x = self._residual(x, attn_out)
    h = self.ffn_norm(x)
    y = moe_decode_ffn(self.ffn, h) if self.is_moe else self.ffn(h)
    return self._residual(x, y), cache


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
    # Our own tied models scale logits by 1/sqrt(D); imported tied models (Qwen3) do not.
    self.scale_tied_logits = config.get("scale_tied_logits", True)
    # Granite's muP-style input and output scales (1 elsewhere): embeddings times m, logits / s.
    self.embedding_multiplier = float(config.get("embedding_multiplier", 1.0))
    self.logit_divisor = float(config.get("logit_divisor", 1.0))
    self.embed = nnx.Embed(
        config.vocab_size, config.d_model, param_dtype=param_dtype, dtype=self.dtype, rngs=rngs,
        embedding_init=sharding.logical(nnx.initializers.normal(1.0), ("vocab", "embed")))
    self.blocks = nnx.List([Block(config, i, rngs=rngs) for i in range(config.num_layers)])
    self.final_norm = residual_norm(config, config.d_model, param_dtype=param_dtype)
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
    x = self._embed(tokens)
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

  def _embed(self, tokens: jax.Array) -> jax.Array:
    x = self.embed(tokens)
    return x * self.embedding_multiplier if self.embedding_multiplier != 1.0 else x

  def _logits(self, x: jax.Array) -> jax.Array:
    """Final norm and output projection: [B, S, D] -> float32 logits [B, S, V]."""
    logits = self._project_out(self.final_norm(x))
    return logits / self.logit_divisor if self.logit_divisor != 1.0 else logits

  def _project_out(self, x: jax.Array) -> jax.Array:
    if self.tie_embeddings:
      # The embedding has unit-variance rows; 1/sqrt(D) keeps initial logits O(1).
      # Accumulated in f32 (not Embed.attend's compute dtype), like the untied projection.
      logits = jnp.dot(x.astype(self.dtype), self.embed.embedding[...].astype(self.dtype).T,
                       preferred_element_type=jnp.float32)
      return logits * x.shape[-1] ** -0.5 if self.scale_tied_logits else logits
    return jnp.dot(x, self.unembed[...].astype(self.dtype), preferred_element_type=jnp.float32)

  def init_cache(self, batch: int, max_len: int) -> list[LayerCache]:
    """An empty KV cache for `batch` sequences of up to `max_len` tokens: k, v [B, L, H_kv, Dh]."""
    return [block.attn.init_cache(batch, max_len) for block in self.blocks]

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
    x = self._embed(tokens)
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
