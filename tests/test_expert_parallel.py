"""Expert parallelism: the training loss and gradients are the same function on every mesh."""
import functools
import shutil

import jax
import jax.extend
import numpy as np
import pytest

from configs import default
from experiments import comm_model
from moe_jax import data, sharding, train
from moe_jax.validation import ConfigError, validate_config
from test_train import run  # trains with a loss-recording, optionally preempting callback


def tiny_moe_config(capacity_factor=None, exchange="all_to_all", **mesh):
  config = default.get_config("tiny")
  config.model.moe.num_experts = 8  # divisible by every expert-axis size below
  config.model.num_layers, config.model.moe_every = 1, 1  # one MoE block: compiles fast
  config.model.moe.capacity_factor = capacity_factor
  config.model.moe.ep_exchange = exchange
  # Capacity groups of a sequence (the default layout) see later tokens; these tests compare meshes
  # on that layout on purpose, not causality.
  config.model.moe.allow_noncausal = True
  config.mesh.data = 1
  for axis, size in mesh.items():
    config.mesh[axis] = size
  return config


def loss_and_grads(config):
  """Loss, dropped fraction and gradients of step 0's batch, computed on config.mesh (with the
  initial router state for routers that keep one)."""
  validate_config(config, num_devices=8)
  mesh = sharding.make_mesh(config.mesh)
  graphdef, params, _ = train.build_model(config, mesh)
  router_state = train.init_router_state(config, mesh)  # {} unless the router keeps state
  batch = data.load_dataset(config.data, "train").train_batch(0, config.data.batch_size,
                                                             config.seed)
  batch = jax.device_put(batch, sharding.batch_sharding(mesh))
  grad_fn = jax.value_and_grad(functools.partial(train.loss_fn, graphdef=graphdef), has_aux=True)
  with jax.set_mesh(mesh):
    (loss, (_, aux)), grads = jax.jit(grad_fn)(params, batch, router_state=router_state)
  return float(loss), float(aux["dropped_fraction"]), jax.tree.map(np.asarray, grads)


def worst_relative_difference(grads, reference):
  return max(float(np.linalg.norm(g - r) / np.linalg.norm(r))
             for g, r in zip(jax.tree.leaves(grads), jax.tree.leaves(reference)))


MESHES = [dict(data=2, expert=4), dict(expert=8), dict(fsdp=2, expert=4),
          dict(data=2, expert=2, tensor=2)]


@pytest.mark.parametrize("capacity_factor", [None, 1.0], ids=["dropless", "capacity"])
def test_mesh_invariance(capacity_factor):
  """data=8 (no expert parallelism) and four expert-parallel meshes agree to float tolerance."""
  loss, dropped, grads = loss_and_grads(tiny_moe_config(capacity_factor, data=8))
  if capacity_factor is not None:
    assert dropped > 0.05  # the capacity case really drops tokens
  for mesh in MESHES:
    ep_loss, ep_dropped, ep_grads = loss_and_grads(tiny_moe_config(capacity_factor, **mesh))
    assert ep_dropped == pytest.approx(dropped, abs=1e-7), mesh
    assert ep_loss == pytest.approx(loss, rel=1e-6), mesh
    assert worst_relative_difference(ep_grads, grads) < 1e-5, mesh


@pytest.mark.parametrize("capacity_factor", [None, 1.0], ids=["dropless", "capacity"])
def test_allgather_exchange_matches_all_to_all(capacity_factor):
  """The all-gather / reduce-scatter exchange computes what the all-to-all exchange computes."""
  loss, dropped, grads = loss_and_grads(tiny_moe_config(capacity_factor, data=2, expert=4))
  ag_loss, ag_dropped, ag_grads = loss_and_grads(
      tiny_moe_config(capacity_factor, "allgather", data=2, expert=4))
  assert ag_dropped == pytest.approx(dropped, abs=1e-7)
  assert ag_loss == pytest.approx(loss, rel=1e-6)
  assert worst_relative_difference(ag_grads, grads) < 1e-5


def test_capacity_group_may_not_span_devices():
  config = tiny_moe_config(1.0, data=2, expert=4)
  config.model.moe.group_size = 64  # each device holds one 32-token sequence
  with pytest.raises(ConfigError, match="group_size=64 must divide the tokens each device holds"):
    validate_config(config, num_devices=8)


def test_training_logs_the_same_losses_with_and_without_expert_parallelism(tmp_path):
  losses = []
  for name, mesh in (("dp", dict(data=8)), ("ep", dict(data=2, expert=4))):
    config = tiny_moe_config(**mesh)
    config.train.steps, config.train.eval_every = 4, 100
    losses.append(run(config, tmp_path / name)[1])
  np.testing.assert_allclose([losses[1][s] for s in range(1, 5)],
                             [losses[0][s] for s in range(1, 5)], rtol=1e-5)


def test_checkpoint_restores_onto_another_mesh(tmp_path):
  """Saved with experts split 4 ways, resumed with experts split 8 ways and on one device."""
  def config_on(**mesh):
    config = tiny_moe_config(**mesh)
    config.train.steps, config.train.eval_every, config.train.checkpoint_every = 8, 100, 100
    return config

  _, reference = run(config_on(data=2, expert=4), tmp_path / "straight")
  first, before = run(config_on(data=2, expert=4), tmp_path / "saved", stop_at=5)
  assert first["preempted"]
  for name, mesh in (("ep8", dict(expert=8)), ("single", dict(data=1))):
    workdir = tmp_path / name
    shutil.copytree(tmp_path / "saved", workdir)
    _, after = run(config_on(**mesh), workdir)
    assert min(after) == 6
    resumed = {**before, **after}
    np.testing.assert_allclose([resumed[s] for s in range(1, 9)],
                               [reference[s] for s in range(1, 9)], rtol=1e-5)


def _collectives(jaxpr, found=None):
  """(primitive, per-device bytes) of every collective in a jaxpr, sub-jaxprs included.

  The bytes are the operand's, except for all_gather: its gathered result.
  """
  found = [] if found is None else found
  for eqn in jaxpr.eqns:
    if eqn.primitive.name in ("all_to_all", "all_gather", "reduce_scatter"):
      var = eqn.outvars[0] if eqn.primitive.name == "all_gather" else eqn.invars[0]
      found.append((eqn.primitive.name, int(np.prod(var.aval.shape)) * var.aval.dtype.itemsize))
    for sub in jax.extend.core.jaxprs_in_params(eqn.params):
      _collectives(sub, found)
  return found


@pytest.mark.parametrize("mode", ["capacity_all_to_all", "padded_all_to_all", "allgather"])
def test_comm_model_counts_the_bytes_the_layer_exchanges(mode):
  """experiments/comm_model.py's byte counts equal the arrays the EP forward actually exchanges."""
  capacity_factor = 1.0 if mode == "capacity_all_to_all" else None
  exchange = "allgather" if mode == "allgather" else "all_to_all"
  config = tiny_moe_config(capacity_factor, exchange, data=2, expert=4)
  mesh = sharding.make_mesh(config.mesh)
  graphdef, params, _ = train.build_model(config, mesh)
  batch = data.load_dataset(config.data, "train").train_batch(0, config.data.batch_size, 0)
  with jax.set_mesh(mesh):
    jaxpr = jax.make_jaxpr(functools.partial(train.loss_fn, graphdef=graphdef))(params, batch)
  collectives = _collectives(jaxpr.jaxpr)
  expected = comm_model.exchanged_bytes(config, dict(mesh.shape), mode)
  dispatch_kind = "all_gather" if mode == "allgather" else "all_to_all"
  token_exchange = [size for kind, size in collectives if kind == dispatch_kind]
  # The first collective of its kind moves the tokens; for all-gather, that is the token gather.
  assert token_exchange[0] == expected["per_device_bytes"], (collectives, expected)
  combine_kind = "reduce_scatter" if mode == "allgather" else "all_to_all"
  combine = [size for kind, size in collectives if kind == combine_kind][-1]
  assert combine == expected["combine_per_device_bytes"], (collectives, expected)


def test_shared_experts_run_expert_parallel():
  """A layer with an always-on shared expert computes the same function with experts split."""
  def with_shared(**mesh):
    config = tiny_moe_config(**mesh)
    config.model.moe.num_shared_experts = 1
    return config

  loss, _, grads = loss_and_grads(with_shared(data=8))
  ep_loss, _, ep_grads = loss_and_grads(with_shared(data=2, expert=4))
  assert ep_loss == pytest.approx(loss, rel=1e-6)
  assert worst_relative_difference(ep_grads, grads) < 1e-5


# Capacity + allgather + tensor is a fixed case of tests/test_fuzz.py.
@pytest.mark.parametrize("capacity_factor, exchange", [
    (None, "all_to_all"), (None, "allgather"), (None, "ragged_all_to_all"),
    (1.0, "all_to_all")])
def test_expert_tensor_parallelism(capacity_factor, exchange):
  """Experts' hidden dimension over `tensor` inside shard_map: the data=8 loss and gradients, and
  the weights enter the shard_map sharded over `tensor` (not gathered)."""
  from moe_jax import expert_parallel
  loss, dropped, grads = loss_and_grads(tiny_moe_config(capacity_factor, data=8))
  config = tiny_moe_config(capacity_factor, exchange, data=2, expert=2, tensor=2)
  tp_loss, tp_dropped, tp_grads = loss_and_grads(config)
  assert tp_dropped == pytest.approx(dropped, abs=1e-7)
  assert tp_loss == pytest.approx(loss, rel=1e-6)
  assert worst_relative_difference(tp_grads, grads) < 1e-5

  mesh = sharding.make_mesh(config.mesh)
  hidden = config.model.moe.expert_hidden_dim
  weights = (jax.ShapeDtypeStruct((8, 32, 2 * hidden), "float32"),
             jax.ShapeDtypeStruct((8, hidden, 32), "float32"))
  assert expert_parallel.tensor_parallel_size(weights, mesh) == 2
  specs = expert_parallel._weight_specs(weights, mesh)
  assert specs == (jax.sharding.PartitionSpec("expert", None, "tensor"),
                   jax.sharding.PartitionSpec("expert", "tensor", None))
  # A hidden size `tensor` does not divide falls back to gathering the weights on entry.
  odd = (jax.ShapeDtypeStruct((8, 32, 2 * 33), "float32"),
         jax.ShapeDtypeStruct((8, 33, 32), "float32"))
  assert expert_parallel.tensor_parallel_size(odd, mesh) == 1
