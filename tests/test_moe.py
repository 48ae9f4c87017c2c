"""MoELayer (`moe_jax.moe`) against a float64 NumPy per-token reference.

The reference loops over tokens and their K choices, applies that expert's FFN with the layer's
own weights, and sums with the router weights (Shazeer et al. 2017; GShard 2020; Switch Transformer
2021, eq. 1-4; ST-MoE 2022, eq. 5). Capacity dropping follows the Switch/GShard priority: within a
group, all first choices in token order, then all second choices, ... Each layer is jitted once.
"""
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs.default import get_config
from moe_jax.moe import MoELayer

D_MODEL, HIDDEN = 19, 23
BATCH, SEQ = 2, 37

# ------------------------------------------------------------------------------------ references


def rel_err(actual, expected):
  actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
  return np.linalg.norm(actual - expected) / max(np.linalg.norm(expected), 1e-30)


def np_softmax(logits):
  z = np.exp(logits - logits.max(axis=-1, keepdims=True))
  return z / z.sum(axis=-1, keepdims=True)


def np_activation(activation, gate, up):
  """SwiGLU silu(gate) * up (Shazeer 2020), or GELU in its tanh form (jax.nn.gelu's default)."""
  if activation == "swiglu":
    return gate / (1.0 + np.exp(-gate)) * up
  return 0.5 * up * (1.0 + np.tanh(np.sqrt(2.0 / np.pi) * (up + 0.044715 * up ** 3)))


def np_ffn(x, w_up, w_gate, w_down, activation):
  gate = None if w_gate is None else x @ w_gate
  return np_activation(activation, gate, x @ w_up) @ w_down


def np_params(layer):
  """The layer's weights as float64 NumPy arrays."""
  def get(param):
    return None if param is None else np.asarray(param[...], np.float64)

  if layer.experts.w_gate_up is not None:  # SwiGLU: gate and up interleaved column by column
    gate_up = get(layer.experts.w_gate_up)
    w_gate, w_up = gate_up[..., 0::2], gate_up[..., 1::2]
  else:
    w_gate, w_up = None, get(layer.experts.w_up)
  params = {
      "router": get(layer.router.kernel),
      "w_up": w_up,
      "w_gate": w_gate,
      "w_down": get(layer.experts.w_down),
      "shared": None,
  }
  if layer.shared_experts is not None:
    mlp = layer.shared_experts
    params["shared"] = (get(mlp.w_up), get(mlp.w_gate), get(mlp.w_down))
  return params


def np_moe(x, params, cfg, activation="swiglu", mask=None):
  """Per-token float64 MoE: returns (y [B, S, D], aux dict, index [T, K], kept [T, K])."""
  batch, seq, d_model = x.shape
  num_tokens, num_experts, top_k = batch * seq, cfg.num_experts, cfg.top_k
  tokens = np.asarray(x, np.float64).reshape(num_tokens, d_model)
  valid = np.ones(num_tokens, bool) if mask is None else np.asarray(mask).reshape(-1)
  logits = tokens @ params["router"]
  probs = np_softmax(logits)
  index = np.full((num_tokens, top_k), num_experts)
  weight = np.zeros((num_tokens, top_k))
  for t in np.flatnonzero(valid):
    order = sorted(range(num_experts), key=lambda e: (-probs[t, e], e))[:top_k]
    index[t] = order
    renormalise = cfg.normalize_top_k and top_k > 1  # K = 1 keeps the raw probability (Switch)
    weight[t] = probs[t, order] / (probs[t, order].sum() if renormalise else 1.0)
  kept = index < num_experts
  if cfg.capacity_factor is not None:
    group = cfg.group_size or seq
    capacity = max(1, math.ceil(cfg.capacity_factor * group * top_k / num_experts))
    for g in range(num_tokens // group):
      fill = np.zeros(num_experts, int)
      for k in range(top_k):
        for t in range(g * group, (g + 1) * group):
          e = index[t, k]
          if e < num_experts:
            kept[t, k] = fill[e] < capacity
            fill[e] += 1
  y = np.zeros((num_tokens, d_model))
  for t in range(num_tokens):
    for k in range(top_k):
      if kept[t, k]:
        e = index[t, k]
        w_gate = None if params["w_gate"] is None else params["w_gate"][e]
        y[t] += weight[t, k] * np_ffn(tokens[t], params["w_up"][e], w_gate, params["w_down"][e],
                                      activation)
  if params["shared"] is not None:
    y += np_ffn(tokens, params["shared"][0], params["shared"][1], params["shared"][2], activation)

  n_valid = valid.sum()
  load = np.bincount(index[index < num_experts], minlength=num_experts) / (n_valid * top_k)
  balance = num_experts * np.sum(load * probs[valid].mean(axis=0))
  log_z = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
  z_loss = np.mean(log_z[valid] ** 2)
  entropy = np.mean(-(probs * np.log(probs)).sum(-1)[valid])
  assigned = (index < num_experts).sum()
  aux = {
      "loss": cfg.load_balance_loss_weight * balance + cfg.router_z_loss_weight * z_loss,
      "load_balance_loss": balance,
      "router_z_loss": z_loss,
      "expert_load": load,
      "dropped_fraction": 1.0 - kept.sum() / max(assigned, 1),
      "router_entropy": entropy,
  }
  return y.reshape(batch, seq, d_model), aux, index, kept


# ---------------------------------------------------------------------------------------- layers


def make_config(**overrides):
  cfg = get_config().model.moe
  cfg.num_experts, cfg.top_k, cfg.expert_hidden_dim = 5, 2, HIDDEN
  for name, value in overrides.items():
    cfg[name] = value
  return cfg


@functools.lru_cache(maxsize=None)
def build(activation="swiglu", dtype="float32", **overrides):
  """(layer, cfg, jitted forward(state, x, mask) -> (y, aux), graphdef) for one configuration."""
  cfg = make_config(**overrides)
  layer = MoELayer(cfg, D_MODEL, rngs=nnx.Rngs(0), activation=activation, dtype=jnp.dtype(dtype))
  graphdef, _ = nnx.split(layer)
  forward = jax.jit(lambda state, x, mask: nnx.merge(graphdef, state)(x, mask))
  return layer, cfg, forward, graphdef


def run(x, mask=None, activation="swiglu", dtype="float32", **overrides):
  layer, cfg, forward, _ = build(activation=activation, dtype=dtype, **overrides)
  y, aux = forward(nnx.state(layer), jnp.asarray(x), None if mask is None else jnp.asarray(mask))
  return y, aux, layer, cfg


def random_x(seed, shape=(BATCH, SEQ, D_MODEL)):
  return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


def check_aux(aux, ref_aux, tol=1e-5):
  for name in ("loss", "load_balance_loss", "router_z_loss", "router_entropy"):
    assert rel_err(aux[name], ref_aux[name]) < tol, name
  np.testing.assert_allclose(np.asarray(aux["expert_load"]), ref_aux["expert_load"], atol=1e-6)
  np.testing.assert_allclose(float(aux["dropped_fraction"]), ref_aux["dropped_fraction"], atol=1e-6)


# ------------------------------------------------------------------------------------- forward


@pytest.mark.parametrize("activation,overrides", [
    ("swiglu", {}),
    ("gelu", {"num_experts": 7, "top_k": 3}),
    ("swiglu", {"top_k": 1, "normalize_top_k": False}),
], ids=["swiglu-k2", "gelu-e7-k3", "switch-k1-raw"])
def test_dropless_forward_matches_numpy(activation, overrides):
  """Dropless output and all aux statistics equal the per-token reference; nothing is dropped."""
  x = random_x(0)
  y, aux, layer, cfg = run(x, activation=activation, **overrides)
  ref_y, ref_aux, _, _ = np_moe(x, np_params(layer), cfg, activation)
  assert y.shape == x.shape and y.dtype == jnp.float32
  assert rel_err(y, ref_y) < 1e-5
  check_aux(aux, ref_aux)
  assert float(aux["dropped_fraction"]) == 0.0
  np.testing.assert_allclose(float(np.sum(aux["expert_load"])), 1.0, atol=1e-6)


@pytest.mark.parametrize("overrides", [
    {"capacity_factor": 1.0},
    {"capacity_factor": 0.5, "top_k": 1, "num_experts": 7},
    {"capacity_factor": 0.8, "group_size": 2 * SEQ},
    {"capacity_factor": 2.0, "group_size": 2, "top_k": 3},
], ids=["cf1-seq-groups", "cf0.5-k1", "cf0.8-batch-group", "cf2-tiny-groups"])
def test_capacity_forward_matches_numpy(overrides):
  """With capacity buffers, dropped choices contribute 0 exactly as the Switch priority says."""
  x = random_x(1)
  y, aux, layer, cfg = run(x, **overrides)
  ref_y, ref_aux, _, kept = np_moe(x, np_params(layer), cfg)
  assert rel_err(y, ref_y) < 1e-5
  check_aux(aux, ref_aux)
  if overrides["capacity_factor"] < 2.0:
    assert ref_aux["dropped_fraction"] > 0.0  # the case really drops


def test_shared_expert_is_added():
  """num_shared_experts=1 adds a dense MLP of width expert_hidden_dim to every token's output."""
  x = random_x(2)
  y, aux, layer, cfg = run(x, num_shared_experts=1)
  assert layer.shared_experts.w_up[...].shape == (D_MODEL, HIDDEN)
  params = np_params(layer)
  ref_y, ref_aux, _, _ = np_moe(x, params, cfg)
  assert rel_err(y, ref_y) < 1e-5
  check_aux(aux, ref_aux)
  params["shared"] = None
  routed_only, _, _, _ = np_moe(x, params, cfg)
  assert rel_err(y, routed_only) > 1e-2  # the shared path is really there


def test_gmm_backends_agree():
  """gmm_backend reference, xla and auto (blocked on CPU) build the same weights and outputs."""
  x = random_x(3)
  outputs = {}
  for backend in ("reference", "xla", "auto"):
    y, aux, layer, cfg = run(x, gmm_backend=backend)
    outputs[backend] = np.asarray(y)
    ref_y, _, _, _ = np_moe(x, np_params(layer), cfg)
    assert rel_err(y, ref_y) < 1e-5, backend
  for backend in ("xla", "auto"):
    assert rel_err(outputs[backend], outputs["reference"]) < 1e-5, backend


def test_bfloat16_layer_matches_reference():
  """dtype=bfloat16 experts (f32 router, f32 combine) stay within bf16 accuracy of the reference."""
  x = jnp.asarray(random_x(4), jnp.bfloat16)
  y, aux, layer, cfg = run(x, dtype="bfloat16")
  assert y.dtype == jnp.bfloat16
  ref_y, ref_aux, _, _ = np_moe(np.asarray(x, np.float64), np_params(layer), cfg)
  assert rel_err(y, ref_y) < 2e-2
  # The router sees the same bf16 values in f32, so routing statistics are f32-accurate.
  check_aux(aux, ref_aux, tol=1e-5)


def test_identical_tokens_keep_exactly_capacity():
  """S identical top-1 tokens in one group: exactly C = ceil(37 / 4) = 10 kept, the first 10."""
  x = np.tile(random_x(5, (1, 1, D_MODEL)), (1, SEQ, 1))
  y, aux, layer, cfg = run(x, num_experts=4, top_k=1, capacity_factor=1.0)
  np.testing.assert_allclose(float(aux["dropped_fraction"]), 1.0 - 10 / SEQ, atol=1e-6)
  y = np.asarray(y)[0]
  assert np.all(np.abs(y[:10]).max(axis=-1) > 0)
  np.testing.assert_array_equal(y[10:], 0.0)
  np.testing.assert_allclose(y[:10], np.broadcast_to(y[0], (10, D_MODEL)), rtol=1e-6)


def test_group_size_must_divide_tokens():
  """A group_size that does not divide B*S raises a ValueError naming group_size."""
  layer = MoELayer(make_config(capacity_factor=1.0, group_size=5), D_MODEL, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="group_size"):
    layer(jnp.asarray(random_x(6)))


# ------------------------------------------------------------------------------------ properties


@pytest.mark.parametrize("overrides", [{}, {"capacity_factor": 1.0}],
                         ids=["dropless", "capacity-seq-groups"])
def test_sequence_output_independent_of_other_sequences(overrides):
  """Changing sequence 1 leaves sequence 0's output unchanged (dropless; capacity, group = seq)."""
  x = random_x(7)
  x_other = x.copy()
  x_other[1] = random_x(8, (SEQ, D_MODEL))
  y, _, _, _ = run(x, **overrides)
  y_other, _, _, _ = run(x_other, **overrides)
  np.testing.assert_allclose(np.asarray(y_other)[0], np.asarray(y)[0], rtol=1e-6, atol=1e-6)
  assert rel_err(np.asarray(y_other)[1], np.asarray(y)[1]) > 0.1


@pytest.mark.parametrize("overrides", [{}, {"capacity_factor": 0.75}],
                         ids=["dropless", "capacity"])
def test_padding_mask(overrides):
  """Masked tokens: zero output, no load, no capacity, no statistic; other tokens unaffected."""
  rng = np.random.default_rng(9)
  x = random_x(9)
  mask = rng.random((BATCH, SEQ)) > 0.3
  mask[:, :4] = False  # early padding would take capacity first if it were routed
  y, aux, layer, cfg = run(x, mask=mask, **overrides)
  ref_y, ref_aux, ref_index, _ = np_moe(x, np_params(layer), cfg, mask=mask)
  assert np.all(ref_index[~mask.reshape(-1)] == cfg.num_experts)
  assert rel_err(y, ref_y) < 1e-5
  check_aux(aux, ref_aux)
  np.testing.assert_array_equal(np.asarray(y)[~mask], 0.0)
  np.testing.assert_allclose(float(np.sum(aux["expert_load"])), 1.0, atol=1e-6)

  # The content of padded positions does not matter.
  x_garbage = np.where(mask[..., None], x, 100.0 * random_x(10))
  y_garbage, aux_garbage, _, _ = run(x_garbage, mask=mask, **overrides)
  np.testing.assert_allclose(np.asarray(y_garbage), np.asarray(y), rtol=1e-6, atol=1e-6)
  for name in ("loss", "expert_load", "dropped_fraction", "router_entropy"):
    np.testing.assert_allclose(np.asarray(aux_garbage[name]), np.asarray(aux[name]), rtol=1e-6)
  if not overrides:
    # Dropless: masking changes nothing for the valid tokens.
    y_unmasked, _, _, _ = run(x, **overrides)
    np.testing.assert_allclose(np.asarray(y)[mask], np.asarray(y_unmasked)[mask],
                               rtol=1e-6, atol=1e-6)


# ------------------------------------------------------------------------------------- gradients


def jnp_reference_loss(weights, x, index, kept, cfg, c):
  """The layer's loss sum(y * c) + aux loss, written densely in jnp from the equations.

  Every expert runs on every token; the routing choice (`index`, `kept`, from the NumPy reference)
  is a constant, as it is piecewise constant in the inputs.
  """
  w_router, w_gate_up, w_down = weights
  w_gate, w_up = w_gate_up[..., 0::2], w_gate_up[..., 1::2]
  batch, seq, d_model = x.shape
  tokens = x.reshape(batch * seq, d_model)
  logits = tokens @ w_router
  probs = jax.nn.softmax(logits, axis=-1)
  chosen = jnp.take_along_axis(probs, jnp.asarray(index), axis=-1)
  if cfg.normalize_top_k and index.shape[-1] > 1:
    chosen = chosen / jnp.sum(chosen, axis=-1, keepdims=True)
  chosen = chosen * jnp.asarray(kept, jnp.float32)
  hidden = jax.nn.silu(jnp.einsum("td,edf->tef", tokens, w_gate)) * jnp.einsum(
      "td,edf->tef", tokens, w_up)
  out = jnp.einsum("tef,efd->ted", hidden, w_down)  # [T, E, D]
  onehot = jax.nn.one_hot(index, cfg.num_experts)  # [T, K, E]
  y = jnp.einsum("tke,tk,ted->td", onehot, chosen, out)
  load = np.bincount(index.reshape(-1), minlength=cfg.num_experts) / index.size
  balance = cfg.num_experts * jnp.sum(load * jnp.mean(probs, axis=0))
  z_loss = jnp.mean(jax.nn.logsumexp(logits, axis=-1) ** 2)
  aux_loss = cfg.load_balance_loss_weight * balance + cfg.router_z_loss_weight * z_loss
  return jnp.sum(y.reshape(x.shape) * c) + aux_loss


@pytest.mark.parametrize("overrides", [{}, {"capacity_factor": 1.0}], ids=["dropless", "capacity"])
def test_gradients_match_dense_reference(overrides):
  """d loss / d (x, router, experts) of the layer == jax.grad of the dense jnp reference; finite."""
  layer, cfg, _, graphdef = build(**overrides)
  x = random_x(11)
  c = np.random.default_rng(12).normal(size=x.shape).astype(np.float32)
  _, ref_aux, index, kept = np_moe(x, np_params(layer), cfg)
  if overrides:
    assert ref_aux["dropped_fraction"] > 0

  def layer_loss(state, x):
    y, aux = nnx.merge(graphdef, state)(x)
    return jnp.sum(y * c) + aux["loss"]

  state = nnx.state(layer)
  loss, (g_state, g_x) = jax.jit(jax.value_and_grad(layer_loss, argnums=(0, 1)))(state,
                                                                                  jnp.asarray(x))
  weights = (layer.router.kernel[...], layer.experts.w_gate_up[...], layer.experts.w_down[...])
  ref_loss, ref_grads = jax.jit(jax.value_and_grad(
      lambda w, x: jnp_reference_loss(w, x, index, kept, cfg, c), argnums=(0, 1)))(
          weights, jnp.asarray(x))
  assert rel_err(loss, ref_loss) < 1e-5
  (g_router, g_gate_up, g_down), ref_g_x = ref_grads
  grads = {"x": (g_x, ref_g_x), "router": (g_state["router"]["kernel"][...], g_router),
           "w_gate_up": (g_state["experts"]["w_gate_up"][...], g_gate_up),
           "w_down": (g_state["experts"]["w_down"][...], g_down)}
  for name, (actual, expected) in grads.items():
    assert np.all(np.isfinite(np.asarray(actual))), name
    assert np.abs(np.asarray(expected)).max() > 0, name
    assert rel_err(actual, expected) < 2e-5, name


def test_dropless_gradient_matches_finite_difference():
  """<grad_x loss, v> equals the central difference of the layer's loss along v (f32, eps=1e-2).

  The step is checked not to change any routing choice, so the loss is smooth along it.
  """
  layer, cfg, _, graphdef = build()
  rng = np.random.default_rng(13)
  x = random_x(13)
  c = rng.normal(size=x.shape).astype(np.float32)
  params = np_params(layer)
  state = nnx.state(layer)

  def layer_loss(x):
    y, aux = nnx.merge(graphdef, state)(x)
    return jnp.sum(y * c) + aux["loss"]

  value_and_grad = jax.jit(jax.value_and_grad(layer_loss))
  _, g_x = value_and_grad(jnp.asarray(x))
  # Move only tokens whose top-K set is clear (logit margin > 0.2), so no step flips a choice;
  # half along the gradient, half random, so the derivative stands well above f32 rounding.
  logits = np.sort(x.reshape(-1, D_MODEL) @ params["router"], axis=-1)[:, ::-1]
  margin = (logits[:, cfg.top_k - 1] - logits[:, cfg.top_k]).reshape(BATCH, SEQ, 1)
  g_dir = np.asarray(g_x, np.float64) * (margin > 0.2)
  noise = rng.normal(size=x.shape) * (margin > 0.2)
  v = g_dir / np.linalg.norm(g_dir) + noise / np.linalg.norm(noise)
  v = (v / np.linalg.norm(v)).astype(np.float32)
  eps = 1e-2
  _, _, index, _ = np_moe(x, params, cfg)
  for sign in (1, -1):
    _, _, shifted_index, _ = np_moe(x + sign * eps * v, params, cfg)
    np.testing.assert_array_equal(shifted_index, index)
  plus, _ = value_and_grad(jnp.asarray(x + eps * v))
  minus, _ = value_and_grad(jnp.asarray(x - eps * v))
  directional = float(np.sum(np.asarray(g_x) * v))
  finite_difference = (float(plus) - float(minus)) / (2 * eps)
  assert abs(directional) > 1.0
  assert abs(finite_difference - directional) < 1e-3 * abs(directional)


def test_soft_moe_metrics_are_measured_not_constant():
  """Soft MoE's load and entropies against NumPy from the layer's own dispatch/combine weights."""
  from configs import routers  # pylint: disable=g-import-not-at-top
  from moe_jax.routers.soft import soft_weights  # pylint: disable=g-import-not-at-top

  config = routers.apply_router(get_config("tiny"), "soft").model.moe
  config.num_experts, config.soft_slots_per_expert = 3, 2
  config.group_by = "sequence"
  layer = MoELayer(config, 8, rngs=nnx.Rngs(0))
  # Skew the slots: expert 0's slot parameters align with the inputs' mean direction.
  x = np.random.default_rng(1).normal(size=(5, 7, 8)).astype(np.float32) + 1.5
  phi = np.asarray(layer.router.phi[...]).copy()
  phi[:, :2] += 3.0
  layer.router.phi[...] = jnp.asarray(phi)
  _, aux = layer(jnp.asarray(x))
  groups = x.reshape(5 * 7, 8).reshape(-1, 7, 8)  # sequence groups: one row each
  dispatch, combine = (np.asarray(w, np.float64) for w in soft_weights(
      jnp.asarray(groups), layer.router.phi[...], layer.router.scale[...]))
  per_expert = combine.reshape(5, 7, 3, 2).sum(-1)  # [G, N, E]
  load = per_expert.sum((0, 1)) / per_expert.sum()
  np.testing.assert_allclose(aux["expert_load"], load, rtol=1e-5)
  assert load.max() / load.mean() > 1.2  # the skew shows: not a constant uniform vector
  entropy = -(per_expert * np.log(per_expert)).sum(-1).mean()
  np.testing.assert_allclose(aux["router_entropy"], entropy, rtol=1e-5)
  combine_entropy = -(combine * np.log(combine)).sum(-1).mean()
  np.testing.assert_allclose(aux["soft_combine_entropy"], combine_entropy, rtol=1e-5)
  dispatch_entropy = -(dispatch * np.log(dispatch)).sum(1).mean()
  np.testing.assert_allclose(aux["soft_dispatch_entropy"], dispatch_entropy, rtol=1e-5)
  assert 0 < aux["router_entropy"] < np.log(3)


# ------------------------------------------------------------------------------- gmm tiling field


def test_gmm_tiling_reaches_the_kernel_and_keeps_the_function():
  """model.moe.gmm_tiling: other row tiles give the same output; a bad tile is the kernel's error."""
  x = random_x(21)
  y_default, _, layer, _ = run(x, gmm_backend="blocked")
  assert layer.experts.gmm_tiling is None
  y_tiled, _, layer, _ = run(x, gmm_backend="blocked", gmm_tiling=(16, 4))
  assert layer.experts.gmm_tiling == (16, 4)
  assert rel_err(y_tiled, np.asarray(y_default, np.float64)) < 1e-6
  with pytest.raises(ValueError, match="strictly decreasing"):
    run(x, gmm_backend="blocked", gmm_tiling=(4, 16))


def test_gmm_tiling_is_validated_with_the_config():
  from configs import default
  from moe_jax.validation import validate_config
  config = default.get_config()
  config.model.moe.gmm_backend = "blocked"
  config.model.moe.gmm_tiling = (64, 128)
  with pytest.raises(ValueError, match="gmm_tiling=.*'blocked'"):
    validate_config(config)
  config.model.moe.gmm_tiling = (128, 64)
  validate_config(config)
