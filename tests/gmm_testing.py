"""Float64 NumPy references and helpers shared by the grouped matmul tests."""

import jax.numpy as jnp
import numpy as np


def np_gmm(x, w, group_sizes):
  """[m, k] x [g, k, n] -> [m, n] in float64; rows past the last group are zero."""
  x, w = np.asarray(x, np.float64), np.asarray(w, np.float64)
  out = np.zeros((x.shape[0], w.shape[2]))
  start = 0
  for i, size in enumerate(group_sizes):
    out[start:start + size] = x[start:start + size] @ w[i]
    start += size
  return out


def np_tgmm(x, g, group_sizes):
  """[m, k], [m, n] -> [g, k, n] in float64, over each group's rows only."""
  x, g = np.asarray(x, np.float64), np.asarray(g, np.float64)
  out = np.zeros((len(group_sizes), x.shape[1], g.shape[1]))
  start = 0
  for i, size in enumerate(group_sizes):
    out[i] = x[start:start + size].T @ g[start:start + size]
    start += size
  return out


def f64(a):
  """`a` as a float64 NumPy array, through float32 (which holds bfloat16 exactly)."""
  return np.asarray(jnp.asarray(a, jnp.float32), np.float64)


def rel_err(actual, expected):
  """Relative Frobenius-norm error of `actual` against the float64 `expected`."""
  expected = np.asarray(expected, np.float64)
  return np.linalg.norm(f64(actual) - expected) / max(np.linalg.norm(expected), 1e-30)


def random_inputs(seed, m, k, n, g):
  """Standard-normal float32 `lhs` [m, k], `rhs` [g, k, n] and cotangent [m, n].

  Args:
    seed: an int seed, or a `np.random.Generator` to draw from (used as is).
    m, k, n, g: the problem's dimensions.
  """
  rng = np.random.default_rng(seed)
  return (rng.standard_normal((m, k), dtype=np.float32),
          rng.standard_normal((g, k, n), dtype=np.float32),
          rng.standard_normal((m, n), dtype=np.float32))


def assert_float32_gmm_and_grads(x, w, ct, group_sizes, out, d_x, d_w):
  """Checks a float32 gmm's output and VJP against the float64 references.

  Rows past `sum(group_sizes)` (of `out` and `d_x`) and the weight gradients
  of empty groups must be exactly zero, not merely small.

  Args:
    x, w, ct: the float32 `lhs` [m, k], `rhs` [g, k, n] and cotangent [m, n].
    group_sizes: the group sizes, a list of ints.
    out, d_x, d_w: gmm(x, w) and its `lhs` and `rhs` gradients for `ct`.
  """
  total = sum(group_sizes)
  assert out.shape == (x.shape[0], w.shape[2]) and d_x.shape == x.shape and d_w.shape == w.shape
  assert out.dtype == d_x.dtype == d_w.dtype == jnp.float32
  assert rel_err(out[:total], np_gmm(x, w, group_sizes)[:total]) < 1e-5
  assert rel_err(d_x[:total], np_gmm(ct, w.transpose(0, 2, 1), group_sizes)[:total]) < 1e-5
  assert rel_err(d_w, np_tgmm(x[:total], ct[:total], group_sizes)) < 1e-5
  assert np.all(np.asarray(out[total:]) == 0)
  assert np.all(np.asarray(d_x[total:]) == 0)
  for i in np.flatnonzero(np.asarray(group_sizes) == 0):
    assert np.all(np.asarray(d_w[i]) == 0), f"empty group {i} got a nonzero weight gradient"


def assert_float32_tgmm(x, g, group_sizes, out):
  """Checks a float32 tgmm(x, g) against the float64 reference; empty groups exactly zero."""
  total = sum(group_sizes)
  assert out.shape == (len(group_sizes), x.shape[1], g.shape[1]) and out.dtype == jnp.float32
  assert rel_err(out, np_tgmm(x[:total], g[:total], group_sizes)) < 1e-5
  empty = np.asarray(group_sizes) == 0
  assert np.all(np.asarray(out)[empty] == 0)


def assert_float32_loss_and_grads(x, w, ct, group_sizes, loss, d_x, d_w):
  """Checks `loss = sum(gmm(x, w) * ct)` and its gradients in `x` and `w` (float32)."""
  assert abs(float(loss) - np.sum(np_gmm(x, w, group_sizes) * ct)) < 1e-4 * np.abs(ct).sum()
  assert rel_err(d_x, np_gmm(ct, w.transpose(0, 2, 1), group_sizes)) < 1e-5
  assert rel_err(d_w, np_tgmm(x, ct, group_sizes)) < 1e-5
