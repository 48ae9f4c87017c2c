"""Back-of-the-envelope model of expert-parallel MoE training: bytes, FLOPs and time per step.

    python experiments/comm_model.py --config=configs/mixtral_like.py:v5p-64
    python experiments/comm_model.py --config=configs/deepseek_like.py:h100x64 --modes=any
    python experiments/comm_model.py --config=configs/mixtral_like.py:h100x8 --modes=allgather

For one config (model dims, batch, sequence length, mesh) on one named target (`moe_jax/targets.py`)
it estimates, per device, per MoE layer and per training step:
  * the token exchange of the expert-parallel (EP) layer, in one of four forms (`MODES`):
      capacity_all_to_all  GShard/Switch capacity buffers [E, G_local, C, D] per device; each
                           device sends the chunk [E/ep, G_local, C, D] of each peer's experts
                           (dispatch), and the expert outputs come back the same way (combine).
      padded_all_to_all    the dropless all-to-all of moe_jax/expert_parallel.py: every
                           destination gets a buffer of T_local * K rows (the most it could need),
                           K = the router's slots per token (`routing.slots_per_token`): top_k for
                           token choice and random routing, E' for expert choice and ReLU, E' or
                           max_experts_per_token for top-p.
      ragged_all_to_all    the exact dropless exchange (moe.ep_exchange="ragged_all_to_all" on GPU
                           and TPU, where lax.ragged_all_to_all exists): the T_local * top_k
                           routed rows, (ep - 1)/ep of them off-device in expectation (on CPU the
                           layer runs a padded stand-in, and a step that overfills the receive
                           buffer falls back to padded_all_to_all; neither is modelled).
      allgather            all-gather the T_local * D tokens over the expert axis, run the local
                           experts on every gathered token routed to them, reduce-scatter the
                           [ep * T_local, D] partial outputs back.
    Dispatches move tokens in the activation dtype; combines move float32 (the expert FFNs and the
    combine accumulate in float32 and the EP layer exchanges them as they are);
  * the expert FLOPs (SwiGLU: 3 matmuls of rows x D x F; a multiply-add is 2 FLOPs) and their time
    at the target's peak FLOP/s;
  * the weight traffic that expert parallelism trades against: FSDP all-gathers of the expert
    weights (forward and backward) with a reduce-scatter of their gradients, the data-parallel
    gradient all-reduce, and (without EP) tensor-parallel all-reduces of the layer output;
  * a lower bound on memory per device (weights, gradients, AdamW moments, activations, buffers).
Then it ranks every mesh layout data x fsdp x expert x tensor of the target's device count that is
valid for the config (and every exchange asked for) by the estimated MoE time per step.

Assumptions (each makes the estimate optimistic or simple, none tuned to a measurement):
  * No overlap: time = compute + every collective's time. Real systems overlap some of it.
  * Peak FLOP/s: grouped matmuls reach maybe 50-80% of it, so compute time is a lower bound. Only
    real rows are computed in dropless modes (the grouped matmul skips rows past its groups);
    capacity buffers are computed whole.
  * GPUs: NVSwitch and the InfiniBand fat tree are non-blocking, so a device sends at its full
    per-direction bandwidth to any set of peers. NVLink (inside a host) and InfiniBand (across
    hosts) transfers run concurrently: an all-to-all takes the slower of the two.
  * TPUs: a group of n chips is a near-cubic sub-torus of side n^(1/dims) with wraparound; an
    all-to-all byte crosses dims * side / 4 links on average (at least 1), so an all-to-all takes
    off-device bytes * mean hops / per-chip bandwidth. Slices smaller than a cube (v5p: 4x4x4)
    lack wraparound links, so this is optimistic there. A ring runs along one torus dimension in
    both directions: 2 of the chip's 2 * dims links, i.e. per-chip bandwidth / dims.
  * All-gather / reduce-scatter / all-reduce as rings: (n - 1)/n of the full array per device (x2
    for all-reduce), at the bandwidth of the slowest link the ring crosses.
  * One fixed latency per collective call (assumed round numbers, not measured; see TOPOLOGIES).
  * Backward = forward volume: the transpose of an all-to-all is an all-to-all of the same-shaped
    cotangents in the other direction, and all-gather and reduce-scatter are each other's
    transpose. So forward + backward moves 2x the forward bytes; with `remat` the forward is
    recomputed inside the backward pass, its collectives included, so 3x (and the FLOPs are 4x the
    forward instead of 3x). Routing metadata (integer ids) has no backward.
  * Uniform routing for the dropless and all-gather modes with top_k FFN experts per token
    (expected rows per expert = T*top_k/E), whatever the router: ReLU routing's default target
    sparsity gives top_k on average, top-p's count varies, zero-computation experts lower it.
  * Soft MoE is not modelled: its experts run under GSPMD, not the shard_map EP layer, so no
    exchange of the kinds above is traced (`exchanged_bytes` raises).
  * Weight collectives happen once per step (no gradient accumulation) in the parameter dtype.
  * The tensor axis: with EP the layer's shard_map gathers whole expert weights, so tensor-axis
    replicas repeat the same expert work; without EP, GSPMD splits F over it.
  * Only the MoE layers are timed (attention and embeddings are not); memory counts the model.
  * Device order is host-major and the innermost mesh axes vary fastest (`sharding.make_mesh`), so
    an axis stays inside a host when it and the axes inside it fit in one.
"""
from __future__ import annotations

import copy
import dataclasses
import itertools
import math
import os
import sys
from collections.abc import Mapping, Sequence

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# The machine model lives in comm_topologies; its names stay importable from here.
from experiments.comm_topologies import (  # noqa: E402,F401
    TOPOLOGIES, Topology, all_to_all_seconds, group_locality, ring_seconds, target_topology,
    torus_mean_hops)
from moe_jax import routing, targets  # noqa: E402
from moe_jax.dispatch import expert_capacity  # noqa: E402
from moe_jax.sharding import BATCH_AXES, MESH_AXES  # noqa: E402

MODES = ("capacity_all_to_all", "padded_all_to_all", "ragged_all_to_all", "allgather")
_ITEMSIZE = {"float32": 4, "bfloat16": 2, "float16": 2}
# Expert outputs and partial combines are float32 (experts.*_ffn, dispatch.*_combine accumulate in
# float32) and moe_jax/expert_parallel.py exchanges them as they are.
COMBINE_ITEMSIZE = 4

# ----------------------------------------------------------------------------------- shapes


def mesh_sizes(num_devices_by_axis: Mapping[str, int]) -> dict[str, int]:
  """Sizes of all mesh axes (missing ones are 1) from a dict or a `jax.sharding.Mesh.shape`."""
  unknown = set(num_devices_by_axis) - set(MESH_AXES)
  if unknown:
    raise ValueError(f"Unknown mesh axes {sorted(unknown)}; allowed: {MESH_AXES}.")
  sizes = {axis: int(num_devices_by_axis.get(axis, 1)) for axis in MESH_AXES}
  bad = {axis: size for axis, size in sizes.items() if size < 1}
  if bad:
    raise ValueError(f"Mesh axis sizes must be resolved positive integers, got {bad}.")
  return sizes


def itemsize(dtype: str) -> int:
  """Bytes per element of a config dtype name."""
  if dtype not in _ITEMSIZE:
    raise ValueError(f"Unknown dtype {dtype!r}; allowed: {sorted(_ITEMSIZE)}.")
  return _ITEMSIZE[dtype]


def tokens_per_device(config, sizes: Mapping[str, int]) -> int:
  """T_local = batch_size * seq_len / (data * fsdp * expert): the tokens one device routes."""
  shards = math.prod(sizes[axis] for axis in BATCH_AXES)
  if config.data.batch_size % shards:
    raise ValueError(f"config.data.batch_size={config.data.batch_size} is not divisible by the "
                     f"batch shards {shards} of mesh {dict(sizes)}.")
  return config.data.batch_size // shards * config.data.seq_len


def config_mode(config) -> str:
  """The exchange the config's EP layer performs (moe.ep_exchange and capacity_factor decide)."""
  exchange = config.model.moe.get("ep_exchange", "all_to_all")
  if exchange == "allgather":
    return "allgather"
  if exchange == "ragged_all_to_all":  # dropless only (validation rejects it with capacity)
    return "ragged_all_to_all"
  return "padded_all_to_all" if config.model.moe.capacity_factor is None else "capacity_all_to_all"


def configurable_modes(config) -> tuple[str, ...]:
  """The modes the recipes are ranked among (`--modes=any`).

  `moe.ep_exchange="ragged_all_to_all"` can also select ragged_all_to_all for a dropless config;
  it is left out here until that exchange has run on a GPU or TPU (only its CPU stand-in has been
  tested). Pass --modes=ragged_all_to_all,... to rank it.
  """
  if config.model.moe.capacity_factor is None:
    return ("padded_all_to_all", "allgather")
  return ("capacity_all_to_all", "allgather")


def exchanged_bytes(config, num_devices_by_axis: Mapping[str, int], mode: str, *,
                    capacity_factor: float | None = None) -> dict:
  """What one MoE layer's expert-parallel exchange moves in the forward pass, per collective call.

  The forward makes one dispatch call (tokens, in the activation dtype `config.model.dtype`) and one
  combine call (expert outputs, float32: the expert FFNs and the combine accumulate in float32 and
  the EP layer exchanges them as they are), plus the routing metadata some modes send along. See the
  module docstring for the backward.

  Args:
    config: experiment config (model.d_model, model.dtype, model.moe.{router, num_experts, top_k,
      capacity_factor, group_size, ...}, data.{batch_size, seq_len}); K below is the router's
      slots per token (`routing.slots_per_token`), top_k only for token choice and random routing.
      router='soft' raises ValueError (not modelled).
    num_devices_by_axis: mesh axis sizes, e.g. {"data": 2, "expert": 4}, or `mesh.shape`.
    mode: one of MODES.
    capacity_factor: overrides `config.model.moe.capacity_factor` (capacity mode only).

  Returns:
    A dict with, for the dispatch call:
      per_device_bytes: the array each device exchanges: for the all-to-all modes its whole send
        buffer (the off-device chunks and the one it keeps; capacity: exactly
        E * G_local * C * D * itemsize); for "allgather" the gathered tokens
        ep * T_local * D * itemsize.
      total_bytes: num_devices * per_device_bytes (every device, tensor-axis replicas included).
      per_destination_bytes: what one device sends to one expert peer (capacity:
        E/ep * G_local * C * D * itemsize; padded: T_local * K * D * itemsize; allgather: its own
        T_local * D * itemsize shard).
      sent_bytes_per_device: the part that leaves the device.
    the same four with a combine_ prefix for the combine call (itemsize combine_itemsize = 4); for
    "allgather" the combine is a reduce-scatter whose input is the [ep * T_local, D] partial output;
    metadata_per_device_bytes / metadata_sent_bytes_per_device: routing ids and weights sent with
      the tokens (padded: int32 local expert ids [ep, T_local * K]; allgather: int32 expert ids and
      float32 weights [T_local, K] (with a capacity factor also the float32 priority
      [T_local]), gathered; capacity and ragged: none counted);
    slots_per_token: K;
    ffn_rows_per_device: rows of the expert FFN's input buffer (padding included);
    expected_rows_per_device: real (token, expert) rows each device computes in expectation;
    tokens_per_device (T_local), expert_parallel (ep), num_devices, itemsize, combine_itemsize,
    mode;
    for capacity mode also group_size, groups_per_device, capacity, buffer_shape (E, G_local, C, D).
    Capacity, padded and all-gather byte counts are exact integers; ragged ones are expectations
    under uniform routing (floats).
  """
  if mode not in MODES:
    raise ValueError(f"mode={mode!r} is not one of {MODES}.")
  sizes = mesh_sizes(num_devices_by_axis)
  moe = config.model.moe
  ep, num_devices = sizes["expert"], math.prod(sizes.values())
  if moe.num_experts % ep:
    raise ValueError(f"config.model.moe.num_experts={moe.num_experts} is not divisible by the "
                     f"expert axis size {ep}.")
  d_model, item = config.model.d_model, itemsize(config.model.dtype)
  if moe.get("router", "token_choice") == "soft":
    raise ValueError("router='soft' is not modelled: Soft MoE's experts are partitioned by GSPMD, "
                     "not exchanged by the expert-parallel layer (moe_jax/expert_parallel.py).")
  t_local, top_k = tokens_per_device(config, sizes), moe.top_k
  # K, the slots per token of the router's decision: the EP layer's buffers and routing metadata
  # have T_local * K rows (top_k for token choice, E' for ReLU, top-p and expert choice).
  slots = routing.slots_per_token(moe)
  out = {"mode": mode, "itemsize": item, "combine_itemsize": COMBINE_ITEMSIZE,
         "expert_parallel": ep, "num_devices": num_devices, "tokens_per_device": t_local,
         "slots_per_token": slots,
         "expected_rows_per_device": t_local * top_k,
         "metadata_per_device_bytes": 0, "metadata_sent_bytes_per_device": 0}

  factor = moe.capacity_factor
  if mode == "capacity_all_to_all":
    factor = factor if capacity_factor is None else capacity_factor
    if factor is None:
      raise ValueError("capacity_all_to_all needs a capacity factor: the config is dropless "
                       "(model.moe.capacity_factor=None); pass capacity_factor=.")
  if factor is not None and mode in ("capacity_all_to_all", "allgather"):
    # As MoELayer: one row of the layout group_by selects (a sequence, or the batch at a position).
    row = config.data.batch_size if moe.get("group_by", "sequence") == "position" else (
        config.data.seq_len)
    group_size = moe.get("group_size", 0) or row
    if t_local % group_size:
      raise ValueError(f"Capacity groups of {group_size} tokens do not tile the {t_local} tokens "
                       "per device; a group may not span devices.")
    groups = t_local // group_size
    # As MoELayer._capacity: expert choice sizes its buffers by C = capacity_factor * N / E.
    capacity = (routing.expert_choice_capacity(moe, group_size)
                if moe.get("router") == "expert_choice"
                else expert_capacity(group_size, moe.num_experts, top_k, factor))
    # The batched FFN computes every slot of [E_local, ep * G_local, C] = E * G_local * C rows.
    out.update(group_size=group_size, groups_per_device=groups, capacity=capacity,
               buffer_shape=(moe.num_experts, groups, capacity, d_model),
               ffn_rows_per_device=moe.num_experts * groups * capacity,
               expected_rows_per_device=moe.num_experts * groups * capacity)

  def record(prefix: str, per_destination, sent_chunks: int, chunks: int) -> None:
    out[prefix + "per_destination_bytes"] = per_destination
    out[prefix + "per_device_bytes"] = chunks * per_destination
    out[prefix + "sent_bytes_per_device"] = sent_chunks * per_destination

  if mode == "capacity_all_to_all":
    chunk = moe.num_experts // ep * groups * capacity * d_model  # [E/ep, G_local, C, D]
    record("", chunk * item, ep - 1, ep)
    record("combine_", chunk * COMBINE_ITEMSIZE, ep - 1, ep)
  elif mode == "padded_all_to_all":
    rows = t_local * slots  # the most one device can route to any one destination
    record("", rows * d_model * item, ep - 1, ep)
    record("combine_", rows * d_model * COMBINE_ITEMSIZE, ep - 1, ep)
    out.update(metadata_per_device_bytes=ep * rows * 4,
               metadata_sent_bytes_per_device=(ep - 1) * rows * 4,
               ffn_rows_per_device=ep * rows)
  elif mode == "ragged_all_to_all":
    rows = t_local * top_k
    record("", rows * d_model * item / ep, (ep - 1), ep)
    record("combine_", rows * d_model * COMBINE_ITEMSIZE / ep, (ep - 1), ep)
    out["ffn_rows_per_device"] = rows
  else:
    shard = t_local * d_model  # each device's own tokens; gathered from (ep - 1) peers
    record("", shard * item, ep - 1, ep)
    record("combine_", shard * COMBINE_ITEMSIZE, ep - 1, ep)
    # int32 ids and float32 weights per slot, and with capacity the float32 priority per token.
    per_token = slots * 8 + (4 if factor is not None else 0)
    out.update(metadata_per_device_bytes=ep * t_local * per_token,
               metadata_sent_bytes_per_device=(ep - 1) * t_local * per_token)
    if factor is None:  # dropless: every gathered (token, slot) row is sorted into the FFN input
      out["ffn_rows_per_device"] = ep * t_local * slots
  out["total_bytes"] = num_devices * out["per_device_bytes"]
  out["combine_total_bytes"] = num_devices * out["combine_per_device_bytes"]
  return out


# ----------------------------------------------------------------------------------- time


@dataclasses.dataclass(frozen=True)
class LayerCost:
  """One MoE layer, one training step (forward + backward, + recompute with remat), per device.

  Bytes are what leaves the device; seconds follow the module's assumptions; FLOPs count a
  multiply-add as 2.
  """
  token_bytes: float
  weight_bytes: float
  tensor_bytes: float
  flops: float
  compute_s: float
  token_comm_s: float
  weight_comm_s: float
  tensor_comm_s: float

  @property
  def total_s(self) -> float:
    return self.compute_s + self.token_comm_s + self.weight_comm_s + self.tensor_comm_s


@dataclasses.dataclass(frozen=True)
class Estimate:
  """A mesh layout's estimate: per-layer cost, whole-step MoE time and memory per device."""
  sizes: dict
  mode: str
  exchange: dict
  layer: LayerCost
  num_moe_layers: int
  memory_bytes: float
  memory_limit_bytes: float

  @property
  def step_s(self) -> float:
    """Estimated time of all MoE layers in one training step, seconds."""
    return self.num_moe_layers * self.layer.total_s

  @property
  def fits(self) -> bool:
    """The memory lower bound is within the limit (HBM times a headroom fraction)."""
    return self.memory_bytes <= self.memory_limit_bytes


def num_moe_layers(config) -> int:
  """Layers whose FFN is MoE: moe_every-1, 2*moe_every-1, ... (models/transformer.is_moe_layer)."""
  every = config.model.moe_every
  return config.model.num_layers // every if every > 0 else 0


def _ffn_matrices(config) -> int:
  return 3 if config.model.get("activation", "swiglu") == "swiglu" else 2


def layer_cost(config, sizes: Mapping[str, int], topo: Topology, mode: str, *,
               capacity_factor: float | None = None) -> tuple[LayerCost, dict]:
  """Bytes, FLOPs and seconds of one MoE layer for one training step on one device.

  Returns (LayerCost, the `exchanged_bytes` dict).
  """
  sizes = mesh_sizes(sizes)
  exchange = exchanged_bytes(config, sizes, mode, capacity_factor=capacity_factor)
  model, moe = config.model, config.model.moe
  d_model, hidden, experts = model.d_model, moe.expert_hidden_dim, moe.num_experts
  act_item, param_item = itemsize(model.dtype), itemsize(model.param_dtype)
  ep, fsdp, tp = sizes["expert"], sizes["fsdp"], sizes["tensor"]
  t_local = exchange["tokens_per_device"]
  remat = 1 if model.get("remat", False) else 0
  passes = 2 + remat  # forward, backward, recomputed forward
  mats = _ffn_matrices(config)
  fast_domain = topo.fast_domain

  # Token exchange: dispatch and combine each pass (the backward mirrors them); routing metadata
  # is integer or not differentiated, so it moves in the forward passes only.
  n_ep, local_ep = group_locality(sizes, ("expert",), fast_domain)
  collective = ring_seconds if mode == "allgather" else all_to_all_seconds
  metadata_passes = 1 + remat
  token_s = (passes * (collective(exchange["per_device_bytes"], n_ep, local_ep, topo)
                       + collective(exchange["combine_per_device_bytes"], n_ep, local_ep, topo))
             + metadata_passes * collective(exchange["metadata_per_device_bytes"], n_ep, local_ep,
                                            topo))
  token_bytes = (passes * (exchange["sent_bytes_per_device"]
                           + exchange["combine_sent_bytes_per_device"])
                 + metadata_passes * exchange["metadata_sent_bytes_per_device"])

  # Expert compute. With expert parallelism the EP layer's shard_map gathers the expert weights
  # whole (fsdp and tensor shards) and every tensor-axis replica computes the same rows; without it
  # GSPMD splits the hidden dimension F over `tensor`.
  tp_split = tp if ep == 1 else 1
  rows = exchange["expected_rows_per_device"]
  shared_hidden = (moe.get("num_shared_experts", 0) or 0) * hidden
  forward_flops = (2 * mats * rows * d_model * hidden / tp_split
                   + 2 * mats * t_local * d_model * shared_hidden / tp
                   + 2 * t_local * d_model * experts)  # router
  flops = (3 + remat) * forward_flops  # backward = 2x forward (input and weight gradients)
  compute_s = flops / topo.peak_flops

  # Weights: FSDP all-gathers (forward, backward) and a gradient reduce-scatter; then the gradient
  # all-reduce over the replicas (expert weights: data; shared experts and router: data x expert).
  gather_axes = ("fsdp",) if ep == 1 else ("fsdp", "tensor")
  n_gather, local_gather = group_locality(sizes, gather_axes, fast_domain)
  n_fsdp, local_fsdp = group_locality(sizes, ("fsdp",), fast_domain)
  expert_shard = experts * mats * d_model * hidden / (ep * fsdp * tp) * param_item
  dense_shard = (mats * d_model * shared_hidden / tp + d_model * experts) / fsdp * param_item
  weight_s = weight_bytes = 0.0
  for shard, (n_g, local_g), sync_axes in (
      (expert_shard, (n_gather, local_gather), ("data",)),
      (dense_shard, (n_fsdp, local_fsdp), ("data", "expert"))):
    if shard == 0:
      continue
    weight_s += 3 * ring_seconds(shard * n_g, n_g, local_g, topo)
    weight_bytes += 3 * (n_g - 1) / n_g * shard * n_g
    n_sync, local_sync = group_locality(sizes, sync_axes, fast_domain)
    weight_s += 2 * ring_seconds(shard, n_sync, local_sync, topo)  # all-reduce = RS + AG
    weight_bytes += 2 * (n_sync - 1) / n_sync * shard

  # Tensor parallelism without EP: the F-split FFN leaves partial sums of the [T_local, D] output
  # (forward) and of the input gradient (backward), one all-reduce each per pass.
  tensor_s = tensor_bytes = 0.0
  if tp > 1 and ep == 1:
    n_tp, local_tp = group_locality(sizes, ("tensor",), fast_domain)
    tensor_full = t_local * d_model * act_item
    tensor_s = passes * 2 * ring_seconds(tensor_full, n_tp, local_tp, topo)
    tensor_bytes = passes * 2 * (n_tp - 1) / n_tp * tensor_full

  cost = LayerCost(token_bytes=token_bytes, weight_bytes=weight_bytes, tensor_bytes=tensor_bytes,
                   flops=flops, compute_s=compute_s, token_comm_s=token_s, weight_comm_s=weight_s,
                   tensor_comm_s=tensor_s)
  return cost, exchange


def memory_bytes(config, sizes: Mapping[str, int], exchange: dict | None = None) -> float:
  """Lower bound on bytes per device: weights, gradients, AdamW moments, activations, buffers.

  Parameters follow the logical-axis rules (embed -> fsdp, mlp/heads/vocab -> tensor, expert ->
  expert); gradients and both AdamW moments are in the parameter dtype (optax.adamw's default).
  Activations: with remat, each block's input [T_local, D] is kept; on top, one block at a time:
  its attention scores and probabilities [B_local, H, S, S] (this codebase's attention materialises
  them) and, when `exchange` is given, the expert layer's buffers: the dispatch and combine send
  and receive buffers and the FFN's rows (input, float32 gate/up outputs, hidden, float32 output).
  Without remat the per-block activations are not counted, so the bound is looser.
  """
  sizes = mesh_sizes(sizes)
  model, moe = config.model, config.model.moe
  ep, fsdp, tp = sizes["expert"], sizes["fsdp"], sizes["tensor"]
  d_model, mats = model.d_model, _ffn_matrices(config)
  moe_layers = num_moe_layers(config)
  dense_layers = model.num_layers - moe_layers
  shared_hidden = (moe.get("num_shared_experts", 0) or 0) * moe.expert_hidden_dim
  embeddings = model.vocab_size * d_model * (1 if model.get("tie_embeddings", True) else 2)
  params = (embeddings / (fsdp * tp)
            + model.num_layers * 4 * d_model * model.num_heads * model.head_dim / (fsdp * tp)
            + dense_layers * mats * d_model * model.mlp_dim / (fsdp * tp)
            + moe_layers * (moe.num_experts * mats * d_model * moe.expert_hidden_dim
                            / (ep * fsdp * tp)
                            + mats * d_model * shared_hidden / (fsdp * tp)
                            + d_model * moe.num_experts / fsdp))
  state = 4 * params * itemsize(model.param_dtype)
  t_local = tokens_per_device(config, sizes)
  act_item = itemsize(model.dtype)
  saved = model.num_layers * t_local * d_model * act_item if model.get("remat", False) else 0
  batch_local = t_local // config.data.seq_len
  scores = batch_local * model.num_heads / tp * config.data.seq_len ** 2 * (4 + act_item)
  buffers = 0.0
  if exchange is not None and moe_layers:
    buffers = 2 * (exchange["per_device_bytes"] + exchange["combine_per_device_bytes"])
    rows = exchange["ffn_rows_per_device"]
    hidden = moe.expert_hidden_dim / (tp if ep == 1 else 1)  # see layer_cost on the tensor axis
    buffers += rows * (d_model * (act_item + 4) + hidden * ((mats - 1) * 4 + act_item))
  return state + saved + max(scores, buffers)


def estimate(config, sizes: Mapping[str, int], topo: Topology, mode: str | None = None, *,
             capacity_factor: float | None = None, memory_fraction: float = 1.0) -> Estimate:
  """The Estimate of one mesh layout.

  Args:
    config, sizes, topo: the experiment, its mesh axis sizes and the machine.
    mode: one of MODES; default: what the config's EP layer does (`config_mode`).
    capacity_factor: for capacity mode when the config is dropless.
    memory_fraction: the layout `fits` when the memory lower bound is at most this fraction of HBM.
  """
  mode = mode or config_mode(config)
  sizes = mesh_sizes(sizes)
  cost, exchange = layer_cost(config, sizes, topo, mode, capacity_factor=capacity_factor)
  # Without expert parallelism there is no exchange and the plain layer's buffers apply; the
  # exchange dict then still sizes the FFN rows, which is close enough for a lower bound.
  return Estimate(sizes=sizes, mode=mode, exchange=exchange, layer=cost,
                  num_moe_layers=num_moe_layers(config),
                  memory_bytes=memory_bytes(config, sizes, exchange),
                  memory_limit_bytes=memory_fraction * topo.hbm_bytes)


# ----------------------------------------------------------------------------------- ranking


def factorizations(num_devices: int, parts: int = len(MESH_AXES)) -> list[tuple[int, ...]]:
  """Every ordered tuple of `parts` positive integers whose product is num_devices."""
  divisors = [d for d in range(1, num_devices + 1) if num_devices % d == 0]
  result = []
  for head in itertools.product(divisors, repeat=parts - 1):
    if num_devices % math.prod(head) == 0:
      result.append(head + (num_devices // math.prod(head),))
  return result


def layout_problem(config, sizes: Mapping[str, int]) -> str | None:
  """Why a mesh layout is invalid for the config, or None when it is valid.

  Valid = `validate_config` passes with this mesh on exactly that many devices, and every sharded
  dimension splits evenly (d_model over fsdp; heads and expert_hidden_dim over tensor).
  """
  from moe_jax.validation import ConfigError, validate_config  # local: imports JAX and the kernels

  sizes = mesh_sizes(sizes)
  trial = copy.deepcopy(config)
  for axis, size in sizes.items():
    trial.mesh[axis] = size
  try:
    validate_config(trial, num_devices=math.prod(sizes.values()))
  except ConfigError as e:
    return str(e)
  model = config.model
  if model.d_model % sizes["fsdp"]:
    return f"d_model={model.d_model} does not split over fsdp={sizes['fsdp']}"
  if model.num_heads % sizes["tensor"] or model.moe.expert_hidden_dim % sizes["tensor"]:
    return f"heads or expert_hidden_dim do not split over tensor={sizes['tensor']}"
  return None


def rank_layouts(config, num_devices: int, topo: Topology, modes: Sequence[str] | None = None, *,
                 capacity_factor: float | None = None, memory_fraction: float = 1.0,
                 max_axis: Mapping[str, int] | None = None) -> list[Estimate]:
  """Estimates of every valid (layout, mode) of `num_devices`: those that fit first, then fastest.

  Args:
    config, num_devices, topo, capacity_factor, memory_fraction: as for `estimate`.
    modes: exchange modes to rank (default: the config's own, `config_mode`). Without expert
      parallelism (expert=1) the mode makes no difference, so such layouts appear once.
    max_axis: upper bounds on axis sizes, e.g. {"tensor": 1} to rank data x fsdp x expert only.
  """
  modes = tuple(modes or (config_mode(config),))
  max_axis = dict(max_axis or {})
  mesh_sizes(max_axis)  # rejects unknown axis names
  results = []
  for combo in factorizations(num_devices):
    sizes = dict(zip(MESH_AXES, combo))
    if any(sizes[axis] > limit for axis, limit in max_axis.items()):
      continue
    if layout_problem(config, sizes) is not None:
      continue
    for mode in (modes if sizes["expert"] > 1 else modes[:1]):
      try:
        results.append(estimate(config, sizes, topo, mode, capacity_factor=capacity_factor,
                                memory_fraction=memory_fraction))
      except ValueError:  # e.g. capacity groups that would span devices on this layout
        continue
  return sorted(results, key=lambda e: (not e.fits, e.step_s))


def format_table(estimates: Sequence[Estimate], title: str = "") -> str:
  """A Markdown table of estimates: per device, all MoE layers of one training step."""
  lines = [title] if title else []
  lines.append("| data | fsdp | expert | tensor | exchange | tokens/dev | exchange GB/step "
               "| compute ms | token comm ms | weight comm ms | tensor comm ms | MoE ms/step "
               "| memory GB (>=) | fits |")
  lines.append("|" + "---|" * 14)
  for e in estimates:
    n = e.num_moe_layers
    mode = e.mode.replace("_all_to_all", " a2a") if e.sizes["expert"] > 1 else "(none: ep=1)"
    lines.append(
        f"| {e.sizes['data']} | {e.sizes['fsdp']} | {e.sizes['expert']} | {e.sizes['tensor']} "
        f"| {mode} | {e.exchange['tokens_per_device']} | {n * e.layer.token_bytes / 1e9:,.2f} "
        f"| {n * e.layer.compute_s * 1e3:,.1f} | {n * e.layer.token_comm_s * 1e3:,.1f} "
        f"| {n * e.layer.weight_comm_s * 1e3:,.1f} | {n * e.layer.tensor_comm_s * 1e3:,.1f} "
        f"| {e.step_s * 1e3:,.1f} | {e.memory_bytes / 1e9:,.1f} | {'yes' if e.fits else 'no'} |")
  return "\n".join(lines)


# ----------------------------------------------------------------------------------- main


def main(argv):
  from absl import app  # local: the library part needs no absl

  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  spec = _CONFIG.value
  _, variant = targets.split_config_spec(spec)
  target_name = _TARGET.value or variant
  if target_name not in targets.TARGETS:
    raise app.UsageError("Name the machine: --target=NAME or a config variant that is a target "
                         f"({sorted(targets.TARGETS)}).")
  target = targets.get_target(target_name)
  try:
    topo = target_topology(target).scaled(_BANDWIDTH_SCALE.value)
  except ValueError as e:
    raise app.UsageError(str(e)) from None
  config = targets.load_config_file(spec)
  if _MODES.value == ["config"]:
    modes = (config_mode(config),)
  elif _MODES.value == ["any"]:
    modes = configurable_modes(config)
  else:
    modes = tuple(_MODES.value)
    bad = [m for m in modes if m not in MODES]
    if bad:
      raise app.UsageError(f"--modes {bad} not in {MODES} (or 'config', 'any').")
  # Used only where the config is dropless; a capacity config keeps its own factor.
  capacity_factor = _CAPACITY_FACTOR.value if config.model.moe.capacity_factor is None else None
  fraction = _MEMORY_FRACTION.value
  max_axis = {}
  for item in _MAX_AXIS.value:
    axis, _, limit = item.partition("=")
    max_axis[axis] = int(limit)

  print(f"{spec} on {target.name}: {target.num_devices} devices, {target.num_hosts} host(s), "
        f"topology {topo.name}; {num_moe_layers(config)} MoE layers; batch "
        f"{config.data.batch_size} x {config.data.seq_len} tokens; fits = memory bound <= "
        f"{fraction:g} x {topo.hbm_bytes / 1e9:g} GB.\n")
  configured = {axis: int(config.mesh[axis]) for axis in MESH_AXES}
  if -1 not in configured.values() and math.prod(configured.values()) == target.num_devices:
    print(format_table([estimate(config, configured, topo, capacity_factor=capacity_factor,
                                 memory_fraction=fraction)], "Configured mesh and exchange:"))
    print()
  ranked = rank_layouts(config, target.num_devices, topo, modes, capacity_factor=capacity_factor,
                        memory_fraction=fraction, max_axis=max_axis)
  print(format_table(ranked[:_TOP.value], f"Best {min(_TOP.value, len(ranked))} of {len(ranked)} "
                     f"valid (layout, exchange) pairs, modes {', '.join(modes)}:"))
  best = next((e.sizes for e in ranked if e.sizes["expert"] > 1), None)
  if best is not None:
    rows = []
    for mode in MODES:
      try:
        rows.append(estimate(config, best, topo, mode, capacity_factor=capacity_factor,
                             memory_fraction=fraction))
      except ValueError as e:
        print(f"({mode}: {e})")
    print()
    print(format_table(rows, "Every exchange on the best expert-parallel layout:"))


if __name__ == "__main__":
  from absl import app as _app
  from absl import flags as _flags

  _CONFIG = _flags.DEFINE_string("config", None, "Config file and variant: path.py[:variant].")
  _TARGET = _flags.DEFINE_string("target", None,
                                  "Machine (moe_jax/targets.py); default: the config variant.")
  _MODES = _flags.DEFINE_list(
      "modes", ["config"], f"Exchanges to rank: 'config' (the config's), 'any' (every one "
      f"moe.ep_exchange can select but ragged_all_to_all, see configurable_modes) or names from "
      f"{MODES}.")
  _CAPACITY_FACTOR = _flags.DEFINE_float(
      "capacity_factor", 1.25, "Capacity factor of capacity_all_to_all for a dropless config.")
  _TOP = _flags.DEFINE_integer("top", 10, "Rows shown.")
  _BANDWIDTH_SCALE = _flags.DEFINE_float("bandwidth_scale", 1.0, "Multiply every link's bandwidth.")
  _MEMORY_FRACTION = _flags.DEFINE_float(
      "memory_fraction", 1.0, "A layout fits when its memory lower bound is <= this x HBM.")
  _MAX_AXIS = _flags.DEFINE_list("max_axis", [], "Axis size limits, e.g. tensor=1,expert=8.")
  _flags.mark_flags_as_required(["config"])
  _app.run(main)
