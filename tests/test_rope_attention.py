"""RoPE (`models/rope.py`) and attention (`models/attention.py`) against independent references.

RoPE frequencies and attention factors are compared with transformers' own `ROPE_INIT_FUNCTIONS`;
`apply_rope` and `Attention` with float64 NumPy code written here (explicit pair rotations, the GQA
head mapping, qk-norm, clamping, causal / sliding-window softmax). Attention parameters are
replaced by random values (biases non-zero, norm scales away from 1) so that a dropped or
misplaced bias, norm or head mapping moves the output.
"""
import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from transformers import modeling_rope_utils
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

from configs import default
from moe_jax import validation
from moe_jax.models import attention, rope

transformers.utils.logging.set_verbosity_error()


def rel_err(actual, expected) -> float:
  actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
  return float(np.linalg.norm(actual - expected) / max(np.linalg.norm(expected), 1e-30))


# ------------------------------------------------------------------------ frequencies vs transformers

HEAD_DIM = 64


def hf_rope(head_dim: int, rope_parameters: dict) -> tuple[np.ndarray, float]:
  """(inv_freq, attention factor) as transformers computes them for `rope_parameters`."""
  config = transformers.LlamaConfig(
      hidden_size=head_dim * 4, num_attention_heads=4, head_dim=head_dim,
      max_position_embeddings=1 << 20, rope_parameters=dict(rope_parameters))
  kind = rope_parameters["rope_type"]
  if kind == "default":
    inv_freq, factor = LlamaRotaryEmbedding.compute_default_rope_parameters(config)
  else:
    inv_freq, factor = modeling_rope_utils.ROPE_INIT_FUNCTIONS[kind](config)
  return inv_freq.numpy().astype(np.float64), float(factor)


def our_scaling(rope_parameters: dict) -> ml_collections.ConfigDict | None:
  """The same scaling as our `rope_scaling` ConfigDict (None for the default kind)."""
  kind = rope_parameters["rope_type"]
  if kind == "default":
    return None
  scaling = rope.default_scaling()
  scaling.kind = kind
  scaling.factor = float(rope_parameters["factor"])
  scaling.original_max_len = int(rope_parameters["original_max_position_embeddings"])
  for key in ("low_freq_factor", "high_freq_factor", "beta_fast", "beta_slow", "mscale",
              "mscale_all_dim", "attention_factor", "truncate"):
    if key in rope_parameters:
      scaling[key] = type(scaling[key])(rope_parameters[key])
  return scaling


YARN = dict(rope_type="yarn", rope_theta=1e4, factor=40.0, original_max_position_embeddings=4096,
            beta_fast=32.0, beta_slow=1.0)
ROPE_CASES = {
    "default-1e4": dict(rope_type="default", rope_theta=1e4),
    "default-1e6": dict(rope_type="default", rope_theta=1e6),
    "llama3": dict(rope_type="llama3", rope_theta=1e4, factor=8.0, low_freq_factor=1.0,
                   high_freq_factor=4.0, original_max_position_embeddings=4096),
    "llama3.1": dict(rope_type="llama3", rope_theta=5e5, factor=8.0, low_freq_factor=1.0,
                     high_freq_factor=4.0, original_max_position_embeddings=8192),
    "yarn-truncate": dict(YARN, truncate=True),
    "yarn-no-truncate": dict(YARN, truncate=False),
    "yarn-1e6-factor8": dict(YARN, rope_theta=1e6, factor=8.0, truncate=True),
    # DeepSeek-V3: mscale = mscale_all_dim = 1 (attention factor 1, not 0.1 ln 40 + 1).
    "yarn-deepseek-v3": dict(YARN, mscale=1.0, mscale_all_dim=1.0, truncate=True),
    "yarn-deepseek-v3-no-truncate": dict(YARN, mscale=1.0, mscale_all_dim=1.0, truncate=False),
    "yarn-mscale-ratio": dict(YARN, mscale=1.0, mscale_all_dim=0.707),
    "yarn-mscale-only": dict(YARN, mscale=0.707),  # one alone is ignored
    "yarn-explicit-attention-factor": dict(YARN, attention_factor=1.25),
}


@pytest.mark.parametrize("case", list(ROPE_CASES))
def test_inverse_frequencies_match_transformers(case):
  params = ROPE_CASES[case]
  expected, expected_factor = hf_rope(HEAD_DIM, params)
  scaling = our_scaling(params)
  ours = rope.inverse_frequencies(HEAD_DIM, params["rope_theta"], scaling)
  assert ours.shape == (HEAD_DIM // 2,)
  np.testing.assert_allclose(ours, expected, rtol=1e-6, atol=0)
  np.testing.assert_allclose(rope.attention_factor(scaling), expected_factor, rtol=1e-6)


def test_rope_cases_exercise_their_details():
  """The cases above are not vacuous: each scaling detail changes transformers' answer."""
  plain, _ = hf_rope(HEAD_DIM, ROPE_CASES["default-1e4"])
  # llama3 at 1e4 / 4096: some frequencies kept, some divided by 8, some blended.
  llama3, _ = hf_rope(HEAD_DIM, ROPE_CASES["llama3"])
  ratio = llama3 / plain
  assert np.any(np.isclose(ratio, 1.0)) and np.any(np.isclose(ratio, 1 / 8))
  assert np.any((ratio < 0.99) & (ratio > 1 / 8 + 1e-3))
  # YaRN: the truncation changes the ramp, and the attention factor depends on the mscales.
  truncated, f_plain = hf_rope(HEAD_DIM, ROPE_CASES["yarn-truncate"])
  untruncated, _ = hf_rope(HEAD_DIM, ROPE_CASES["yarn-no-truncate"])
  assert np.max(np.abs(truncated / untruncated - 1)) > 1e-3
  _, f_v3 = hf_rope(HEAD_DIM, ROPE_CASES["yarn-deepseek-v3"])
  _, f_ratio = hf_rope(HEAD_DIM, ROPE_CASES["yarn-mscale-ratio"])
  assert f_plain == pytest.approx(0.1 * math.log(40) + 1)
  assert f_v3 == pytest.approx(1.0)
  assert len({round(f, 6) for f in (f_plain, f_v3, f_ratio)}) == 3


def test_unknown_scaling_and_missing_original_len_raise():
  scaling = rope.default_scaling()
  scaling.kind = "ntk"
  with pytest.raises(ValueError, match="rope_scaling.kind"):
    rope.inverse_frequencies(HEAD_DIM, 1e4, scaling)
  scaling = rope.default_scaling()
  scaling.update(kind="yarn", factor=4.0)
  with pytest.raises(ValueError, match="original_max_len"):
    rope.inverse_frequencies(HEAD_DIM, 1e4, scaling)


# ------------------------------------------------------------------------------- apply_rope

def np_theta(head_dim: int, base: float) -> np.ndarray:
  return base ** (-2.0 * np.arange(head_dim // 2) / head_dim)


def np_pairs(head_dim: int, interleaved: bool) -> list[tuple[int, int]]:
  """The (first, second) dimensions rotated together by theta_i, i < head_dim / 2."""
  half = head_dim // 2
  return [(2 * i, 2 * i + 1) if interleaved else (i, i + half) for i in range(half)]


def np_rope(x, positions, theta, interleaved: bool, scale: float = 1.0):
  """Float64 RoPE of x [B, S, H, Dh] at positions [B, S]: one explicit 2-D rotation per pair."""
  x = np.asarray(x, np.float64)
  out = np.empty_like(x)
  for i, (a, b) in enumerate(np_pairs(x.shape[-1], interleaved)):
    angle = np.asarray(positions, np.float64)[:, :, None] * theta[i]
    cos, sin = np.cos(angle) * scale, np.sin(angle) * scale
    out[..., a] = x[..., a] * cos - x[..., b] * sin
    out[..., b] = x[..., b] * cos + x[..., a] * sin
  return out


def our_rope(x, positions, theta, interleaved, scale=1.0):
  return np.asarray(rope.apply_rope(jnp.asarray(x, jnp.float32), jnp.asarray(positions),
                                    theta.astype(np.float32), interleaved=interleaved,
                                    scale=scale), np.float64)


@pytest.mark.parametrize("interleaved", [False, True], ids=["half-split", "interleaved"])
def test_apply_rope_matches_numpy(interleaved):
  rng = np.random.default_rng(0)
  batch, seq, heads, head_dim = 2, 7, 3, 16
  x = rng.normal(size=(batch, seq, heads, head_dim)).astype(np.float32)
  positions = rng.integers(0, 40, size=(batch, seq))
  theta = np_theta(head_dim, 100.0)
  for scale in (1.0, 1.3):
    ours = our_rope(x, positions, theta, interleaved, scale)
    assert rel_err(ours, np_rope(x, positions, theta, interleaved, scale)) < 1e-5
  # The other pairing is a different function (the test can tell them apart).
  other = np_rope(x, positions, theta, not interleaved)
  assert rel_err(our_rope(x, positions, theta, interleaved), other) > 0.1


@pytest.mark.parametrize("interleaved", [False, True], ids=["half-split", "interleaved"])
def test_apply_rope_preserves_pair_norms(interleaved):
  rng = np.random.default_rng(1)
  head_dim = 16
  x = rng.normal(size=(2, 9, 2, head_dim)).astype(np.float32)
  positions = rng.integers(0, 1000, size=(2, 9))
  y = our_rope(x, positions, np_theta(head_dim, 1e4), interleaved)
  assert rel_err(y, x) > 0.1  # it does rotate
  for a, b in np_pairs(head_dim, interleaved):
    np.testing.assert_allclose(np.hypot(y[..., a], y[..., b]),
                               np.hypot(x[..., a], x[..., b]), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("interleaved", [False, True], ids=["half-split", "interleaved"])
def test_rope_dot_product_depends_on_offset_only(interleaved):
  rng = np.random.default_rng(2)
  head_dim = 32
  theta = np_theta(head_dim, 1e4)
  q = rng.normal(size=(1, 1, 1, head_dim))
  k = rng.normal(size=(1, 1, 1, head_dim))

  def dot(pq, pk):
    rq = our_rope(q, np.array([[pq]]), theta, interleaved)
    rk = our_rope(k, np.array([[pk]]), theta, interleaved)
    return float(np.sum(rq * rk))

  for pq, pk in [(3, 1), (10, 4), (0, 7), (12, 12)]:
    base = dot(pq, pk)
    assert dot(pq + 5, pk + 5) == pytest.approx(base, rel=1e-5, abs=1e-5)
    # and it does depend on the offset
    assert abs(dot(pq + 1, pk) - base) > 1e-3


# ------------------------------------------------------------------------------- attention

D_MODEL, NUM_HEADS, HEAD_DIM_ATTN = 20, 6, 8
BATCH, SEQ = 2, 9
EPS = 1e-5


def randomize(module: nnx.Module, seed: int) -> dict:
  """Replaces every parameter of `module` by a random value; returns them as float64 arrays.

  Matrices ~ N(0, 1/fan_in), biases ~ 0.3 N(0, 1), norm scales ~ 1 + 0.4 N(0, 1).
  """
  rng = np.random.default_rng(seed)
  state = nnx.state(module, nnx.Param)
  pure = nnx.to_pure_dict(state)
  values = {}

  def draw(path, leaf):
    name = "/".join(str(p) for p in path)
    shape = leaf.shape
    if name.endswith("scale"):
      value = 1.0 + 0.4 * rng.normal(size=shape)
    elif name.split("/")[-1].startswith("b_"):
      value = 0.3 * rng.normal(size=shape)
    else:
      fan_in = shape[0] if name in ("w_q", "w_k", "w_v") else shape[0] * shape[1]
      value = rng.normal(size=shape) / np.sqrt(fan_in)
    value = value.astype(np.float32)
    values[name] = value.astype(np.float64)
    return jnp.asarray(value)

  new = jax.tree_util.tree_map_with_path(
      lambda path, leaf: draw(tuple(getattr(p, "key", p) for p in path), leaf), pure)
  nnx.replace_by_pure_dict(state, new)
  nnx.update(module, state)
  return values


def np_rms(x, scale, eps):
  return x / np.sqrt(np.mean(x ** 2, axis=-1, keepdims=True) + eps) * scale


def np_attention(x, p, *, num_heads, num_kv_heads, head_dim, base, qk_norm="none", clip=None,
                 window=0, interleaved=False, theta=None, rope_scale=1.0, stats=None):
  """Float64 GQA self-attention, one query at a time; returns [B, S, D]."""
  x = np.asarray(x, np.float64)
  batch, seq, _ = x.shape
  proj = lambda w, b: np.einsum("bsd,dhk->bshk", x, p[w]) + (p[b] if b in p else 0.0)
  q, k, v = proj("w_q", "b_q"), proj("w_k", "b_k"), proj("w_v", "b_v")
  if qk_norm == "head":
    q = np_rms(q, p["q_norm/scale"], EPS)
    k = np_rms(k, p["k_norm/scale"], EPS)
  elif qk_norm == "projection":
    q = np_rms(q.reshape(batch, seq, -1), p["q_norm/scale"], EPS).reshape(q.shape)
    k = np_rms(k.reshape(batch, seq, -1), p["k_norm/scale"], EPS).reshape(k.shape)
  if clip is not None:
    if stats is not None:
      stats["clipped"] = np.mean(np.abs(np.concatenate([q.ravel(), k.ravel(), v.ravel()])) > clip)
    q, k, v = (np.clip(t, -clip, clip) for t in (q, k, v))
  theta = np_theta(head_dim, base) if theta is None else theta
  positions = np.broadcast_to(np.arange(seq), (batch, seq))
  q = np_rope(q, positions, theta, interleaved, rope_scale)
  k = np_rope(k, positions, theta, interleaved, rope_scale)
  group = num_heads // num_kv_heads
  out = np.zeros((batch, seq, num_heads, head_dim))
  for b in range(batch):
    for h in range(num_heads):
      kv = h // group  # kv head j serves query heads j*r .. (j+1)*r - 1
      for i in range(seq):
        keys = [j for j in range(seq) if j <= i and (not window or i - window < j)]
        scores = np.array([q[b, i, h] @ k[b, j, kv] for j in keys]) / np.sqrt(head_dim)
        w = np.exp(scores - scores.max())
        out[b, i, h] = (w / w.sum()) @ v[b, keys, kv]
  y = np.einsum("bshk,hkd->bsd", out, p["w_o"])
  return y + p.get("b_o", 0.0)


def make_attention(num_kv_heads, *, seed=0, **kwargs):
  attn = attention.Attention(D_MODEL, NUM_HEADS, HEAD_DIM_ATTN, rngs=nnx.Rngs(0),
                             num_kv_heads=num_kv_heads, norm_eps=EPS, **kwargs)
  return attn, randomize(attn, seed)


def inputs(seed=0, seq=SEQ):
  return np.random.default_rng(100 + seed).normal(size=(BATCH, seq, D_MODEL)).astype(np.float32)


def run(attn, x):
  positions = jnp.broadcast_to(jnp.arange(x.shape[1]), x.shape[:2])
  return np.asarray(attn(jnp.asarray(x), positions), np.float64)


ATTENTION_CASES = {
    "gqa-head-norm": dict(num_kv_heads=2, qk_norm="head"),
    "gqa-projection-norm": dict(num_kv_heads=2, qk_norm="projection"),
    "mha-head-norm": dict(num_kv_heads=6, qk_norm="head"),
    "mha-projection-norm": dict(num_kv_heads=0, qk_norm="projection"),
    "gqa-interleaved-no-norm": dict(num_kv_heads=3, qk_norm="none", rope_interleaved=True),
}


@pytest.mark.parametrize("case", list(ATTENTION_CASES))
def test_attention_matches_numpy(case):
  kwargs = dict(ATTENTION_CASES[case])
  num_kv_heads = kwargs.pop("num_kv_heads")
  qk_norm = kwargs["qk_norm"]
  attn, p = make_attention(num_kv_heads, rope_base=100.0, qkv_bias=True, out_bias=True,
                           clip_qkv=0.5, **kwargs)
  for name in ("b_q", "b_k", "b_v", "b_o") + (("q_norm/scale",) if qk_norm != "none" else ()):
    assert name in p, (name, sorted(p))
  x = inputs()
  stats = {}
  expected = np_attention(x, p, num_heads=NUM_HEADS, num_kv_heads=num_kv_heads or NUM_HEADS,
                          head_dim=HEAD_DIM_ATTN, base=100.0, qk_norm=qk_norm, clip=0.5,
                          interleaved=kwargs.get("rope_interleaved", False), stats=stats)
  # The clamp is live: it changes a real fraction of q, k, v.
  assert 0.05 < stats["clipped"] < 0.95, stats
  y = run(attn, x)
  assert y.shape == x.shape
  assert rel_err(y, expected) < 1e-5


def test_gqa_head_mapping_matters():
  """The reference distinguishes kv head j serving query heads j*r.. from a round-robin mapping
  (so the GQA comparison above would catch a wrong mapping)."""
  attn, p = make_attention(2, rope_base=100.0)
  x = inputs()
  y = run(attn, x)
  # Round robin: query head h uses kv head h % 2  <=>  permute the query heads to blocks.
  order = [0, 2, 4, 1, 3, 5]  # query heads of kv head 0 first, then kv head 1
  permuted = dict(p, w_q=p["w_q"][:, order], w_o=p["w_o"][order])
  block = np_attention(x, p, num_heads=6, num_kv_heads=2, head_dim=8, base=100.0)
  round_robin = np_attention(x, permuted, num_heads=6, num_kv_heads=2, head_dim=8, base=100.0)
  assert rel_err(y, block) < 1e-5
  assert rel_err(y, round_robin) > 1e-2


def test_attention_with_yarn_matches_transformers_frequencies():
  """Attention under YaRN: the reference uses transformers' frequencies and attention factor."""
  params = dict(rope_type="yarn", rope_theta=1e4, factor=16.0,
                original_max_position_embeddings=64, beta_fast=32.0, beta_slow=1.0)
  theta, factor = hf_rope(HEAD_DIM_ATTN, params)
  assert factor > 1.2
  attn, p = make_attention(2, rope_base=1e4, rope_scaling=our_scaling(params), qk_norm="head")
  x = inputs(3)
  expected = np_attention(x, p, num_heads=6, num_kv_heads=2, head_dim=8, base=1e4,
                          qk_norm="head", theta=theta, rope_scale=factor)
  assert rel_err(run(attn, x), expected) < 1e-5


# ---------------------------------------------------------------------------- sliding window

WINDOW = 3


def test_sliding_window_matches_numpy():
  attn, p = make_attention(2, rope_base=100.0, qkv_bias=True, qk_norm="head",
                           sliding_window=WINDOW)
  x = inputs(1)
  expected = np_attention(x, p, num_heads=6, num_kv_heads=2, head_dim=8, base=100.0,
                          qk_norm="head", window=WINDOW)
  full = np_attention(x, p, num_heads=6, num_kv_heads=2, head_dim=8, base=100.0, qk_norm="head")
  assert rel_err(expected, full) > 1e-2  # the window matters at this length
  assert rel_err(run(attn, x), expected) < 1e-5


def test_sliding_window_ignores_tokens_outside_it():
  """Output at q is unchanged by tokens before q - 2 under window 3, changed without the window."""
  windowed, p = make_attention(2, rope_base=100.0, sliding_window=WINDOW)
  unwindowed, p_unwindowed = make_attention(2, rope_base=100.0)
  assert all(np.array_equal(p[k], p_unwindowed[k]) for k in p)  # same parameters (same seed)
  x = inputs(2)
  base_w, base_u = run(windowed, x), run(unwindowed, x)
  rng = np.random.default_rng(7)
  for q in range(WINDOW, SEQ):
    perturbed = x.copy()
    perturbed[:, :q - WINDOW + 1] += rng.normal(size=perturbed[:, :q - WINDOW + 1].shape)
    y_w, y_u = run(windowed, perturbed), run(unwindowed, perturbed)
    np.testing.assert_allclose(y_w[:, q:q + 1], base_w[:, q:q + 1], rtol=0, atol=1e-6)
    assert np.max(np.abs(y_u[:, q] - base_u[:, q])) > 1e-3
    # A token just inside the window does matter.
    inside = x.copy()
    inside[:, q - WINDOW + 1] += 1.0
    assert np.max(np.abs(run(windowed, inside)[:, q] - base_w[:, q])) > 1e-3


# ----------------------------------------------------------------------------------- decoding

def test_decode_matches_forward_with_gqa_and_window():
  attn, _ = make_attention(2, rope_base=100.0, qkv_bias=True, out_bias=True, qk_norm="head",
                           clip_qkv=0.5, sliding_window=WINDOW)
  x = inputs(4)
  full = run(attn, x)
  prefill = 5
  cache = attn.init_cache(BATCH, SEQ + 3)  # slots past the sequence stay zero
  y, cache = attn.decode(jnp.asarray(x[:, :prefill]), cache, 0)
  outs = [np.asarray(y)]
  for t in range(prefill, SEQ):
    y, cache = attn.decode(jnp.asarray(x[:, t:t + 1]), cache, t)
    outs.append(np.asarray(y))
  cached = np.concatenate(outs, axis=1)
  assert cached.shape == full.shape
  assert rel_err(cached, full) < 1e-5
  np.testing.assert_allclose(cached, full, rtol=0, atol=1e-5)


# ------------------------------------------------------------------------------------- errors

def test_bad_attention_arguments_raise():
  with pytest.raises(ValueError, match="num_kv_heads"):
    attention.Attention(D_MODEL, 6, 8, rngs=nnx.Rngs(0), num_kv_heads=4)
  with pytest.raises(ValueError, match="qk_norm"):
    attention.Attention(D_MODEL, 6, 8, rngs=nnx.Rngs(0), qk_norm="bogus")


def base_config():
  config = default.get_config()
  validation.validate_config(config)  # valid as written: every error below is the edit's
  return config


def test_validate_config_rejects_bad_kv_heads():
  config = base_config()
  assert config.model.num_heads == 4
  config.model.num_kv_heads = 3
  with pytest.raises(validation.ConfigError, match=r"model\.num_kv_heads"):
    validation.validate_config(config)
  config.model.num_kv_heads = 2  # a divisor is fine
  validation.validate_config(config)


def test_validate_config_rejects_llama3_without_original_len():
  config = base_config()
  config.model.rope_scaling.kind = "llama3"
  config.model.rope_scaling.factor = 8.0
  config.model.rope_scaling.original_max_len = 0
  with pytest.raises(validation.ConfigError, match=r"rope_scaling\.original_max_len"):
    validation.validate_config(config)


def test_validate_config_rejects_out_of_range_moe_layers():
  config = base_config()
  assert config.model.num_layers == 4
  config.model.moe_layers = (0, 9)
  with pytest.raises(validation.ConfigError, match=r"model\.moe_layers"):
    validation.validate_config(config)


# --------------------------------------------------------------------------------------- norms


@pytest.mark.parametrize("kind", ["rms", "layer"])
def test_residual_norms_match_float64_reference(kind):
  """RMSNorm and the bias-free LayerNorm against their formulas in float64, at an awkward width
  with a non-zero mean (where the two differ) and a scale away from 1."""
  from moe_jax.models import norms  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(3)
  x = rng.standard_normal((3, 5, 37)) * 2.0 + 0.7
  scale = 1.0 + 0.3 * rng.standard_normal(37)
  config = ml_collections.ConfigDict({"norm": kind, "norm_eps": 1e-5})
  norm = norms.residual_norm(config, 37, param_dtype=jnp.float32)
  norm.scale[...] = jnp.asarray(scale, jnp.float32)
  if kind == "rms":
    expected = x / np.sqrt(np.mean(x ** 2, -1, keepdims=True) + 1e-5) * scale
  else:
    centred = x - x.mean(-1, keepdims=True)
    expected = centred / np.sqrt(centred.var(-1, keepdims=True) + 1e-5) * scale
  assert rel_err(norm(jnp.asarray(x, jnp.float32)), expected) < 1e-5
