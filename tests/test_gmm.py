"""Grouped matmul (pallas_kernels.gmm / tgmm) against a float64 NumPy reference."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gmm_testing import (assert_float32_gmm_and_grads, assert_float32_loss_and_grads,
                         assert_float32_tgmm, f64, np_gmm, np_tgmm, random_inputs, rel_err)
import pallas_kernels
from pallas_kernels.gmm import ops

# (backend, tiling); the blocked tilings cover a single tile size and several
# levels, down to 1-row tiles.
BACKEND_CASES = [
    ("reference", None),
    ("xla", None),
    ("blocked", None),
    ("blocked", 8),
    ("blocked", (16, 4, 1)),
]
BACKEND_IDS = [f"{b}-{t}" for b, t in BACKEND_CASES]

# (m, k, n, group_sizes): nothing is a multiple of a tile.
SHAPE_CASES = {
    "awkward": (37, 19, 23, [10, 0, 20, 5]),
    "one_group_takes_all": (37, 19, 23, [0, 37, 0]),
    "rows_past_end": (50, 19, 23, [3, 0, 7]),
    "many_small_groups": (120, 11, 13, [0, 4, 1, 0, 7, 2, 3, 0, 5, 1, 6, 0, 2, 3, 1, 4, 0,
                                        2, 8, 1, 0, 3, 2, 5, 0, 1, 4, 2, 0, 3, 1, 6, 2]),
    "multi_level_tiles": (300, 19, 23, [130, 0, 1, 97, 60]),
}


def gmm_and_vjp(x, w, group_sizes, ct, **kwargs):
  out, pullback = jax.vjp(lambda a, b: pallas_kernels.gmm(a, b, group_sizes, **kwargs), x, w)
  return (out, *pullback(jnp.asarray(ct, out.dtype)))


@pytest.mark.parametrize("backend,tiling", BACKEND_CASES, ids=BACKEND_IDS)
@pytest.mark.parametrize("case", list(SHAPE_CASES))
def test_gmm_forward_and_grads_float32(case, backend, tiling):
  m, k, n, sizes = SHAPE_CASES[case]
  rng = np.random.default_rng(list(SHAPE_CASES).index(case))
  x, w, ct = random_inputs(rng, m, k, n, len(sizes))
  total = sum(sizes)
  # Rows past the end are ignored even when they hold NaN.
  x[total:] = np.nan
  out, d_x, d_w = gmm_and_vjp(x, w, jnp.asarray(sizes, jnp.int32), ct, backend=backend,
                              tiling=tiling)
  assert_float32_gmm_and_grads(x, w, ct, sizes, out, d_x, d_w)


@pytest.mark.parametrize("backend,tiling", BACKEND_CASES, ids=BACKEND_IDS)
def test_gmm_bfloat16(backend, tiling):
  m, k, n, sizes = SHAPE_CASES["awkward"]
  rng = np.random.default_rng(1)
  x, w, ct = random_inputs(rng, m, k, n, len(sizes))
  x, w = jnp.asarray(x, jnp.bfloat16), jnp.asarray(w, jnp.bfloat16)
  gs = jnp.asarray(sizes, jnp.int32)
  ref_out = np_gmm(f64(x), f64(w), sizes)

  out, d_x, d_w = gmm_and_vjp(x, w, gs, ct, backend=backend, tiling=tiling)
  assert out.dtype == d_x.dtype == d_w.dtype == jnp.bfloat16
  assert rel_err(out, ref_out) < 1e-2
  ct_bf16 = f64(jnp.asarray(ct, jnp.bfloat16))
  assert rel_err(d_x, np_gmm(ct_bf16, f64(w).transpose(0, 2, 1), sizes)) < 1e-2
  assert rel_err(d_w, np_tgmm(f64(x), ct_bf16, sizes)) < 1e-2

  # bf16 products are exact in float32, so a float32 result only sees float32 sums.
  out32 = pallas_kernels.gmm(x, w, gs, preferred_element_type=jnp.float32, backend=backend,
                             tiling=tiling)
  assert out32.dtype == jnp.float32
  assert rel_err(out32, ref_out) < 1e-5


@pytest.mark.parametrize("backend,tiling", BACKEND_CASES, ids=BACKEND_IDS)
def test_tgmm(backend, tiling):
  m, k, n, sizes = SHAPE_CASES["many_small_groups"]
  rng = np.random.default_rng(2)
  x, _, g = random_inputs(rng, m, k, n, len(sizes))
  total = sum(sizes)
  x[total:], g[total:] = np.nan, np.inf
  out = pallas_kernels.tgmm(x, g, jnp.asarray(sizes, jnp.int32), backend=backend, tiling=tiling)
  assert 0 in sizes
  assert_float32_tgmm(x, g, sizes, out)


@pytest.mark.parametrize("backend", ["xla", "blocked"])
def test_jit_with_traced_group_sizes(backend):
  m, k, n, g = 45, 9, 7, 4
  rng = np.random.default_rng(3)
  x, w, ct = random_inputs(rng, m, k, n, g)

  @jax.jit
  def loss_and_grads(x, w, gs):
    loss = lambda x, w: jnp.sum(pallas_kernels.gmm(x, w, gs, backend=backend) * ct)
    return jax.value_and_grad(loss, argnums=(0, 1))(x, w)

  for sizes in ([11, 0, 30, 4], [0, 2, 0, 40]):
    loss, (d_x, d_w) = loss_and_grads(x, w, jnp.asarray(sizes, jnp.int32))
    assert_float32_loss_and_grads(x, w, ct, sizes, loss, d_x, d_w)


def test_blocked_default_tiles_at_moderate_size():
  m, k, n, g = 1000, 32, 24, 6
  rng = np.random.default_rng(4)
  x, w, _ = random_inputs(rng, m, k, n, g)
  sizes = jnp.asarray([300, 0, 513, 64, 1, 100], jnp.int32)
  blocked = pallas_kernels.gmm(x, w, sizes, backend="blocked")
  assert rel_err(blocked, np_gmm(x, w, np.asarray(sizes))) < 1e-5


def test_empty_inputs():
  w = np.ones((3, 4, 5), np.float32)
  out = pallas_kernels.gmm(np.ones((0, 4), np.float32), w, jnp.zeros(3, jnp.int32))
  assert out.shape == (0, 5)
  out = pallas_kernels.tgmm(np.ones((6, 4), np.float32), np.ones((6, 5), np.float32),
                            jnp.zeros(0, jnp.int32))
  assert out.shape == (0, 4, 5)


def test_auto_backend_is_blocked_on_cpu():
  assert jax.default_backend() == "cpu"
  assert ops.resolve_backend("auto") == "blocked"
  assert {"auto", "blocked", "xla", "reference", "gpu"} <= set(pallas_kernels.BACKENDS)


@pytest.mark.parametrize("platform", ["gpu", "tpu", "rocm"])
def test_auto_backend_never_picks_an_unverified_kernel(platform, monkeypatch):
  """Until a Pallas kernel is checked on real hardware, "auto" takes XLA's ragged_dot there."""
  monkeypatch.setattr(ops.jax, "default_backend", lambda: platform)
  chosen = ops.resolve_backend("auto")
  assert chosen == "xla"
  assert chosen in ops.verified_backends(platform) or platform not in ops.VERIFICATION
  for name, status in ops.VERIFICATION.get(platform, ()):
    if name in ("gpu", "tpu"):
      assert status.startswith("NOT verified"), (platform, name, status)
  assert ops.resolve_backend(platform if platform != "rocm" else "xla") != "auto"


_X = np.ones((8, 4), np.float32)
_W = np.ones((3, 4, 5), np.float32)
_GS = np.array([2, 3, 3], np.int32)


@pytest.mark.parametrize("kwargs,argument", [
    (dict(lhs=_X[None]), "lhs"),
    (dict(lhs=_X.astype(np.int32)), "lhs"),
    (dict(rhs=_W[0]), "rhs"),
    (dict(rhs=np.ones((3, 6, 5), np.float32)), "k"),
    (dict(group_sizes=_GS.astype(np.float32)), "group_sizes"),
    (dict(group_sizes=_GS[None]), "group_sizes"),
    (dict(group_sizes=_GS[:2]), "group_sizes"),
    (dict(backend="cuda"), "backend"),
    (dict(backend="blocked", tiling=(4, 8)), "tiling"),
    (dict(backend="blocked", tiling=0), "tiling"),
    (dict(preferred_element_type=jnp.int32), "preferred_element_type"),
])
def test_gmm_bad_inputs_raise(kwargs, argument):
  args = dict(lhs=_X, rhs=_W, group_sizes=_GS)
  args.update(kwargs)
  with pytest.raises(ValueError, match=argument):
    pallas_kernels.gmm(args.pop("lhs"), args.pop("rhs"), args.pop("group_sizes"), **args)


@pytest.mark.parametrize("grad,group_sizes,argument", [
    (np.ones((7, 5), np.float32), _GS, "grad"),
    (np.ones((8,), np.float32), _GS, "grad"),
    (np.ones((8, 5), np.float32), _GS.astype(np.float32), "group_sizes"),
])
def test_tgmm_bad_inputs_raise(grad, group_sizes, argument):
  with pytest.raises(ValueError, match=argument):
    pallas_kernels.tgmm(_X, grad, group_sizes)
