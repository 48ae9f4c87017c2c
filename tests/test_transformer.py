"""Decoder-only Transformer (`moe_jax.models.transformer`): attention vs NumPy, causality, layout.

Note on causality: with capacity dispatch and group = sequence, for K >= 2 a later token's first
choice takes an expert's slot ahead of an earlier token's second choice (the Switch priority is by
choice rank, then token), so such a model is not causal in general; only the dense and dropless
models are tested for it. (At K=1 the priority is token order alone.)
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs.default import get_config
from moe_jax.moe import MLP, MoELayer
from moe_jax.models import transformer


def rel_err(actual, expected):
  actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
  return np.linalg.norm(actual - expected) / max(np.linalg.norm(expected), 1e-30)


# ------------------------------------------------------------------------------------- attention


def np_rope(x, positions, base):
  """RoPE (Su et al. 2021), half-split pairs (i, i + Dh/2), theta_i = base^(-2i/Dh)."""
  head_dim = x.shape[-1]
  half = head_dim // 2
  out = np.empty_like(x)
  for b in range(x.shape[0]):
    for s in range(x.shape[1]):
      for i in range(half):
        angle = positions[b, s] * base ** (-2.0 * i / head_dim)
        first, second = x[b, s, :, i], x[b, s, :, i + half]
        out[b, s, :, i] = first * np.cos(angle) - second * np.sin(angle)
        out[b, s, :, i + half] = second * np.cos(angle) + first * np.sin(angle)
  return out


def np_attention(x, w_q, w_k, w_v, w_o, positions, base):
  """Causal softmax attention in float64, looping over batch, heads and query positions."""
  q = np_rope(np.einsum("bsd,dhk->bshk", x, w_q), positions, base)
  k = np_rope(np.einsum("bsd,dhk->bshk", x, w_k), positions, base)
  v = np.einsum("bsd,dhk->bshk", x, w_v)
  batch, seq, heads, head_dim = q.shape
  out = np.zeros_like(q)
  for b in range(batch):
    for h in range(heads):
      for i in range(seq):
        scores = k[b, :i + 1, h] @ q[b, i, h] / np.sqrt(head_dim)
        p = np.exp(scores - scores.max())
        out[b, i, h] = (p / p.sum()) @ v[b, :i + 1, h]
  return np.einsum("bshk,hkd->bsd", out, w_o)


def test_attention_matches_numpy():
  """Attention == float64 causal RoPE attention, with per-sequence position offsets."""
  d_model, heads, head_dim, batch, seq = 19, 3, 6, 2, 11
  attn = transformer.Attention(d_model, heads, head_dim, rngs=nnx.Rngs(0), rope_base=100.0)
  rng = np.random.default_rng(0)
  x = rng.normal(size=(batch, seq, d_model))
  positions = np.stack([np.arange(seq), np.arange(seq) + 5])
  y = attn(jnp.asarray(x, jnp.float32), jnp.asarray(positions))
  weights = [np.asarray(p[...], np.float64) for p in (attn.w_q, attn.w_k, attn.w_v, attn.w_o)]
  expected = np_attention(x, *weights, positions, 100.0)
  assert y.shape == x.shape
  assert rel_err(y, expected) < 1e-5
  # RoPE makes attention depend on relative positions only: a common shift changes nothing.
  shifted = attn(jnp.asarray(x, jnp.float32), jnp.asarray(positions + 3))
  assert rel_err(shifted, y) < 1e-5
  # ... while a different relative layout does change it (the rotation really is applied).
  reversed_positions = attn(jnp.asarray(x, jnp.float32), jnp.asarray(positions[:, ::-1].copy()))
  assert rel_err(reversed_positions, y) > 1e-2


def test_attention_rejects_odd_head_dim():
  """RoPE needs an even head_dim: an odd one raises ValueError naming head_dim."""
  with pytest.raises(ValueError, match="head_dim"):
    transformer.Attention(8, 2, 5, rngs=nnx.Rngs(0))


# ----------------------------------------------------------------------------------------- model


def tiny_config(**overrides):
  config = get_config("tiny").model
  config.vocab_size = 61
  for name, value in overrides.items():
    config[name] = value
  return config


@functools.lru_cache(maxsize=None)
def build(**overrides):
  """(model, jitted forward(state, tokens) -> (logits, aux)) for one model configuration."""
  model = transformer.Transformer(tiny_config(**overrides), rngs=nnx.Rngs(0))
  graphdef, _ = nnx.split(model)
  forward = jax.jit(lambda state, tokens: nnx.merge(graphdef, state)(tokens))
  return model, forward


def random_tokens(seed, shape=(2, 13), vocab=61):
  return np.random.default_rng(seed).integers(0, vocab, size=shape).astype(np.int32)


@pytest.mark.parametrize("moe_every", [0, 1], ids=["dense", "dropless-moe"])
def test_model_is_causal(moe_every):
  """Changing token t changes no logits at positions < t (and does change position t)."""
  model, forward = build(moe_every=moe_every)
  assert model.blocks[0].is_moe == (moe_every == 1)
  tokens = random_tokens(1)
  state = nnx.state(model)
  logits, aux = forward(state, jnp.asarray(tokens))
  assert logits.shape == (2, 13, 61) and logits.dtype == jnp.float32
  t = 6
  changed = tokens.copy()
  changed[0, t] = (tokens[0, t] + 17) % 61
  logits_changed, _ = forward(state, jnp.asarray(changed))
  logits, logits_changed = np.asarray(logits), np.asarray(logits_changed)
  np.testing.assert_allclose(logits_changed[0, :t], logits[0, :t], rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(logits_changed[1], logits[1], rtol=1e-6, atol=1e-6)
  assert np.abs(logits_changed[0, t] - logits[0, t]).max() > 1e-3
  if moe_every:
    assert float(aux["dropped_fraction"]) == 0.0
    assert set(aux) >= {"loss", "layer0/expert_load", "layer1/expert_load"}
  else:
    assert float(aux["loss"]) == 0.0


def test_is_moe_layer_pattern():
  """moe_every=n makes layers n-1, 2n-1, ... MoE; 0 makes none; the built blocks follow it."""
  assert [transformer.is_moe_layer(i, 2) for i in range(6)] == [False, True] * 3
  assert [transformer.is_moe_layer(i, 3) for i in range(6)] == [False, False, True] * 2
  assert [transformer.is_moe_layer(i, 1) for i in range(4)] == [True] * 4
  assert not any(transformer.is_moe_layer(i, 0) for i in range(6))
  for moe_every in (0, 2):
    model = transformer.Transformer(tiny_config(moe_every=moe_every, num_layers=4),
                                    rngs=nnx.Rngs(0))
    kinds = [type(block.ffn) for block in model.blocks]
    expected = [MoELayer if transformer.is_moe_layer(i, moe_every) else MLP for i in range(4)]
    assert kinds == expected


def test_remat_gives_same_logits_and_grads():
  """remat=True recomputes the blocks in the backward pass with identical logits and gradients."""
  tokens = jnp.asarray(random_tokens(2))
  targets = jnp.asarray(random_tokens(3))
  results = []
  for remat in (False, True):
    model = transformer.Transformer(tiny_config(moe_every=1, remat=remat), rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(model)

    def loss_fn(state):
      logits, aux = nnx.merge(graphdef, state)(tokens)
      log_probs = jax.nn.log_softmax(logits)
      nll = -jnp.mean(jnp.take_along_axis(log_probs, targets[..., None], axis=-1))
      return nll + aux["loss"], logits

    (_, logits), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(state)
    results.append((state, logits, grads))
  (state0, logits0, grads0), (state1, logits1, grads1) = results
  for a, b in zip(jax.tree.leaves(state0), jax.tree.leaves(state1)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert rel_err(logits1, logits0) < 1e-6
  leaves0, leaves1 = jax.tree.leaves(grads0), jax.tree.leaves(grads1)
  assert len(leaves0) == len(leaves1)
  for a, b in zip(leaves0, leaves1):
    assert np.all(np.isfinite(np.asarray(b)))
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-5, atol=1e-7)
  # The router gets a gradient (top-2, renormalised) in both.
  router_grad = grads1["blocks"][0]["ffn"]["router"]["kernel"][...]
  assert np.abs(np.asarray(router_grad)).max() > 0


def test_tied_and_untied_embeddings():
  """Untied adds one 'unembed' [D, V]; with unembed = E^T / sqrt(D) it gives the tied logits."""
  tied, tied_forward = build(tie_embeddings=True)
  untied, untied_forward = build(tie_embeddings=False)
  tied_params = nnx.state(tied, nnx.Param)
  untied_params = nnx.state(untied, nnx.Param)
  assert "unembed" not in tied_params and "unembed" in untied_params
  d_model, vocab = 32, 61
  assert untied.unembed[...].shape == (d_model, vocab)

  def count(params):
    return sum(leaf.size for leaf in jax.tree.leaves(params))

  assert count(untied_params) - count(tied_params) == d_model * vocab

  tokens = jnp.asarray(random_tokens(4))
  tied_logits, _ = tied_forward(nnx.state(tied), tokens)
  untied_logits, _ = untied_forward(nnx.state(untied), tokens)
  assert rel_err(untied_logits, tied_logits) > 1e-2
  # A copy of the untied model holding the tied weights and the scaled transposed embedding.
  clone = nnx.clone(untied)
  nnx.update(clone, nnx.clone(tied_params))
  clone.unembed[...] = clone.embed.embedding[...].T * d_model ** -0.5
  clone_logits, _ = untied_forward(nnx.state(clone), tokens)
  assert rel_err(clone_logits, tied_logits) < 1e-5
  # The cached models are untouched.
  assert "unembed" in nnx.state(untied, nnx.Param) and untied.unembed[...].shape == (d_model, vocab)


def test_dense_variant_has_equal_active_ffn_flops():
  """get_config('dense'): every FFN is an MLP whose width is top_k * expert_hidden_dim."""
  moe_config, dense_config = get_config().model, get_config("dense").model
  assert dense_config.moe_every == 0
  assert dense_config.mlp_dim == moe_config.moe.top_k * moe_config.moe.expert_hidden_dim
  dense = transformer.Transformer(dense_config, rngs=nnx.Rngs(0))
  moe = transformer.Transformer(moe_config, rngs=nnx.Rngs(0))
  assert all(isinstance(block.ffn, MLP) for block in dense.blocks)
  moe_blocks = [block for block in moe.blocks if block.is_moe]
  assert moe_blocks
  for block in moe_blocks:
    dense_ffn = dense.blocks[0].ffn
    experts = block.ffn.experts
    # Weights a token multiplies: one dense MLP vs K experts of its top-K.
    dense_active = sum(p[...].size for p in (dense_ffn.w_up, dense_ffn.w_gate, dense_ffn.w_down))
    expert_active = sum(p[...][0].size for p in (experts.w_gate_up, experts.w_down))
    assert dense_active == moe_config.moe.top_k * expert_active
