"""bf16 training stays bf16: the traced grouped-matmul backward has bf16 operands, f32 accumulation.

The forward asks for a float32 result (`preferred_element_type=f32`), so its cotangent arrives in
float32. Before issue #12 the VJP multiplied that f32 cotangent with the bf16 weights, which
promoted both backward products to f32 and made an f32 copy of the weights. These tests read the
jaxpr of forward + backward (every sub-jaxpr: loops, conds, custom VJPs, Pallas kernels) and check
each dot's operand dtypes and every f32 conversion, then compare the bf16 results with a float64
NumPy reference at bf16 tolerance.
"""
import jax
import jax.extend as jex
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from gmm_testing import f64, np_gmm, np_tgmm, random_inputs, rel_err
import pallas_kernels
from moe_jax.experts import Experts, fuse_gate_up, split_gate_up

# (backend, interpret): every backend, the Pallas ones in interpret mode.
BACKENDS = [("blocked", False), ("xla", False), ("reference", False), ("gpu", True),
            ("tpu", True)]
IDS = [name for name, _ in BACKENDS]
# Awkward sizes: nothing is a multiple of a tile; an empty group; rows past the last group.
M, K, N, SIZES = 37, 24, 40, [9, 0, 14, 6]


def _subjaxprs(value):
  if isinstance(value, jex.core.ClosedJaxpr):
    yield value.jaxpr
  elif isinstance(value, jex.core.Jaxpr):
    yield value
  elif isinstance(value, (tuple, list)):
    for item in value:
      yield from _subjaxprs(item)


def all_eqns(jaxpr):
  """Every equation of `jaxpr` and of its sub-jaxprs, recursively."""
  for eqn in jaxpr.eqns:
    yield eqn
    for param in eqn.params.values():
      for sub in _subjaxprs(param):
        yield from all_eqns(sub)
    # Custom-VJP rules are stored as callables; the traced backward is already inlined by grad.


def dot_operand_dtypes(jaxpr):
  return [(tuple(str(v.aval.dtype) for v in eqn.invars[:2]),
           str(eqn.params.get("preferred_element_type")))
          for eqn in all_eqns(jaxpr) if eqn.primitive.name in ("dot_general", "ragged_dot_general")]


def f32_upcasts(jaxpr, shapes):
  """Shapes of bf16 -> f32 conversions of arrays whose shape is one of `shapes`."""
  found = []
  for eqn in all_eqns(jaxpr):
    if eqn.primitive.name == "convert_element_type":
      src, dst = eqn.invars[0].aval, eqn.outvars[0].aval
      if src.dtype == jnp.bfloat16 and dst.dtype == jnp.float32 and tuple(src.shape) in shapes:
        found.append(tuple(src.shape))
  return found


def weight_shapes(w):
  """A weight [G, K, N]'s shape, one group's [K, N] and their transposes."""
  g, k, n = w.shape
  return {(g, k, n), (g, n, k), (k, n), (n, k)}


def gmm_loss(backend, interpret, sizes):
  def loss(x, w, ct):
    out = pallas_kernels.gmm(x, w, sizes, preferred_element_type=jnp.float32, backend=backend,
                             interpret=interpret)
    return jnp.sum(out * ct)
  return loss


@pytest.mark.parametrize("backend,interpret", BACKENDS, ids=IDS)
def test_backward_traces_bf16_operands_and_no_f32_weight_copy(backend, interpret):
  x, w, ct = random_inputs(0, M, K, N, len(SIZES))
  x, w = jnp.asarray(x, jnp.bfloat16), jnp.asarray(w, jnp.bfloat16)
  sizes = jnp.asarray(SIZES, jnp.int32)
  grad_fn = jax.value_and_grad(gmm_loss(backend, interpret, sizes), argnums=(0, 1))
  jaxpr = jax.make_jaxpr(grad_fn)(x, w, jnp.asarray(ct)).jaxpr
  dots = dot_operand_dtypes(jaxpr)
  # Forward, d_lhs and d_rhs each run at least one product.
  assert len(dots) >= 3, dots
  for operands, accumulation in dots:
    assert operands == ("bfloat16", "bfloat16"), dots
    assert accumulation == "float32", dots
  assert f32_upcasts(jaxpr, weight_shapes(w)) == []


@pytest.mark.parametrize("backend,interpret", BACKENDS, ids=IDS)
def test_bf16_values_and_grads_match_float64(backend, interpret):
  rng = np.random.default_rng(3)
  x, w, ct = random_inputs(rng, M, K, N, len(SIZES))
  x, w = jnp.asarray(x, jnp.bfloat16), jnp.asarray(w, jnp.bfloat16)
  sizes = jnp.asarray(SIZES, jnp.int32)
  loss = gmm_loss(backend, interpret, sizes)
  out = pallas_kernels.gmm(x, w, sizes, preferred_element_type=jnp.float32, backend=backend,
                           interpret=interpret)
  d_x, d_w = jax.grad(loss, argnums=(0, 1))(x, w, jnp.asarray(ct))
  assert d_x.dtype == d_w.dtype == jnp.bfloat16
  assert rel_err(out, np_gmm(f64(x), f64(w), SIZES)) < 1e-5  # bf16 products are exact in f32
  # The reference sees the exact f32 cotangent; the kernels see it rounded to bf16.
  assert rel_err(d_x, np_gmm(ct, f64(w).transpose(0, 2, 1), SIZES)) < 1e-2
  assert rel_err(d_w, np_tgmm(f64(x), ct, SIZES)) < 1e-2
  np.testing.assert_array_equal(f64(d_w)[1], 0.0)  # the empty group
  np.testing.assert_array_equal(f64(d_x)[sum(SIZES):], 0.0)  # rows past the last group


def bf16_experts(activation="swiglu"):
  return Experts(5, 24, 20, activation=activation, rngs=nnx.Rngs(0), dtype=jnp.bfloat16,
                 param_dtype=jnp.bfloat16, gmm_backend="blocked")


@pytest.mark.parametrize("activation", ["swiglu", "gelu"])
def test_expert_ffn_backward_stays_bf16(activation):
  """The whole expert FFN (two grouped matmuls, the activation) traced with bf16 weights."""
  experts = bf16_experts(activation)
  graphdef, state = nnx.split(experts)
  sizes = jnp.asarray([7, 0, 11, 3, 9], jnp.int32)
  x = jax.random.normal(jax.random.key(1), (33, 24), jnp.bfloat16)

  def loss(state, x):
    return jnp.sum(nnx.merge(graphdef, state).grouped(x, sizes) ** 2)

  jaxpr = jax.make_jaxpr(jax.grad(loss, argnums=(0, 1)))(state, x).jaxpr
  weights = [p[...] for p in (experts.w_gate_up, experts.w_up, experts.w_down) if p is not None]
  shapes = set().union(*(weight_shapes(w) for w in weights))
  assert f32_upcasts(jaxpr, shapes) == []
  dots = dot_operand_dtypes(jaxpr)
  assert len(dots) >= 6 and all(ops == ("bfloat16", "bfloat16") for ops, _ in dots), dots


def test_expert_ffn_bf16_matches_float64():
  experts = bf16_experts()
  sizes = [7, 0, 11, 3, 9]
  x = jax.random.normal(jax.random.key(2), (33, 24), jnp.bfloat16)
  gate_up, w_down = f64(experts.w_gate_up[...]), f64(experts.w_down[...])
  xs = f64(x)
  gate, up = np_gmm(xs, gate_up[..., 0::2], sizes), np_gmm(xs, gate_up[..., 1::2], sizes)
  expected = np_gmm(gate / (1 + np.exp(-gate)) * up, w_down, sizes)
  actual = experts.grouped(x, jnp.asarray(sizes, jnp.int32))
  assert actual.dtype == jnp.float32
  assert rel_err(actual, expected) < 1e-2


def test_fused_gate_up_layout():
  """Columns interleave (2j gate, 2j+1 up): any even contiguous split holds whole pairs."""
  rng = np.random.default_rng(4)
  gate, up = (rng.normal(size=(3, 4, 6)).astype(np.float32) for _ in range(2))
  fused = np.asarray(fuse_gate_up(jnp.asarray(gate), jnp.asarray(up)))
  assert fused.shape == (3, 4, 12)
  np.testing.assert_array_equal(fused[..., 0::2], gate)
  np.testing.assert_array_equal(fused[..., 1::2], up)
  # Tensor parallelism over 3 shards of the fused axis: shard s holds gate/up columns 2s, 2s+1.
  for s, shard in enumerate(np.split(fused, 3, axis=-1)):
    g, u = split_gate_up(jnp.asarray(shard))
    np.testing.assert_array_equal(g, gate[..., 2 * s:2 * s + 2])
    np.testing.assert_array_equal(u, up[..., 2 * s:2 * s + 2])
