"""Derived config values follow command-line overrides; fields are validated only where used."""
import math
import os

import pytest
from absl import flags
from ml_collections import config_flags

from moe_jax.validation import ConfigError, validate_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def parse(config_file: str, *overrides: str):
  """The config as `python -m moe_jax.main --config=FILE --config.a.b=v ...` builds it."""
  argv = ["prog", f"--config={os.path.join(REPO, config_file)}", *overrides]
  flag_values = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, "config file", flag_values=flag_values,
                                  sys_argv=argv)
  flag_values(argv)
  return flag_values.config


@pytest.mark.parametrize("config_file", ["configs/default.py:dense", "configs/routers.py:dense"])
@pytest.mark.parametrize("overrides", [
    (), ("--config.model.moe.top_k=3",), ("--config.model.moe.expert_hidden_dim=96",),
    ("--config.model.moe.top_k=4", "--config.model.moe.expert_hidden_dim=40"),
])
def test_dense_baseline_width_follows_top_k_and_expert_width(config_file, overrides):
  config = parse(config_file, *overrides)
  moe = config.model.moe
  assert config.model.mlp_dim == moe.top_k * moe.expert_hidden_dim
  validate_config(config, 1)


def test_explicit_dense_width_wins():
  config = parse("configs/default.py:dense", "--config.model.mlp_dim=300",
                 "--config.model.moe.top_k=4")
  assert config.model.mlp_dim == 300


@pytest.mark.parametrize("overrides", [
    (), ("--config.model.moe.top_k=3",), ("--config.model.moe.num_experts=16",),
    ("--config.data.batch_size=24",),
    ("--config.data.batch_size=6", "--config.model.moe.top_k=1", "--config.model.moe.num_experts=4"),
])
def test_soft_slots_follow_top_k_experts_and_batch_size(overrides):
  config = parse("configs/routers.py:soft", *overrides)
  moe = config.model.moe
  expected = math.ceil(moe.top_k * config.data.batch_size / moe.num_experts)
  assert moe.soft_slots_per_expert == expected


@pytest.mark.parametrize("experts", [4, 8, 32])
def test_vmoe_noise_follows_the_expert_count(experts):
  config = parse("configs/routers.py:vmoe", f"--config.model.moe.num_experts={experts}")
  assert config.model.moe.router_noise_std == pytest.approx(1 / experts)


def test_expert_choice_capacity_follows_top_k():
  config = parse("configs/routers.py:expert_choice", "--config.model.moe.top_k=3")
  assert config.model.moe.capacity_factor == 3.0


def test_micro_batch_size_is_checked_only_for_micro_batch_balance():
  config = parse("configs/default.py", "--config.data.batch_size=15")
  validate_config(config, 1)  # global balance: balance_micro_batch_size=2 is not used
  config.model.moe.balance_scope = "micro_batch"
  with pytest.raises(ConfigError, match=r"balance_micro_batch_size=2 .*dividing data.batch_size=15"):
    validate_config(config, 1)
  config.model.moe.balance_micro_batch_size = 5
  validate_config(config, 1)
