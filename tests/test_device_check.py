"""experiments/device_check.py on CPU: the --quick run end to end, and the parts that judge it.

The script exists to spend scarce device time well, so it must be known to run before a device is
lent: the quick run here goes through every part (the XLA gmm backends checked against float64,
the bench_gmm timing, a short training run) and its JSON is checked for what a device run will be
read for.
"""
import importlib.util
import json
import os
import sys

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _import_script():
  # Under the name bench_gmm.py's tests use too, so that its absl flags are defined once.
  sys.path.insert(0, os.path.join(REPO, "experiments"))
  spec = importlib.util.spec_from_file_location(
      "device_check", os.path.join(REPO, "experiments", "device_check.py"))
  module = importlib.util.module_from_spec(spec)
  sys.modules[spec.name] = module  # dataclasses look their module up here
  spec.loader.exec_module(module)
  return module


device_check = _import_script()


@pytest.fixture(scope="module")
def quick_report(tmp_path_factory):
  out_dir = str(tmp_path_factory.mktemp("device_check"))
  report = device_check.run(device_check.Options(
      out_dir=out_dir, quick=True, budget_s=600, peak_flops=1e12, command="pytest quick run",
      # One config keeps the test short; the Mixtral-like one is checked without training below.
      train_configs=("default",)),
      log=lambda line: None)
  return out_dir, report


def test_quick_run_writes_json_and_markdown(quick_report):
  out_dir, report = quick_report
  with open(os.path.join(out_dir, "device_check.json")) as f:
    saved = json.load(f)
  assert saved["meta"]["command"] == "pytest quick run"
  assert saved["meta"]["device_kind"] and saved["meta"]["jax_version"]
  assert saved["errors"] == {} and saved["skipped_parts"] == []
  assert {"check", "time", "train"} <= set(saved)
  with open(os.path.join(out_dir, "device_check.md")) as f:
    text = f.read()
  assert "## Device check" in text and "pytest quick run" in text
  assert "| xla | float32 |" in text and "FAILED" not in text


def test_quick_check_covers_every_cpu_backend_within_tolerance(quick_report):
  check = quick_report[1]["check"]
  rows = check["rows"]
  assert {r["backend"] for r in rows} == {"xla", "blocked", "reference"}
  assert {r["dtype"] for r in rows} == {"float32", "bfloat16"}
  assert {r["pass_"] for r in rows} == {"fwd", "d_lhs", "d_rhs"}
  assert check["failures"] == [] and check["raised"] == []
  for r in rows:
    assert r["ok"] and r["rel_err"] <= r["tol"] and r["max_abs_where_zero"] == 0.0, r
  # bf16 outputs are rounded, float32 ones are not: the two tolerances are both exercised.
  assert max(r["rel_err"] for r in rows if r["dtype"] == "float32") < 1e-6
  assert max(r["rel_err"] for r in rows if r["dtype"] == "bfloat16") > 1e-4


def test_quick_timing_ratios_are_positive(quick_report):
  rows = quick_report[1]["time"]["rows"]
  assert {r["op"] for r in rows} == {"fwd", "fwd+bwd", "tgmm"}
  assert {"dense", "gmm[blocked]", "gmm[xla]"} <= {r["impl"] for r in rows}
  for r in rows:
    assert r["ms"] > 0 and r["vs_dense"] > 0 and np.isfinite(r["vs_dense"]), r


def test_quick_training_reports_throughput_and_mfu(quick_report):
  rows = quick_report[1]["train"]["rows"]
  assert [r["config"] for r in rows] == ["default"]
  for r in rows:
    assert r["steps"] == 3 and r["tokens_per_s"] > 0 and r["flops_per_token"] > 0
    assert r["mfu"] == pytest.approx(r["tokens_per_s"] * r["flops_per_token"] / 1e12)
    assert np.isfinite(r["train_loss"])


def test_judge_names_backend_dtype_pass_and_size_of_a_failure():
  case = device_check.Case("awkward", 45, 40, 72, (10, 0, 12, 5))
  _, refs = device_check._case_data(case, np.float32, seed=0)
  total = sum(case.sizes)
  out = np.zeros((case.m, case.n), np.float32)
  out[:total] = refs["fwd"] * (1 + 1e-3)  # 1e-3 relative error
  d_lhs = np.zeros((case.m, case.k), np.float32)
  d_lhs[:total] = refs["d_lhs"]
  d_lhs[total] = 1.0  # a row past the end that is not zero
  d_rhs = refs["d_rhs"].astype(np.float32)
  d_rhs[0, 0, 0] = np.nan
  rows = device_check._judge("gpu", "float32", case, (out, d_lhs, d_rhs), refs)
  assert [r["ok"] for r in rows] == [False, False, False]
  texts = [device_check._failure_text(r) for r in rows]
  assert texts[0].startswith("gpu float32 awkward fwd: rel err 0.001")
  assert "rows past the end not zero (max |value| 1)" in texts[1]
  assert texts[2].startswith("gpu float32 awkward d_rhs: rel err nan")
  pad = lambda a: np.pad(a, ((0, case.m - total), (0, 0)))
  good = device_check._judge("gpu", "float32", case,
                             (pad(refs["fwd"]), pad(refs["d_lhs"]), refs["d_rhs"]), refs)
  assert all(r["ok"] for r in good)


def test_spent_budget_skips_every_part_but_still_writes(tmp_path):
  report = device_check.run(device_check.Options(out_dir=str(tmp_path), budget_s=0),
                            log=lambda line: None)
  assert report["skipped_parts"] == list(device_check.PARTS)
  with open(tmp_path / "device_check.json") as f:
    assert json.load(f)["skipped_parts"] == list(device_check.PARTS)


def test_active_flops_count_top_k_of_the_experts():
  # The dense variant has the same active FFN FLOPs by construction, so the MoE model's active
  # parameters exceed the dense one's by its routers alone (D x E per MoE layer).
  config = device_check.load_config("default")
  dense = device_check.load_config("default:dense")
  seq = config.data.seq_len
  moe, ref = (device_check.model_flops_per_token(c.model, seq) for c in (config, dense))
  moe_layers = config.model.num_layers // config.model.moe_every
  router = moe_layers * config.model.d_model * config.model.moe.num_experts
  assert moe["active_params"] - ref["active_params"] == router
  assert moe["total_params"] > moe["active_params"] + router  # 6 of 8 experts idle per token
  m = config.model
  assert moe["flops_per_token"] == 6 * moe["active_params"] + 12 * m.num_layers * m.num_heads * (
      m.head_dim * seq)


def test_mixtral_recipe_falls_back_to_data_parallel_on_one_device():
  one = device_check.train_config("mixtral_like:cpu8", "auto", 3, quick=True, num_devices=1)
  assert (one.mesh.data, one.mesh.expert) == (-1, 1)
  eight = device_check.train_config("mixtral_like:cpu8", "auto", 3, quick=True, num_devices=8)
  assert (eight.mesh.data, eight.mesh.expert) == (1, 8)
  assert one.data.task == eight.data.task == "stdlib_bytes"


def test_peak_flops_by_device_kind():
  assert device_check.peak_flops("NVIDIA H200") == 989e12
  assert device_check.peak_flops("NVIDIA H100 80GB HBM3") == 989e12
  assert device_check.peak_flops("NVIDIA H100 PCIe") == 756e12
  assert device_check.peak_flops("cpu") is None


def test_a_backend_that_cannot_run_is_reported_not_fatal(tmp_path):
  # The compiled "gpu" backend cannot run on a CPU, as a kernel that fails on its first hardware
  # run would not: every case is reported by backend and dtype, and the timing leaves it out.
  lines = []
  report = device_check.run(device_check.Options(
      out_dir=str(tmp_path), quick=True, parts=("check", "time"), gmm_backends=("gpu", "xla")),
      log=lines.append)
  check = report["check"]
  assert report["errors"] == {} and check["raised"] == ["gpu"]
  gpu_rows = [r for r in check["rows"] if r["backend"] == "gpu"]
  assert {(r["dtype"], r["ok"]) for r in gpu_rows} == {("float32", False), ("bfloat16", False)}
  assert all(r["ok"] for r in check["rows"] if r["backend"] == "xla")
  assert all(f.startswith("gpu ") and " raised " in f for f in check["failures"])
  assert {r["impl"] for r in report["time"]["rows"]} >= {"dense", "gmm[xla]"}
  assert "gmm[gpu]" not in {r["impl"] for r in report["time"]["rows"]}
  assert "# time: left out ['gpu'], which raised in the check" in lines
