"""experiments/bench_gmm.py: FLOP counts by hand, group sizes, and the CSV of a tiny CPU run."""
import csv
import importlib.util
import os
import sys

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _import_script():
  spec = importlib.util.spec_from_file_location(
      "bench_gmm", os.path.join(REPO, "experiments", "bench_gmm.py"))
  module = importlib.util.module_from_spec(spec)
  sys.modules[spec.name] = module  # dataclasses look their module up here
  spec.loader.exec_module(module)
  return module


bench_gmm = _import_script()


def test_flops_hand_case():
  # [m=2, k=3] x [3, n=4]: 2*3*4 multiply-adds = 48 FLOPs; the backward adds two such matmuls.
  assert bench_gmm.flops("fwd", 2, 3, 4) == 48
  assert bench_gmm.flops("fwd+bwd", 2, 3, 4) == 144
  assert bench_gmm.flops("tgmm", 2, 3, 4) == 48
  with pytest.raises(ValueError, match="op"):
    bench_gmm.flops("bwd", 2, 3, 4)


def test_scaled_rounds_up_to_multiples_of_eight():
  mixtral = bench_gmm.PRESETS["mixtral"]
  assert bench_gmm.scaled(mixtral, 1) == mixtral
  small = bench_gmm.scaled(mixtral, 64)
  assert (small.d, small.f, small.experts, small.top_k) == (64, 224, 8, 2)
  v3 = bench_gmm.scaled(bench_gmm.PRESETS["deepseek_v3_scaled"], 100)
  assert (v3.d, v3.f) == (40, 16)  # ceil(35.84) = 36 -> 40; ceil(10.24) = 11 -> 16
  with pytest.raises(ValueError, match="scale"):
    bench_gmm.scaled(mixtral, 0)


@pytest.mark.parametrize("skew", bench_gmm.SKEWS)
def test_group_sizes_are_a_top_k_routing(skew):
  t, e, k = 512, 64, 6
  sizes = bench_gmm.group_sizes(t, e, k, skew, seed=3)
  assert sizes.dtype == np.int32 and sizes.shape == (e,)
  assert sizes.sum() == t * k
  # Each token picks k distinct experts, so no expert gets more than T rows.
  assert sizes.max() <= t
  np.testing.assert_array_equal(sizes, bench_gmm.group_sizes(t, e, k, skew, seed=3))


def test_skewed_sizes_are_more_unequal_than_balanced():
  balanced = bench_gmm.group_sizes(1024, 64, 2, "balanced", seed=0)
  skewed = bench_gmm.group_sizes(1024, 64, 2, "skewed", seed=0)
  assert skewed.max() > 2 * balanced.max()
  assert skewed.min() < balanced.min()


def test_tiny_cpu_run_writes_expected_csv(tmp_path):
  path = tmp_path / "gmm.csv"
  lines = []
  returned = bench_gmm.run_benchmark(
      ["mixtral"], num_tokens=64, scale=64, backends=["auto", "blocked", "xla"], repeats=1,
      warmup=0, calls_per_sample=1, include_tgmm=True, csv_path=str(path), log=lines.append)
  with open(path, newline="") as f:
    reader = csv.DictReader(f)
    assert tuple(reader.fieldnames) == bench_gmm.CSV_COLUMNS
    rows = list(reader)
  assert len(rows) == len(returned)

  # "auto" resolves to "blocked" on CPU and is not timed twice; no CUDA, so no torch rows.
  peers = ["tokamax.ragged_dot"] if bench_gmm._tokamax() is not None else []
  matmuls = {"dense", "jax.lax.ragged_dot", "gmm[blocked]", "gmm[xla]", *peers}
  expected = {(skew, op, impl) for skew in bench_gmm.SKEWS for op in ("fwd", "fwd+bwd")
              for impl in matmuls}
  expected |= {(skew, "tgmm", impl) for skew in bench_gmm.SKEWS
               for impl in ("dense", "gmm[blocked]", "gmm[xla]")}
  got = [(r["skew"], r["op"], r["impl"]) for r in rows]
  assert len(got) == len(set(got)) and set(got) == expected

  # d 4096 / 64 = 64, f 14336 / 64 = 224, M = T * top_k = 128.
  for r in rows:
    assert (r["shape"], r["dtype"], int(r["num_tokens"]), int(r["top_k"]), int(r["experts"])) == (
        "mixtral", "float32", 64, 2, 8)
    assert (int(r["m"]), int(r["k"]), int(r["n"])) == (128, 64, 224)
    assert int(r["flops"]) == {"fwd": 2, "fwd+bwd": 6, "tgmm": 2}[r["op"]] * 128 * 64 * 224
    assert float(r["tflops_per_s"]) == pytest.approx(
        int(r["flops"]) / (float(r["ms"]) * 1e-3) / 1e12, rel=1e-6)
    if r["impl"] == "dense":
      assert float(r["vs_dense"]) == pytest.approx(1.0)
    # Only tgmm rows compare with the same implementation's forward.
    assert (r["vs_fwd"] != "") == (r["op"] == "tgmm")
  assert any("torch._grouped_mm left out" in line for line in lines)


@pytest.mark.parametrize("kwargs,argument", [
    (dict(shape_names=["mixtral_8x22b"]), "shapes"),
    (dict(peers=["cublas"]), "peers"),
    (dict(backends=["cuda"]), "backend"),
])
def test_bad_arguments_raise_before_timing(kwargs, argument):
  args = dict(shape_names=["mixtral"], num_tokens=8, scale=64, repeats=1, warmup=0,
              log=lambda line: None)
  args.update(kwargs)
  with pytest.raises(ValueError, match=argument):
    bench_gmm.run_benchmark(args.pop("shape_names"), **args)


@pytest.mark.parametrize("text,expected", [
    ("", None),
    ("256", 256),
    ("512, 128,32", (512, 128, 32)),
    ("128,128,64", (128, 128, 64)),
    ("fwd:128,128,64;drhs:64,128,128", {"fwd": (128, 128, 64), "drhs": (64, 128, 128)}),
    ("dlhs:16,32,64;", {"dlhs": (16, 32, 64)}),
])
def test_parse_tiling(text, expected):
  assert bench_gmm.parse_tiling(text) == expected


@pytest.mark.parametrize("text,match", [
    ("128,x,64", "positive ints"),
    ("128,0", "positive ints"),
    ("fwd:128,128", "three tiles"),
    ("bwd:128,128,64", "pass in"),
    ("fwd:16,16,16;fwd:32,32,32", "twice"),
    ("fwd:16,16,16;32,32,32", "pass in"),
])
def test_parse_tiling_rejects_bad_text(text, match):
  with pytest.raises(ValueError, match=f"--tiling.*{match}"):
    bench_gmm.parse_tiling(text)


def test_tiling_flag_reaches_run_benchmark(monkeypatch):
  seen = {}
  monkeypatch.setattr(bench_gmm, "run_benchmark", lambda *a, **kw: seen.update(kw))
  flag_values = bench_gmm.flags.FLAGS

  def main_with(*argv):
    flag_values(["bench_gmm.py", *argv])
    try:
      bench_gmm.main([])
    finally:
      flag_values.unparse_flags()

  main_with("--backends=gpu,xla", "--tiling=fwd:128,128,64;drhs:64,128,128")
  assert seen["tiling"] == {"fwd": (128, 128, 64), "drhs": (64, 128, 128)}
  main_with()
  assert seen["tiling"] is None
  with pytest.raises(bench_gmm.app.UsageError, match="three tiles"):
    main_with("--backends=gpu", "--tiling=fwd:1,2")
  # Checked against each backend before anything runs: 24 is no power of two for "gpu".
  with pytest.raises(bench_gmm.app.UsageError, match="backend 'gpu'"):
    main_with("--backends=gpu", "--tiling=24,32,32")


def test_tiling_reaches_the_kernel(monkeypatch):
  calls = []
  gmm, tgmm = bench_gmm.pallas_kernels.gmm, bench_gmm.pallas_kernels.tgmm
  monkeypatch.setattr(bench_gmm.pallas_kernels, "gmm",
                      lambda *a, **kw: calls.append(("gmm", kw)) or gmm(*a, **kw))
  monkeypatch.setattr(bench_gmm.pallas_kernels, "tgmm",
                      lambda *a, **kw: calls.append(("tgmm", kw)) or tgmm(*a, **kw))
  rows = bench_gmm.run_benchmark(["mixtral"], num_tokens=16, scale=64, skews=["balanced"],
                                 backends=["blocked", "xla"], peers=[], repeats=1, warmup=0,
                                 include_tgmm=True, tiling=(32, 16), log=lambda line: None)
  # The blocked backend gets the tiling for gmm (forward and its VJP) and tgmm; xla gets none.
  by_backend = {(op, kw["backend"], kw.get("tiling", "absent")) for op, kw in calls}
  assert by_backend == {("gmm", "blocked", (32, 16)), ("tgmm", "blocked", (32, 16)),
                        ("gmm", "xla", "absent"), ("tgmm", "xla", "absent")}
  assert {r["impl"]: r["tiling"] for r in rows} == {
      "dense": "", "gmm[blocked]": "(32, 16)", "gmm[xla]": ""}


def test_tiling_changes_nothing_numerically_and_bad_tiles_fail_in_the_kernel():
  rng = np.random.default_rng(0)
  x, w = rng.standard_normal((40, 24), np.float32), rng.standard_normal((3, 24, 16), np.float32)
  sizes = np.array([13, 0, 20], np.int32)
  default, _ = bench_gmm.gmm_candidates(["blocked"])
  tiled, tiled_t = bench_gmm.gmm_candidates(["blocked"], bench_gmm.parse_tiling("16,8"))
  np.testing.assert_allclose(tiled["gmm[blocked]"](x, w, sizes),
                             default["gmm[blocked]"](x, w, sizes), rtol=1e-5, atol=1e-5)
  assert tiled_t["gmm[blocked]"](x, x[:, :16], sizes).shape == (3, 24, 16)
  # Row tiles must decrease: the blocked backend's own message, raised before any timing.
  with pytest.raises(ValueError, match="'blocked'.*strictly decreasing"):
    bench_gmm.run_benchmark(["mixtral"], num_tokens=8, scale=64, backends=["blocked"],
                            tiling=bench_gmm.parse_tiling("16,32"), log=lambda line: None)
  bad, _ = bench_gmm.gmm_candidates(["blocked"], (16, 32))
  with pytest.raises(ValueError, match="strictly decreasing"):
    bad["gmm[blocked]"](x, w, sizes)
  # A tiling with no backend that takes one is a mistake, not something to ignore.
  with pytest.raises(ValueError, match="none of the backends"):
    bench_gmm.run_benchmark(["mixtral"], num_tokens=8, scale=64, backends=["xla"],
                            tiling=(16,), log=lambda line: None)
