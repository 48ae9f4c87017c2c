"""The "tpu" gmm backend (Pallas Mosaic kernels) in TPU interpret mode, against float64 NumPy.

`interpret=True` runs the kernels under `pltpu.InterpretParams()`, which fills
never-written memory with NaN: an output block a kernel forgets to store
shows up as NaN here rather than as a lucky zero.

Tiles are tiny, far below Mosaic's (8, 128) block rule (interpret mode has
none), so that small problems span many row, k and n tiles. The lowering
tests at the end instead lower the compiled kernels (interpret=False) for TPU
on this CPU host, at legal tiles, down to their Mosaic custom calls.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gmm_testing import (assert_float32_gmm_and_grads, assert_float32_loss_and_grads,
                         assert_float32_tgmm, f64, np_gmm, np_tgmm, random_inputs, rel_err)
import pallas_kernels
from pallas_kernels.gmm import metadata
from pallas_kernels.gmm import tpu

TILES = (16, 16, 32)

# (m, k, n, group_sizes, tiling): no dimension is a multiple of its tile.
CASES = {
    # Rows 27..44 belong to no group (the last row tile holds none of the
    # groups' rows); group 1 is empty; groups share row tiles.
    "awkward": (45, 40, 72, [10, 0, 12, 5], TILES),
    "one_group_takes_all": (45, 40, 72, [0, 45, 0], TILES),
    "all_groups_empty": (20, 12, 24, [0, 0, 0], TILES),
    # 11 groups, several per 8-row tile, empties at the start, middle and end.
    "many_small_groups": (40, 24, 40, [0, 3, 1, 0, 7, 2, 5, 0, 4, 1, 0], (8, 16, 32)),
    # A different (tm, tk, tn) for each pass, so each pass cuts differently.
    "per_pass_tiling": (45, 40, 72, [10, 0, 20, 5],
                        {"fwd": (16, 16, 32), "dlhs": (8, 32, 16), "drhs": (32, 8, 24)}),
}


def gmm_and_vjp(x, w, group_sizes, ct, **kwargs):
  out, pullback = jax.vjp(
      lambda a, b: pallas_kernels.gmm(a, b, group_sizes, backend="tpu", interpret=True, **kwargs),
      x, w)
  return (out, *pullback(jnp.asarray(ct, out.dtype)))


@pytest.mark.parametrize("case", list(CASES))
def test_forward_and_grads_float32(case):
  m, k, n, sizes, tiling = CASES[case]
  x, w, ct = random_inputs(list(CASES).index(case), m, k, n, len(sizes))
  total = sum(sizes)
  x[total:] = np.nan  # Rows past the last group must be ignored, even NaN ones.
  out, d_x, d_w = gmm_and_vjp(x, w, jnp.asarray(sizes, jnp.int32), ct, tiling=tiling)
  assert_float32_gmm_and_grads(x, w, ct, sizes, out, d_x, d_w)


def test_bfloat16():
  m, k, n, sizes, tiling = CASES["awkward"]
  x, w, ct = random_inputs(10, m, k, n, len(sizes))
  x, w = jnp.asarray(x, jnp.bfloat16), jnp.asarray(w, jnp.bfloat16)
  gs = jnp.asarray(sizes, jnp.int32)
  ref_out = np_gmm(f64(x), f64(w), sizes)

  out, d_x, d_w = gmm_and_vjp(x, w, gs, ct, tiling=tiling)
  assert out.dtype == d_x.dtype == d_w.dtype == jnp.bfloat16
  assert rel_err(out, ref_out) < 1e-2
  ct_bf16 = f64(jnp.asarray(ct, jnp.bfloat16))
  assert rel_err(d_x, np_gmm(ct_bf16, f64(w).transpose(0, 2, 1), sizes)) < 1e-2
  assert rel_err(d_w, np_tgmm(f64(x), ct_bf16, sizes)) < 1e-2
  assert np.all(f64(d_w[1]) == 0)

  # bf16 products are exact in float32, so a float32 result sees only float32 sums.
  out32 = pallas_kernels.gmm(x, w, gs, preferred_element_type=jnp.float32, tiling=tiling,
                             backend="tpu", interpret=True)
  assert out32.dtype == jnp.float32
  assert rel_err(out32, ref_out) < 1e-5


def test_tgmm_ignores_nan_and_inf_past_the_end():
  m, k, n, sizes, tiling = CASES["many_small_groups"]
  x, _, g = random_inputs(11, m, k, n, len(sizes))
  total = sum(sizes)
  x[total:], g[total:] = np.nan, np.inf
  out = pallas_kernels.tgmm(x, g, jnp.asarray(sizes, jnp.int32), tiling=tiling, backend="tpu",
                            interpret=True)
  assert_float32_tgmm(x, g, sizes, out)


def test_default_tiling_and_jit_with_traced_group_sizes():
  """Default tiles (each covers its small dimension); one compilation, two schedules."""
  m, k, n, g = 45, 9, 7, 4
  x, w, ct = random_inputs(12, m, k, n, g)
  traces = []

  @jax.jit
  def loss_and_grads(x, w, gs):
    traces.append(None)
    loss = lambda x, w: jnp.sum(
        pallas_kernels.gmm(x, w, gs, backend="tpu", interpret=True) * ct)
    return jax.value_and_grad(loss, argnums=(0, 1))(x, w)

  for sizes in ([11, 0, 30, 4], [0, 2, 0, 40]):
    loss, (d_x, d_w) = loss_and_grads(x, w, jnp.asarray(sizes, jnp.int32))
    assert_float32_loss_and_grads(x, w, ct, sizes, loss, d_x, d_w)
  assert len(traces) == 1


def brute_force_visits(sizes, num_rows, tm, visit_empty_groups, visit_tail):
  """The (group, tile) visit list, by enumerating rows."""
  num_tiles = -(-num_rows // tm)
  visits, start = [], 0
  for i, size in enumerate(sizes):
    end = min(start + size, num_rows)
    if end > start:
      visits += [(i, t) for t in range(start // tm, (end - 1) // tm + 1)]
    elif visit_empty_groups:
      visits.append((i, min(start // tm, num_tiles - 1)))
    start = end
  if visit_tail:
    visits += [(len(sizes) - 1, t) for t in range(-(-start // tm), num_tiles)]
  return visits


@pytest.mark.parametrize("flags", [(False, True), (True, False)],
                         ids=["gmm_tail", "tgmm_empty_groups"])
def test_tile_visits_matches_brute_force(flags):
  rng = np.random.default_rng(13)
  for trial in range(20):
    # Few distinct shapes: each new one compiles the metadata ops again.
    num_groups, tm = int(rng.choice([1, 3, 11])), int(rng.choice([1, 8, 16]))
    num_rows = int(rng.choice([5, 40, 67]))
    sizes = rng.integers(0, 12, num_groups) * (rng.random(num_groups) < 0.7)
    if trial % 5 == 0:  # Claims past num_rows are dropped.
      sizes[-1] = num_rows
    group_ids, m_tile_ids, offsets, num_visits = metadata.tile_visits(
        jnp.asarray(sizes, jnp.int32), num_rows, tm, visit_empty_groups=flags[0],
        visit_tail=flags[1])
    expected = brute_force_visits(sizes, num_rows, tm, *flags)
    bound = -(-num_rows // tm) + num_groups - 1
    assert group_ids.shape == m_tile_ids.shape == (bound,)
    assert int(num_visits) == len(expected) <= bound
    got = list(zip(np.asarray(group_ids).tolist(), np.asarray(m_tile_ids).tolist()))
    assert got[:len(expected)] == expected
    # Inactive entries repeat the last active one, so their blocks stay put.
    assert all(v == expected[-1] for v in got[len(expected):])
    np.testing.assert_array_equal(
        offsets, np.minimum(np.concatenate([[0], np.cumsum(sizes)]), num_rows))


def test_pass_tiles():
  tiling = tpu.normalize_tiling({"dlhs": (8, 32, 16)})
  assert hash(tiling) is not None
  assert tpu.pass_tiles(tiling, "dlhs") == (8, 32, 16)
  assert tpu.pass_tiles(tiling, "fwd") == tpu.pass_tiles(None, "drhs") == tpu.DEFAULT_TILES
  assert tpu.pass_tiles((16, 16, 32), "drhs") == (16, 16, 32)


_X = np.ones((45, 40), np.float32)
_W = np.ones((3, 40, 72), np.float32)
_GS = np.array([10, 20, 15], np.int32)


@pytest.mark.parametrize("tiling,interpret,match", [
    ((16, 16), True, "tiling"),
    ((16, 0, 32), True, "tiling"),
    ({"bwd": (16, 16, 32)}, True, "tiling keys"),
    ({"fwd": (16, 16)}, True, r"tiling\['fwd'\]"),
    # Compiled for a TPU, Mosaic needs lane tiles of 128 unless they cover the dimension.
    ((16, 16, 32), False, "tk=16 must be a multiple of 128"),
    ((12, 128, 128), False, "tm=12 must be a multiple of 8"),
])
def test_bad_tiling_raises(tiling, interpret, match):
  with pytest.raises(ValueError, match=match):
    pallas_kernels.gmm(_X, _W, _GS, tiling=tiling, backend="tpu", interpret=interpret)


# Compiled-mode tiles per pass, each a legal Mosaic block for both dtypes (tm a multiple of 16, tk
# and tn of 128) and each cutting the problem differently; no dimension is a multiple of every tile.
_TPU_TILING = {"fwd": (128, 128, 256), "dlhs": (64, 256, 128), "drhs": (256, 128, 128)}


def _lower_for_tpu(f, *args) -> str:
  """The StableHLO text of jit(f) lowered for TPU on this CPU-only host."""
  return jax.jit(f).trace(*args).lower(lowering_platforms=("tpu",)).as_text()


def _mosaic_kernels(text: str) -> list[str]:
  """Names of the Mosaic kernels (`tpu_custom_call`s) in lowered text, in program order."""
  calls = re.findall(r"custom_call @tpu_custom_call\(", text)
  names = re.findall(r'kernel_name = "(\w+)"', text)
  assert len(names) == len(calls), (len(names), len(calls))
  return names


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_lowers_to_mosaic_for_tpu(dtype):
  # Lowering for "tpu" runs the real Pallas-to-Mosaic lowering (not the interpreter) on a
  # CPU-only jaxlib and serializes each kernel into a `tpu_custom_call`. It catches operations,
  # block shapes and index maps that Mosaic's front end rejects; compiling the kernels (layouts,
  # VMEM limits) needs libtpu and a TPU.
  m, k, n, g = 300, 384, 640, 6

  def fwd_and_vjp(x, w, gs, ct):
    out, pullback = jax.vjp(
        lambda a, b: pallas_kernels.gmm(a, b, gs, backend="tpu", tiling=_TPU_TILING), x, w)
    return out, *pullback(ct)

  args = (jax.ShapeDtypeStruct((m, k), dtype), jax.ShapeDtypeStruct((g, k, n), dtype),
          jax.ShapeDtypeStruct((g,), jnp.int32), jax.ShapeDtypeStruct((m, n), dtype))
  assert _mosaic_kernels(_lower_for_tpu(fwd_and_vjp, *args)) == [
      "gmm", "gmm_transposed_rhs", "tgmm"]  # forward, d_lhs, d_rhs.

  tgmm = lambda x, ct, gs: pallas_kernels.tgmm(x, ct, gs, backend="tpu", tiling=_TPU_TILING)
  assert _mosaic_kernels(_lower_for_tpu(tgmm, args[0], args[3], args[2])) == ["tgmm"]


def test_tpu_lowering_enforces_block_rules(monkeypatch):
  # With the wrapper's own check bypassed, an illegal tile (tk=64) reaches Pallas' TPU lowering,
  # which rejects it: the lowering above is the compiled path, not one that accepts anything.
  monkeypatch.setattr(tpu, "_fit_tiles",
                      lambda tiles, dims, itemsize, interpret: tuple(map(min, tiles, dims)))
  f = lambda x, w, gs: pallas_kernels.gmm(x, w, gs, backend="tpu", tiling=(8, 64, 128))
  args = (jax.ShapeDtypeStruct((300, 256), jnp.float32),
          jax.ShapeDtypeStruct((6, 256, 384), jnp.float32), jax.ShapeDtypeStruct((6,), jnp.int32))
  with pytest.raises(ValueError, match="divisible by 8 and 128"):
    _lower_for_tpu(f, *args)
