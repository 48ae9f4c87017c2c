"""experiments/moe_scaling.py: cell arithmetic and statistics by hand, quick studies end to end."""
import csv
import math
import os

import numpy as np
import pytest

from configs import default
from configs import moe_scaling as study_configs
from experiments import moe_scaling as ms
from moe_jax import train
from moe_jax.validation import validate_config

D_MODEL = default.get_config().model.d_model
FFN_PARAMS = 3  # SwiGLU: gate, up and down matrices per hidden unit and model unit
MOE_LAYERS = 2  # 4 layers, every other one MoE


def _configs(study_name, base=""):
  study = study_configs.get_config(study_name)
  study.base = base
  return study, {cell: ms.cell_config(study, cell) for cell in ms.parse_cells(study)}


@pytest.mark.parametrize("study_name", study_configs.STUDIES)
def test_every_cell_is_valid_and_has_the_same_active_ffn_width(study_name):
  for base in ("", "tiny"):
    study, configs = _configs(study_name, base)
    reference = default.get_config("tiny" if base else None).model.moe
    widths = {cell: ms.active_ffn_hidden(c) for cell, c in configs.items()}
    assert set(widths.values()) == {float(reference.top_k * reference.expert_hidden_dim)}, widths
    for seed in (0, 1):
      config = ms.run_config(study, next(iter(configs)), seed)
      assert config.seed == seed and config.train.steps == study.steps
    for config in configs.values():
      validate_config(config, 1)


def test_expert_count_adds_only_expert_and_router_weights():
  _, configs = _configs("experts")
  params = {cell: ms.total_params(c) for cell, c in configs.items()}
  hidden = default.get_config().model.moe.expert_hidden_dim
  # Per MoE layer each expert holds 3 * D * F weights and the router D weights per expert.
  per_expert = MOE_LAYERS * (FFN_PARAMS * D_MODEL * hidden + D_MODEL)
  for cell in ("e4", "e16", "e32", "e64"):
    assert params[cell] - params["e8"] == (int(cell[1:]) - 8) * per_expert
  # Dense: every FFN an MLP of hidden 2F; the MoE layers' FFNs become E experts of F plus a router.
  assert params["e8"] - params["dense"] == MOE_LAYERS * (
      FFN_PARAMS * D_MODEL * hidden * (8 - 2) + D_MODEL * 8)
  assert [configs[c].model.moe.top_k for c in configs if c != "dense"] == [2] * 5


def test_granularity_keeps_total_expert_parameters():
  _, configs = _configs("granularity")
  params = {cell: ms.total_params(c) for cell, c in configs.items()}
  shapes = {cell: (c.model.moe.num_experts, c.model.moe.expert_hidden_dim, c.model.moe.top_k,
                   c.model.moe.num_shared_experts) for cell, c in configs.items()}
  assert shapes == {"m1": (8, 256, 2, 0), "m2": (16, 128, 4, 0), "m4": (32, 64, 8, 0),
                    "m1_shared": (7, 256, 1, 1), "m2_shared": (15, 128, 3, 1),
                    "m4_shared": (31, 64, 7, 1)}
  # Only the router, D weights per routed expert, differs.
  for cell, (experts, *_) in shapes.items():
    assert params[cell] - params["m1"] == MOE_LAYERS * D_MODEL * (experts - 8), cell


def test_intervals_and_slope_and_specialisation_by_hand():
  # 2 s.e. intervals [1.0, 1.4] and [1.5, 1.7] are disjoint; [1.0, 1.4] and [1.3, 1.5] are not.
  assert ms.intervals_disjoint(1.2, 0.1, 1.6, 0.05, 2.0)
  assert not ms.intervals_disjoint(1.2, 0.1, 1.4, 0.05, 2.0)
  assert not ms.intervals_disjoint(1.2, 0.0, 1.9, 0.05, 2.0)  # one seed resolves nothing
  assert not ms.intervals_disjoint(1.2, math.nan, 1.9, 0.05, 2.0)

  # Seed 0 falls 0.1 per doubling exactly; seed 1 at E = 4, 8, 16 by 2.0, 1.85, 1.8: slope -0.1.
  runs = [{"router": f"e{e}", "seed": 0, "bpb": 2.0 - 0.1 * math.log2(e / 4)} for e in (4, 8, 16)]
  runs += [{"router": f"e{e}", "seed": 1, "bpb": b} for e, b in ((4, 2.0), (8, 1.85), (16, 1.8))]
  runs += [{"router": "dense", "seed": 0, "bpb": 9.0}]
  doubling = ms.per_doubling(runs)
  assert doubling["slopes"] == pytest.approx({0: -0.1, 1: -0.1})
  assert doubling["mean"] == pytest.approx(-0.1) and doubling["sem"] == pytest.approx(0, abs=1e-12)

  # Three experts, three classes. Expert e takes only class e: perfectly specialised.
  perfect = ms.specialisation_from_counts(np.diag([10, 20, 30]))
  class_entropy = -sum(p * math.log2(p) for p in (1 / 6, 2 / 6, 3 / 6))
  assert perfect == pytest.approx({"class_entropy_bits": 0.0,
                                   "class_expert_mi_bits": class_entropy,
                                   "experts_per_class": 1.0})
  uniform = ms.specialisation_from_counts(np.full((3, 2), 5))
  assert uniform == pytest.approx({"class_entropy_bits": 1.0, "class_expert_mi_bits": 0.0,
                                   "experts_per_class": 3.0})
  # Expert 0: 6 of class a, 2 of b; expert 1: 2 of b. H(class | e0) = H(3/4, 1/4) with
  # P(e0) = 0.8; class b splits 2 / 2 over the experts (2 experts), class a uses one.
  mixed = ms.specialisation_from_counts(np.array([[6, 2], [0, 2]]))
  h_e0 = -(0.75 * math.log2(0.75) + 0.25 * math.log2(0.25))
  assert mixed["class_entropy_bits"] == pytest.approx(0.8 * h_e0)
  assert mixed["class_expert_mi_bits"] == pytest.approx(
      -(0.6 * math.log2(0.6) + 0.4 * math.log2(0.4)) - 0.8 * h_e0)
  assert mixed["experts_per_class"] == pytest.approx(0.6 * 1 + 0.4 * 2)


def test_summary_deltas_and_resolution_by_hand():
  study, configs = _configs("experts", "tiny")
  bpb = {"dense": [2.0, 2.1, 1.9], "e4": [1.7, 1.72, 1.68], "e8": [2.0, 1.8, 2.2]}
  runs = [{"router": cell, "seed": s, "bpb": b, "tokens_per_s": 1000.0 + 100 * s,
           "load_imbalance": math.nan if cell == "dense" else 1.5, "dropped_fraction": 0.0,
           "experts_per_token": math.nan, "bpb_stderr": 0.01}
          for cell, values in bpb.items() for s, b in enumerate(values)]
  rows = ms.summarize_cells(runs, list(bpb), configs, interval_sems=2.0)
  assert [r["cell"] for r in rows] == list(bpb)
  sem = {c: np.std(v, ddof=1) / math.sqrt(3) for c, v in bpb.items()}
  by_cell = {r["cell"]: r for r in rows}
  for cell, values in bpb.items():
    row = by_cell[cell]
    assert row["bpb_mean"] == pytest.approx(np.mean(values))
    assert row["bpb_sem"] == pytest.approx(sem[cell])
    assert row["delta_vs_ref"] == pytest.approx(np.mean(values) - 2.0)
    assert row["delta_sem"] == pytest.approx(math.sqrt(sem[cell] ** 2 + sem["dense"] ** 2))
    assert row["s_per_step"] == pytest.approx(8 * 32 / 1100.0)  # tiny: 8 x 32 tokens per step
  # dense 2.0 ± 0.0577 vs e4 1.70 ± 0.0115: 2 s.e. intervals disjoint; e8 2.0 ± 0.115 is not.
  assert [r["resolved_vs_ref"] for r in rows] == ["-", "yes", "no"]
  text = ms.markdown_table(rows, study, seeds=[0, 1, 2], corpus="", doubling=ms.per_doubling(runs))
  table = [line for line in text.splitlines() if line.startswith("| e4 |")]
  assert len(table) == 1 and "| yes |" in table[0] and f"{-0.3:+.4f}" in table[0]


def _read_csv(path):
  with open(path, newline="") as f:
    reader = csv.DictReader(f)
    return reader.fieldnames, list(reader)


# Each quick study trains 4 tiny runs; compilation dominates (about 10-20 s per MoE run on two
# shared cores), so all but the cheapest run only where slow tests do.
@pytest.mark.parametrize("study_name", [
    "experts", *(pytest.param(s, marks=pytest.mark.slow) for s in study_configs.STUDIES[1:])])
def test_quick_study_writes_its_table_and_resumes(study_name, tmp_path, monkeypatch):
  study = study_configs.get_config(f"{study_name},quick")
  cells = study.cells.split(",")
  seeds = [int(s) for s in study.seeds.split(",")]
  assert study.base == "tiny" and len(seeds) == 2 and study.steps <= 6
  ms.run_study(study, str(tmp_path))

  columns, rows = _read_csv(tmp_path / "results.csv")
  assert columns == list(ms.SUMMARY_COLUMNS)
  assert [row["cell"] for row in rows] == cells
  run_columns, run_rows = _read_csv(tmp_path / "runs.csv")
  assert run_columns == list(ms.RUN_COLUMNS)
  assert sorted((r["cell"], int(r["seed"])) for r in run_rows) == sorted(
      (c, s) for c in cells for s in seeds)
  for row in rows:
    assert int(row["n_seeds"]) == len(seeds)
    own = [float(r["bpb"]) for r in run_rows if r["cell"] == row["cell"]]
    assert float(row["bpb_mean"]) == pytest.approx(np.mean(own))
    assert float(row["bpb_sem"]) == pytest.approx(np.std(own, ddof=1) / math.sqrt(len(own)))
    assert 0 < float(row["bpb_mean"]) < 10 and float(row["tokens_per_s_mean"]) > 0
    assert float(row["s_per_step"]) == pytest.approx(8 * 32 / float(row["tokens_per_s_mean"]))
    assert row["resolved_vs_ref"] in (("-",) if row is rows[0] else ("yes", "no"))
    specialisation = [float(row[n]) for n in ms.SPECIALISATION_NAMES]
    if study_name == "balance_scope":
      experts = int(row["num_experts"])
      assert 0 <= specialisation[0] <= math.log2(5) + 1e-9  # five disjoint byte classes
      assert 1 - 1e-9 <= specialisation[2] <= experts + 1e-9
    else:
      assert all(math.isnan(v) for v in specialisation)
  text = (tmp_path / "results.md").read_text()
  for cell in cells:
    assert sum(line.startswith(f"| {cell} |") for line in text.splitlines()) == 1
  assert (tmp_path / "val_loss.png").stat().st_size > 0
  if study_name == "experts":
    assert (tmp_path / "loss_vs_experts.png").stat().st_size > 0
    assert "per doubling of E" in text
  if study_name == "encoder":
    assert "masked-byte bits/byte" in text

  # A rerun reuses every result.json (and the specialisation analysis) and writes the same table.
  def no_training(*args, **kwargs):
    raise AssertionError("train_and_evaluate called for a finished run")

  monkeypatch.setattr(train, "train_and_evaluate", no_training)
  before = (tmp_path / "results.csv").read_text()
  os.remove(tmp_path / "results.csv")
  ms.run_study(study, str(tmp_path))
  assert (tmp_path / "results.csv").read_text() == before


def test_runs_recorded_before_the_encoder_fields_existed_are_reused(tmp_path):
  """A result.json whose config lacks model.causal / data.objective / data.mask_rate ran with
  their defaults, so the study reuses it; another value of a new field is a different config."""
  study = study_configs.get_config("experts,quick")
  config = ms.run_config(study, "dense", 0)
  saved = ms.cr._config_json(config)  # pylint: disable=protected-access
  del saved["model"]["causal"], saved["data"]["objective"], saved["data"]["mask_rate"]
  run_dir = tmp_path / "run"
  run_dir.mkdir()
  ms.cr.write_json(str(run_dir / ms.cr.RESULT_FILE),
                   {"router": "dense", "seed": 0, "steps": 4, "bpb": 3.0, "config": saved})
  record, trained = ms.cr.load_or_train_run(config, str(run_dir), router="dense", seed=0,
                                            tail_fraction=0.2)
  assert not trained and record["bpb"] == 3.0
  config.data.mask_rate = 0.3
  with pytest.raises(ValueError, match="data.mask_rate"):
    ms.cr.load_or_train_run(config, str(run_dir), router="dense", seed=0, tail_fraction=0.2)


def test_unknown_study_and_cell_are_rejected():
  with pytest.raises(ValueError, match="variant 'sizes'"):
    study_configs.get_config("sizes")
  study = study_configs.get_config("experts")
  study.cells = "dense,e1"
  with pytest.raises(ValueError, match="cell 'e1'"):
    ms.parse_cells(study)
  study = study_configs.get_config("granularity")
  study.cells = "m3"
  with pytest.raises(ValueError, match="granularity m=3"):
    ms.parse_cells(study)
