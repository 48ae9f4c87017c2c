"""The "gpu" grouped matmul (Pallas, Triton lowering) in interpret mode, against float64 NumPy."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gmm_testing import (assert_float32_gmm_and_grads, assert_float32_loss_and_grads,
                         assert_float32_tgmm, f64, np_gmm, np_tgmm, random_inputs, rel_err)
import pallas_kernels
from pallas_kernels.gmm import gpu
from pallas_kernels.gmm import metadata


def gmm_and_vjp(x, w, group_sizes, ct, **kwargs):
  """Forward, d_lhs and d_rhs of the public gmm on the interpreted "gpu" backend."""
  f = lambda a, b: pallas_kernels.gmm(a, b, group_sizes, backend="gpu", interpret=True, **kwargs)
  out, pullback = jax.vjp(f, x, w)
  return (out, *pullback(jnp.asarray(ct, out.dtype)))


# (m, k, n, group_sizes, tiling): no dimension is a multiple of its tile.
CASES = {
    "awkward": (45, 40, 72, [10, 0, 20, 5], (16, 16, 32)),
    "one_group_takes_all": (45, 40, 72, [0, 45, 0], (16, 16, 32)),
    # Most of lhs lies past sum(group_sizes); tiles that hold no group's row.
    "rows_past_end": (70, 24, 20, [3, 0, 9], (16, 16, 16)),
    # 12 groups, several inside one 16-row tile, empty ones on tile borders.
    "many_small_groups": (50, 20, 24, [0, 3, 1, 0, 7, 2, 5, 0, 9, 1, 6, 4], (16, 16, 16)),
    # Defaults clipped to the padded dims; k spans two k-steps, n two tiles.
    "default_tiles": (40, 70, 90, [15, 0, 17], None),
}


@pytest.mark.parametrize("case", list(CASES))
def test_forward_and_grads_float32(case):
  m, k, n, sizes, tiling = CASES[case]
  x, w, ct = random_inputs(list(CASES).index(case), m, k, n, len(sizes))
  total = sum(sizes)
  # Rows past the end must not leak into anything, even as NaN.
  x[total:] = np.nan

  out, d_x, d_w = gmm_and_vjp(x, w, jnp.asarray(sizes, jnp.int32), ct, tiling=tiling)
  assert_float32_gmm_and_grads(x, w, ct, sizes, out, d_x, d_w)


def test_bfloat16_and_per_pass_tiling():
  m, k, n, sizes = 45, 40, 72, [10, 0, 20, 5]
  rng = np.random.default_rng(10)
  x = jnp.asarray(rng.standard_normal((m, k)), jnp.bfloat16)
  w = jnp.asarray(rng.standard_normal((len(sizes), k, n)), jnp.bfloat16)
  ct = jnp.asarray(rng.standard_normal((m, n)), jnp.bfloat16)
  gs = jnp.asarray(sizes, jnp.int32)
  # A different tile shape per pass; "drhs" left to its default.
  tiling = {"fwd": (16, 32, 16), "dlhs": (32, 16, 64)}

  out, d_x, d_w = gmm_and_vjp(x, w, gs, ct, tiling=tiling)
  assert out.dtype == d_x.dtype == d_w.dtype == jnp.bfloat16
  # Inputs are exact in float64, so the only error is bf16 rounding of the outputs.
  assert rel_err(out, np_gmm(f64(x), f64(w), sizes)) < 1e-2
  assert rel_err(d_x, np_gmm(f64(ct), f64(w).transpose(0, 2, 1), sizes)) < 1e-2
  assert rel_err(d_w, np_tgmm(f64(x), f64(ct), sizes)) < 1e-2

  # bf16 products are exact in float32: a float32 result sees only float32 sums.
  out32 = pallas_kernels.gmm(x, w, gs, preferred_element_type=jnp.float32, backend="gpu",
                             tiling=tiling, interpret=True)
  assert out32.dtype == jnp.float32
  assert rel_err(out32, np_gmm(f64(x), f64(w), sizes)) < 1e-5


def test_tgmm_ignores_nan_and_inf_past_the_end():
  m, k, n = 60, 20, 24
  sizes = [0, 3, 1, 0, 7, 2, 5, 0, 9, 1, 6]
  rng = np.random.default_rng(11)
  x = rng.standard_normal((m, k), dtype=np.float32)
  g = rng.standard_normal((m, n), dtype=np.float32)
  total = sum(sizes)
  x[total:], g[total:] = np.nan, np.inf
  out = pallas_kernels.tgmm(x, g, jnp.asarray(sizes, jnp.int32), backend="gpu",
                            tiling=(16, 16, 16), interpret=True)
  assert_float32_tgmm(x, g, sizes, out)


def test_jit_with_traced_group_sizes():
  m, k, n, g = 45, 24, 20, 4
  x, w, ct = random_inputs(12, m, k, n, g)

  @jax.jit
  def loss_and_grads(x, w, gs):
    loss = lambda x, w: jnp.sum(pallas_kernels.gmm(
        x, w, gs, backend="gpu", tiling=(16, 16, 16), interpret=True) * ct)
    return jax.value_and_grad(loss, argnums=(0, 1))(x, w)

  # One compilation serves group sizes that move the boundaries across tiles.
  for sizes in ([11, 0, 30, 4], [0, 2, 0, 40], [45, 0, 0, 0]):
    loss, (d_x, d_w) = loss_and_grads(x, w, jnp.asarray(sizes, jnp.int32))
    assert_float32_loss_and_grads(x, w, ct, sizes, loss, d_x, d_w)
  assert loss_and_grads._cache_size() == 1


@pytest.mark.parametrize("sizes", [[10, 0, 20, 5], [0, 0, 16, 0, 16], [3, 1, 0, 1, 40], [0, 0]])
def test_tile_group_ranges(sizes):
  num_rows, tile = 48, 16
  first, last = metadata.tile_group_ranges(jnp.asarray(sizes, jnp.int32), num_rows, tile)
  bounds = np.cumsum([0] + sizes)
  for t in range(num_rows // tile):
    rows = range(t * tile, (t + 1) * tile)
    owners = {i for i in range(len(sizes)) for r in rows if bounds[i] <= r < bounds[i + 1]}
    covered = set(range(int(first[t]), int(last[t])))
    assert owners <= covered, f"tile {t}: groups {owners} not all in {covered}"
    # Anything extra is an empty group, which costs no k-step.
    assert all(sizes[i] == 0 for i in covered - owners)


def test_pass_tiles_and_defaults():
  assert gpu.pass_tiles(None, "fwd", jnp.bfloat16) == gpu.DEFAULT_TILES_16BIT["fwd"]
  assert gpu.pass_tiles(None, "drhs", jnp.float32) == gpu.DEFAULT_TILES_32BIT["drhs"]
  assert gpu.pass_tiles((32, 16, 64), "dlhs", jnp.float32) == (32, 16, 64)
  per_pass = gpu.normalize_tiling({"drhs": (16, 32, 64)})
  hash(per_pass)  # A static argument of the custom VJP.
  assert gpu.pass_tiles(per_pass, "drhs", jnp.float32) == (16, 32, 64)
  assert gpu.pass_tiles(per_pass, "fwd", jnp.float32) == gpu.DEFAULT_TILES_32BIT["fwd"]


@pytest.mark.parametrize("tiling", [(16, 16), (24, 16, 16), (8, 16, 16), (16, 16, 16.0),
                                    {"bwd": (16, 16, 16)}, {"fwd": (16, 48, 16)}])
def test_bad_tiling_raises(tiling):
  x, w = np.ones((8, 4), np.float32), np.ones((3, 4, 5), np.float32)
  with pytest.raises(ValueError, match="tiling"):
    pallas_kernels.gmm(x, w, np.array([2, 3, 3], np.int32), backend="gpu", tiling=tiling,
                       interpret=True)


def test_interpret_flag_reaches_the_kernel():
  # Without interpret mode the Triton kernel cannot run on a CPU: that it
  # fails shows the flag is not dropped on the way to `pallas_call`.
  assert jax.default_backend() == "cpu"
  x, w = np.ones((8, 4), np.float32), np.ones((3, 4, 5), np.float32)
  gs = np.array([2, 3, 3], np.int32)
  np.testing.assert_array_equal(
      pallas_kernels.gmm(x, w, gs, backend="gpu", interpret=True), np.full((8, 5), 4.0))
  with pytest.raises(Exception, match="(?i)cpu|gpu|cuda|lower"):
    pallas_kernels.gmm(x, w, gs, backend="gpu")


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
def test_lowers_to_triton_for_cuda(dtype):
  # Lowering for "cuda" runs the real Pallas-to-Triton lowering (not the
  # interpreter) on this CPU-only host, at the default tiles: it catches
  # operations, shapes and tile sizes that Triton cannot take.
  m, k, n, g = 300, 256, 384, 6

  def fwd_and_vjp(x, w, gs, ct):
    out, pullback = jax.vjp(lambda a, b: pallas_kernels.gmm(a, b, gs, backend="gpu"), x, w)
    return out, *pullback(ct)

  args = (jax.ShapeDtypeStruct((m, k), dtype), jax.ShapeDtypeStruct((g, k, n), dtype),
          jax.ShapeDtypeStruct((g,), jnp.int32), jax.ShapeDtypeStruct((m, n), dtype))
  lowered = jax.jit(fwd_and_vjp).trace(*args).lower(lowering_platforms=("cuda",))
  kernels = re.findall(r"custom_call @([\w$.]*triton[\w$.]*)\(", lowered.as_text())
  assert len(kernels) == 3, kernels  # gmm, the d_lhs gmm and tgmm.
