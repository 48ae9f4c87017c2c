"""Expert parallelism: dispatch, expert FFN and combine inside `shard_map` over the `expert` mesh axis.

Experts are split over the `expert` axis (E_local = E / ep per device) and tokens over the batch axes
(data, fsdp, expert). Routing happens outside, under `jit`, on the global batch, so balance statistics
are global; only the movement of tokens to their experts is manual. Three exchanges:

  * "all_to_all" (GShard 2020, Lepikhin et al., Sec. 3.2): every device builds send buffers for every
    expert and `lax.all_to_all` hands expert e's rows to the device that owns e, and back.
    - capacity dispatch: the buffers are the fixed-size capacity buffers [E, G_local, C, D].
    - dropless: each device sends, to every destination, a buffer of T_local * K rows (the worst case:
      all of its assignments may go there): exact and portable, ep times the routed rows in bytes.
  * "ragged_all_to_all" (dropless only; capacity buffers have a fixed size, so "all_to_all" already
    sends exactly them): the devices of an expert group all-gather their per-expert row counts, then
    `ragged_exchange.ragged_all_to_all` sends each destination only the rows routed to it, into a
    receive buffer of R rows (`recv_buffer_rows`), and the expert outputs come back the same way.
    R = ep * T_local * K (the default) can never overflow; a smaller R saves memory, and a step
    whose routing needs more than R rows on some device takes the padded "all_to_all" path instead
    (a `lax.cond` on the gathered counts, the same on every device of the group), so nothing is
    ever dropped; `ragged_recv_rows` reports the rows a routing needs. XLA:CPU lacks the collective, so
    on CPU the ragged exchange runs as a padded stand-in: the same results, not the bytes saved.
  * "allgather": all-gather the tokens (and their routing) over `expert`, run the local experts on
    every token routed to them, and reduce-scatter the partial outputs back. No all-to-all; it moves
    ep x T_local x D per device each way, which wins when K is large relative to ep (see
    experiments/comm_model.py).

All give the function of the single-device layer: capacity groups are whole groups of consecutive
tokens held by one device (`group_size` must divide the local tokens), so the same tokens are dropped
on every mesh. Expert weights sharded over `fsdp` are gathered on entry by `shard_map` (per layer,
when the layer runs); over `tensor` they stay sharded when `tensor` divides the hidden dimension
(expert tensor parallelism, `tensor_parallel_size`: partial down-projections summed over `tensor`).
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from moe_jax import dispatch, ragged_exchange, sharding
from moe_jax.experts import batched_ffn, grouped_ffn

EXCHANGES = ("all_to_all", "allgather", "ragged_all_to_all")
AXIS = "expert"


def expert_axis_size(mesh) -> int:
  """Size of the `expert` axis of `mesh` (1 when there is no mesh or no such axis)."""
  if mesh is None or mesh.empty or AXIS not in mesh.axis_names:
    return 1
  return mesh.shape[AXIS]


def _specs(mesh):
  batch_axes = tuple(a for a in sharding.BATCH_AXES if a in mesh.axis_names)
  return P(batch_axes), P(AXIS)


def _local_experts(expert_index: jax.Array, num_local: int) -> tuple[jax.Array, jax.Array]:
  """Expert ids relative to this device's slice of experts, and whether each is local."""
  first = jax.lax.axis_index(AXIS) * num_local
  local = expert_index - first
  is_local = (local >= 0) & (local < num_local)
  return jnp.where(is_local, local, num_local), is_local


def _vary_like(weights, tokens):
  """Marks the expert weights as varying over the token's mesh axes before the custom-VJP gmm.

  A custom VJP must return cotangents typed like its inputs. Weights are replicated over the batch
  axes, so their per-device gradient must be summed over those axes: making them varying first (by
  adding the tokens' empty sum, exactly 0) lets JAX insert that sum as the transpose, on every JAX
  version, without naming the axes.
  """
  zero = jnp.sum(tokens.reshape(-1)[:0])
  return tuple(None if w is None else w + zero.astype(w.dtype) for w in weights)


TENSOR_AXIS = "tensor"


def _weight_specs(weights, mesh):
  """shard_map specs of (w_in [E, D, F or 2F], w_down [E, F, D]): experts over `expert` and, with
  expert tensor parallelism, the hidden dimension F over `tensor` (see `tensor_parallel_size`)."""
  tp = tensor_parallel_size(weights, mesh)
  if tp == 1:
    return tuple(P(AXIS) for _ in weights)
  return P(AXIS, None, TENSOR_AXIS), P(AXIS, TENSOR_AXIS, None)


def tensor_parallel_size(weights, mesh) -> int:
  """The `tensor` axis size that shards the experts' hidden dimension inside `shard_map` (1 = none).

  Expert tensor parallelism (Megatron-style, as in "MegaBlocks" and Megatron-Core's expert TP):
  each `tensor` shard holds F / tp hidden units of every local expert (for SwiGLU, whole
  gate/up pairs, as `experts.fuse_gate_up` interleaves them), computes its partial
  down-projection, and the partials are summed over `tensor`; the weights are never gathered over
  `tensor`. Used when the mesh's `tensor` axis is > 1 and divides F; otherwise the weights are
  gathered over `tensor` on entry, as before.
  """
  if mesh is None or TENSOR_AXIS not in mesh.axis_names or mesh.shape[TENSOR_AXIS] == 1:
    return 1
  if len(weights) != 2:
    return 1  # expert biases: b_down must be added once, after the sum over `tensor`
  tp = mesh.shape[TENSOR_AXIS]
  # F / tp hidden units per shard; the fused [.., 2F] input weight then splits into even runs.
  return tp if weights[-1].shape[1] % tp == 0 else 1


def _varying_axes(x) -> frozenset:
  """The manual mesh axes `x` varies over inside `shard_map` (JAX 0.10+: manual_axis_type)."""
  aval = jax.typeof(x)
  manual = getattr(aval, "manual_axis_type", None)
  return manual.varying if manual is not None else frozenset(getattr(aval, "vma", ()))


def _is_tensor_sharded(weights) -> bool:
  """Whether the local weights vary over `tensor` (i.e. hold a slice of F, not all of it).

  Read from the weights' type, which `_weight_specs` decided. Were it misread as False, the
  unsummed outputs would vary over `tensor` and shard_map's replication check would fail loudly.
  """
  return TENSOR_AXIS in _varying_axes(weights[-1])


def _local_grouped_ffn(x_sorted, group_sizes, weights, **kwargs):
  """`grouped_ffn` on this device's experts; with tensor-sharded weights, summed over `tensor`.

  Both operands are made to vary over each other's mesh axes first: the custom-VJP gmm needs its
  cotangents typed like its inputs, and the implicit broadcasts' transposes are the sums over
  those axes (the weights' gradient over the batch axes, the tokens' over `tensor`).
  """
  tensor_sharded = _is_tensor_sharded(weights)
  if tensor_sharded:
    x_sorted = _vary_like((x_sorted,), weights[-1])[0]
  y = grouped_ffn(x_sorted, group_sizes, _vary_like(weights, x_sorted), **kwargs)
  return jax.lax.psum(y, TENSOR_AXIS) if tensor_sharded else y


def _local_batched_ffn(x_buffers, weights, **kwargs):
  """`batched_ffn` on this device's experts; with tensor-sharded weights, summed over `tensor`."""
  y = batched_ffn(x_buffers, weights, **kwargs)
  return jax.lax.psum(y, TENSOR_AXIS) if _is_tensor_sharded(weights) else y


# ---------------------------------------------------------------------------------------- dropless


def dropless(tokens: jax.Array, expert_index: jax.Array, combine_weight: jax.Array, weights, *,
             mesh, exchange: str, activation: str, dtype, backend: str,
             recv_buffer_factor: float = 0.0, tiling=None) -> jax.Array:
  """Expert-parallel dropless MoE: tokens [T, D] -> [T, D] float32 (T sharded over batch axes).

  expert_index/combine_weight [T, K] are the FFN assignments of a `RoutingDecision` (ids >= E
  go nowhere). `recv_buffer_factor` sizes the "ragged_all_to_all" receive buffer (see
  `recv_buffer_rows`; 0 = the exact worst case); the other exchanges ignore it. `backend` and
  `tiling` go to the grouped matmul (`pallas_kernels.gmm`).
  """
  batch_spec, expert_spec = _specs(mesh)
  ep = expert_axis_size(mesh)
  bodies = {"all_to_all": _dropless_all_to_all, "allgather": _dropless_allgather,
            "ragged_all_to_all": functools.partial(_dropless_ragged,
                                                   recv_buffer_factor=recv_buffer_factor)}
  if exchange not in bodies:
    raise ValueError(f"exchange={exchange!r} is not one of {EXCHANGES}.")
  fn = functools.partial(bodies[exchange], ep=ep, activation=activation, dtype=dtype,
                         backend=backend, tiling=tiling)
  weight_specs = _weight_specs(weights, mesh)
  # Any token count works (a 13-token prompt on 8 devices): padding rows go to no expert.
  num_tokens = tokens.shape[0]
  shards = math.prod(mesh.shape[axis] for axis in batch_spec[0])
  pad = -num_tokens % shards
  if pad:
    num_experts = weights[-1].shape[0]
    tokens = jnp.pad(tokens, ((0, pad), (0, 0)))
    expert_index = jnp.pad(expert_index, ((0, pad), (0, 0)), constant_values=num_experts)
    combine_weight = jnp.pad(combine_weight, ((0, pad), (0, 0)))
  out = jax.shard_map(
      fn, mesh=mesh, in_specs=(batch_spec, batch_spec, batch_spec, weight_specs),
      out_specs=batch_spec)(tokens, expert_index, combine_weight, weights)
  return out[:num_tokens]


def _dropless_allgather(tokens, expert_index, combine_weight, weights, *, ep, activation, dtype,
                        backend, tiling=None):
  """All-gather tokens over `expert`, local experts on what is routed to them, reduce-scatter."""
  all_tokens = jax.lax.all_gather(tokens, AXIS, tiled=True)
  all_index = jax.lax.all_gather(expert_index, AXIS, tiled=True)
  all_weight = jax.lax.all_gather(combine_weight, AXIS, tiled=True)
  num_local = weights[0].shape[0]
  local_index, is_local = _local_experts(all_index, num_local)
  plan = dispatch.dropless_plan(local_index, num_local)
  x_sorted = dispatch.dropless_dispatch(all_tokens, plan, local_index.shape[-1])
  y_sorted = _local_grouped_ffn(x_sorted, plan.group_sizes, weights,
                         activation=activation, dtype=dtype, backend=backend, tiling=tiling)
  partial = dispatch.dropless_combine(y_sorted, plan, jnp.where(is_local, all_weight, 0.0))
  return jax.lax.psum_scatter(partial, AXIS, scatter_dimension=0, tiled=True)


def _dropless_all_to_all(tokens, expert_index, combine_weight, weights, *, ep, activation, dtype,
                         backend, tiling=None):
  """Sort by expert, padded all-to-all to the experts' owners, grouped FFN, all-to-all back."""
  num_experts = weights[0].shape[0] * ep
  plan = dispatch.dropless_plan(expert_index, num_experts)
  x_sorted = dispatch.dropless_dispatch(tokens, plan, expert_index.shape[-1])  # [rows], by expert
  y_sorted = _padded_exchange(x_sorted, expert_index, plan, weights, ep=ep, activation=activation,
                              dtype=dtype, backend=backend, tiling=tiling)
  return dispatch.dropless_combine(y_sorted, plan, combine_weight)


def _padded_exchange(x_sorted, expert_index, plan, weights, *, ep, activation, dtype, backend,
                     tiling=None):
  """Expert outputs [rows, D] float32 of expert-sorted rows [rows, D], rows = T_local * K.

  Each destination gets a buffer of `rows` rows, the most one device can send to any one.
  """
  num_local = weights[0].shape[0]
  rows = expert_index.size
  sorted_expert = jnp.take(expert_index.reshape(-1), plan.order)  # [rows], E = unassigned

  # Destination j gets the contiguous run of sorted rows whose expert lives on device j.
  per_device = plan.group_sizes.reshape(ep, num_local).sum(axis=1)
  start = jnp.cumsum(per_device) - per_device
  slot = jnp.arange(rows)
  source_row = start[:, None] + slot[None, :]  # [ep, rows]
  valid = slot[None, :] < per_device[:, None]
  source_row = jnp.where(valid, source_row, 0)
  send = jnp.where(valid[..., None], x_sorted[source_row], 0)
  first_expert = (jnp.arange(ep) * num_local)[:, None]
  send_expert = jnp.where(valid, sorted_expert[source_row] - first_expert, num_local)

  recv = jax.lax.all_to_all(send, AXIS, 0, 0, tiled=True)  # [ep (source), rows, D]
  recv_expert = jax.lax.all_to_all(send_expert, AXIS, 0, 0, tiled=True)
  local_plan = dispatch.dropless_plan(recv_expert.reshape(-1, 1), num_local)
  x_local = dispatch.dropless_dispatch(recv.reshape(ep * rows, -1), local_plan, 1)
  y_local = _local_grouped_ffn(x_local, local_plan.group_sizes, weights,
                        activation=activation,
                        dtype=dtype, backend=backend, tiling=tiling)
  # Un-sort to the received layout (padding rows come out as zeros), then send back.
  y_recv = jnp.zeros_like(y_local).at[local_plan.order].set(y_local, unique_indices=True)
  y_back = jax.lax.all_to_all(y_recv.reshape(ep, rows, -1), AXIS, 0, 0, tiled=True)

  # Row r of destination j's reply is sorted row start[j] + r.
  target = jnp.where(valid, source_row, rows)  # padding goes out of bounds and is dropped
  return jnp.zeros((rows, y_back.shape[-1]), y_back.dtype).at[target].set(y_back, mode="drop")


def recv_buffer_rows(local_rows: int, ep: int, factor: float) -> int:
  """R, the rows of the ragged exchange's receive buffer on each device.

  `local_rows` = T_local * K, the rows a device routes (and, balanced, receives). factor 0 gives
  the exact worst case ep * T_local * K (every device sends all its rows to one device), which
  never overflows; a positive factor gives ceil(factor * T_local * K), capped at that bound.
  """
  exact = ep * local_rows
  if factor <= 0:
    return exact
  # Rounded first so that e.g. 1.1 * 100 = 110.00000000000001 gives 110, not 111.
  return max(1, min(exact, math.ceil(round(factor * local_rows, 6))))


def _routed_counts(expert_index, num_local, ep):
  """Rows each device of the expert group sends to each device, per local expert.

  Returns (local plan of this device's [T, K] assignments, counts [ep (source), ep (destination),
  E_local]); the counts are the same on every device of the group.
  """
  plan = dispatch.dropless_plan(expert_index, num_local * ep)
  counts = jax.lax.all_gather(plan.group_sizes.reshape(ep, num_local), AXIS)
  return plan, counts


def _dropless_ragged(tokens, expert_index, combine_weight, weights, *, ep, recv_buffer_factor,
                     activation, dtype, backend, tiling=None):
  """Sort by expert, ragged all-to-all of the routed rows only, grouped FFN, ragged back.

  Falls back to the padded exchange for a step whose routing would overfill some device's
  receive buffer (see `recv_buffer_rows`), so no row is ever dropped.
  """
  num_local = weights[0].shape[0]
  rows = expert_index.size
  recv_rows = recv_buffer_rows(rows, ep, recv_buffer_factor)
  plan, counts = _routed_counts(expert_index, num_local, ep)
  x_sorted = dispatch.dropless_dispatch(tokens, plan, expert_index.shape[-1])
  ragged = functools.partial(_ragged_exchange, counts=counts, recv_rows=recv_rows, weights=weights,
                             activation=activation, dtype=dtype, backend=backend,
                             tiling=tiling)
  if recv_rows >= ep * rows:  # the exact bound: nothing can overflow
    y_sorted = ragged(x_sorted)
  else:
    padded = functools.partial(_padded_exchange, expert_index=expert_index, plan=plan,
                               weights=weights, ep=ep, activation=activation, dtype=dtype,
                               backend=backend, tiling=tiling)
    # The counts are the whole group's, so every device of the group takes the same branch
    # (the branches' collectives need all of them).
    overflow = jnp.max(counts.sum(axis=(0, 2))) > recv_rows
    y_sorted = jax.lax.cond(overflow, padded, ragged, x_sorted)
  return dispatch.dropless_combine(y_sorted, plan, combine_weight)


def _ragged_exchange(x_sorted, *, counts, recv_rows, weights, activation, dtype, backend,
                     tiling=None):
  """Expert outputs [rows, D] float32 of expert-sorted rows [rows, D], moving only routed rows.

  `counts` [ep, ep, E_local] from `_routed_counts`; every device must receive at most
  `recv_rows` rows. Device j's rows arrive source after source, each source's sorted by expert;
  a local sort groups them by expert for the grouped matmul.
  """
  me = jax.lax.axis_index(AXIS)
  num_local = counts.shape[-1]
  sent = counts.sum(axis=2)  # [source, destination] rows
  send_sizes = sent[me]
  input_offsets = jnp.cumsum(send_sizes) - send_sizes  # sorted rows are destination-major
  recv_sizes = sent[:, me]
  recv_offsets = jnp.cumsum(recv_sizes) - recv_sizes
  # Where each source's rows start in each destination's buffer: after the earlier sources'.
  output_offsets = (jnp.cumsum(sent, axis=0) - sent)[me]
  x_recv = ragged_exchange.ragged_all_to_all(
      x_sorted, jnp.zeros((recv_rows,) + x_sorted.shape[1:], x_sorted.dtype), input_offsets,
      send_sizes, output_offsets, recv_sizes, axis_name=AXIS)

  # Received rows form segments (source, local expert), source-major; past them, unused rows.
  segment_ends = jnp.cumsum(counts[:, me, :].reshape(-1))
  segment = jnp.searchsorted(segment_ends, jnp.arange(recv_rows), side="right")
  local_expert = jnp.where(segment < segment_ends.shape[0], segment % num_local, num_local)
  local_plan = dispatch.dropless_plan(local_expert[:, None], num_local)
  x_local = dispatch.dropless_dispatch(x_recv, local_plan, 1)
  y_local = _local_grouped_ffn(x_local, local_plan.group_sizes, weights,
                        activation=activation, dtype=dtype, backend=backend, tiling=tiling)
  y_recv = jnp.zeros_like(y_local).at[local_plan.order].set(y_local, unique_indices=True)

  # The reverse exchange: each source's rows go back to where they came from.
  return_offsets = (jnp.cumsum(sent, axis=1) - sent)[:, me]  # source s's input offset for me
  return ragged_exchange.ragged_all_to_all(
      y_recv, jnp.zeros(x_sorted.shape[:1] + y_recv.shape[1:], y_recv.dtype), recv_offsets,
      recv_sizes, return_offsets, send_sizes, axis_name=AXIS)


def ragged_recv_rows(expert_index: jax.Array, num_experts: int, *, mesh) -> jax.Array:
  """Rows each device receives in the ragged exchange of this routing: [devices along the batch
  axes] int32, in the batch-shard order of `sharding.BATCH_AXES`.

  A step falls back to the padded exchange when any of them exceeds
  `recv_buffer_rows(T_local * K, ep, factor)`; this is for logging and tests.
  """
  batch_spec, _ = _specs(mesh)
  ep = expert_axis_size(mesh)

  def rows(index):
    _, counts = _routed_counts(index, num_experts // ep, ep)
    return counts.sum(axis=(0, 2))[jax.lax.axis_index(AXIS)][None]

  return jax.shard_map(rows, mesh=mesh, in_specs=batch_spec, out_specs=batch_spec)(expert_index)


# ---------------------------------------------------------------------------------------- capacity


def with_capacity(tokens: jax.Array, expert_index: jax.Array, combine_weight: jax.Array, weights,
                  *, mesh, exchange: str, group_size: int, capacity: int, activation: str, dtype,
                  priority: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
  """Expert-parallel capacity MoE: tokens [T, D] -> ([T, D] float32, kept [T, K] bool).

  `priority` [T] (batch-prioritized routing) ranks tokens within each group; None = position.
  """
  if exchange not in ("all_to_all", "allgather"):
    raise ValueError(f"exchange={exchange!r} is not an exchange for capacity dispatch; allowed: "
                     "'all_to_all' or 'allgather' (capacity buffers have a fixed size, so the "
                     "all-to-all already sends exactly them).")
  batch_spec, expert_spec = _specs(mesh)
  ep = expert_axis_size(mesh)
  body = _capacity_all_to_all if exchange == "all_to_all" else _capacity_allgather
  fn = functools.partial(body, ep=ep, group_size=group_size, capacity=capacity,
                         activation=activation, dtype=dtype)
  weight_specs = _weight_specs(weights, mesh)
  if priority is None:
    priority = jnp.zeros(tokens.shape[:1], jnp.float32)  # equal priorities: position order
  return jax.shard_map(
      fn, mesh=mesh, in_specs=(batch_spec, batch_spec, batch_spec, batch_spec, weight_specs),
      out_specs=(batch_spec, batch_spec))(tokens, expert_index, combine_weight, priority, weights)


def _grouped(x, group_size):
  return x.reshape((x.shape[0] // group_size, group_size) + x.shape[1:])


def _capacity_all_to_all(tokens, expert_index, combine_weight, priority, weights, *, ep, group_size,
                         capacity, activation, dtype):
  """Local capacity buffers [E, G_local, C, D], all-to-all to owners, batched FFN, and back."""
  num_experts = weights[0].shape[0] * ep
  index = _grouped(expert_index, group_size)
  weight = _grouped(combine_weight, group_size)
  plan = dispatch.capacity_plan(index, num_experts, capacity, _grouped(priority, group_size))
  buffers = dispatch.capacity_dispatch(_grouped(tokens, group_size), index, plan, num_experts)
  # [E, G_local, C, D] -> [E_local, ep * G_local, C, D]: expert e's rows from every device.
  received = jax.lax.all_to_all(buffers, AXIS, 0, 1, tiled=True)
  num_local, groups = received.shape[:2]
  y = _local_batched_ffn(received.reshape(num_local, groups * capacity, -1), weights,
                  activation=activation, dtype=dtype)
  y = jax.lax.all_to_all(y.reshape(num_local, groups, capacity, -1), AXIS, 1, 0, tiled=True)
  out = dispatch.capacity_combine(y, index, weight, plan)
  return out.reshape(tokens.shape[0], -1), plan.kept.reshape(expert_index.shape)


def _capacity_allgather(tokens, expert_index, combine_weight, priority, weights, *, ep, group_size,
                        capacity, activation, dtype):
  """All-gather tokens, the global capacity plan, local experts' buffers only, reduce-scatter."""
  num_experts = weights[0].shape[0] * ep
  num_local = num_experts // ep
  all_tokens = jax.lax.all_gather(tokens, AXIS, tiled=True)
  index = _grouped(jax.lax.all_gather(expert_index, AXIS, tiled=True), group_size)
  weight = _grouped(jax.lax.all_gather(combine_weight, AXIS, tiled=True), group_size)
  all_priority = jax.lax.all_gather(priority, AXIS, tiled=True)
  plan = dispatch.capacity_plan(index, num_experts, capacity, _grouped(all_priority, group_size))
  local_index, is_local = _local_experts(index, num_local)
  local_plan = plan.replace(kept=plan.kept & is_local)
  buffers = dispatch.capacity_dispatch(_grouped(all_tokens, group_size), local_index, local_plan,
                                       num_local)
  groups = buffers.shape[1]
  y = _local_batched_ffn(buffers.reshape(num_local, groups * capacity, -1), weights,
                  activation=activation, dtype=dtype)
  partial = dispatch.capacity_combine(y.reshape(num_local, groups, capacity, -1), local_index,
                                      weight, local_plan)
  out = jax.lax.psum_scatter(partial.reshape(all_tokens.shape[0], -1), AXIS, scatter_dimension=0,
                             tiled=True)
  kept = plan.kept.reshape(-1, expert_index.shape[-1])
  own = jax.lax.axis_index(AXIS) * tokens.shape[0]
  return out, jax.lax.dynamic_slice_in_dim(kept, own, tokens.shape[0])
