"""Gradient accumulation: k micro-batches are one step on the whole batch (loss, grads, state).

Dropless routing in float32 has no randomness and no capacity, so k micro-steps must reproduce one
step on the global batch to float rounding. The balance loss, the loss-free bias and ReMoE's
coefficient are where naive accumulation goes wrong; each test below fails if they are computed per
micro-batch (one test shows that the naive version really differs).
"""
import functools

import jax
import numpy as np
import pytest

from configs import default
from moe_jax import data, grad_accum, sharding, train
from moe_jax.validation import ConfigError, validate_config
from test_train import run


def accum_config(router="token_choice", **moe_overrides):
  config = default.get_config("tiny")
  config.model.num_layers, config.model.moe_every = 2, 1
  config.model.moe.num_experts = 8
  config.model.moe.router = router
  # A large balance weight makes a wrong (per-micro-batch) balance loss visible in the gradients.
  config.model.moe.load_balance_loss_weight = 0.1
  for name, value in moe_overrides.items():
    config.model.moe[name] = value
  config.mesh.data = 1
  return config


def one_step(config, accum_steps, *, global_balance=None):
  """(metrics, new state) of step 0 on config.mesh with `accum_steps` micro-batches."""
  mesh = sharding.make_mesh(config.mesh)
  tx, _ = train.make_optimizer(config.train)
  graphdef, state = train.fresh_state(config, mesh, tx)
  batch = data.load_dataset(config.data, "train").train_batch(0, config.data.batch_size,
                                                             config.seed)
  batch = jax.device_put(batch, sharding.batch_sharding(mesh))
  if global_balance is None:
    global_balance = grad_accum.needs_global_load(config.model)
  step = functools.partial(train.train_step, graphdef=graphdef, tx=tx, seed=config.seed,
                           grad_accum_steps=accum_steps, global_balance=global_balance)
  with jax.set_mesh(mesh):
    new_state, metrics = jax.jit(step)(state, batch)
  return jax.tree.map(np.asarray, jax.device_get(metrics)), jax.device_get(new_state)


def rel(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def worst(tree, reference):
  return max(rel(a, b) for a, b in zip(jax.tree.leaves(tree), jax.tree.leaves(reference)))


def assert_same_step(config, accum_steps, tol=2e-5):
  metrics_1, state_1 = one_step(config, 1)
  metrics_k, state_k = one_step(config, accum_steps)
  for name in ("loss", "total_loss", "grad_norm", "aux/load_balance_loss", "aux/router_z_loss"):
    assert rel(metrics_k[name], metrics_1[name]) < tol, name
  for key in metrics_1:
    if key.endswith("/expert_load") or key.endswith("/expert_counts"):
      np.testing.assert_allclose(metrics_k[key], metrics_1[key], rtol=1e-6, atol=1e-7)
  assert worst(state_k["params"], state_1["params"]) < tol
  # Adam's first moment after one step is (1 - b1) * grad: the gradients themselves.
  assert worst(state_k["opt_state"], state_1["opt_state"]) < tol
  if "router_state" in state_1:
    assert worst(state_k["router_state"], state_1["router_state"]) < 1e-6
  return metrics_1, state_1, state_k


def test_token_choice_global_balance_equals_one_step():
  # k = 2 is covered by the ReLU, top-p and expert-parallel tests below.
  assert_same_step(accum_config(), 4)


def test_naive_per_micro_batch_balance_differs():
  """Without the global load, the balance-loss gradients are those of micro-batch balance."""
  config = accum_config()
  _, state_1 = one_step(config, 1)
  _, naive = one_step(config, 4, global_balance=False)
  assert worst(naive["opt_state"], state_1["opt_state"]) > 1e-4


def test_loss_free_bias_updates_once_from_the_whole_batch():
  config = accum_config(bias_update_rate=0.01)
  _, state_1, state_k = assert_same_step(config, 4)
  bias = jax.tree.leaves(state_1["router_state"])
  assert all(np.abs(b).max() > 0 for b in bias)  # the update happened, with sign(mean - count)


def test_relu_router_l1_coefficient_and_top_p():
  assert_same_step(accum_config("relu"), 2)
  assert_same_step(accum_config("top_p", top_p_threshold=0.5), 2)


def test_micro_batch_scope_balances_within_each_accumulation_micro_batch():
  """Micro-batch balance needs no global statistics; its groups lie inside each micro-batch.

  With one balance group per accumulation micro-batch (balance_micro_batch_size = B / k), the
  segmented micro-batch loss must equal global-scope balance computed per micro-batch (the naive
  accumulation): two code paths of `switch_load_balance_loss`, one answer.
  """
  micro = accum_config(balance_scope="micro_batch", balance_micro_batch_size=4)  # B=8, k=2
  assert not grad_accum.needs_global_load(micro.model)
  metrics, state = one_step(micro, 2)
  naive_metrics, naive_state = one_step(accum_config(), 2, global_balance=False)
  assert metrics["aux/load_balance_loss"] > 0
  assert rel(metrics["aux/load_balance_loss"], naive_metrics["aux/load_balance_loss"]) < 1e-6
  assert worst(state["opt_state"], naive_state["opt_state"]) < 2e-5
  # Two groups per micro-batch balance differently: the loss changes.
  halves, _ = one_step(accum_config(balance_scope="micro_batch", balance_micro_batch_size=2), 2)
  assert rel(halves["aux/load_balance_loss"], metrics["aux/load_balance_loss"]) > 1e-4


def test_expert_parallel_mesh_equals_one_device():
  """data=2 x expert=4 with k=2 == one step on one device, dropless and with capacity.

  Capacity groups are sequences here, inside every micro-batch: the same tokens are dropped.
  """
  for capacity_factor in (None, 1.0):
    config = accum_config(capacity_factor=capacity_factor, allow_noncausal=True)
    config.data.batch_size = 16
    _, state_1 = one_step(config, 1)
    config.mesh.data, config.mesh.expert = 2, 4
    validate_config(config, num_devices=8)
    _, state_k = one_step(config, 2)
    assert worst(state_k["opt_state"], state_1["opt_state"]) < 2e-5, capacity_factor
    assert worst(state_k["params"], state_1["params"]) < 2e-5, capacity_factor


def test_default_job_logs_the_same_losses(tmp_path):
  """The Done-when check at tiny scale: train.grad_accum_steps=4 logs the losses of 1."""
  config = default.get_config("tiny")
  config.mesh.data = 2  # micro-batches of 2 sequences, one per device
  config.train.steps, config.train.eval_every, config.train.checkpoint_every = 6, 6, 6
  _, losses_1 = run(config, tmp_path / "k1")
  config.train.grad_accum_steps = 4
  _, losses_4 = run(config, tmp_path / "k4")
  assert sorted(losses_1) == sorted(losses_4) == list(range(1, 7))
  for step in losses_1:
    assert abs(losses_4[step] - losses_1[step]) < 1e-5 * abs(losses_1[step]), step


@pytest.mark.parametrize("overrides, match", [
    ({"train.grad_accum_steps": 3}, "must divide config.data.batch_size=8"),
    ({"train.grad_accum_steps": 0}, "grad_accum_steps=0 is invalid"),
    ({"model.moe.importance_loss_weight": 0.01}, "importance_loss_weight=0.01 is not supported"),
    ({"model.moe.noisy_load_loss_weight": 0.01}, "noisy_load_loss_weight=0.01 is not supported"),
    ({"model.moe.router": "expert_choice", "model.moe.group_by": "position"},
     "group_by='position' with 'expert_choice'"),
    ({"model.moe.balance_scope": "micro_batch", "model.moe.balance_micro_batch_size": 3},
     "balance_micro_batch_size=3 must divide the accumulation micro-batch"),
    ({"mesh.data": 8}, r"micro-batch size \(data.batch_size / train.grad_accum_steps\)=4 must be "
     "divisible"),
])
def test_config_errors(overrides, match):
  config = default.get_config("tiny")
  config.mesh.data = 1
  config.train.grad_accum_steps = 2
  for path, value in overrides.items():
    node = config
    *parents, leaf = path.split(".")
    for name in parents:
      node = node[name]
    node[leaf] = value
  with pytest.raises(ConfigError, match=match):
    validate_config(config, num_devices=8)
