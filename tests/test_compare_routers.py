"""experiments/compare_routers.py: table arithmetic by hand, and the quick study end to end."""
import csv
import importlib.util
import json
import math
import os
import sys

import numpy as np
import pytest

from configs import compare_routers as study_configs
from configs import default
from moe_jax import data, train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SUMMARY_COLUMNS = ["router", "n_seeds", "bpb_mean", "bpb_std", "bpb_sem", "eval_stderr",
                   "tokens_per_s_mean", "load_imbalance", "dropped_fraction", "experts_per_token",
                   "causal"]
NUM_EXPERTS = default.get_config("tiny").model.moe.num_experts  # the quick study's base


def _import_script():
  spec = importlib.util.spec_from_file_location(
      "compare_routers", os.path.join(REPO, "experiments", "compare_routers.py"))
  module = importlib.util.module_from_spec(spec)
  sys.modules[spec.name] = module
  spec.loader.exec_module(module)
  return module


cr = _import_script()


def _run(router, seed, bpb, imbalance, tokens_per_s=1000.0, dropped=0.0, experts=math.nan,
         stderr=math.nan, noncausal=False):
  return {"router": router, "seed": seed, "bpb": bpb, "tokens_per_s": tokens_per_s,
          "load_imbalance": imbalance, "dropped_fraction": dropped, "experts_per_token": experts,
          "bpb_stderr": stderr, "noncausal": noncausal}


def test_summarize_and_markdown_table_by_hand():
  bpb = {"dense": [2.5, 2.7, 2.4], "token_choice": [2.2, 2.35, 2.31], "soft": [2.9]}
  imbalance = {"token_choice": [1.2, 1.4, 1.3], "soft": [1.0]}
  runs = []
  for router, values in bpb.items():
    for seed, value in enumerate(values):
      runs.append(_run(router, seed, value,
                       imbalance[router][seed] if router in imbalance else math.nan,
                       tokens_per_s=1000.0 + 100 * seed, dropped=0.01 * seed,
                       experts=2.0 if router == "token_choice" else math.nan,
                       stderr=0.02 + 0.01 * seed, noncausal=router == "soft"))
  order = ["token_choice", "dense", "soft"]
  summary = cr.summarize(runs, order)

  assert [row["router"] for row in summary] == order
  assert all(set(row) == set(SUMMARY_COLUMNS) for row in summary)
  by_router = {row["router"]: row for row in summary}
  for router in ("dense", "token_choice"):
    row = by_router[router]
    assert row["n_seeds"] == 3
    np.testing.assert_allclose(row["bpb_mean"], np.mean(bpb[router]), rtol=1e-12)
    np.testing.assert_allclose(row["bpb_std"], np.std(bpb[router], ddof=1), rtol=1e-12)
    np.testing.assert_allclose(row["bpb_sem"], np.std(bpb[router], ddof=1) / math.sqrt(3),
                               rtol=1e-12)
    np.testing.assert_allclose(row["eval_stderr"], 0.03, rtol=1e-12)  # mean of .02, .03, .04
    assert row["causal"] == "yes"
    np.testing.assert_allclose(row["tokens_per_s_mean"], 1100.0, rtol=1e-12)
    np.testing.assert_allclose(row["dropped_fraction"], 0.01, rtol=1e-12)
  assert by_router["soft"]["n_seeds"] == 1 and by_router["soft"]["bpb_std"] == 0.0
  assert by_router["soft"]["causal"] == "no"
  assert math.isnan(by_router["dense"]["load_imbalance"])
  assert math.isnan(by_router["dense"]["experts_per_token"])
  np.testing.assert_allclose(by_router["token_choice"]["load_imbalance"], 1.3, rtol=1e-12)
  assert by_router["token_choice"]["experts_per_token"] == 2.0

  text = cr.markdown_table(summary, steps=300, seeds=[0, 1, 2], base="tiny")
  lines = text.splitlines()
  assert "300 steps" in lines[0] and "0, 1, 2" in lines[0] and "default.py:tiny" in lines[0]
  rows = [line for line in lines if line.startswith("| ") and not line.startswith("| router")]
  assert [r.split("|")[1].strip() for r in rows] == order
  dense_cells = [c.strip() for c in rows[1].split("|")[1:-1]]
  dense_values = np.asarray(bpb["dense"])
  assert dense_cells[2] == f"{dense_values.mean():.3f} ± {dense_values.std(ddof=1):.3f}"
  assert dense_cells[3] == f"{dense_values.std(ddof=1) / math.sqrt(3):.3f}"
  assert dense_cells[4] == "0.030"
  assert dense_cells[6] == "-"  # no router, no imbalance
  assert dense_cells[9] == "yes"
  assert [c.strip() for c in rows[0].split("|")[1:-1]][6] == "1.30"
  assert [c.strip() for c in rows[2].split("|")[1:-1]][9] == "no"


def test_step_stats_and_tail_window():
  moe_metrics = {"loss": np.float32(3.0), "aux/dropped_fraction": np.float32(0.25),
                 "aux/layer1/expert_load": np.array([0.5, 0.25, 0.25, 0.0], np.float32),
                 "aux/layer3/expert_load": np.full(4, 0.25, np.float32)}
  stats = cr.step_stats(moe_metrics)
  # Layer 1: max 0.5 over mean 0.25 = 2; layer 3 is uniform (1).
  np.testing.assert_allclose(stats["load_imbalance"], 1.5, rtol=1e-6)
  np.testing.assert_allclose(stats["dropped_fraction"], 0.25)
  assert math.isnan(stats["experts_per_token"])
  dense = cr.step_stats({"loss": np.float32(3.0), "aux/loss": np.float32(0.0)})
  assert math.isnan(dense["load_imbalance"]) and dense["dropped_fraction"] == 0.0
  assert cr.tail_first_step(300, 0.2) == 241
  assert cr.tail_first_step(6, 0.2) == 6

  recorder = cr.TailRecorder(cr.tail_first_step(10, 0.2))
  for step in range(1, 11):
    metrics = dict(moe_metrics, **{"aux/experts_per_token": np.float32(step)})
    recorder(step, metrics)
  assert sorted(recorder.records) == [9, 10]
  assert recorder.means()["experts_per_token"] == 9.5


class FakeTrainer:
  """Stands in for train.train_and_evaluate: known per-step loads, stops on "SIGTERM" at stop_at.

  Its "checkpoint" is a file holding the last step, so a second call resumes after it, as the real
  loop does.
  """

  def __init__(self, stop_at=None):
    self.stop_at = stop_at
    self.steps_run = []

  @staticmethod
  def load(step):
    return np.array([step, 1.0, 1.0, 1.0]) / (step + 3.0)

  def __call__(self, config, workdir, step_callback=None):
    os.makedirs(workdir, exist_ok=True)
    marker = os.path.join(workdir, "fake_checkpoint")
    start = int(open(marker).read()) if os.path.exists(marker) else 0
    steps, history = config.train.steps, []
    for step in range(start + 1, steps + 1):
      self.steps_run.append(step)
      step_callback(step, {"loss": np.float32(1.0), "aux/dropped_fraction": np.float32(0.1),
                           "aux/layer1/expert_load": self.load(step).astype(np.float32),
                           "aux/experts_per_token": np.float32(step)})
      if step % config.train.eval_every == 0 or step == steps:
        history.append((step, 2.0 / step, 3.0 / step, 0.1 / step))
      if step == self.stop_at or step == steps:
        with open(marker, "w") as f:
          f.write(str(step))
        result = {"step": step, "preempted": step != steps, "eval_history": history,
                  "train/tokens_per_s": 100.0 * step}
        if history and history[-1][0] == step:
          result.update({"eval/loss": history[-1][1], "eval/bits_per_byte": history[-1][2],
                         "eval/bits_per_byte_stderr": history[-1][3]})
        result["corpus"] = {"task": "fake", "path": "", "python": "3", "implementation": "C",
                            "splits": {}, "file_list_sha256": "0", "content_sha256": "0"}
        return result


def test_interrupted_run_resumes_and_merges_its_statistics(tmp_path, monkeypatch):
  study = study_configs.get_config("quick")
  study.steps = 10  # tail (last 20%) = steps 9 and 10; evaluations at 3, 6, 9 and 10
  config = cr.run_config(study, "token_choice", 0)
  run_dir = str(tmp_path / "run")
  kwargs = dict(router="token_choice", seed=0, tail_fraction=study.tail_fraction)

  monkeypatch.setattr(train, "train_and_evaluate", FakeTrainer(stop_at=9))
  with pytest.raises(cr.StudyPreempted):
    cr.load_or_train_run(config, run_dir, **kwargs)
  assert os.path.exists(os.path.join(run_dir, cr.PARTIAL_FILE))
  assert not os.path.exists(os.path.join(run_dir, cr.RESULT_FILE))

  resumed = FakeTrainer()
  monkeypatch.setattr(train, "train_and_evaluate", resumed)
  record, trained = cr.load_or_train_run(config, run_dir, **kwargs)
  assert trained and resumed.steps_run == [10]
  assert [e[0] for e in record["eval_history"]] == [3, 6, 9, 10]
  ratios = [FakeTrainer.load(s).max() / FakeTrainer.load(s).mean() for s in (9, 10)]
  np.testing.assert_allclose(record["load_imbalance"], np.mean(ratios), rtol=1e-6)
  np.testing.assert_allclose(record["experts_per_token"], 9.5, rtol=1e-6)
  np.testing.assert_allclose(record["dropped_fraction"], 0.1, rtol=1e-6)
  assert record["bpb"] == pytest.approx(0.3) and record["tokens_per_s"] == 1000.0
  assert not os.path.exists(os.path.join(run_dir, cr.PARTIAL_FILE))

  # Finished: reused as saved (NaN-free here) without training.
  monkeypatch.setattr(train, "train_and_evaluate", None)
  again, trained = cr.load_or_train_run(config, run_dir, **kwargs)
  assert not trained
  assert {k: again[k] for k in cr.RUN_COLUMNS} == {k: record[k] for k in cr.RUN_COLUMNS}
  # ... but not for another config.
  config.train.learning_rate *= 2
  with pytest.raises(ValueError, match="train.learning_rate"):
    cr.load_or_train_run(config, run_dir, **kwargs)


def test_run_killed_without_partial_record_starts_over(tmp_path, monkeypatch):
  study = study_configs.get_config("quick")
  config = cr.run_config(study, "dense", 1)
  run_dir = tmp_path / "run"
  run_dir.mkdir()
  (run_dir / "fake_checkpoint").write_text("4")  # as if killed (SIGKILL) after step 4
  fresh = FakeTrainer()
  monkeypatch.setattr(train, "train_and_evaluate", fresh)
  record, _ = cr.load_or_train_run(config, str(run_dir), router="dense", seed=1,
                                   tail_fraction=study.tail_fraction)
  assert fresh.steps_run == list(range(1, study.steps + 1))
  assert record["steps"] == study.steps


def _read_csv(path):
  with open(path, newline="") as f:
    reader = csv.DictReader(f)
    return reader.fieldnames, list(reader)


def test_quick_study_end_to_end_and_reuse(tmp_path, monkeypatch):
  study = study_configs.get_config("quick")
  routers = study.routers.split(",")
  seeds = [int(s) for s in study.seeds.split(",")]
  cr.run_study(study, str(tmp_path))

  columns, rows = _read_csv(tmp_path / "results.csv")
  assert columns == SUMMARY_COLUMNS
  assert [row["router"] for row in rows] == routers
  run_columns, run_rows = _read_csv(tmp_path / "runs.csv")
  assert sorted((r["router"], int(r["seed"])) for r in run_rows) == sorted(
      (router, seed) for router in routers for seed in seeds)
  for row in rows:
    assert int(row["n_seeds"]) == len(seeds)
    assert 0 < float(row["bpb_mean"]) < 9, row
    assert np.isfinite(float(row["bpb_std"])) and float(row["bpb_std"]) >= 0
    own = [float(r["bpb"]) for r in run_rows if r["router"] == row["router"]]
    np.testing.assert_allclose(float(row["bpb_mean"]), np.mean(own), rtol=1e-9)
    imbalance = float(row["load_imbalance"])
    experts = float(row["experts_per_token"])
    if row["router"] == "dense":
      assert math.isnan(imbalance) and math.isnan(experts), row
      assert float(row["dropped_fraction"]) == 0.0
    else:
      assert imbalance >= 1.0 - 1e-6, row  # max/mean of a load vector is at least 1
      assert 0 < experts <= NUM_EXPERTS, row  # reported, and at most every expert
  for r in run_rows:
    assert 0 < float(r["bpb"]) < 9 and float(r["tokens_per_s"]) > 0, r
    with open(tmp_path / "runs" / f"{r['router']}_seed{r['seed']}" / "result.json") as f:
      history = json.load(f)["eval_history"]
    assert [step for step, *_ in history] == list(range(study.eval_every, study.steps + 1,
                                                        study.eval_every))
    assert history[-1][2] == pytest.approx(float(r["bpb"]))
    assert history[-1][3] == pytest.approx(float(r["bpb_stderr"])) and history[-1][3] > 0

  text = (tmp_path / "results.md").read_text()
  assert f"{study.steps} steps" in text.splitlines()[0]
  fingerprint = data.corpus_fingerprint(default.get_config("tiny").data)
  assert f"Corpus: {data.describe_fingerprint(fingerprint)}." in text.splitlines()[0]
  for router in routers:
    assert sum(line.startswith(f"| {router} |") for line in text.splitlines()) == 1
  assert (tmp_path / "val_loss.png").stat().st_size > 0  # matplotlib is in the test extra

  # A second call reuses every run's result.json and writes the same table.
  def no_training(*args, **kwargs):
    raise AssertionError("train_and_evaluate called for a finished run")

  monkeypatch.setattr(train, "train_and_evaluate", no_training)
  before = (tmp_path / "results.csv").read_text()
  os.remove(tmp_path / "results.csv")
  cr.run_study(study, str(tmp_path))
  assert (tmp_path / "results.csv").read_text() == before
