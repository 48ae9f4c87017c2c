"""configs/mixtral_like.py and configs/deepseek_like.py: every variant is valid on its machine."""
import math
import os
import re
import subprocess
import sys

import pytest

from configs import deepseek_like, mixtral_like
from moe_jax import sharding, targets, train
from moe_jax.validation import ConfigError, validate_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VARIANTS = ("v5p-64", "v5p-128", "h100x8", "h100x64", "cpu8")
CASES = [(module, variant) for module in (mixtral_like, deepseek_like) for variant in VARIANTS]


@pytest.mark.parametrize("module,variant", CASES,
                         ids=[f"{m.__name__.split('.')[-1]}:{v}" for m, v in CASES])
def test_variant_is_valid_on_its_target_and_uses_every_device(module, variant):
  config = module.get_config(variant)
  num_devices = targets.get_target(variant).num_devices
  validate_config(config, num_devices=num_devices)
  sizes = sharding.resolve_mesh_shape(config.mesh, num_devices)
  assert math.prod(sizes.values()) == num_devices
  assert config.data.seq_len <= config.model.max_len
  assert config.model.vocab_size >= 259  # the byte pipeline's ids must fit


@pytest.mark.parametrize("module", [mixtral_like, deepseek_like])
def test_cpu8_is_valid_on_8_devices_and_not_on_a_smaller_machine(module):
  config = module.get_config("cpu8")
  validate_config(config, num_devices=8)
  with pytest.raises(ConfigError, match="config.mesh"):
    validate_config(config, num_devices=4)


def test_default_variant_is_v5p_64():
  assert mixtral_like.get_config().to_dict() == mixtral_like.get_config("v5p-64").to_dict()
  assert deepseek_like.get_config().to_dict() == deepseek_like.get_config("v5p-64").to_dict()


@pytest.mark.parametrize("module", [mixtral_like, deepseek_like])
def test_unknown_variant_names_the_allowed_ones(module):
  with pytest.raises(ValueError, match="'tpu9000'.*h100x8"):
    module.get_config("tpu9000")


def test_mixtral_shapes():
  for variant in VARIANTS[:-1]:
    model = mixtral_like.get_config(variant).model
    moe = model.moe
    assert (model.d_model, model.num_layers, model.num_heads, model.head_dim) == (4096, 32, 32, 128)
    assert (moe.num_experts, moe.top_k, moe.expert_hidden_dim) == (8, 2, 14336)
    assert (model.vocab_size, model.moe_every, model.dtype, model.remat) == (
        32000, 1, "bfloat16", True)
    assert moe.capacity_factor is None


def test_deepseek_shapes():
  for variant in VARIANTS[:-1]:
    model = deepseek_like.get_config(variant).model
    moe = model.moe
    assert (model.d_model, model.moe_every) == (2048, 1)
    assert (moe.num_experts, moe.top_k, moe.expert_hidden_dim, moe.num_shared_experts) == (
        64, 6, 1408, 2)


@pytest.mark.parametrize("module", [mixtral_like, deepseek_like])
def test_cpu8_keeps_the_moe_structure(module):
  full, tiny = module.get_config("h100x8"), module.get_config("cpu8")
  for field in ("num_experts", "top_k", "num_shared_experts"):
    assert tiny.model.moe[field] == full.model.moe[field]
  assert tiny.mesh.expert == 8


def _deepseek_cpu8_parameters(model) -> int:
  """Parameters of the deepseek_like cpu8 shapes, by hand: untied embeddings, per block two RMSNorm
  scales, Q/K/V/O, a linear router, E SwiGLU experts and the shared SwiGLU FFN; a final norm."""
  moe = model.moe
  d, attention = model.d_model, model.num_heads * model.head_dim
  block = (2 * d + 4 * d * attention + d * moe.num_experts
           + moe.num_experts * 3 * d * moe.expert_hidden_dim
           + 3 * d * moe.num_shared_experts * moe.expert_hidden_dim)
  return 2 * model.vocab_size * d + model.num_layers * block + d


@pytest.mark.slow
def test_cpu8_trains_two_steps_on_8_emulated_devices(tmp_path):
  """The scaled-down recipe runs end to end through moe_jax.main on its expert=8 mesh, holds the
  parameters its shapes give, and trains what a data-parallel-only mesh trains: the same step
  losses, gradient norm and eval loss (to the printed digits)."""
  overrides = {"train.steps": 2, "train.eval_every": 2, "train.checkpoint_every": 2,
               "train.log_every": 1, "data.eval_batches": 1, "data.task": "synthetic"}
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS="--xla_force_host_platform_device_count=8")
  result = subprocess.run(
      [sys.executable, "-m", "moe_jax.main", "--config=configs/deepseek_like.py:cpu8",
       f"--workdir={tmp_path / 'ep'}", *(f"--config.{k}={v}" for k, v in overrides.items())],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  assert os.path.exists(tmp_path / "ep" / "config.json")
  log = result.stderr
  assert "Mesh {'data': 1, 'fsdp': 1, 'expert': 8, 'tensor': 1} over 8 devices" in log, log[-3000:]
  config = deepseek_like.get_config("cpu8")
  assert f"Model: {_deepseek_cpu8_parameters(config.model):,} parameters." in log
  steps = re.findall(r"step (\d+)/2 loss (\S+) .* grad_norm (\S+) \|", log)
  ep_loss = {int(step): float(loss) for step, loss, _ in steps}
  ep_grad_norm = {int(step): float(norm) for step, _, norm in steps}
  ep_eval = [float(v) for v in re.findall(r"step 2/2 eval loss (\S+) ", log)]
  assert sorted(ep_loss) == [1, 2] and len(ep_eval) == 1, log[-3000:]

  # The same run on data=8 (no expert parallelism), in this process.
  for key, value in overrides.items():
    section, field = key.split(".")
    config[section][field] = value
  config.mesh.data, config.mesh.expert = 8, 1
  metrics = {}
  dp = train.train_and_evaluate(config, str(tmp_path / "dp"),
                                step_callback=lambda step, m: metrics.setdefault(step, m))
  for step in (1, 2):
    assert ep_loss[step] == pytest.approx(float(metrics[step]["loss"]), abs=2e-4), step
    assert ep_grad_norm[step] == pytest.approx(float(metrics[step]["grad_norm"]), rel=6e-3), step
  assert ep_eval[0] == pytest.approx(dp["eval/loss"], abs=2e-4)
