"""The ragged all-to-all stand-in has the primitive's semantics, and the dropless expert-parallel
layer built on it computes the single-device MoE, overflowing receive buffers included."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import Mesh, PartitionSpec as P

from moe_jax import data, expert_parallel, ragged_exchange, sharding, train
from moe_jax.experts import Experts, batched_ffn
from moe_jax.validation import ConfigError, validate_config
from test_expert_parallel import tiny_moe_config

AXIS = "peers"


def random_exchange(rng, ep, slices, rows_in, rows_out, width=(3, 2)):
  """Per-device arguments [ep, ...] of a well-defined ragged all-to-all with random raggedness.

  Each receiver lays the slices it gets out in a random order with random gaps (rows no slice
  writes), a third of all slices are empty, and input slices may overlap.
  """
  n = ep * slices
  send_sizes = rng.integers(0, rows_out // n + 1, size=(ep, n))
  send_sizes[rng.random((ep, n)) < 1 / 3] = 0
  recv_sizes = np.zeros_like(send_sizes)
  output_offsets = np.zeros_like(send_sizes)
  for dst in range(ep):
    incoming = [(src, s) for src in range(ep) for s in range(slices)]
    sizes = {(src, s): send_sizes[src, dst * slices + s] for src, s in incoming}
    gaps = rng.multinomial(rows_out - sum(sizes.values()), np.ones(n + 1) / (n + 1))
    position = gaps[0]
    for (src, s), gap in zip([incoming[i] for i in rng.permutation(n)], gaps[1:]):
      output_offsets[src, dst * slices + s] = position
      recv_sizes[dst, src * slices + s] = sizes[src, s]
      position += sizes[src, s] + gap
  input_offsets = rng.integers(0, rows_in - send_sizes + 1)
  operand = rng.normal(size=(ep, rows_in) + width).astype(np.float32)
  output = rng.normal(size=(ep, rows_out) + width).astype(np.float32)
  ints = [x.astype(np.int32) for x in (input_offsets, send_sizes, output_offsets, recv_sizes)]
  return operand, output, *ints


def numpy_ragged_all_to_all(operand, output, input_offsets, send_sizes, output_offsets,
                            recv_sizes):
  """The primitive's documented semantics, device by device ([ep, ...] arguments)."""
  ep, n = send_sizes.shape
  slices = n // ep
  result = output.copy()
  for src in range(ep):
    for i in range(n):
      dst, s = divmod(i, slices)
      size = send_sizes[src, i]
      assert recv_sizes[dst, src * slices + s] == size
      start, at = input_offsets[src, i], output_offsets[src, i]
      result[dst, at:at + size] = operand[src, start:start + size]
  return result


def run_on_devices(args, devices, use_primitive):
  mesh = Mesh(np.asarray(devices), (AXIS,), axis_types=(jax.sharding.AxisType.Auto,))

  def per_device(*xs):
    xs = [x[0] for x in xs]
    return ragged_exchange.ragged_all_to_all(*xs, axis_name=AXIS, use_primitive=use_primitive)[None]

  fn = jax.shard_map(per_device, mesh=mesh, in_specs=(P(AXIS),) * 6, out_specs=P(AXIS))
  return np.asarray(jax.jit(fn)(*args))


@pytest.mark.parametrize("slices,rows_in,rows_out", [(1, 12, 40), (2, 9, 64), (3, 20, 72)])
def test_stand_in_matches_the_primitives_semantics(slices, rows_in, rows_out):
  rng = np.random.default_rng(slices)
  args = random_exchange(rng, 8, slices, rows_in, rows_out)
  expected = numpy_ragged_all_to_all(*args)
  assert (args[3] == 0).any() and (args[3] > 0).any()
  untouched = np.isclose(expected, args[1]).all(axis=(2, 3))
  assert untouched.any() and not untouched.all()  # some rows keep `output`, some are written
  np.testing.assert_array_equal(run_on_devices(args, jax.devices()[:8], use_primitive=False),
                                expected)


def test_stand_in_matches_the_primitive():
  if not ragged_exchange.primitive_available():
    pytest.skip("XLA:CPU does not implement ragged_all_to_all")
  devices = jax.devices()
  args = random_exchange(np.random.default_rng(0), len(devices), 2, 16, 48)
  np.testing.assert_array_equal(run_on_devices(args, devices, use_primitive=False),
                                run_on_devices(args, devices, use_primitive=True))


# ------------------------------------------------------------------------------------- the layer

NUM_EXPERTS, D_MODEL, HIDDEN, TOKENS = 8, 16, 32, 64


def routing(top_k, seed=0):
  """Skewed routing: ~70% of the choices go to expert 3, a few to no expert (id E)."""
  rng = np.random.default_rng(seed)
  index = rng.integers(0, NUM_EXPERTS, size=(TOKENS, top_k))
  index[rng.random(index.shape) < 0.7] = 3
  if top_k > 1:  # a token's choices are distinct experts
    index[:, 1] = np.where(index[:, 1] == index[:, 0], (index[:, 0] + 1) % NUM_EXPERTS,
                           index[:, 1])
  index[rng.random(index.shape) < 0.05] = NUM_EXPERTS
  weight = rng.uniform(0.1, 1.0, size=index.shape).astype(np.float32)
  return jnp.asarray(index, jnp.int32), jnp.asarray(weight)


def dense_moe(tokens, index, weight, weights):
  """The reference: every expert on every token, each token's K outputs weighted and summed."""
  everything = batched_ffn(jnp.broadcast_to(tokens, (NUM_EXPERTS,) + tokens.shape), weights,
                           activation="swiglu", dtype=jnp.float32)  # [E, T, D]
  chosen = everything[jnp.minimum(index, NUM_EXPERTS - 1), jnp.arange(TOKENS)[:, None]]
  return jnp.einsum("tkd,tk->td", chosen, jnp.where(index < NUM_EXPERTS, weight, 0.0))


def value_and_grads(fn, tokens, weight, weights, cotangent):
  """fn(tokens, weight, weights) and the gradients of <fn, cotangent> w.r.t. all three."""
  def both(*args):
    y, vjp = jax.vjp(fn, *args)
    return y, vjp(cotangent)
  return jax.tree.map(np.asarray, jax.jit(both)(tokens, weight, weights))


def relative_error(got, want):
  return max(float(np.linalg.norm(g - w) / np.linalg.norm(w))
             for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)))


@functools.lru_cache
def problem(top_k):
  weights = Experts(NUM_EXPERTS, D_MODEL, HIDDEN, activation="swiglu", rngs=nnx.Rngs(0)).weights()
  keys = jax.random.split(jax.random.key(1))
  tokens = jax.random.normal(keys[0], (TOKENS, D_MODEL))
  cotangent = jax.random.normal(keys[1], (TOKENS, D_MODEL))
  index, weight = routing(top_k)
  reference = value_and_grads(lambda x, w, ws: dense_moe(x, index, w, ws), tokens, weight,
                              weights, cotangent)
  return tokens, index, weight, weights, cotangent, reference


def expert_parallel_run(mesh_axes, top_k, factor=0.0):
  tokens, index, weight, weights, cotangent, reference = problem(top_k)
  mesh = sharding.make_mesh(mesh_axes)
  fn = lambda x, w, ws: expert_parallel.dropless(
      x, index, w, ws, mesh=mesh, exchange="ragged_all_to_all", activation="swiglu",
      dtype=jnp.float32, backend="auto", recv_buffer_factor=factor)
  with jax.set_mesh(mesh):
    got = value_and_grads(fn, tokens, weight, weights, cotangent)
    needed = np.asarray(expert_parallel.ragged_recv_rows(index, NUM_EXPERTS, mesh=mesh))
  return got, reference, needed, mesh


def numpy_recv_rows(index, mesh):
  """Rows each batch shard's device receives: its expert group's assignments to its experts."""
  ep = mesh.shape["expert"]
  # [group, source, rows]: the expert axis varies fastest among the batch shards. Unassigned
  # choices (id E) belong to "device" ep, which does not exist.
  owner = np.asarray(index).reshape(sharding.batch_shards(mesh) // ep, ep, -1) // (
      NUM_EXPERTS // ep)
  return np.array([(group == d).sum() for group in owner for d in range(ep)])


@pytest.mark.parametrize("mesh_axes,top_k", [(dict(expert=8), 2), (dict(data=2, expert=4), 2),
                                             (dict(expert=8), 1)],
                         ids=["expert=8-K=2", "data=2,expert=4-K=2", "expert=8-K=1"])
def test_ragged_layer_equals_the_single_device_moe(mesh_axes, top_k):
  """Outputs and gradients (tokens, combine weights, expert weights) with the exact buffer."""
  got, reference, needed, mesh = expert_parallel_run(mesh_axes, top_k)
  np.testing.assert_array_equal(needed, numpy_recv_rows(problem(top_k)[1], mesh))
  assert needed.max() > 2 * needed.min()  # the routing really is skewed
  assert relative_error(got, reference) < 1e-5


def test_overfull_receive_buffer_falls_back_without_dropping():
  """factor 0.25 (R = T_local * K / 4) cannot hold the skewed load: the padded fallback is exact."""
  top_k = 2
  got, reference, needed, mesh = expert_parallel_run(dict(expert=8), top_k, factor=0.25)
  local_rows = TOKENS // 8 * top_k
  assert needed.max() > expert_parallel.recv_buffer_rows(local_rows, 8, 0.25)
  assert relative_error(got, reference) < 1e-5


def test_tight_receive_buffer_uses_the_ragged_exchange():
  """R = exactly the most rows any device receives: no fallback, and still exact."""
  top_k, mesh_axes = 2, dict(data=2, expert=4)
  most = numpy_recv_rows(problem(top_k)[1], sharding.make_mesh(mesh_axes)).max()
  local_rows = TOKENS // 8 * top_k
  factor = most / local_rows
  assert expert_parallel.recv_buffer_rows(local_rows, 4, factor) == most < 4 * local_rows
  got, reference, needed, _ = expert_parallel_run(mesh_axes, top_k, factor=factor)
  assert needed.max() == most
  assert relative_error(got, reference) < 1e-5


def test_recv_buffer_rows():
  assert expert_parallel.recv_buffer_rows(100, 4, 0.0) == 400  # the exact worst case
  assert expert_parallel.recv_buffer_rows(100, 4, 1.1) == 110
  assert expert_parallel.recv_buffer_rows(100, 4, 9.0) == 400  # never past the worst case
  assert expert_parallel.recv_buffer_rows(100, 4, 1e-9) == 1


def test_primitive_path_traces_and_differentiates(monkeypatch):
  """On CPU the primitive cannot run, but the GPU/TPU path must type-check and lower."""
  monkeypatch.setattr(ragged_exchange, "primitive_available", lambda: True)
  tokens, index, weight, weights, cotangent, _ = problem(2)
  mesh = sharding.make_mesh(dict(data=2, expert=4))
  loss = lambda x, w, ws: jnp.sum(cotangent * expert_parallel.dropless(
      x, index, w, ws, mesh=mesh, exchange="ragged_all_to_all", activation="swiglu",
      dtype=jnp.float32, backend="auto", recv_buffer_factor=1.5))
  with jax.set_mesh(mesh):
    text = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(tokens, weight, weights).as_text()
  # There and back, forward and transposed.
  assert text.count("custom_call @ragged_all_to_all(") == 4


# ------------------------------------------------------------------------------ config and model


def test_transformer_loss_matches_data_parallelism(monkeypatch):
  """The tiny model's step-0 loss on expert=8 with the ragged exchange is its data=8 loss
  (forward only: the layer tests above check gradients)."""
  traced = []
  body = expert_parallel._dropless_ragged
  monkeypatch.setattr(expert_parallel, "_dropless_ragged",
                      lambda *a, **k: traced.append(k) or body(*a, **k))
  config = tiny_moe_config(exchange="ragged_all_to_all", expert=8)
  config.data.reader = "numpy"  # the same batches without importing TensorFlow
  validate_config(config, num_devices=8)
  ep_mesh = sharding.make_mesh(config.mesh)
  graphdef, params, _ = train.build_model(config, ep_mesh)
  batch = data.load_dataset(config.data, "train").train_batch(0, config.data.batch_size, 0)
  loss_fn = jax.jit(functools.partial(train.loss_fn, graphdef=graphdef))
  losses = []
  # The layer is expert-parallel exactly when the ambient mesh has an expert axis.
  for mesh in (ep_mesh, sharding.make_mesh(dict(data=8))):
    with jax.set_mesh(mesh):
      placed = jax.device_put(params, jax.tree.map(lambda a: sharding.replicated(mesh), params))
      losses.append(float(loss_fn(placed, jax.device_put(batch, sharding.batch_sharding(mesh)))[0]))
  assert len(traced) == 1 and traced[0]["recv_buffer_factor"] == 0.0  # the EP run took it
  assert losses[0] == pytest.approx(losses[1], rel=1e-6)


def test_validation_of_the_ragged_exchange_fields():
  config = tiny_moe_config(1.0, "ragged_all_to_all", data=2, expert=4)
  with pytest.raises(ConfigError, match="ep_exchange='ragged_all_to_all' needs dropless"):
    validate_config(config, num_devices=8)
  config = tiny_moe_config(None, "ragged_all_to_all", data=2, expert=4)
  validate_config(config, num_devices=8)
  with pytest.warns(UserWarning, match="most steps will overflow"):
    config.model.moe.ep_recv_buffer_factor = 0.5
    validate_config(config, num_devices=8)
  config.model.moe.ep_recv_buffer_factor = -1.0
  with pytest.raises(ConfigError, match="ep_recv_buffer_factor=-1.0 is invalid"):
    validate_config(config, num_devices=8)
  with pytest.raises(ValueError, match="not an exchange for capacity dispatch"):
    expert_parallel.with_capacity(
        jnp.zeros((8, 4)), jnp.zeros((8, 1), jnp.int32), jnp.ones((8, 1)), (), mesh=None,
        exchange="ragged_all_to_all", group_size=8, capacity=1, activation="swiglu",
        dtype=jnp.float32)
