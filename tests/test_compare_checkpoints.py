"""experiments/compare_checkpoints.py: paired differences by hand and on real checkpoints."""
import json
import shutil

import numpy as np
import pytest

import tiny_checkpoint
from experiments import compare_checkpoints


def test_paired_difference_by_hand():
  baseline = np.array([2.0, 3.0, 1.0, 4.0, 9.0])
  other = baseline + np.array([-0.1, -0.3, -0.2, 0.0, 5.0])
  tokens = np.array([10.0, 10.0, 10.0, 10.0, 2.0])  # the last batch is a padded one
  mean, stderr = compare_checkpoints.paired_difference(baseline, other, tokens)
  assert mean == pytest.approx((-1.0 - 3.0 - 2.0 + 0.0 + 10.0) / 42)
  full = np.array([-0.1, -0.3, -0.2, 0.0])
  assert stderr == pytest.approx(full.std(ddof=1) / 2)


def test_copies_differ_by_zero_and_losses_match_training(tmp_path):
  workdir, result = tiny_checkpoint.trained_workdir()
  copy = tmp_path / "copy"
  shutil.copytree(workdir, copy)
  text = compare_checkpoints.compare([workdir, str(copy)])
  rows = [line for line in text.splitlines() if line.startswith(f"| {copy} |")]
  cells = [c.strip() for c in rows[0].split("|")[1:-1]]
  assert cells[1] == str(tiny_checkpoint.STEPS)
  assert cells[2] == (f"{result['eval/bits_per_byte']:.4f} ± "
                      f"{result['eval/bits_per_byte_stderr']:.4f}")
  assert cells[3] == "+0.0000 ± 0.0000" and cells[4] == "no"


def test_models_trained_on_other_data_are_refused(tmp_path):
  workdir, _ = tiny_checkpoint.trained_workdir()
  other = tmp_path / "other"
  shutil.copytree(workdir, other)
  config = json.load(open(other / "config.json"))
  config["data"]["seq_len"] = 16
  json.dump(config, open(other / "config.json", "w"))
  with pytest.raises(ValueError, match="seq_len"):
    compare_checkpoints.compare([workdir, str(other)])
  with pytest.raises(ValueError, match="at least two"):
    compare_checkpoints.compare([workdir])
