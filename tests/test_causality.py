"""Validation's causality rule agrees with what the MoE layer does when later tokens change."""
import jax
import numpy as np
import pytest
from flax import nnx

from configs import default
from moe_jax.moe import MoELayer
from moe_jax.validation import ConfigError, noncausal_routing, validate_config

BATCH, SEQ, D_MODEL = 4, 12, 16


def _config(**moe_fields):
  config = default.get_config("tiny")
  config.data.batch_size = BATCH
  moe = config.model.moe
  moe.num_experts = 4
  for key, value in moe_fields.items():
    moe[key] = value
  return config


def _leaks_future(config, trials: int = 6) -> bool:
  """Does some change to positions > t change the layer's output at positions <= t?

  Measured on random inputs: the change perturbs every later token strongly, so routing decisions
  (selection, capacity slots, slot contents) that depend on them change.
  """
  layer = MoELayer(config.model.moe, D_MODEL, rngs=nnx.Rngs(0))
  forward = jax.jit(lambda x: layer(x)[0])
  rng = np.random.default_rng(0)
  for trial in range(trials):
    x = rng.normal(size=(BATCH, SEQ, D_MODEL)).astype(np.float32)
    cut = 1 + trial % (SEQ - 2)
    changed = x.copy()
    changed[:, cut + 1:] = rng.normal(size=changed[:, cut + 1:].shape) * 3.0
    before, after = np.asarray(forward(x)), np.asarray(forward(changed))
    if np.max(np.abs(before[:, :cut + 1] - after[:, :cut + 1])) > 1e-5:
      return True
  return False


CASES = {
    "dropless top-2": {},
    "expert choice, sequence groups": dict(router="expert_choice", capacity_factor=1.0),
    "expert choice, position groups": dict(router="expert_choice", capacity_factor=1.0,
                                           group_by="position"),
    "expert choice, position groups of 2": dict(router="expert_choice", capacity_factor=1.0,
                                                group_by="position", group_size=2),
    "expert choice, position groups of 8": dict(router="expert_choice", capacity_factor=1.0,
                                                group_by="position", group_size=8),
    "soft, sequence groups": dict(router="soft", soft_slots_per_expert=2),
    "soft, position groups": dict(router="soft", soft_slots_per_expert=2, group_by="position"),
    "capacity top-2, sequence groups": dict(capacity_factor=0.5),
    "capacity top-2, position groups": dict(capacity_factor=0.5, group_by="position"),
    "capacity top-1, sequence groups": dict(capacity_factor=0.5, top_k=1),
    "bpr top-1, sequence groups": dict(capacity_factor=0.5, top_k=1, capacity_priority="score"),
    "bpr top-2, position groups": dict(capacity_factor=0.5, capacity_priority="score",
                                       group_by="position"),
    "top-p dropless": dict(router="top_p"),
    "top-p capacity, sequence groups": dict(router="top_p", capacity_factor=0.5),
}


@pytest.mark.parametrize("name", list(CASES))
def test_rule_matches_the_layer(name):
  config = _config(**CASES[name])
  reason = noncausal_routing(config)
  assert _leaks_future(config) == (reason is not None), (name, reason)


def test_validation_rejects_leaks_unless_allowed_and_names_the_fix():
  config = _config(router="expert_choice", capacity_factor=1.0)
  with pytest.raises(ConfigError) as error:
    validate_config(config, 1)
  message = str(error.value)
  assert "router='expert_choice' with group_by='sequence'" in message
  assert "config.model.moe.group_by='position'" in message
  assert "config.model.moe.allow_noncausal=True" in message
  config.model.moe.allow_noncausal = True
  validate_config(config, 1)
  config.model.causal = False  # an encoder trained on next bytes would see its targets
  with pytest.raises(ConfigError, match="config.model.causal=False is invalid with "
                     "config.data.objective='lm'"):
    validate_config(config, 1)


def test_capacity_on_the_default_job_asks_for_position_groups():
  config = default.get_config()
  config.model.moe.capacity_factor = 1.25
  with pytest.raises(ConfigError, match=r"capacity_factor=1.25 .*group_by='sequence'"):
    validate_config(config, 1)
  config.model.moe.group_by = "position"
  validate_config(config, 1)
