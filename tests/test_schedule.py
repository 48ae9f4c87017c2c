"""Learning-rate schedules: cosine and warmup-stable-decay, and a resume never changes them silently."""
import math
import shutil

import numpy as np
import pytest

from configs import default
from moe_jax import train
from moe_jax.validation import ConfigError, validate_config
from tests.test_train import run, tiny_config


def _train_config(**overrides):
  config = default.get_config().train
  for key, value in overrides.items():
    config[key] = value
  return config


def test_cosine_matches_the_formula_and_holds_the_end_value():
  config = _train_config(learning_rate=1e-3, warmup_steps=10, end_learning_rate_fraction=0.1)
  schedule = train.make_schedule(config, 110)
  for step in (0, 5, 10, 40, 75, 110, 150, 10_000):
    if step < 10:
      expected = 1e-3 * step / 10
    else:
      progress = min(step - 10, 100) / 100
      expected = 1e-4 + (1e-3 - 1e-4) * 0.5 * (1 + math.cos(math.pi * progress))
    assert float(schedule(step)) == pytest.approx(expected, rel=1e-5), step


def test_wsd_matches_the_formula():
  """Warmup-stable-decay (MiniCPM 2024): warmup, peak held, linear decay over the last 20%."""
  config = _train_config(schedule="wsd", learning_rate=2e-3, warmup_steps=10, decay_fraction=0.2,
                         end_learning_rate_fraction=0.05)
  schedule = train.make_schedule(config, 100)
  peak, end = 2e-3, 1e-4
  expected = {0: 0.0, 5: peak / 2, 10: peak, 50: peak, 80: peak, 90: (peak + end) / 2, 100: end,
              130: end}
  for step, value in expected.items():
    assert float(schedule(step)) == pytest.approx(value, rel=1e-5, abs=1e-12), step


def test_wsd_extension_keeps_every_rate_of_the_stable_phase():
  config = _train_config(schedule="wsd", warmup_steps=10, decay_fraction=0.1)
  short, long = train.make_schedule(config, 100), train.make_schedule(config, 300)
  steps = np.arange(0, 90)
  np.testing.assert_allclose([float(short(s)) for s in steps], [float(long(s)) for s in steps])
  assert float(long(150)) > float(short(150))  # the longer run is still at its peak


def test_resumed_horizon_rules():
  config = _train_config(steps=3000, schedule_steps=0, warmup_steps=100)
  horizon, message = train.resumed_horizon(config, saved=1500, step=1500)
  assert horizon == 1500 and "keeping the saved schedule horizon 1500" in message
  assert "3e-04" in message or "0.0003" in message  # the held final rate is named
  config.schedule_steps = 3000
  horizon, message = train.resumed_horizon(config, saved=1500, step=1500)
  assert horizon == 3000 and "replaces the saved schedule horizon 1500" in message
  # The example: the cosine over 3000 steps has 1.72e-3 at step 1500 instead of 3e-4.
  assert "0.0003 -> 0.00172" in message, message
  config.schedule_steps, config.steps = 0, 1500
  assert train.resumed_horizon(config, saved=1500, step=1000)[0] == 1500


def test_resume_keeps_the_saved_horizon_unless_a_new_one_is_given(tmp_path, monkeypatch):
  """Train 20 steps, resume to 30: the losses of one run whose schedule ends at step 20; with
  train.schedule_steps=30 the resumed run lays the schedule over 30 steps instead (and says so)."""
  quiet = dict(checkpoint_every=100, eval_every=100)
  _, reference = run(tiny_config(steps=30, schedule_steps=20, **quiet), tmp_path / "straight")
  run(tiny_config(steps=20, **quiet), tmp_path / "kept")
  shutil.copytree(tmp_path / "kept", tmp_path / "relaid")
  messages = []
  log_info = train.logging.info
  monkeypatch.setattr(train.logging, "info",
                      lambda msg, *args: (messages.append(str(msg) % args if args else str(msg)),
                                         log_info(msg, *args)))
  _, kept = run(tiny_config(steps=30, **quiet), tmp_path / "kept")
  assert min(kept) == 21
  np.testing.assert_allclose([kept[s] for s in range(21, 31)],
                             [reference[s] for s in range(21, 31)], rtol=1e-6)
  assert any("keeping the saved schedule horizon 20" in m for m in messages), messages
  _, relaid = run(tiny_config(steps=30, schedule_steps=30, **quiet), tmp_path / "relaid")
  assert any("train.schedule_steps=30 replaces the saved schedule horizon 20" in m
             for m in messages), messages
  assert kept[21] == pytest.approx(relaid[21], rel=1e-6)  # step 21's rate acts after its loss
  assert abs(kept[30] - relaid[30]) > 1e-6


@pytest.mark.parametrize("field,value,message", [
    ("schedule", "linear", "config.train.schedule='linear'"),
    ("schedule_steps", 50, "config.train.schedule_steps=50"),
    ("schedule_steps", -1, "config.train.schedule_steps=-1"),
    ("decay_fraction", 0.0, "config.train.decay_fraction=0.0"),
])
def test_bad_schedule_fields_are_rejected(field, value, message):
  config = default.get_config()
  config.train[field] = value
  with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
    validate_config(config, 1)
