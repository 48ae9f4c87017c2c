"""Expert parallelism: dispatch, expert FFN and combine inside `shard_map` over the `expert` mesh axis.

Experts are split over the `expert` axis (E_local = E / ep per device) and tokens over the batch axes
(data, fsdp, expert). Routing happens outside, under `jit`, on the global batch, so balance statistics
are global; only the movement of tokens to their experts is manual. Two exchanges:

  * "all_to_all" (GShard 2020, Lepikhin et al., Sec. 3.2): every device builds send buffers for every
    expert and `lax.all_to_all` hands expert e's rows to the device that owns e, and back.
    - capacity dispatch: the buffers are the fixed-size capacity buffers [E, G_local, C, D].
    - dropless: each device sends, to every destination, a buffer of T_local * K rows (the worst case:
      all of its assignments may go there). `lax.ragged_all_to_all` would send only the rows needed,
      but XLA:CPU does not implement it; this padded exchange is the portable fallback, exact and
      ep times larger in bytes.
  * "allgather": all-gather the tokens (and their routing) over `expert`, run the local experts on
    every token routed to them, and reduce-scatter the partial outputs back. No all-to-all; it moves
    ep x T_local x D per device each way, which wins when K is large relative to ep (see
    experiments/comm_model.py).

Both give the function of the single-device layer: capacity groups are whole groups of consecutive
tokens held by one device (`group_size` must divide the local tokens), so the same tokens are dropped
on every mesh. Expert weights sharded over `fsdp` or `tensor` are gathered on entry by `shard_map`.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from moe_jax import dispatch, sharding
from moe_jax.experts import batched_ffn, grouped_ffn

EXCHANGES = ("all_to_all", "allgather")
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


# ---------------------------------------------------------------------------------------- dropless


def dropless(tokens: jax.Array, expert_index: jax.Array, combine_weight: jax.Array, weights, *,
             mesh, exchange: str, activation: str, dtype, backend: str) -> jax.Array:
  """Expert-parallel dropless MoE: tokens [T, D] -> [T, D] float32 (T sharded over batch axes).

  expert_index/combine_weight [T, K] are the FFN assignments of a `RoutingDecision` (ids >= E
  go nowhere).
  """
  batch_spec, expert_spec = _specs(mesh)
  ep = expert_axis_size(mesh)
  body = _dropless_all_to_all if exchange == "all_to_all" else _dropless_allgather
  fn = functools.partial(body, ep=ep, activation=activation, dtype=dtype, backend=backend)
  weight_specs = tuple(None if w is None else expert_spec for w in weights)
  return jax.shard_map(
      fn, mesh=mesh, in_specs=(batch_spec, batch_spec, batch_spec, weight_specs),
      out_specs=batch_spec)(tokens, expert_index, combine_weight, weights)


def _dropless_allgather(tokens, expert_index, combine_weight, weights, *, ep, activation, dtype,
                        backend):
  """All-gather tokens over `expert`, local experts on what is routed to them, reduce-scatter."""
  all_tokens = jax.lax.all_gather(tokens, AXIS, tiled=True)
  all_index = jax.lax.all_gather(expert_index, AXIS, tiled=True)
  all_weight = jax.lax.all_gather(combine_weight, AXIS, tiled=True)
  num_local = weights[0].shape[0]
  local_index, is_local = _local_experts(all_index, num_local)
  plan = dispatch.dropless_plan(local_index, num_local)
  x_sorted = dispatch.dropless_dispatch(all_tokens, plan, local_index.shape[-1])
  y_sorted = grouped_ffn(x_sorted, plan.group_sizes, _vary_like(weights, x_sorted), activation=activation, dtype=dtype,
                         backend=backend)
  partial = dispatch.dropless_combine(y_sorted, plan, jnp.where(is_local, all_weight, 0.0))
  return jax.lax.psum_scatter(partial, AXIS, scatter_dimension=0, tiled=True)


def _dropless_all_to_all(tokens, expert_index, combine_weight, weights, *, ep, activation, dtype,
                         backend):
  """Sort by expert, padded all-to-all to the experts' owners, grouped FFN, all-to-all back."""
  num_experts = weights[0].shape[0] * ep
  num_local = num_experts // ep
  top_k = expert_index.shape[-1]
  rows = expert_index.size  # T_local * K: the most one device can send to any one destination
  plan = dispatch.dropless_plan(expert_index, num_experts)
  x_sorted = dispatch.dropless_dispatch(tokens, plan, top_k)  # [rows, D], by expert
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
  y_local = grouped_ffn(x_local, local_plan.group_sizes, _vary_like(weights, x_local),
                        activation=activation,
                        dtype=dtype, backend=backend)
  # Un-sort to the received layout (padding rows come out as zeros), then send back.
  y_recv = jnp.zeros_like(y_local).at[local_plan.order].set(y_local, unique_indices=True)
  y_back = jax.lax.all_to_all(y_recv.reshape(ep, rows, -1), AXIS, 0, 0, tiled=True)

  # Row r of destination j's reply is sorted row start[j] + r.
  target = jnp.where(valid, source_row, rows)  # padding goes out of bounds and is dropped
  y_sorted = jnp.zeros((rows, y_back.shape[-1]), y_back.dtype).at[target].set(y_back, mode="drop")
  return dispatch.dropless_combine(y_sorted, plan, combine_weight)


# ---------------------------------------------------------------------------------------- capacity


def with_capacity(tokens: jax.Array, expert_index: jax.Array, combine_weight: jax.Array, weights,
                  *, mesh, exchange: str, group_size: int, capacity: int, activation: str, dtype,
                  priority: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
  """Expert-parallel capacity MoE: tokens [T, D] -> ([T, D] float32, kept [T, K] bool).

  `priority` [T] (batch-prioritized routing) ranks tokens within each group; None = position.
  """
  batch_spec, expert_spec = _specs(mesh)
  ep = expert_axis_size(mesh)
  body = _capacity_all_to_all if exchange == "all_to_all" else _capacity_allgather
  fn = functools.partial(body, ep=ep, group_size=group_size, capacity=capacity,
                         activation=activation, dtype=dtype)
  weight_specs = tuple(None if w is None else expert_spec for w in weights)
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
  y = batched_ffn(received.reshape(num_local, groups * capacity, -1), weights,
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
  y = batched_ffn(buffers.reshape(num_local, groups * capacity, -1), weights,
                  activation=activation, dtype=dtype)
  partial = dispatch.capacity_combine(y.reshape(num_local, groups, capacity, -1), local_index,
                                      weight, local_plan)
  out = jax.lax.psum_scatter(partial.reshape(all_tokens.shape[0], -1), AXIS, scatter_dimension=0,
                             tiled=True)
  kept = plan.kept.reshape(-1, expert_index.shape[-1])
  own = jax.lax.axis_index(AXIS) * tokens.shape[0]
  return out, jax.lax.dynamic_slice_in_dim(kept, own, tokens.shape[0])
