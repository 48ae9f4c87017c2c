"""Moving tokens to experts and back, given an index-form `RoutingDecision`.

Two dispatch modes:
  * dropless (MegaBlocks, 2022): sort the T*K assignments by expert into one [T*K, D] array with
    per-expert group sizes, for a grouped matmul; nothing is dropped.
  * capacity (GShard 2020, Switch Transformer 2021): every expert gets C slots per group of N tokens,
    C = ceil(capacity_factor * N * K / E); assignments past an expert's C-th slot are dropped.
    Groups are consecutive runs of `group_size` tokens of the batch, so they depend on the data layout
    only, never on the device mesh.

Unassigned choices (expert index >= E: the sentinel, or a zero-computation / null expert) go
nowhere in both modes.
"""
from __future__ import annotations

import math

import flax.struct
import jax
import jax.numpy as jnp


# ----------------------------------------------------------------------------------------- dropless


@flax.struct.dataclass
class DroplessPlan:
  """Sort order of the T*K assignments by expert.

  Attributes:
    order: [T*K] int32; sorted row p holds flat assignment order[p] (= token * K + choice).
      Unassigned choices sort last, past sum(group_sizes).
    group_sizes: [E] int32 rows per expert in the sorted array.
  """
  order: jax.Array
  group_sizes: jax.Array


def dropless_plan(expert_index: jax.Array, num_experts: int) -> DroplessPlan:
  """Plans the sort of `expert_index` [T, K] by expert (stable, so token order is kept per expert)."""
  flat = expert_index.reshape(-1)
  order = jnp.argsort(flat, stable=True).astype(jnp.int32)
  # Out-of-range ids (the unassigned sentinel E) are dropped by segment_sum.
  group_sizes = jax.ops.segment_sum(jnp.ones_like(flat), flat, num_segments=num_experts)
  return DroplessPlan(order=order, group_sizes=group_sizes.astype(jnp.int32))


def dropless_dispatch(x: jax.Array, plan: DroplessPlan, top_k: int) -> jax.Array:
  """Gathers tokens `x` [T, D] into expert-sorted rows [T*K, D]."""
  return jnp.take(x, plan.order // top_k, axis=0)


def dropless_combine(y_sorted: jax.Array, plan: DroplessPlan, combine_weight: jax.Array) -> jax.Array:
  """Un-sorts expert outputs [T*K, D] and sums each token's K outputs with its weights [T, K].

  Returns [T, D] float32 (the combine accumulates in float32 whatever the expert dtype).
  """
  num_tokens, top_k = combine_weight.shape
  y_flat = jnp.zeros_like(y_sorted).at[plan.order].set(y_sorted, unique_indices=True)
  y = y_flat.reshape(num_tokens, top_k, -1).astype(jnp.float32)
  return jnp.einsum("tkd,tk->td", y, combine_weight.astype(jnp.float32))


# ----------------------------------------------------------------------------------------- capacity


def expert_capacity(group_tokens: int, num_experts: int, top_k: int, capacity_factor: float) -> int:
  """C = ceil(capacity_factor * N * K / E) slots per expert and group of N tokens (GShard, Alg. 1)."""
  if capacity_factor is None or capacity_factor <= 0:
    raise ValueError(f"capacity_factor must be > 0, got {capacity_factor}.")
  # Rounded first so that e.g. 1.1 * 100 / 10 = 11.000000000000002 gives 11, not 12.
  return max(1, math.ceil(round(capacity_factor * group_tokens * top_k / num_experts, 6)))


@flax.struct.dataclass
class CapacityPlan:
  """Slot of each assignment in its expert's buffer.

  Attributes:
    slot: [G, N, K] int32 position in the expert's buffer of its group.
    kept: [G, N, K] bool, False for dropped or unassigned choices.
    capacity: C, slots per expert and group (static).
  """
  slot: jax.Array
  kept: jax.Array
  capacity: int = flax.struct.field(pytree_node=False)


def capacity_plan(expert_index: jax.Array, num_experts: int, capacity: int,
                  priority: jax.Array | None = None) -> CapacityPlan:
  """Assigns slots with the Switch/GShard priority rule, or batch-prioritized routing.

  Within a group, all first choices claim slots before any second choice, and so on; within one
  choice rank, earlier tokens first. Assignments whose slot is >= C are dropped.
  With `priority` (batch-prioritized routing, V-MoE, Riquelme et al. 2021, Sec. 4 / Alg. 1), tokens
  are ranked by decreasing priority instead of position (ties by position) before the same rule,
  so the tokens the router is most confident about claim capacity first. Slot numbers then follow
  that ranking.

  Args:
    expert_index: [G, N, K] int32 in [0, E] (E or more = no FFN expert).
    num_experts: E.
    capacity: C.
    priority: [G, N] float, e.g. each token's largest router probability; None = position order.
  """
  if priority is not None:
    order = jnp.argsort(-jax.lax.stop_gradient(priority), axis=1, stable=True)  # [G, N]
    ranked = jnp.take_along_axis(expert_index, order[:, :, None], axis=1)
    plan = capacity_plan(ranked, num_experts, capacity)
    inverse = jnp.argsort(order, axis=1)
    unrank = lambda x: jnp.take_along_axis(x, inverse[:, :, None], axis=1)
    return plan.replace(slot=unrank(plan.slot), kept=unrank(plan.kept))
  groups, group_tokens, top_k = expert_index.shape
  # One-hot is [G, K*N, E]: the index form avoids the [G, N, E, C] tensor, not this smaller one.
  onehot = jax.nn.one_hot(expert_index, num_experts, dtype=jnp.int32)  # ids >= E -> all zeros
  rank_major = onehot.transpose(0, 2, 1, 3).reshape(groups, top_k * group_tokens, num_experts)
  position = jnp.cumsum(rank_major, axis=1) - 1
  slot = jnp.sum(position * rank_major, axis=-1).reshape(groups, top_k, group_tokens).transpose(0, 2, 1)
  kept = (slot < capacity) & (expert_index < num_experts)
  return CapacityPlan(slot=slot.astype(jnp.int32), kept=kept, capacity=capacity)


def capacity_dispatch(x: jax.Array, expert_index: jax.Array, plan: CapacityPlan,
                      num_experts: int) -> jax.Array:
  """Scatters tokens `x` [G, N, D] into expert buffers [E, G, C, D] (empty slots are zero)."""
  groups, group_tokens, top_k = expert_index.shape
  group_id = jnp.broadcast_to(jnp.arange(groups)[:, None, None], expert_index.shape)
  # Dropped assignments point out of bounds and are discarded by mode="drop".
  expert = jnp.where(plan.kept, expert_index, num_experts)
  values = jnp.broadcast_to(x[:, :, None, :], (groups, group_tokens, top_k, x.shape[-1]))
  buffers = jnp.zeros((num_experts, groups, plan.capacity, x.shape[-1]), x.dtype)
  # Not unique_indices: every dropped assignment shares the same out-of-bounds index.
  return buffers.at[expert, group_id, plan.slot].set(values, mode="drop")


def capacity_combine(y_buffers: jax.Array, expert_index: jax.Array, combine_weight: jax.Array,
                     plan: CapacityPlan) -> jax.Array:
  """Gathers expert outputs [E, G, C, D] back to tokens, weighted: returns [G, N, D] float32.

  `combine_weight` is [G, N, K]; dropped choices contribute nothing (the token keeps only its
  residual path for that choice, as in Switch Transformer).
  """
  num_experts = y_buffers.shape[0]
  groups = expert_index.shape[0]
  group_id = jnp.broadcast_to(jnp.arange(groups)[:, None, None], expert_index.shape)
  expert = jnp.minimum(expert_index, num_experts - 1)
  slot = jnp.minimum(plan.slot, plan.capacity - 1)
  gathered = y_buffers[expert, group_id, slot].astype(jnp.float32)  # [G, N, K, D]
  weight = jnp.where(plan.kept, combine_weight, 0.0).astype(jnp.float32)
  return jnp.einsum("gnkd,gnk->gnd", gathered, weight)


def dense_capacity_tensors(expert_index: jax.Array, combine_weight: jax.Array, plan: CapacityPlan,
                           num_experts: int) -> tuple[jax.Array, jax.Array]:
  """Reference form of a capacity decision: dispatch and combine tensors [G, N, E, C].

  Materialises what `capacity_dispatch`/`capacity_combine` do with indices (the T x E x C formulation
  of GShard); for tests and small-scale analysis only.
  """
  kept = plan.kept
  expert_onehot = jax.nn.one_hot(jnp.where(kept, expert_index, num_experts), num_experts)
  slot_onehot = jax.nn.one_hot(jnp.where(kept, plan.slot, plan.capacity), plan.capacity)
  dispatch = jnp.einsum("gnke,gnkc->gnec", expert_onehot, slot_onehot)
  combine = jnp.einsum("gnke,gnkc,gnk->gnec", expert_onehot, slot_onehot,
                       combine_weight.astype(jnp.float32))
  return dispatch.astype(bool), combine
