"""Routers (`moe_jax.routing`) and dispatch (`moe_jax.dispatch`) against float64 NumPy references.

The references below are written from the papers' equations (Shazeer et al. 2017; GShard 2020;
Switch Transformer 2021; MegaBlocks 2022), loop over tokens, and share no code with the library.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moe_jax import dispatch
from moe_jax import routing

# ------------------------------------------------------------------------------------ references


def np_softmax(logits):
  """Row softmax in float64."""
  logits = np.asarray(logits, np.float64)
  z = np.exp(logits - logits.max(axis=-1, keepdims=True))
  return z / z.sum(axis=-1, keepdims=True)


def np_top_k(logits, top_k, valid=None, normalize=True):
  """Per-token top-k of the float64 softmax; ties go to the lower expert index.

  Returns (index [T, K] with E for invalid tokens, weight [T, K] with 0 for invalid tokens).
  """
  probs = np_softmax(logits)
  num_tokens, num_experts = probs.shape
  valid = np.ones(num_tokens, bool) if valid is None else np.asarray(valid)
  index = np.full((num_tokens, top_k), num_experts, np.int64)
  weight = np.zeros((num_tokens, top_k))
  for t in range(num_tokens):
    if not valid[t]:
      continue
    # Sort by (-prob, expert): equal probabilities keep the lower index first.
    order = sorted(range(num_experts), key=lambda e: (-probs[t, e], e))[:top_k]
    w = probs[t, order]
    if normalize and top_k > 1:  # Switch: a single choice keeps its raw probability
      w = w / w.sum()
    index[t], weight[t] = order, w
  return index, weight


def np_capacity_plan(expert_index, num_experts, capacity):
  """Switch/GShard priority: per group, rank-0 choices in token order, then rank 1, ...

  Returns (slot [G, N, K], kept [G, N, K]); slot is -1 for unassigned choices.
  """
  expert_index = np.asarray(expert_index)
  groups, group_tokens, top_k = expert_index.shape
  slot = np.full(expert_index.shape, -1, np.int64)
  kept = np.zeros(expert_index.shape, bool)
  for g in range(groups):
    fill = np.zeros(num_experts, np.int64)
    for k in range(top_k):
      for n in range(group_tokens):
        e = expert_index[g, n, k]
        if e == num_experts:
          continue
        slot[g, n, k] = fill[e]
        kept[g, n, k] = fill[e] < capacity
        fill[e] += 1
  return slot, kept


def random_index(rng, shape, num_experts, unassigned_fraction=0.0, hot_fraction=0.0):
  """Distinct experts per token (as a router gives), some tokens unassigned (index E).

  A `hot_fraction` of the tokens put expert 0 first, so that it overflows.
  """
  *lead, top_k = shape
  flat = int(np.prod(lead))
  rows = []
  for _ in range(flat):
    perm = list(rng.permutation(num_experts))
    if rng.random() < hot_fraction:
      perm = [0] + [e for e in perm if e != 0]
    rows.append(perm[:top_k])
  index = np.array(rows)
  drop = rng.random(flat) < unassigned_fraction
  index[drop] = num_experts
  return index.reshape(shape).astype(np.int32)


def rel_err(actual, expected):
  actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
  return np.linalg.norm(actual - expected) / max(np.linalg.norm(expected), 1e-30)


# --------------------------------------------------------------------------------------- routing


@pytest.mark.parametrize("top_k", [1, 2, 3])
@pytest.mark.parametrize("normalize", [True, False])
def test_top_k_matches_numpy(top_k, normalize):
  """Experts are the per-token top-k of the softmax; weights renormalised or raw; probs f32."""
  rng = np.random.default_rng(top_k)
  logits = rng.normal(size=(37, 7)) * 2.0
  valid = rng.random(37) > 0.2
  decision = routing.token_choice_top_k(jnp.asarray(logits, jnp.float32), top_k,
                                        valid=jnp.asarray(valid), normalize=normalize)
  index, weight = np_top_k(logits, top_k, valid, normalize)
  np.testing.assert_array_equal(decision.expert_index, index)
  assert decision.expert_index.dtype == jnp.int32
  assert rel_err(decision.combine_weight, weight) < 1e-5
  assert rel_err(decision.router_probs, np_softmax(logits)) < 1e-5
  assert decision.router_probs.dtype == jnp.float32
  np.testing.assert_array_equal(decision.valid, valid)
  # Unassigned tokens: sentinel E everywhere and exactly zero weight.
  assert np.all(np.asarray(decision.expert_index)[~valid] == 7)
  assert np.all(np.asarray(decision.combine_weight)[~valid] == 0.0)


@pytest.mark.parametrize("top_k", [1, 2, 3])
def test_top_k_ties_go_to_lower_index(top_k):
  """Exactly tied probabilities (integer logits) pick the lower expert index, deterministically."""
  rng = np.random.default_rng(7)
  logits = rng.integers(0, 3, size=(37, 5)).astype(np.float64)
  decision = routing.token_choice_top_k(jnp.asarray(logits, jnp.float32), top_k)
  index, weight = np_top_k(logits, top_k)
  np.testing.assert_array_equal(decision.expert_index, index)
  assert rel_err(decision.combine_weight, weight) < 1e-6
  # Recomputing (as remat does) routes identically.
  again = routing.token_choice_top_k(jnp.asarray(logits, jnp.float32), top_k)
  np.testing.assert_array_equal(decision.expert_index, again.expert_index)


def test_top_k_rejects_bad_k():
  """K outside [1, E] raises a ValueError that names top_k."""
  logits = jnp.ones((4, 3))
  for bad in (0, 4):
    with pytest.raises(ValueError, match="top_k"):
      routing.token_choice_top_k(logits, bad)


def test_top_1_unnormalised_router_gradient_matches_softmax_jacobian():
  """Switch top-1: d(sum_t c_t w_t)/d logits is the softmax Jacobian row of the chosen expert."""
  rng = np.random.default_rng(1)
  logits = rng.normal(size=(37, 5))
  c = rng.normal(size=(37,))

  def objective(l):
    decision = routing.token_choice_top_k(l, 1, normalize=False)
    return jnp.sum(decision.combine_weight[:, 0] * c)

  grad = np.asarray(jax.grad(objective)(jnp.asarray(logits, jnp.float32)))
  probs = np_softmax(logits)
  chosen = probs.argmax(axis=-1)
  expected = np.zeros_like(logits)
  for t in range(37):
    j = chosen[t]
    # d p_j / d l_i = p_j (delta_ij - p_i).
    expected[t] = c[t] * probs[t, j] * ((np.arange(5) == j) - probs[t])
  assert np.abs(grad).max() > 1e-3
  assert rel_err(grad, expected) < 1e-5


def test_top_1_default_router_still_gets_gradient():
  """Top-1 with the default settings (normalize=True) still passes a task gradient to the router."""
  rng = np.random.default_rng(2)
  logits = jnp.asarray(rng.normal(size=(37, 5)), jnp.float32)
  c = jnp.asarray(rng.normal(size=(37,)), jnp.float32)
  grad = jax.grad(lambda l: jnp.sum(routing.token_choice_top_k(l, 1).combine_weight[:, 0] * c))(
      logits)
  assert np.abs(np.asarray(grad)).max() > 1e-3


def test_bf16_router_picks_experts_of_float32_logits():
  """A bf16 Router computes logits in f32: near-ties that bf16 rounding would merge are resolved.

  Expert 1's kernel column equals expert 0's plus one bf16 step in one coordinate, so expert 1 has
  the larger logit for every token by less than a bf16 ulp of the logit. The f64 reference (same
  bf16 values) picks expert 1 everywhere; a bf16 dot would tie and pick expert 0.
  """
  rng = np.random.default_rng(3)
  num_tokens, d_model = 37, 19
  x = jnp.asarray(rng.normal(size=(num_tokens, d_model)), jnp.bfloat16)
  x = x.at[:, 4].set(jnp.abs(x[:, 4]) + 0.25)
  router = routing.Router(d_model, 2, rngs=nnx.Rngs(0), param_dtype=jnp.bfloat16)
  kernel = np.array(router.kernel[...].astype(jnp.float32))
  kernel[:, 1] = kernel[:, 0]
  kernel[4, 0], kernel[4, 1] = 0.5, 0.5 + 2.0 ** -8  # both exact in bf16
  router.kernel[...] = jnp.asarray(kernel, jnp.bfloat16)
  assert np.array_equal(np.asarray(router.kernel[...].astype(jnp.float32)), kernel)

  # Precondition that makes the test discriminating: bf16 arithmetic ties on some tokens.
  bf16_logits = np.asarray(jnp.dot(x, router.kernel[...]).astype(jnp.float32))
  assert np.sum(bf16_logits[:, 0] == bf16_logits[:, 1]) > 0

  logits = router(x)
  assert logits.dtype == jnp.float32
  ref_logits = np.asarray(x, np.float64) @ kernel.astype(np.float64)
  assert rel_err(logits, ref_logits) < 1e-6
  decision = routing.token_choice_top_k(logits, 1)
  ref_index, _ = np_top_k(ref_logits, 1)
  np.testing.assert_array_equal(decision.expert_index, ref_index)
  assert np.all(ref_index[:, 0] == 1)
  # bf16 logits handed straight to the router function route like their f32 values.
  bf16_in = jnp.asarray(rng.normal(size=(37, 5)), jnp.bfloat16)
  decision_bf16 = routing.token_choice_top_k(bf16_in, 2)
  index, weight = np_top_k(np.asarray(bf16_in, np.float64), 2)
  np.testing.assert_array_equal(decision_bf16.expert_index, index)
  assert decision_bf16.combine_weight.dtype == jnp.float32
  assert rel_err(decision_bf16.combine_weight, weight) < 1e-5


# -------------------------------------------------------------------------------------- capacity


@pytest.mark.parametrize("group_tokens,num_experts,top_k,factor,expected", [
    (37, 5, 2, 1.25, 19),  # 1.25 * 74 / 5 = 18.5 -> 19
    (10, 4, 1, 1.0, 3),  # 2.5 -> 3
    (8, 4, 1, 1.0, 2),  # exact
    (37, 7, 3, 2.0, 32),  # 222 / 7 = 31.71 -> 32
    (3, 8, 1, 0.5, 1),  # 0.1875 -> 1
    (1, 64, 1, 0.01, 1),  # never below one slot
    (100, 10, 1, 1.1, 11),  # 1.1 * 100 / 10 is 11.000000000000002 in floating point: still 11
])
def test_expert_capacity_formula(group_tokens, num_experts, top_k, factor, expected):
  """C = ceil(cf * N * K / E), at least 1 (GShard Alg. 1), on hand-computed cases."""
  assert dispatch.expert_capacity(group_tokens, num_experts, top_k, factor) == expected


@pytest.mark.parametrize("factor", [0.0, -1.0, None])
def test_expert_capacity_rejects_bad_factor(factor):
  """A non-positive or missing capacity factor raises ValueError naming capacity_factor."""
  with pytest.raises(ValueError, match="capacity_factor"):
    dispatch.expert_capacity(8, 4, 1, factor)


@pytest.mark.parametrize("top_k,capacity", [(1, 3), (2, 5), (3, 4)])
def test_capacity_plan_matches_switch_priority(top_k, capacity):
  """Slots follow the rank-major, token-order priority within each group; slot >= C is dropped."""
  rng = np.random.default_rng(10 + top_k)
  num_experts = 5 if top_k < 3 else 7
  # Skewed routing so that expert 0 overflows.
  index = random_index(rng, (3, 37, top_k), num_experts, unassigned_fraction=0.15,
                       hot_fraction=0.4)
  plan = dispatch.capacity_plan(jnp.asarray(index), num_experts, capacity)
  slot, kept = np_capacity_plan(index, num_experts, capacity)
  assigned = index < num_experts
  assert plan.capacity == capacity
  np.testing.assert_array_equal(np.asarray(plan.kept), kept)
  np.testing.assert_array_equal(np.asarray(plan.slot)[assigned], slot[assigned])
  assert kept.sum() < assigned.sum()  # the case really drops something


def test_identical_tokens_overflow_exactly_capacity():
  """N identical top-1 tokens pick one expert: exactly C = ceil(cf*N*K/E) = 10 kept, the first."""
  num_tokens, num_experts, factor = 37, 4, 1.0
  capacity = dispatch.expert_capacity(num_tokens, num_experts, 1, factor)
  assert capacity == 10  # ceil(37 / 4)
  logits = np.tile(np.random.default_rng(4).normal(size=(1, num_experts)), (num_tokens, 1))
  decision = routing.token_choice_top_k(jnp.asarray(logits, jnp.float32), 1)
  index = decision.expert_index.reshape(1, num_tokens, 1)
  assert len(np.unique(np.asarray(index))) == 1
  plan = dispatch.capacity_plan(index, num_experts, capacity)
  kept = np.asarray(plan.kept)[0, :, 0]
  assert kept.sum() == 10
  assert kept[:10].all() and not kept[10:].any()
  np.testing.assert_array_equal(np.asarray(plan.slot)[0, :, 0], np.arange(num_tokens))


@pytest.mark.parametrize("top_k", [1, 2])
def test_dense_capacity_tensors_match_index_path(top_k):
  """Index path (scatter/gather) == dense GShard einsums == NumPy tensors built from the plan."""
  rng = np.random.default_rng(20 + top_k)
  groups, group_tokens, num_experts, d_model, capacity = 3, 13, 5, 19, 4
  index = random_index(rng, (groups, group_tokens, top_k), num_experts, unassigned_fraction=0.2)
  weight = rng.random(index.shape) * (index < num_experts)
  x = rng.normal(size=(groups, group_tokens, d_model))
  y_buffers = rng.normal(size=(num_experts, groups, capacity, d_model))

  index_j = jnp.asarray(index)
  plan = dispatch.capacity_plan(index_j, num_experts, capacity)
  buffers = dispatch.capacity_dispatch(jnp.asarray(x, jnp.float32), index_j, plan, num_experts)
  combined = dispatch.capacity_combine(jnp.asarray(y_buffers, jnp.float32), index_j,
                                       jnp.asarray(weight, jnp.float32), plan)
  dispatch_t, combine_t = dispatch.dense_capacity_tensors(index_j, jnp.asarray(weight, jnp.float32),
                                                          plan, num_experts)

  slot, kept = np_capacity_plan(index, num_experts, capacity)
  ref_dispatch = np.zeros((groups, group_tokens, num_experts, capacity), bool)
  ref_combine = np.zeros((groups, group_tokens, num_experts, capacity))
  ref_buffers = np.zeros((num_experts, groups, capacity, d_model))
  ref_out = np.zeros((groups, group_tokens, d_model))
  for g in range(groups):
    for n in range(group_tokens):
      for k in range(top_k):
        if kept[g, n, k]:
          e, c = index[g, n, k], slot[g, n, k]
          ref_dispatch[g, n, e, c] = True
          ref_combine[g, n, e, c] = weight[g, n, k]
          ref_buffers[e, g, c] = x[g, n]
          ref_out[g, n] += weight[g, n, k] * y_buffers[e, g, c]

  assert dispatch_t.dtype == jnp.bool_
  np.testing.assert_array_equal(np.asarray(dispatch_t), ref_dispatch)
  assert rel_err(combine_t, ref_combine) < 1e-6
  assert rel_err(buffers, ref_buffers) < 1e-6
  assert combined.dtype == jnp.float32
  assert rel_err(combined, ref_out) < 1e-5
  # The dense einsum path gives the index path's outputs.
  dense_buffers = jnp.einsum("gnec,gnd->egcd", dispatch_t.astype(jnp.float32), x)
  dense_out = jnp.einsum("gnec,egcd->gnd", combine_t, y_buffers)
  assert rel_err(buffers, dense_buffers) < 1e-6
  assert rel_err(combined, dense_out) < 1e-5
  # Each kept slot is used by exactly one assignment; no slot >= C is ever written.
  assert np.asarray(dispatch_t).sum(axis=(0, 1)).max() <= groups


# -------------------------------------------------------------------------------------- dropless


@pytest.mark.parametrize("top_k", [1, 2, 3])
def test_dropless_round_trip_with_identity_experts(top_k):
  """Sort by expert, identity experts, unsort: token t gets sum_k w_k x_t (0 if unassigned)."""
  rng = np.random.default_rng(30 + top_k)
  num_tokens, num_experts, d_model = 37, 7, 19
  index = random_index(rng, (num_tokens, top_k), num_experts, unassigned_fraction=0.2)
  index[:, 0] = np.where(index[:, 0] == 3, 4, index[:, 0])  # expert 3 only via later ranks
  weight = rng.random(index.shape) * (index < num_experts)
  x = rng.normal(size=(num_tokens, d_model))

  plan = dispatch.dropless_plan(jnp.asarray(index), num_experts)
  x_sorted = dispatch.dropless_dispatch(jnp.asarray(x, jnp.float32), plan, top_k)
  y = dispatch.dropless_combine(x_sorted, plan, jnp.asarray(weight, jnp.float32))

  expected = (weight[:, :, None] * x[:, None, :]).sum(axis=1)
  assert y.dtype == jnp.float32 and y.shape == (num_tokens, d_model)
  assert rel_err(y, expected) < 1e-6
  np.testing.assert_array_equal(np.asarray(y)[(index == num_experts).all(axis=1)], 0.0)

  # Group sizes are the per-expert assignment counts; the sentinel is not counted.
  sizes = np.bincount(index[index < num_experts], minlength=num_experts)
  np.testing.assert_array_equal(np.asarray(plan.group_sizes), sizes)
  # Sorted rows: expert 0's tokens in token order, then expert 1's, ...; unassigned rows last.
  expected_rows = [t for e in range(num_experts) for t in range(num_tokens)
                   for k in range(top_k) if index[t, k] == e]
  order = np.asarray(plan.order)
  np.testing.assert_array_equal(order[:sizes.sum()] // top_k, expected_rows)
  assert np.all(index.reshape(-1)[order[sizes.sum():]] == num_experts)
  np.testing.assert_array_equal(np.sort(order), np.arange(num_tokens * top_k))


def test_dropless_unassigned_rows_contribute_nothing():
  """Huge values in the sorted rows past sum(group_sizes) (unassigned choices) reach no token."""
  rng = np.random.default_rng(40)
  num_tokens, num_experts, top_k, d_model = 37, 5, 2, 19
  index = random_index(rng, (num_tokens, top_k), num_experts, unassigned_fraction=0.3)
  weight = np.where(index < num_experts, rng.random(index.shape), 0.0)
  plan = dispatch.dropless_plan(jnp.asarray(index), num_experts)
  total = int(np.sum(index < num_experts))
  y_sorted = rng.normal(size=(num_tokens * top_k, d_model))
  y_sorted[total:] = 1e6
  y = dispatch.dropless_combine(jnp.asarray(y_sorted, jnp.float32), plan,
                                jnp.asarray(weight, jnp.float32))
  order = np.asarray(plan.order)
  expected = np.zeros((num_tokens, d_model))
  for p in range(total):
    t, k = divmod(order[p], top_k)
    expected[t] += weight[t, k] * y_sorted[p]
  assert rel_err(y, expected) < 1e-5
  assert np.abs(np.asarray(y)).max() < 1e3
