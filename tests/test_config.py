"""Config validation: every bad value raises one error naming the field, the value and what is allowed."""
import os
import subprocess
import sys

import pytest

from configs import default
from moe_jax.validation import ConfigError, validate_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_shipped_configs_are_valid():
  for variant in (None, "dense", "tiny"):
    validate_config(default.get_config(variant), num_devices=8)
    validate_config(default.get_config(variant), num_devices=1)


def test_unknown_variant_is_rejected():
  with pytest.raises(ValueError, match="variant 'huge'"):
    default.get_config("huge")


def test_dense_variant_has_equal_active_ffn_width():
  moe, dense = default.get_config(), default.get_config("dense")
  assert dense.model.moe_every == 0
  assert dense.model.mlp_dim == moe.model.moe.top_k * moe.model.moe.expert_hidden_dim


BAD_VALUES = [
    # (field path, bad value, words the message must contain)
    ("model.moe.router", "telepathy", ["config.model.moe.router", "'telepathy'", "token_choice"]),
    ("model.moe.top_k", 9, ["config.model.moe.top_k", "9", "num_experts=8"]),
    ("model.moe.top_k", 0, ["config.model.moe.top_k", "0"]),
    ("model.moe.capacity_factor", -1.0, ["config.model.moe.capacity_factor", "-1.0", "> 0"]),
    ("model.moe.capacity_factor", 0.0, ["config.model.moe.capacity_factor", "0.0"]),
    ("model.moe.num_experts", 0, ["config.model.moe.num_experts", "positive"]),
    ("model.moe.gmm_backend", "cuda9", ["config.model.moe.gmm_backend", "'cuda9'", "reference"]),
    ("model.dtype", "float8", ["config.model.dtype", "'float8'", "bfloat16"]),
    ("model.head_dim", 15, ["config.model.head_dim", "15", "even"]),
    ("model.activation", "relu6", ["config.model.activation", "swiglu"]),
    ("model.moe_every", -1, ["config.model.moe_every", "-1"]),
    ("data.seq_len", 1024, ["config.data.seq_len", "1024", "max_len=512"]),
    ("data.task", "wikipedia", ["config.data.task", "'wikipedia'", "stdlib_bytes"]),
    ("data.reader", "pandas", ["config.data.reader", "'pandas'", "numpy"]),
    ("data.batch_size", 0, ["config.data.batch_size", "positive"]),
    ("train.steps", -5, ["config.train.steps", "-5", "positive"]),
    ("train.learning_rate", 0.0, ["config.train.learning_rate", "0.0", "> 0"]),
    ("train.keep_checkpoints", 0, ["config.train.keep_checkpoints", "positive"]),
    ("mesh.data", 0, ["config.mesh.data=0", "-1"]),
    ("model.residual_multiplier", 0.0, ["config.model.residual_multiplier", "> 0"]),
    ("model.logit_divisor", -2.0, ["config.model.logit_divisor", "-2.0"]),
    ("model.attention_scale", -0.1, ["config.model.attention_scale", "-0.1"]),
]


def test_attention_scale_is_mha_only():
  config = default.get_config()
  config.model.attention, config.model.attention_scale = "mla", 0.1
  with pytest.raises(ConfigError, match=r"config.model.attention_scale=0.1.*'mla'"):
    validate_config(config, num_devices=8)


@pytest.mark.parametrize("path,value,words", BAD_VALUES, ids=[f"{p}={v}" for p, v, _ in BAD_VALUES])
def test_bad_value_names_field_value_and_allowed(path, value, words):
  config = default.get_config()
  node = config
  *parents, leaf = path.split(".")
  for name in parents:
    node = node[name]
  with node.ignore_type():
    node[leaf] = value
  with pytest.raises(ConfigError) as info:
    validate_config(config, num_devices=8)
  for word in words:
    assert word in str(info.value), (word, str(info.value))


def test_experts_must_divide_over_expert_axis():
  config = default.get_config()
  config.mesh.data, config.mesh.expert = 1, 3
  with pytest.raises(ConfigError, match=r"num_experts=8 must be divisible by config.mesh.expert=3"):
    validate_config(config, num_devices=8)


def test_mesh_larger_than_devices():
  config = default.get_config()
  config.mesh.data, config.mesh.expert = 4, 4
  with pytest.raises(ConfigError, match=r"needs 16 devices .* 8 are available"):
    validate_config(config, num_devices=8)


def test_two_free_mesh_axes():
  config = default.get_config()
  config.mesh.data, config.mesh.fsdp = -1, -1
  with pytest.raises(ConfigError, match="only one axis may be -1"):
    validate_config(config, num_devices=8)


def test_batch_must_split_over_batch_axes():
  config = default.get_config()
  config.data.batch_size = 12
  with pytest.raises(ConfigError, match=r"batch_size=12 must be divisible .* 8"):
    validate_config(config, num_devices=8)


@pytest.mark.parametrize("variant", ["expert_choice", "token_choice_capacity"])
def test_position_groups_need_whole_positions_per_device_under_expert_parallelism(variant):
  """group_by="position" transposes the batch to [S, B] tokens; the capacity shard_map splits those
  S * B rows over data * fsdp * expert = 8 shards, so seq_len must be a multiple of 8 (each device
  then holds seq_len / 8 whole position groups of B tokens)."""
  from configs import routers

  def config(seq_len, expert=4, **moe):
    c = routers.apply_router(default.get_config("tiny"), variant)
    c.model.moe.num_experts = 8
    c.model.moe.update(moe)
    c.mesh.data, c.mesh.expert = 8 // expert, expert
    c.data.seq_len = seq_len
    return c

  assert config(20).model.moe.group_by == "position"
  message = (r"config.data.seq_len=20 is invalid with model.moe.group_by='position', capacity "
             r"dispatch and expert parallelism \(mesh.expert=4\); allowed: a multiple of the batch "
             r"shards data \* fsdp \* expert = 8")
  with pytest.raises(ConfigError, match=message):
    validate_config(config(20), num_devices=8)
  validate_config(config(24), num_devices=8)  # 3 positions per device
  validate_config(config(20, expert=1), num_devices=8)  # no shard_map: any seq_len
  validate_config(config(20, group_size=4), num_devices=8)  # 20 local tokens, groups of 4
  if variant == "token_choice_capacity":
    validate_config(config(20, capacity_factor=None), num_devices=8)  # dropless: no groups in EP


def test_text_files_task_needs_a_path():
  config = default.get_config()
  config.data.task = "text_files"
  with pytest.raises(ConfigError, match="config.data.path"):
    validate_config(config, num_devices=1)


def test_all_problems_reported_in_one_error():
  config = default.get_config()
  config.model.moe.top_k = 99
  config.data.task = "nope"
  with pytest.raises(ConfigError) as info:
    validate_config(config, num_devices=1)
  assert "config.model.moe.top_k" in str(info.value) and "config.data.task" in str(info.value)


def test_bad_flag_fails_before_writing_the_workdir(tmp_path):
  """The CLI rejects a bad override with the message and leaves no workdir behind."""
  workdir = tmp_path / "never_created"
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")
  proc = subprocess.run(
      [sys.executable, "-m", "moe_jax.main", "--config=configs/default.py",
       f"--workdir={workdir}", "--config.model.moe.top_k=9"],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode != 0
  assert "config.model.moe.top_k=9" in proc.stderr + proc.stdout
  assert not workdir.exists()
