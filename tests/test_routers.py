"""The routing zoo (`moe_jax/routers`, `losses`, `router_state`, `zero_experts`, BPR dispatch)
against float64 NumPy references, plus the properties each method must have.

References are written from the papers' equations (Switch Transformer 2021; V-MoE 2021; Expert
Choice, Zhou et al. 2022; Soft MoE, Puigcerver et al. 2023; DeepSeek-V3 2024; Wang et al. 2024
loss-free balancing; Huang et al. 2024 top-p; ReMoE 2024; MoE++ 2024; AdaMoE 2024), loop over
tokens, and share no code with the library. Sizes are deliberately awkward (T=37, E=6 or 12,
groups of 13, three expert groups).
"""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import configs.default
from moe_jax import dispatch
from moe_jax import losses
from moe_jax import router_state
from moe_jax import routing
from moe_jax import zero_experts
from moe_jax.moe import MoELayer
from moe_jax.routers.decision import RoutingDecision
from moe_jax.routers.dynamic import relu_routing, top_p
from moe_jax.routers.expert_choice import expert_choice
from moe_jax.routers.soft import soft_weights
from moe_jax.routers.token_choice import random_top_k, token_choice_top_k

RTOL, ATOL = 1e-5, 1e-6

# ------------------------------------------------------------------------------------ references


def np_softmax(logits, axis=-1):
  """Softmax in float64."""
  logits = np.asarray(logits, np.float64)
  z = np.exp(logits - logits.max(axis=axis, keepdims=True))
  return z / z.sum(axis=axis, keepdims=True)


def np_sigmoid(logits):
  return 1.0 / (1.0 + np.exp(-np.asarray(logits, np.float64)))


def np_phi(z):
  """Standard normal CDF."""
  return 0.5 * (1.0 + math.erf(z / math.sqrt(2.0)))


def np_token_choice(logits, top_k, valid=None, normalize=True, score_function="softmax",
                    bias=None, num_groups=1, top_k_groups=1, scaling=1.0, group_rule="top2_sum"):
  """Token-choice top-k with DeepSeek-V3 options, one token at a time.

  Returns (index [T, K] with E for invalid tokens, weight [T, K], probs [T, E], allowed [T, E]
  the experts of each token's kept groups, margin: the smallest gap between the K-th and the
  (K+1)-th allowed selection score, and between the last kept and first dropped group score).
  """
  logits = np.asarray(logits, np.float64)
  num_tokens, num_experts = logits.shape
  valid = np.ones(num_tokens, bool) if valid is None else np.asarray(valid)
  bias = np.zeros(num_experts) if bias is None else np.asarray(bias, np.float64)
  index = np.full((num_tokens, top_k), num_experts, np.int64)
  weight = np.zeros((num_tokens, top_k))
  probs = np.zeros((num_tokens, num_experts))
  allowed = np.zeros((num_tokens, num_experts), bool)
  margin = np.inf
  size = num_experts // num_groups
  for t in range(num_tokens):
    if score_function == "softmax":
      z = np.exp(logits[t] - logits[t].max())
      scores = z / z.sum()
    else:
      scores = np.array([1.0 / (1.0 + math.exp(-v)) for v in logits[t]])
    probs[t] = scores / scores.sum()
    select = scores + bias
    group_score = []
    for g in range(num_groups):
      members = sorted(select[g * size:(g + 1) * size], reverse=True)
      if group_rule == "max":  # DeepSeek-V2: the group's highest score
        group_score.append(members[0])
      else:  # DeepSeek-V3: the sum of the two highest (the max alone for a group of one expert)
        group_score.append(sum(members[:2]))
    groups = sorted(range(num_groups), key=lambda g: (-group_score[g], g))
    if num_groups > 1 and top_k_groups < num_groups:
      last_kept, first_dropped = groups[top_k_groups - 1], groups[top_k_groups]
      margin = min(margin, group_score[last_kept] - group_score[first_dropped])
    experts = [e for g in groups[:top_k_groups] for e in range(g * size, (g + 1) * size)]
    allowed[t, experts] = True
    order = sorted(experts, key=lambda e: (-select[e], e))
    if len(order) > top_k:
      margin = min(margin, select[order[top_k - 1]] - select[order[top_k]])
    if not valid[t]:
      continue
    chosen = order[:top_k]
    w = scores[chosen]
    if normalize and top_k > 1:
      w = w / w.sum()
    index[t], weight[t] = chosen, w * scaling
  return index, weight, probs, allowed, margin


def np_expert_choice(logits, capacity, group_size, valid=None):
  """Each expert of each group picks its C valid tokens of largest softmax score (ties: lower t).

  Returns (index [T, E] holding e or E, weight [T, E]).
  """
  logits = np.asarray(logits, np.float64)
  num_tokens, num_experts = logits.shape
  valid = np.ones(num_tokens, bool) if valid is None else np.asarray(valid)
  probs = np_softmax(logits)
  index = np.full((num_tokens, num_experts), num_experts, np.int64)
  weight = np.zeros((num_tokens, num_experts))
  for start in range(0, num_tokens, group_size):
    tokens = [t for t in range(start, start + group_size) if valid[t]]
    for e in range(num_experts):
      for t in sorted(tokens, key=lambda t: (-probs[t, e], t))[:capacity]:
        index[t, e], weight[t, e] = e, probs[t, e]
  return index, weight


def np_top_p(logits, threshold, max_experts=None, valid=None):
  """Experts in decreasing probability while the mass before them is < p; weights raw probs.

  Returns (list of selected expert lists per token ([] when invalid), probs, margin: the smallest
  |prefix mass - p| over all prefixes, to keep float rounding away from the threshold).
  """
  probs = np_softmax(logits)
  num_tokens, num_experts = probs.shape
  valid = np.ones(num_tokens, bool) if valid is None else np.asarray(valid)
  cap = num_experts if max_experts is None else max_experts
  selected, margin = [], np.inf
  for t in range(num_tokens):
    order = sorted(range(num_experts), key=lambda e: (-probs[t, e], e))
    chosen, mass = [], 0.0
    for e in order:
      if mass >= threshold or len(chosen) == cap:
        break
      chosen.append(e)
      mass += probs[t, e]
      margin = min(margin, abs(mass - threshold))
    selected.append(chosen if valid[t] else [])
  return selected, probs, margin


def np_l2n(x, axis):
  return x / np.sqrt(np.sum(x * x, axis=axis, keepdims=True))


def np_soft(x, phi, scale, valid):
  """Soft MoE dispatch (softmax over the group's valid tokens) and combine (softmax over slots)."""
  x, phi = np.asarray(x, np.float64), np.asarray(phi, np.float64)
  groups, group_tokens, _ = x.shape
  num_slots = phi.shape[1]
  dispatch_w = np.zeros((groups, group_tokens, num_slots))
  combine_w = np.zeros((groups, group_tokens, num_slots))
  for g in range(groups):
    if scale is None:
      logits = x[g] @ phi
    else:
      logits = scale * (np_l2n(x[g], -1) @ np_l2n(phi, 0))
    rows = [n for n in range(group_tokens) if valid[g, n]]
    for s in range(num_slots):
      z = np.exp(logits[rows, s] - logits[rows, s].max())
      dispatch_w[g, rows, s] = z / z.sum()
    for n in rows:
      combine_w[g, n] = np_softmax(logits[n])
  return dispatch_w, combine_w


def np_capacity_plan(expert_index, num_experts, capacity, priority=None):
  """Switch rule on tokens ranked by decreasing priority (ties by position): rank-0 choices first.

  Returns (slot [G, N, K], -1 when unassigned; kept [G, N, K]).
  """
  expert_index = np.asarray(expert_index)
  groups, group_tokens, top_k = expert_index.shape
  slot = np.full(expert_index.shape, -1, np.int64)
  kept = np.zeros(expert_index.shape, bool)
  for g in range(groups):
    if priority is None:
      order = list(range(group_tokens))
    else:
      order = sorted(range(group_tokens), key=lambda n: (-float(priority[g, n]), n))
    fill = [0] * num_experts
    for k in range(top_k):
      for n in order:
        e = expert_index[g, n, k]
        if e >= num_experts:
          continue
        slot[g, n, k] = fill[e]
        kept[g, n, k] = fill[e] < capacity
        fill[e] += 1
  return slot, kept


def np_counts(index, num_experts):
  """Assignments per expert (ids >= E count for nothing)."""
  counts = np.zeros(num_experts)
  for e in np.asarray(index).ravel():
    if e < num_experts:
      counts[e] += 1
  return counts


def np_switch_loss(index, probs, valid, num_experts):
  """E * sum_i f_i P_i; f_i = share of the assignments, P_i = mean prob over valid tokens."""
  counts = np_counts(index, num_experts)
  load = counts / max(counts.sum(), 1.0)
  mean_prob = np.asarray(probs, np.float64)[np.asarray(valid)].mean(axis=0)
  return num_experts * np.sum(load * mean_prob)


def np_cv2(values):
  values = np.asarray(values, np.float64)
  return values.var() / values.mean() ** 2


def canonical(index, weight):
  """Slots sorted by expert id per token, so that slot order within a token does not matter."""
  index, weight = np.asarray(index), np.asarray(weight, np.float64)
  order = np.argsort(index, axis=-1, kind="stable")
  return np.take_along_axis(index, order, -1), np.take_along_axis(weight, order, -1)


def assert_same_assignments(decision, ref_index, ref_weight):
  """Same expert set per token (exact) and the same weight for each (expert, token)."""
  index, weight = canonical(decision.expert_index, decision.combine_weight)
  ref_index, ref_weight = canonical(ref_index, ref_weight)
  np.testing.assert_array_equal(index, ref_index)
  np.testing.assert_allclose(weight, ref_weight, rtol=RTOL, atol=ATOL)


def moe_config(**overrides):
  """The tiny preset's `model.moe` config with overrides."""
  config = configs.default.get_config("tiny").model.moe
  for name, value in overrides.items():
    config[name] = value
  return config


def f32(x):
  return jnp.asarray(x, jnp.float32)


# ---------------------------------------------------------------------------------- token choice


@pytest.mark.parametrize("score_function", ["softmax", "sigmoid"])
@pytest.mark.parametrize("top_k,normalize,scaling", [
    (1, True, 1.0), (2, True, 1.0), (3, False, 1.0), (4, True, 2.5)])
def test_token_choice_matches_numpy(score_function, top_k, normalize, scaling):
  """Softmax/sigmoid top-k: experts, weights (renormalised for K>1, scaled), probs, padding."""
  rng = np.random.default_rng(10 + top_k)
  logits = rng.normal(size=(37, 12)) * 1.5
  valid = rng.random(37) > 0.2
  decision = token_choice_top_k(f32(logits), top_k, valid=jnp.asarray(valid), normalize=normalize,
                                score_function=score_function, scaling=scaling)
  index, weight, probs, _, margin = np_token_choice(logits, top_k, valid, normalize,
                                                    score_function, scaling=scaling)
  assert margin > 1e-5  # no near-ties at the selection boundary
  assert decision.expert_index.shape == (37, top_k) and decision.expert_index.dtype == jnp.int32
  assert_same_assignments(decision, index, weight)
  np.testing.assert_allclose(decision.router_probs, probs, rtol=RTOL, atol=ATOL)
  np.testing.assert_allclose(decision.router_logits, logits, rtol=RTOL, atol=ATOL)
  np.testing.assert_array_equal(decision.valid, valid)
  assert decision.noisy_logits is None


@pytest.mark.parametrize("score_function", ["softmax", "sigmoid"])
def test_selection_bias_steers_selection_not_weights(score_function):
  """The bias changes which experts are picked; weights stay the unbiased (renormalised) scores."""
  rng = np.random.default_rng(20)
  logits = rng.normal(size=(37, 6))
  bias = np.array([0.35, -0.2, 0.0, 0.15, -0.4, 0.05])
  top_k = 2
  decision = token_choice_top_k(f32(logits), top_k, score_function=score_function,
                                selection_bias=f32(bias))
  index, weight, probs, _, margin = np_token_choice(logits, top_k, score_function=score_function,
                                                    bias=bias)
  assert margin > 1e-5
  assert_same_assignments(decision, index, weight)
  np.testing.assert_allclose(decision.router_probs, probs, rtol=RTOL, atol=ATOL)
  # The bias really changed some selections compared with no bias.
  plain, _, _, _, _ = np_token_choice(logits, top_k, score_function=score_function)
  changed = [set(a) != set(b) for a, b in zip(index, plain)]
  assert sum(changed) >= 5
  # Weights are unbiased scores: raw ratio w_0 / w_1 equals score ratio, not biased-score ratio.
  scores = np_softmax(logits) if score_function == "softmax" else np_sigmoid(logits)
  got_index = np.asarray(decision.expert_index)
  got_weight = np.asarray(decision.combine_weight, np.float64)
  for t in range(37):
    s = scores[t, got_index[t]]
    np.testing.assert_allclose(got_weight[t], s / s.sum(), rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("score_function,num_experts,num_groups,top_k_groups,top_k,with_bias", [
    ("sigmoid", 12, 3, 2, 3, True),   # groups of 4, DeepSeek-V3 style
    ("softmax", 12, 6, 2, 3, False),  # groups of 2
    ("softmax", 6, 3, 1, 2, True),    # one group of 2 experts: K fills it
    ("sigmoid", 6, 6, 4, 3, False),   # groups of one expert: group score is the max itself
], ids=["sig-e12-g3", "soft-e12-g6", "soft-e6-g3-m1", "sig-e6-g6"])
def test_group_limited_routing(score_function, num_experts, num_groups, top_k_groups, top_k,
                               with_bias):
  """Every token's experts lie inside its top groups (top-2-sum group score); equals reference."""
  rng = np.random.default_rng(30 + num_groups)
  logits = rng.normal(size=(37, num_experts)) * 1.5
  valid = rng.random(37) > 0.15
  bias = rng.normal(size=num_experts) * 0.1 if with_bias else None
  decision = token_choice_top_k(
      f32(logits), top_k, valid=jnp.asarray(valid), score_function=score_function,
      selection_bias=None if bias is None else f32(bias), num_groups=num_groups,
      top_k_groups=top_k_groups)
  index, weight, _, allowed, margin = np_token_choice(
      logits, top_k, valid, score_function=score_function, bias=bias, num_groups=num_groups,
      top_k_groups=top_k_groups)
  assert margin > 1e-5
  assert_same_assignments(decision, index, weight)
  got = np.asarray(decision.expert_index)
  size = num_experts // num_groups
  for t in np.flatnonzero(valid):
    assert np.all(allowed[t, got[t]]), t
    assert len(set(got[t] // size)) <= top_k_groups
  # Group limiting mattered: some token's global top-k falls outside its top groups (groups of
  # one expert cannot change the top-k when top_k_groups >= K).
  unlimited, _, _, _, _ = np_token_choice(logits, top_k, valid, score_function=score_function,
                                          bias=bias)
  if size > 1:
    assert any(set(a) != set(b) for a, b in zip(index, unlimited))


@pytest.mark.parametrize("score_function,num_experts,num_groups,top_k_groups,top_k,with_bias", [
    ("softmax", 12, 3, 1, 2, False),  # groups of 4, one kept
    ("sigmoid", 12, 4, 2, 3, True),   # groups of 3, two kept, with a selection bias
    ("softmax", 8, 4, 2, 2, False),   # groups of 2
], ids=["soft-e12-g3-m1", "sig-e12-g4-bias", "soft-e8-g4"])
def test_group_limited_routing_max_group_score(score_function, num_experts, num_groups,
                                               top_k_groups, top_k, with_bias):
  """group_score="max" (DeepSeek-V2 device-limited routing): a group scores its best expert."""
  rng = np.random.default_rng(130 + num_groups)
  logits = rng.normal(size=(61, num_experts)) * 1.5
  valid = rng.random(61) > 0.15
  bias = rng.normal(size=num_experts) * 0.1 if with_bias else None
  kwargs = dict(score_function=score_function, num_groups=num_groups, top_k_groups=top_k_groups)
  decision = token_choice_top_k(f32(logits), top_k, valid=jnp.asarray(valid),
                                selection_bias=None if bias is None else f32(bias),
                                group_score="max", **kwargs)
  index, weight, _, allowed, margin = np_token_choice(logits, top_k, valid, bias=bias,
                                                      group_rule="max", **kwargs)
  assert margin > 1e-5
  assert_same_assignments(decision, index, weight)
  got = np.asarray(decision.expert_index)
  for t in np.flatnonzero(valid):
    assert np.all(allowed[t, got[t]]), t
  # The rule matters: V3's top-2 sum keeps other groups for some tokens.
  v3, _, _, _, _ = np_token_choice(logits, top_k, valid, bias=bias, **kwargs)
  assert any(set(a) != set(b) for a, b in zip(index, v3))
  # Through the config: route() passes config.group_score on.
  config = moe_config(num_experts=num_experts, top_k=top_k, score_function=score_function,
                      num_expert_groups=num_groups, top_k_groups=top_k_groups, group_score="max")
  routed = routing.route(config, f32(logits), jnp.asarray(valid),
                         selection_bias=None if bias is None else f32(bias))
  assert_same_assignments(routed, index, weight)
  with pytest.raises(ValueError, match="group_score"):
    token_choice_top_k(f32(logits), top_k, group_score="mean", **kwargs)


@pytest.mark.parametrize("score_function", ["softmax", "sigmoid"])
def test_top_1_keeps_raw_score_and_gradient(score_function):
  """K=1 (normalize=True): weight = the largest score, and its gradient wrt logits is nonzero."""
  rng = np.random.default_rng(40)
  logits = rng.normal(size=(37, 6))
  c = rng.normal(size=37)
  decision = token_choice_top_k(f32(logits), 1, score_function=score_function)
  scores = np_softmax(logits) if score_function == "softmax" else np_sigmoid(logits)
  np.testing.assert_allclose(decision.combine_weight[:, 0], scores.max(axis=-1), rtol=RTOL,
                             atol=ATOL)
  grad = jax.grad(lambda l: jnp.sum(token_choice_top_k(l, 1, score_function=score_function)
                                    .combine_weight[:, 0] * f32(c)))(f32(logits))
  grad = np.asarray(grad, np.float64)
  expected = np.zeros_like(logits)
  for t in range(37):
    j = int(np.argmax(scores[t]))
    if score_function == "softmax":
      expected[t] = c[t] * scores[t, j] * ((np.arange(6) == j) - scores[t])
    else:
      expected[t, j] = c[t] * scores[t, j] * (1.0 - scores[t, j])
  assert np.abs(grad).max() > 1e-3
  np.testing.assert_allclose(grad, expected, rtol=RTOL, atol=ATOL)


def test_noisy_logits_drive_scores_and_selection():
  """With noisy_logits, experts and weights come from the noisy scores; router_logits stay clean."""
  rng = np.random.default_rng(41)
  logits = rng.normal(size=(37, 6))
  noisy = logits + rng.normal(size=(37, 6)) * 0.7
  decision = token_choice_top_k(f32(logits), 2, noisy_logits=f32(noisy))
  index, weight, probs, _, margin = np_token_choice(noisy, 2)
  assert margin > 1e-5
  assert_same_assignments(decision, index, weight)
  np.testing.assert_allclose(decision.router_probs, probs, rtol=RTOL, atol=ATOL)
  np.testing.assert_allclose(decision.router_logits, logits, rtol=RTOL, atol=ATOL)
  np.testing.assert_allclose(decision.noisy_logits, noisy, rtol=RTOL, atol=ATOL)


def test_random_top_k_distinct_uniform():
  """Random routing: K distinct experts, weight 1/K, padding unassigned, shares within 3% of 1/E."""
  num_tokens, num_experts, top_k = 20000, 8, 2
  decision = random_top_k(jax.random.key(3), num_tokens, num_experts, top_k)
  index = np.asarray(decision.expert_index)
  assert index.shape == (num_tokens, top_k)
  assert np.all((index >= 0) & (index < num_experts))
  assert np.all(index[:, 0] != index[:, 1])
  np.testing.assert_array_equal(decision.combine_weight, 1.0 / top_k)
  share = np_counts(index, num_experts) / (num_tokens * top_k)
  np.testing.assert_allclose(share, 1.0 / num_experts, rtol=0.03)
  # Padding and metadata logits.
  rng = np.random.default_rng(42)
  valid = rng.random(37) > 0.3
  logits = rng.normal(size=(37, 6))
  small = random_top_k(jax.random.key(4), 37, 6, 3, valid=jnp.asarray(valid), logits=f32(logits))
  small_index = np.asarray(small.expert_index)
  assert np.all(small_index[~valid] == 6) and np.all(np.asarray(small.combine_weight)[~valid] == 0)
  assert all(len(set(row)) == 3 for row in small_index[valid])
  np.testing.assert_allclose(small.router_probs, np_softmax(logits), rtol=RTOL, atol=ATOL)
  # Deterministic per key.
  again = random_top_k(jax.random.key(3), num_tokens, num_experts, top_k)
  np.testing.assert_array_equal(again.expert_index, index)


def test_padding_is_unassigned_for_every_sparse_router():
  """valid=False tokens get only sentinel slots (index E) with weight exactly 0, for all routers."""
  rng = np.random.default_rng(43)
  num_experts = 6
  logits = f32(rng.normal(size=(39, num_experts)))
  valid = rng.random(39) > 0.3
  v = jnp.asarray(valid)
  decisions = {
      "token_choice": token_choice_top_k(logits, 2, valid=v),
      "sigmoid_groups": token_choice_top_k(logits, 2, valid=v, score_function="sigmoid",
                                           selection_bias=f32(rng.normal(size=6)), num_groups=3,
                                           top_k_groups=2, scaling=2.0),
      "expert_choice": expert_choice(logits, 4, 13, valid=v),
      "top_p": top_p(logits, 0.6, valid=v),
      "relu": relu_routing(logits, valid=v),
      "random": random_top_k(jax.random.key(0), 39, num_experts, 2, valid=v),
  }
  for name, decision in decisions.items():
    index = np.asarray(decision.expert_index)
    weight = np.asarray(decision.combine_weight)
    assert np.all(index[~valid] == num_experts), name
    assert np.all(weight[~valid] == 0.0), name
    assert np.all(weight[index == num_experts] == 0.0), name
    assert np.all((index >= 0) & (index <= num_experts)), name
    assert np.any(index[valid] < num_experts), name


# --------------------------------------------------------------------------------- expert choice


def test_expert_choice_matches_numpy():
  """3 groups of 13 tokens, E=5, C=4: chosen tokens and weights S[t, e]; exactly C per expert."""
  rng = np.random.default_rng(50)
  num_experts, group_size, capacity = 5, 13, 4
  logits = rng.normal(size=(3 * group_size, num_experts)) * 2.0
  decision = expert_choice(f32(logits), capacity, group_size)
  index, weight = np_expert_choice(logits, capacity, group_size)
  assert decision.expert_index.shape == (39, num_experts)
  np.testing.assert_array_equal(decision.expert_index, index)  # slot e holds e or E
  np.testing.assert_allclose(decision.combine_weight, weight, rtol=RTOL, atol=ATOL)
  np.testing.assert_allclose(decision.router_probs, np_softmax(logits), rtol=RTOL, atol=ATOL)
  chosen = np.asarray(decision.expert_index).reshape(3, group_size, num_experts) < num_experts
  np.testing.assert_array_equal(chosen.sum(axis=1), capacity)


def test_expert_choice_ties_prefer_lower_token_index():
  """Identical tokens in a group: every expert takes the first C tokens of the group."""
  rng = np.random.default_rng(51)
  row = rng.normal(size=(1, 5))
  logits = np.tile(row, (26, 1))
  decision = expert_choice(f32(logits), 3, 13)
  chosen = np.asarray(decision.expert_index).reshape(2, 13, 5) < 5
  expected = np.zeros((13, 5), bool)
  expected[:3] = True
  np.testing.assert_array_equal(chosen[0], expected)
  np.testing.assert_array_equal(chosen[1], expected)


def test_expert_choice_padding_never_chosen():
  """Padding is never chosen; each expert takes min(C, valid tokens in the group)."""
  rng = np.random.default_rng(52)
  num_experts, group_size, capacity = 5, 13, 4
  logits = rng.normal(size=(3 * group_size, num_experts)) * 2.0
  valid = np.ones(39, bool)
  valid[[2, 5, 6, 11]] = False                        # group 0: 9 valid
  valid[13:26] = False
  valid[[14, 20]] = True                               # group 1: 2 valid (< C)
  valid[[26, 30, 38]] = False                          # group 2: 10 valid
  # Padding gets the largest logits, so it would win without the mask.
  logits[~valid] += 10.0
  decision = expert_choice(f32(logits), capacity, group_size, valid=jnp.asarray(valid))
  index, weight = np_expert_choice(logits, capacity, group_size, valid)
  np.testing.assert_array_equal(decision.expert_index, index)
  np.testing.assert_allclose(decision.combine_weight, weight, rtol=RTOL, atol=ATOL)
  got = np.asarray(decision.expert_index)
  assert np.all(got[~valid] == num_experts)
  chosen = (got < num_experts).reshape(3, group_size, num_experts).sum(axis=1)
  per_group_valid = valid.reshape(3, group_size).sum(axis=1)
  np.testing.assert_array_equal(
      chosen, np.broadcast_to(np.minimum(capacity, per_group_valid)[:, None], chosen.shape))


def test_expert_choice_rejects_bad_sizes():
  """group_size not dividing T, and C outside [1, group_size], raise ValueError."""
  logits = jnp.ones((39, 5))
  with pytest.raises(ValueError, match="group_size"):
    expert_choice(logits, 2, 10)
  with pytest.raises(ValueError, match="capacity"):
    expert_choice(logits, 14, 13)
  with pytest.raises(ValueError, match="capacity"):
    expert_choice(logits, 0, 13)


# ------------------------------------------------------------------------------- top-p and ReLU


@pytest.mark.parametrize("threshold,max_experts", [(0.3, None), (0.55, None), (0.8, None),
                                                   (0.8, 3)])
def test_top_p_matches_numpy(threshold, max_experts):
  """Smallest prefix (by decreasing prob) reaching p, capped; weights = raw probs; minimality."""
  rng = np.random.default_rng(60)
  logits = rng.normal(size=(37, 12)) * 1.5
  valid = rng.random(37) > 0.2
  decision = top_p(f32(logits), threshold, max_experts=max_experts, valid=jnp.asarray(valid))
  selected, probs, margin = np_top_p(logits, threshold, max_experts, valid)
  assert margin > 1e-5
  cap = 12 if max_experts is None else max_experts
  assert decision.expert_index.shape == (37, cap)
  ref_index = np.full((37, cap), 12)
  ref_weight = np.zeros((37, cap))
  for t, chosen in enumerate(selected):
    ref_index[t, :len(chosen)] = chosen
    ref_weight[t, :len(chosen)] = probs[t, chosen]
  assert_same_assignments(decision, ref_index, ref_weight)
  np.testing.assert_allclose(decision.router_probs, probs, rtol=RTOL, atol=ATOL)
  # Properties, from the library's own output.
  got = np.asarray(decision.expert_index)
  counts = []
  for t in np.flatnonzero(valid):
    chosen = [e for e in got[t] if e < 12]
    counts.append(len(chosen))
    mass = probs[t, chosen].sum()
    others = [e for e in range(12) if e not in chosen]
    if others:
      assert probs[t, chosen].min() >= probs[t, others].max()  # a prefix by probability
    if len(chosen) < cap:
      assert mass >= threshold                                  # reaches p
    if len(chosen) > 1:
      assert mass - probs[t, chosen].min() < threshold          # minimal
  assert max(counts) <= cap
  if max_experts is None:
    assert len(set(counts)) > 1  # the number of experts really varies per token


def test_top_p_threshold_one_and_errors():
  """p=1 selects enough experts to reach 1 (up to rounding); p outside (0, 1] raises ValueError."""
  rng = np.random.default_rng(61)
  logits = rng.normal(size=(37, 6))
  decision = top_p(f32(logits), 1.0)
  probs = np_softmax(logits)
  got = np.asarray(decision.expert_index)
  for t in range(37):
    chosen = [e for e in got[t] if e < 6]
    assert len(set(chosen)) == len(chosen)
    assert probs[t, chosen].sum() >= 1.0 - 1e-6
  for bad in (0.0, 1.5, -0.1):
    with pytest.raises(ValueError, match="threshold"):
      top_p(f32(logits), bad)


def test_relu_routing_matches_numpy():
  """ReLU gates: slot e assigned iff relu(logit) > 0, weight = gate; probs = normalised gates."""
  rng = np.random.default_rng(62)
  logits = rng.normal(size=(37, 6)) - 0.3
  logits[4] = -np.abs(logits[4]) - 0.1  # a token with no active gate
  valid = rng.random(37) > 0.2
  valid[4] = True
  decision = relu_routing(f32(logits), valid=jnp.asarray(valid))
  gates = np.maximum(logits, 0.0)
  ref_index = np.where((gates > 0) & valid[:, None], np.arange(6), 6)
  ref_weight = np.where(ref_index < 6, gates, 0.0)
  np.testing.assert_array_equal(decision.expert_index, ref_index)
  np.testing.assert_allclose(decision.combine_weight, ref_weight, rtol=RTOL, atol=ATOL)
  ref_probs = np.zeros_like(gates)
  for t in range(37):
    total = gates[t].sum()
    ref_probs[t] = gates[t] / total if total > 0 else 1.0 / 6
  np.testing.assert_allclose(decision.router_probs, ref_probs, rtol=RTOL, atol=ATOL)
  assert np.all(np.asarray(decision.expert_index)[4] == 6)


# ------------------------------------------------------------------------------------- soft MoE


@pytest.mark.parametrize("scale", [None, 3.0])
def test_soft_weights_match_numpy(scale):
  """Dispatch = softmax over valid tokens, combine = softmax over slots; sums; padding rows 0."""
  rng = np.random.default_rng(70 if scale is None else 71)
  groups, group_tokens, d_model, num_slots = 3, 13, 10, 6
  x = rng.normal(size=(groups, group_tokens, d_model)) * (0.5 if scale is None else 2.0)
  phi = rng.normal(size=(d_model, num_slots)) * 0.4
  valid = rng.random((groups, group_tokens)) > 0.25
  dispatch_w, combine_w = soft_weights(f32(x), f32(phi), None if scale is None else f32(scale),
                                       valid=jnp.asarray(valid))
  ref_dispatch, ref_combine = np_soft(x, phi, scale, valid)
  np.testing.assert_allclose(dispatch_w, ref_dispatch, rtol=RTOL, atol=ATOL)
  np.testing.assert_allclose(combine_w, ref_combine, rtol=RTOL, atol=ATOL)
  dispatch_w, combine_w = np.asarray(dispatch_w), np.asarray(combine_w)
  np.testing.assert_allclose(dispatch_w.sum(axis=1), 1.0, atol=1e-6)  # each slot: convex mix
  np.testing.assert_allclose(combine_w.sum(axis=2)[valid], 1.0, atol=1e-6)
  assert np.all(dispatch_w[~valid] == 0.0) and np.all(combine_w[~valid] == 0.0)


def test_soft_weights_permutation_equivariant():
  """Permuting a group's tokens (and mask) permutes the rows of dispatch and combine alike."""
  rng = np.random.default_rng(72)
  x = rng.normal(size=(3, 13, 10))
  phi = rng.normal(size=(10, 6))
  valid = rng.random((3, 13)) > 0.25
  dispatch_w, combine_w = soft_weights(f32(x), f32(phi), f32(2.0), valid=jnp.asarray(valid))
  perms = np.stack([rng.permutation(13) for _ in range(3)])
  take = lambda a: np.take_along_axis(np.asarray(a), perms[..., None], axis=1)
  x_p = take(x)
  valid_p = np.take_along_axis(valid, perms, axis=1)
  dispatch_p, combine_p = soft_weights(f32(x_p), f32(phi), f32(2.0), valid=jnp.asarray(valid_p))
  np.testing.assert_allclose(dispatch_p, take(dispatch_w), rtol=RTOL, atol=ATOL)
  np.testing.assert_allclose(combine_p, take(combine_w), rtol=RTOL, atol=ATOL)


def test_soft_weights_all_padding_group_mixes_nothing():
  """A group with no valid token gets zero dispatch and combine weights, without NaN."""
  rng = np.random.default_rng(73)
  valid = np.ones((2, 13), bool)
  valid[1] = False
  dispatch_w, combine_w = soft_weights(f32(rng.normal(size=(2, 13, 10))),
                                       f32(rng.normal(size=(10, 6))), f32(1.0),
                                       valid=jnp.asarray(valid))
  assert np.all(np.isfinite(dispatch_w)) and np.all(np.isfinite(combine_w))
  assert np.all(np.asarray(dispatch_w)[1] == 0) and np.all(np.asarray(combine_w)[1] == 0)
  np.testing.assert_allclose(np.asarray(dispatch_w)[0].sum(axis=0), 1.0, atol=1e-6)


def test_soft_moe_layer_permutation_equivariant():
  """Soft MoE layer, groups = sequences: permuting positions in a sequence permutes its outputs."""
  config = moe_config(router="soft", soft_slots_per_expert=3, group_by="sequence")
  d_model = 16
  layer = MoELayer(config, d_model, rngs=nnx.Rngs(0))
  rng = np.random.default_rng(74)
  x = rng.normal(size=(2, 13, d_model)).astype(np.float32)
  y, _ = layer(jnp.asarray(x))
  perms = np.stack([rng.permutation(13) for _ in range(2)])
  take = lambda a: np.take_along_axis(np.asarray(a), perms[..., None], axis=1)
  y_p, _ = layer(jnp.asarray(take(x)))
  assert np.abs(np.asarray(y)).max() > 1e-3
  np.testing.assert_allclose(y_p, take(y), rtol=1e-5, atol=1e-5)
  # Not trivially equivariant: each output depends on the whole sequence.
  x2 = x.copy()
  x2[0, 0] += 1.0
  y2, _ = layer(jnp.asarray(x2))
  assert np.abs(np.asarray(y2)[0, 1:] - np.asarray(y)[0, 1:]).max() > 1e-6
  np.testing.assert_allclose(np.asarray(y2)[1], np.asarray(y)[1], rtol=1e-6, atol=1e-6)


# ------------------------------------------------------------------ batch-prioritized capacity


def test_capacity_plan_with_priority_matches_numpy():
  """BPR: tokens ranked by decreasing priority (ties by position), then the Switch rule."""
  rng = np.random.default_rng(80)
  groups, group_tokens, num_experts, top_k, capacity = 3, 13, 5, 2, 3
  logits = rng.normal(size=(groups * group_tokens, num_experts)) * 2.0
  logits[:, 0] += 1.0  # expert 0 overflows
  valid = rng.random(groups * group_tokens) > 0.15
  decision = token_choice_top_k(f32(logits), top_k, valid=jnp.asarray(valid))
  index = np.asarray(decision.expert_index).reshape(groups, group_tokens, top_k)
  priority = np.asarray(decision.router_probs).max(axis=-1).reshape(groups, group_tokens)
  priority[1, 3] = priority[1, 7]  # an exact tie: position breaks it
  plan = dispatch.capacity_plan(jnp.asarray(index), num_experts, capacity, jnp.asarray(priority))
  slot, kept = np_capacity_plan(index, num_experts, capacity, priority)
  np.testing.assert_array_equal(plan.kept, kept)
  assigned = index < num_experts
  np.testing.assert_array_equal(np.asarray(plan.slot)[assigned], slot[assigned])
  assert not kept.all() and kept.any()
  # Priority really changes the plan compared with position order.
  _, kept_position = np_capacity_plan(index, num_experts, capacity)
  assert np.any(kept_position != kept)
  # Property: no dropped choice outranks a kept one of the same expert and choice rank.
  for g in range(groups):
    for k in range(top_k):
      for e in range(num_experts):
        rows = index[g, :, k] == e
        dropped = priority[g][rows & ~kept[g, :, k]]
        kept_p = priority[g][rows & kept[g, :, k]]
        if len(dropped) and len(kept_p):
          assert dropped.max() <= kept_p.min()


@pytest.mark.parametrize("with_priority", [False, True])
def test_identical_tokens_overflow_by_position(with_priority):
  """N identical tokens all choosing expert 0 first, C=3: exactly the first 3 by position kept."""
  group_tokens = 11
  index = np.tile(np.array([[0, 2]]), (group_tokens, 1))[None].astype(np.int32)
  priority = jnp.full((1, group_tokens), 0.7) if with_priority else None
  plan = dispatch.capacity_plan(jnp.asarray(index), 4, 3, priority)
  kept = np.asarray(plan.kept)[0]
  np.testing.assert_array_equal(kept[:, 0], np.arange(group_tokens) < 3)
  np.testing.assert_array_equal(kept[:, 1], np.arange(group_tokens) < 3)
  np.testing.assert_array_equal(np.asarray(plan.slot)[0, :, 0], np.arange(group_tokens))


# ----------------------------------------------------------------------------------------- losses


def token_choice_decision(seed, num_tokens=37, num_experts=6, top_k=2, shift=None):
  """A softmax top-k decision on random logits with some padding."""
  rng = np.random.default_rng(seed)
  logits = rng.normal(size=(num_tokens, num_experts)) * 1.5
  if shift is not None:
    logits = logits + shift
  valid = rng.random(num_tokens) > 0.2
  return token_choice_top_k(f32(logits), top_k, valid=jnp.asarray(valid)), logits, valid


def test_switch_loss_matches_numpy():
  """E * sum f_i P_i over valid tokens, for top-k (K=2, E=6) and a variable-K (top-p) router."""
  decision, logits, valid = token_choice_decision(90)
  ref = np_switch_loss(decision.expert_index, np_softmax(logits), valid, 6)
  np.testing.assert_allclose(losses.switch_load_balance_loss(decision), ref, rtol=RTOL)
  dyn = top_p(f32(logits), 0.7, valid=jnp.asarray(valid))
  ref = np_switch_loss(dyn.expert_index, np_softmax(logits), valid, 6)
  np.testing.assert_allclose(losses.switch_load_balance_loss(dyn), ref, rtol=RTOL)
  np.testing.assert_allclose(losses.expert_load(dyn),
                             np_counts(dyn.expert_index, 6) / np_counts(dyn.expert_index, 6).sum(),
                             rtol=RTOL, atol=ATOL)


def test_switch_loss_is_one_when_uniform():
  """Exactly uniform load and uniform probabilities give a balance loss of exactly 1."""
  num_tokens, num_experts, top_k = 24, 6, 2
  index = np.array([[(2 * t) % num_experts, (2 * t + 1) % num_experts]
                    for t in range(num_tokens)], np.int32)
  decision = RoutingDecision(
      expert_index=jnp.asarray(index), combine_weight=jnp.full((num_tokens, top_k), 0.5),
      router_probs=jnp.full((num_tokens, num_experts), 1.0 / num_experts),
      router_logits=jnp.zeros((num_tokens, num_experts)), valid=jnp.ones((num_tokens,), bool))
  np.testing.assert_array_equal(np_counts(index, num_experts), 8)
  np.testing.assert_allclose(losses.switch_load_balance_loss(decision), 1.0, rtol=1e-6)
  segments = jnp.asarray(np.arange(num_tokens) // 6)  # each segment of 6 tokens is uniform too
  np.testing.assert_allclose(losses.switch_load_balance_loss(decision, segments, 4), 1.0,
                             rtol=1e-6)
  np.testing.assert_allclose(losses.importance_loss(decision), 0.0, atol=1e-7)


def skewed_segments():
  """Three micro-batches (13, 12, 12 tokens), segment m's tokens strongly prefer expert m."""
  rng = np.random.default_rng(91)
  segments = np.array([0] * 13 + [1] * 12 + [2] * 12)
  logits = rng.normal(size=(37, 6))
  logits[np.arange(37), segments] += 4.0
  valid = rng.random(37) > 0.15
  return logits, valid, segments


def np_micro_batch_loss(index, probs, valid, segments, num_segments, num_experts):
  """Mean over micro-batches of each micro-batch's E * sum f_i P_i."""
  return np.mean([np_switch_loss(index[segments == m], probs[segments == m],
                                 valid[segments == m], num_experts) for m in range(num_segments)])


def test_micro_batch_balance_loss():
  """Micro-batch loss = mean of per-segment losses; equals global with one segment, not with 3."""
  logits, valid, segments = skewed_segments()
  decision = token_choice_top_k(f32(logits), 2, valid=jnp.asarray(valid))
  index = np.asarray(decision.expert_index)
  probs = np_softmax(logits)
  global_loss = float(losses.switch_load_balance_loss(decision))
  one = float(losses.switch_load_balance_loss(decision, jnp.zeros((37,), jnp.int32), 1))
  np.testing.assert_allclose(one, global_loss, rtol=1e-6)
  np.testing.assert_allclose(global_loss, np_switch_loss(index, probs, valid, 6), rtol=RTOL)
  micro = float(losses.switch_load_balance_loss(decision, jnp.asarray(segments), 3))
  np.testing.assert_allclose(micro, np_micro_batch_loss(index, probs, valid, segments, 3, 6),
                             rtol=RTOL)
  # Each micro-batch is imbalanced, the global batch much less so.
  assert micro > 1.5 * global_loss


def np_switch_grad(logits, index, valid, num_experts, segments=None, num_segments=1):
  """d/dl of E mean_m sum_i f^m_i P^m_i, f fixed: E / (M T_m) p_tj (f_j - sum_i f_i p_ti)."""
  probs = np_softmax(logits)
  segments = np.zeros(len(logits), int) if segments is None else segments
  grad = np.zeros_like(probs)
  for m in range(num_segments):
    rows = segments == m
    counts = np_counts(index[rows], num_experts)
    load = counts / counts.sum()
    tokens = (rows & valid).sum()
    for t in np.flatnonzero(rows & valid):
      p = probs[t]
      grad[t] = num_experts / num_segments / tokens * p * (load - np.dot(load, p))
  return grad


@pytest.mark.parametrize("num_segments", [1, 3])
def test_switch_loss_gradient_only_through_mean_prob(num_segments):
  """jax.grad of the balance loss wrt logits equals the gradient of E sum f_i P_i with f fixed."""
  logits, valid, segments = skewed_segments()
  seg = jnp.asarray(segments) if num_segments > 1 else None

  def loss(l):
    return losses.switch_load_balance_loss(token_choice_top_k(l, 2, valid=jnp.asarray(valid)),
                                           seg, num_segments)

  grad = np.asarray(jax.grad(loss)(f32(logits)), np.float64)
  index = np.asarray(token_choice_top_k(f32(logits), 2, valid=jnp.asarray(valid)).expert_index)
  expected = np_switch_grad(logits, index, valid, 6, segments if num_segments > 1 else None,
                            num_segments)
  assert np.abs(expected).max() > 1e-3
  np.testing.assert_allclose(grad, expected, rtol=RTOL, atol=ATOL)
  assert np.all(grad[~valid] == 0.0)


def test_importance_loss_matches_numpy():
  """CV^2 (population variance) of the per-expert sums of probabilities over valid tokens."""
  decision, logits, valid = token_choice_decision(92, shift=np.array([1.0, 0, 0, -0.5, 0, 0.3]))
  importance = np_softmax(logits)[valid].sum(axis=0)
  np.testing.assert_allclose(losses.importance_loss(decision), np_cv2(importance), rtol=RTOL)


@pytest.mark.parametrize("top_k", [1, 2])
def test_noisy_load_loss_matches_numpy(top_k):
  """V-MoE load: CV^2 over experts of sum_x 1 - Phi((kth noisy logit - clean logit_i) / std)."""
  rng = np.random.default_rng(93 + top_k)
  std = 1.0 / 6
  logits = rng.normal(size=(37, 6)) * 0.5
  logits[:, 2] += 0.3
  noisy = logits + std * rng.normal(size=(37, 6))
  valid = rng.random(37) > 0.2
  decision = token_choice_top_k(f32(logits), top_k, valid=jnp.asarray(valid),
                                noisy_logits=f32(noisy))
  load = np.zeros(6)
  for t in np.flatnonzero(valid):
    threshold = sorted(noisy[t], reverse=True)[top_k - 1]
    for i in range(6):
      load[i] += 1.0 - np_phi((threshold - logits[t, i]) / std)
  np.testing.assert_allclose(losses.noisy_load_loss(decision, std, top_k), np_cv2(load),
                             rtol=RTOL, atol=ATOL)
  clean = token_choice_top_k(f32(logits), top_k, valid=jnp.asarray(valid))
  assert float(losses.noisy_load_loss(clean, std, top_k)) == 0.0


def np_softplus(x):
  x = np.asarray(x, np.float64)
  return np.log1p(np.exp(-np.abs(x))) + np.maximum(x, 0.0)


def learned_noise_layer(num_experts=6, top_k=2, d_model=10, seed=0, **overrides):
  """A token-choice MoELayer with learned noise and a random (non-zero) W_noise."""
  config = moe_config(num_experts=num_experts, top_k=top_k, router_noise="learned", **overrides)
  layer = MoELayer(config, d_model, rngs=nnx.Rngs(seed))
  rng = np.random.default_rng(120 + seed)
  layer.router.noise_kernel[...] = f32(rng.normal(size=(d_model, num_experts)) * 0.5)
  return layer


def test_learned_noise_matches_shazeer_eq4():
  """H(x)_i = (x W_g)_i + StandardNormal() * Softplus((x W_noise)_i), float64, the same draws;
  selection and weights come from H; evaluation (no rng) has no noise."""
  d_model, num_experts, num_tokens = 10, 6, 39
  layer = learned_noise_layer(num_experts, d_model=d_model)
  rng = np.random.default_rng(121)
  x = rng.normal(size=(num_tokens, d_model))
  valid = rng.random(num_tokens) > 0.2
  key = jax.random.key(7)
  decision = layer.route(f32(x), jnp.asarray(valid), num_tokens, rng=key)
  w_gate = np.asarray(layer.router.kernel[...], np.float64)
  w_noise = np.asarray(layer.router.noise_kernel[...], np.float64)
  normal = np.asarray(jax.random.normal(key, (num_tokens, num_experts), jnp.float32), np.float64)
  std = np_softplus(x @ w_noise)
  noisy = x @ w_gate + normal * std  # eq. 4
  assert std.std() > 0.1  # the std really varies per token and expert
  np.testing.assert_allclose(decision.router_logits, x @ w_gate, rtol=RTOL, atol=1e-5)
  np.testing.assert_allclose(decision.noise_std, std, rtol=RTOL, atol=1e-5)
  np.testing.assert_allclose(decision.noisy_logits, noisy, rtol=RTOL, atol=1e-5)
  index, weight, probs, _, margin = np_token_choice(noisy, 2, valid)
  assert margin > 1e-4
  assert_same_assignments(decision, index, weight)
  np.testing.assert_allclose(decision.router_probs, probs, rtol=RTOL, atol=1e-5)
  clean = layer.route(f32(x), jnp.asarray(valid), num_tokens)
  assert clean.noisy_logits is None and clean.noise_std is None
  # Zero-initialised W_noise (the paper's code): every std starts at Softplus(0) = log 2.
  fresh = MoELayer(moe_config(num_experts=num_experts, router_noise="learned"), d_model,
                   rngs=nnx.Rngs(0))
  assert np.all(np.asarray(fresh.router.noise_kernel[...]) == 0.0)
  np.testing.assert_allclose(fresh.route(f32(x), jnp.asarray(valid), num_tokens,
                                         rng=key).noise_std, math.log(2.0), rtol=1e-6)
  # The fixed default has no W_noise.
  assert MoELayer(moe_config(), d_model, rngs=nnx.Rngs(0)).router.noise_kernel is None


def test_learned_noise_kernel_gets_a_gradient():
  """W_noise is trained: through the noisy scores (the output) and through the load loss."""
  d_model, num_tokens = 10, 32
  layer = learned_noise_layer(6, d_model=d_model, noisy_load_loss_weight=0.1,
                              load_balance_loss_weight=0.0, router_z_loss_weight=0.0)
  x = f32(np.random.default_rng(122).normal(size=(2, num_tokens // 2, d_model)))
  graphdef, params, rest = nnx.split(layer, nnx.Param, ...)

  def grads(part):
    def f(p):
      y, aux = nnx.merge(graphdef, p, rest)(x, train=True, rng=jax.random.key(8))
      return jnp.sum(y ** 2) if part == "output" else aux["loss"]
    return jax.grad(f)(params)["router"]["noise_kernel"][...]

  for part in ("output", "loss"):
    g = np.asarray(grads(part))
    assert np.all(np.isfinite(g)) and np.abs(g).max() > 1e-4, part


@pytest.mark.parametrize("top_k", [1, 2])
def test_noisy_load_loss_learned_std_matches_shazeer(top_k):
  """Shazeer et al. 2017 eq. 8-10: P(x, i) = Phi(((x W_g)_i - kth_excluding(H(x), k, i)) /
  Softplus((x W_noise)_i)), Load_i = sum_x P(x, i), loss = CV(Load)^2 (float64 reference)."""
  rng = np.random.default_rng(123 + top_k)
  logits = rng.normal(size=(37, 6)) * 0.5
  std = np_softplus(rng.normal(size=(37, 6)) - 1.0)
  noisy = logits + std * rng.normal(size=(37, 6))
  valid = rng.random(37) > 0.2
  decision = token_choice_top_k(f32(logits), top_k, valid=jnp.asarray(valid),
                                noisy_logits=f32(noisy)).replace(noise_std=f32(std))
  load = np.zeros(6)
  for t in np.flatnonzero(valid):
    for i in range(6):
      others = sorted(np.delete(noisy[t], i), reverse=True)
      load[i] += np_phi((logits[t, i] - others[top_k - 1]) / std[t, i])
  got = losses.noisy_load_loss(decision, decision.noise_std, top_k, exclude_self=True)
  np.testing.assert_allclose(got, np_cv2(load), rtol=RTOL, atol=ATOL)
  # Not the V-MoE threshold (the K-th largest including i itself).
  vmoe = losses.noisy_load_loss(decision, decision.noise_std, top_k)
  assert abs(float(vmoe) - float(got)) > 1e-3
  # Wired in the layer: the learned variant uses the decision's std and kth_excluding.
  layer = learned_noise_layer(6, top_k=top_k, noisy_load_loss_weight=1.0)
  x = f32(rng.normal(size=(1, 37, 10)))
  key = jax.random.key(9)
  _, aux = layer(x, train=True, rng=key)
  routed = layer.route(x[0], jnp.ones((37,), bool), 37, rng=key)
  np.testing.assert_allclose(aux["noisy_load_loss"], losses.noisy_load_loss(
      routed, routed.noise_std, top_k, exclude_self=True), rtol=1e-6)
  assert float(layer(x)[1]["noisy_load_loss"]) == 0.0  # evaluation: no noise, no loss


def np_weighted_switch_loss(index, probs, valid, eta):
  """E' * sum_i eta_i f_i P_i (MoE++'s heterogeneous balance loss with this library's f, P)."""
  num_outputs = len(eta)
  counts = np_counts(index, num_outputs)
  load = counts / max(counts.sum(), 1.0)
  mean_prob = np.asarray(probs, np.float64)[np.asarray(valid)].mean(axis=0)
  return num_outputs * np.sum(np.asarray(eta) * load * mean_prob)


@pytest.mark.parametrize("tau", [0.0, 0.3, 1.0])
def test_zero_expert_balance_weight_matches_numpy(tau):
  """MoE++: eta_i = 1 for FFN (and null) experts, tau for zero/copy/constant; global and
  micro-batch scopes, and wired into MoELayer's load_balance_loss."""
  config = moe_config(num_experts=4, num_zero_experts=1, num_copy_experts=1,
                      num_constant_experts=1, zero_expert_balance_weight=tau)
  eta = np.array([1, 1, 1, 1, tau, tau, tau], np.float64)
  np.testing.assert_allclose(losses.zero_expert_balance_weights(7, (4, 7), tau), eta)
  logits, valid, segments = skewed_segments()
  logits = np.concatenate([logits[:, :4], logits[:, 4:] + 0.5, logits[:, :1]], axis=1)  # E' = 7
  decision = token_choice_top_k(f32(logits), 2, valid=jnp.asarray(valid))
  index, probs = np.asarray(decision.expert_index), np_softmax(logits)
  got = losses.switch_load_balance_loss(decision, expert_weight=f32(eta))
  np.testing.assert_allclose(got, np_weighted_switch_loss(index, probs, valid, eta), rtol=RTOL)
  micro = losses.switch_load_balance_loss(decision, jnp.asarray(segments), 3, f32(eta))
  ref = np.mean([np_weighted_switch_loss(index[segments == m], probs[segments == m],
                                         valid[segments == m], eta) for m in range(3)])
  np.testing.assert_allclose(micro, ref, rtol=RTOL)
  if tau == 1.0:  # the ordinary loss over all outputs
    np.testing.assert_allclose(got, losses.switch_load_balance_loss(decision), rtol=1e-6)
  # MoELayer._sparse_aux uses it (the layer's own routing, recomputed from its router).
  d_model = 10
  layer = MoELayer(config, d_model, rngs=nnx.Rngs(1))
  x = f32(np.random.default_rng(124).normal(size=(1, 37, d_model)))
  _, aux = layer(x)
  routed = layer.route(x[0], jnp.ones((37,), bool), 37)
  ref = np_weighted_switch_loss(routed.expert_index, routed.router_probs, np.ones(37, bool), eta)
  np.testing.assert_allclose(aux["load_balance_loss"], ref, rtol=RTOL)
  assert np.any(np.asarray(routed.expert_index) >= 4)  # zero-computation experts were picked


@pytest.mark.parametrize("overrides,problem", [
    ({"router_noise": "adaptive"}, "router_noise"),
    ({"router_noise": "learned", "router_noise_std": 0.1}, "router_noise='learned' needs"),
    ({"router_noise": "learned", "router": "relu"}, "router_noise='learned' needs"),
    ({"num_expert_groups": 2, "group_score": "mean"}, "group_score"),
    ({"num_zero_experts": 1, "zero_expert_balance_weight": -0.5}, "zero_expert_balance_weight"),
    ({"noisy_load_loss_weight": 0.01}, "noisy_load_loss_weight"),
    ({"router_noise": "learned", "noisy_load_loss_weight": 0.01}, None),
    ({"num_expert_groups": 2, "group_score": "max"}, None),
    ({"num_zero_experts": 1, "zero_expert_balance_weight": 0.5}, None),
])
def test_noise_group_score_and_tau_fields_are_validated(overrides, problem):
  from moe_jax.validation import ConfigError, validate_config
  config = configs.default.get_config("tiny")
  config.model.moe.update(overrides)
  if problem is None:
    validate_config(config, num_devices=1)
  else:
    with pytest.raises(ConfigError, match=problem):
      validate_config(config, num_devices=1)


def test_relu_l1_loss_and_gate_sparsity_match_numpy():
  """ReMoE: (1/T) sum_t sum_i f_i relu(l_ti), f_i = E/(K T) #active; sparsity = zero-gate share."""
  rng = np.random.default_rng(95)
  logits = rng.normal(size=(37, 6)) - 0.4
  logits[:, 1] += 1.0
  valid = rng.random(37) > 0.2
  decision = relu_routing(f32(logits), valid=jnp.asarray(valid))
  top_k = 2
  gates = np.maximum(logits, 0.0)[valid]
  tokens = len(gates)
  frequency = 6 / (top_k * tokens) * (gates > 0).sum(axis=0)
  ref = sum(frequency[i] * gates[t, i] for t in range(tokens) for i in range(6)) / tokens
  np.testing.assert_allclose(losses.relu_l1_loss(decision, top_k), ref, rtol=RTOL)
  np.testing.assert_allclose(losses.gate_sparsity(decision), (gates <= 0).mean(), rtol=RTOL)
  # f carries no gradient: d loss / d l_ti = f_i / T for active gates, 0 otherwise.
  grad = jax.grad(lambda l: losses.relu_l1_loss(relu_routing(l, valid=jnp.asarray(valid)),
                                                top_k))(f32(logits))
  expected = np.zeros((37, 6))
  expected[valid] = (gates > 0) * frequency / tokens
  np.testing.assert_allclose(grad, expected, rtol=RTOL, atol=ATOL)


def test_experts_per_token_and_expert_load():
  """FFN experts per valid token (extra experts and sentinel excluded); load = assignment share."""
  rng = np.random.default_rng(96)
  logits = rng.normal(size=(37, 8))
  valid = rng.random(37) > 0.2
  decision = relu_routing(f32(logits), valid=jnp.asarray(valid))  # E' = 8: 5 FFN + 3 extra
  index = np.asarray(decision.expert_index)
  ref = np.mean([(index[t] < 5).sum() for t in np.flatnonzero(valid)])
  np.testing.assert_allclose(losses.experts_per_token(decision, 5), ref, rtol=RTOL)
  counts = np_counts(index, 8)
  np.testing.assert_allclose(losses.expert_load(decision), counts / counts.sum(), rtol=RTOL,
                             atol=ATOL)
  np.testing.assert_allclose(losses.expert_counts(decision), counts)


# ----------------------------------------------------------------------------------- router state


def test_router_state_updates_match_numpy():
  """Bias += u sign(mean c - c) (0 at the mean); lambda *= alpha ** sign(target - sparsity)."""
  bias = np.array([0.1, -0.2, 0.0, 0.05, 0.3, -0.1])
  counts = np.array([10.0, 2.0, 6.0, 6.0, 9.0, 3.0])  # mean 6: experts 2, 3 unchanged
  new = router_state.loss_free_bias_update(f32(bias), f32(counts), 0.01)
  np.testing.assert_allclose(new, bias + 0.01 * np.sign(counts.mean() - counts), rtol=RTOL,
                             atol=1e-7)
  for sparsity, target, expected in ((0.5, 0.75, 1e-3 * 1.2), (0.9, 0.75, 1e-3 / 1.2),
                                     (0.75, 0.75, 1e-3)):
    coef = router_state.l1_coefficient_update(f32(1e-3), f32(sparsity), target, 1.2)
    np.testing.assert_allclose(coef, expected, rtol=RTOL)


@pytest.mark.parametrize("score_function,rate", [("sigmoid", 1e-2), ("softmax", 3e-3)])
def test_loss_free_bias_balances_skewed_router(score_function, rate):
  """300 sign updates of the bias on a router skewed to expert 0 bring max/mean load near 1.

  The step u must be small against the score gaps: softmax scores of the non-favoured experts are
  ~0.05, and with u=1e-2 the sign rule settles in a limit cycle at max/mean ~1.33 (not a bug).
  """
  rng = np.random.default_rng(100)
  num_tokens, num_experts, top_k = 512, 8, 2
  logits = rng.normal(size=(num_tokens, num_experts))
  logits[:, 0] += 3.0
  logits = f32(logits)

  @jax.jit
  def step(bias):
    decision = token_choice_top_k(logits, top_k, selection_bias=bias,
                                  score_function=score_function)
    counts = losses.expert_counts(decision)
    return router_state.loss_free_bias_update(bias, counts, rate), counts

  def imbalance(counts):
    counts = np.asarray(counts)
    return counts.max() / counts.mean()

  bias = jnp.zeros((num_experts,), jnp.float32)
  bias, start = step(bias)
  for _ in range(299):
    bias, _ = step(bias)
  end = step(bias)[1]
  assert imbalance(start) > 2.0
  assert imbalance(end) < 1.3, (imbalance(end), np.asarray(end))
  assert float(bias[0]) < 0  # the overloaded expert was pushed down


# ----------------------------------------------------------------------------------- zero experts


def test_zero_computation_experts_match_numpy():
  """Copy slot = w x; constant c = w (a1 x + a2 v_c), [a1,a2] = softmax(x W_c); zero/null = 0."""
  config = moe_config(num_experts=4, num_zero_experts=1, num_copy_experts=2,
                      num_constant_experts=3, num_null_experts=1)
  ranges = zero_experts.expert_ranges(config)
  assert ranges == {"zero": (4, 5), "copy": (5, 7), "constant": (7, 10), "null": (10, 11)}
  assert routing.num_router_outputs(config) == 11
  d_model = 10
  module = zero_experts.ZeroComputationExperts(config, d_model, rngs=nnx.Rngs(0))
  rng = np.random.default_rng(110)
  x = rng.normal(size=(7, d_model))
  index = np.array([[0, 4, 11], [5, 7, 2], [6, 9, 10], [8, 5, 11], [11, 11, 11], [9, 6, 7],
                    [3, 1, 10]], np.int32)
  weight = rng.random((7, 3)) + 0.1
  weight[index == 11] = 0.0
  out = module(f32(x), jnp.asarray(index), f32(weight))
  gate = np.asarray(module.constant_gate[...], np.float64)  # [C, D, 2]
  vector = np.asarray(module.constant_vector[...], np.float64)  # [C, D]
  ref = np.zeros((7, d_model))
  for t in range(7):
    for k in range(3):
      e, w = index[t, k], weight[t, k]
      if 5 <= e < 7:
        ref[t] += w * x[t]
      elif 7 <= e < 10:
        c = e - 7
        a = np_softmax(x[t] @ gate[c])
        ref[t] += w * (a[0] * x[t] + a[1] * vector[c])
  np.testing.assert_allclose(out, ref, rtol=RTOL, atol=ATOL)
  assert np.all(np.asarray(out)[[4, 6]] == 0.0)  # only zero/null/FFN/sentinel slots


def test_renormalize_over_ffn_experts_matches_numpy():
  """AdaMoE: FFN-slot weights rescaled to sum to 1; null and sentinel slots 0; no FFN -> all 0."""
  index = np.array([[0, 6, 2], [6, 6, 1], [6, 7, 7], [3, 1, 0]], np.int32)  # 6 FFN, null 6, E'=7
  weight = np.array([[0.5, 0.3, 0.2], [0.6, 0.1, 0.3], [0.9, 0.0, 0.0], [0.2, 0.2, 0.1]])
  out = zero_experts.renormalize_over_ffn_experts(jnp.asarray(index), f32(weight), 6)
  ref = np.zeros_like(weight)
  for t in range(4):
    ffn = index[t] < 6
    if weight[t, ffn].sum() > 0:
      ref[t, ffn] = weight[t, ffn] / weight[t, ffn].sum()
  np.testing.assert_allclose(out, ref, rtol=RTOL, atol=ATOL)


# ----------------------------------------------------------------------------------------- route


def test_route_dispatches_on_config_router():
  """route() gives the named router's decision with the config's options; unknown -> ValueError."""
  rng = np.random.default_rng(120)
  logits = f32(rng.normal(size=(26, 4)) * 1.5)
  valid = jnp.asarray(rng.random(26) > 0.2)
  bias = f32(rng.normal(size=4) * 0.1)

  def same(a, b):
    np.testing.assert_array_equal(a.expert_index, b.expert_index)
    np.testing.assert_allclose(a.combine_weight, b.combine_weight, rtol=RTOL, atol=ATOL)
    np.testing.assert_array_equal(a.valid, b.valid)

  config = moe_config(top_k=2, score_function="sigmoid", num_expert_groups=2, top_k_groups=1,
                      routed_scaling_factor=2.0)
  same(routing.route(config, logits, valid, selection_bias=bias),
       token_choice_top_k(logits, 2, valid=valid, score_function="sigmoid", selection_bias=bias,
                          num_groups=2, top_k_groups=1, scaling=2.0))
  config = moe_config(router="expert_choice", capacity_factor=1.5)
  decision = routing.route(config, logits, jnp.ones((26,), bool), group_size=13)
  same(decision, expert_choice(logits, 5, 13))  # C = ceil(1.5 * 13 / 4) = 5
  config = moe_config(router="top_p", top_p_threshold=0.6, max_experts_per_token=0)
  same(routing.route(config, logits, valid), top_p(logits, 0.6, valid=valid))
  config = moe_config(router="top_p", top_p_threshold=0.9, max_experts_per_token=2)
  same(routing.route(config, logits, valid), top_p(logits, 0.9, max_experts=2, valid=valid))
  config = moe_config(router="relu")
  same(routing.route(config, logits, valid), relu_routing(logits, valid=valid))
  config = moe_config(router="random", top_k=2)
  key = jax.random.key(5)
  same(routing.route(config, logits, valid, rng=key), random_top_k(key, 26, 4, 2, valid=valid))
  # Noisy top-k: noise only with an rng; selection from the noisy logits.
  config = moe_config(router_noise_std=0.5)
  assert routing.route(config, logits, valid).noisy_logits is None
  noisy = routing.route(config, logits, valid, rng=jax.random.key(6))
  assert noisy.noisy_logits is not None
  same(noisy, token_choice_top_k(logits, 2, valid=valid, noisy_logits=noisy.noisy_logits))
  assert np.abs(np.asarray(noisy.noisy_logits) - np.asarray(logits)).max() > 1e-2
  with pytest.raises(ValueError, match="expert_choice") as info:
    routing.route(moe_config(router="hash"), logits, valid)
  for name in ("token_choice", "top_p", "relu", "random", "soft", "hash"):
    assert name in str(info.value)
