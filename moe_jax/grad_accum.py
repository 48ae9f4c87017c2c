"""Gradient accumulation whose MoE statistics are those of the whole global batch.

The global batch [B, ...] is split into k micro-batches of B/k rows. Their gradients are summed in
float32 inside one jitted step (`lax.scan`), so peak activation memory is that of one micro-batch.
What makes this more than a loop is the MoE bookkeeping, where the anchors shipped bugs (MaxText
#1483: the balance loss summed over accumulation steps; torchtitan #1304/#1506: the loss-free bias
updated per micro-batch):

  * Global-batch balance (Qiu et al. 2025, "Demons in the Detail", eq. 1-3): the Switch loss
    E * sum_i f_i P_i needs f_i of the *global* batch. f_i carries no gradient, so one forward-only
    pass over the micro-batches first measures every layer's expert counts; the gradient pass then
    gives each micro-batch E * sum_i f_i^global P_i^micro, whose mean over the k (equal-sized)
    micro-batches is exactly the global-batch loss, gradients included. This costs one extra
    forward pass per step and runs only where a global-scope balance loss has a weight.
    `balance_scope="micro_batch"` needs no pass: its groups lie inside each micro-batch.
  * Router state (auxiliary-loss-free bias, ReMoE's L1 coefficient) is updated once per optimizer
    step from the counts and gate sparsity summed over all micro-batches, never per micro-batch.
  * The cross-entropy is normalised by the global batch's token weight and the auxiliary loss by
    k, so the accumulated loss and gradients equal those of one step on the whole batch (to float
    rounding, with deterministic routing); logged auxiliary metrics are means over micro-batches
    and per-layer expert loads come from the summed counts.

Micro-batch j holds rows j, j + k, j + 2k, ... of the global batch, so each device keeps the rows it
already holds (a [B] batch sharded over devices stays sharded over the B/k rows of every micro-batch).
Routing noise of micro-batch j uses `fold_in(rng, j)`.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import PartitionSpec as P

from moe_jax import sharding
from moe_jax.router_state import RouterState


def split_micro_batches(batch: dict, steps: int) -> dict:
  """[B, ...] leaves -> [steps, B / steps, ...]; micro-batch j holds rows j, j + steps, ..."""
  def split(x):
    if x.shape[0] % steps:
      raise ValueError(f"train.grad_accum_steps={steps} must divide the batch size {x.shape[0]}.")
    micro = x.reshape((x.shape[0] // steps, steps) + x.shape[1:]).swapaxes(0, 1)
    mesh = jax.sharding.get_abstract_mesh()
    if mesh is not None and not mesh.empty:
      axes = tuple(a for a in sharding.BATCH_AXES if a in mesh.axis_names)
      micro = jax.lax.with_sharding_constraint(micro, P(None, axes))
    return micro
  return jax.tree.map(split, batch)


def needs_global_load(model_config) -> bool:
  """Whether the MoE layers' balance loss is global-scope, weighted, and so needs a stats pass."""
  moe = model_config.moe
  return (model_config.get("moe_every", 0) > 0 and moe.router != "soft"
          and moe.get("balance_scope", "global") == "global"
          and moe.get("load_balance_loss_weight", 0.0) > 0)


def _layer_stats(aux: dict, name: str) -> dict[int, jax.Array]:
  suffix = f"/{name}"
  return {int(key[len("layer"):-len(suffix)]): value for key, value in aux.items()
          if key.startswith("layer") and key.endswith(suffix)}


def _micro_rng(rng: jax.Array | None, j: jax.Array) -> jax.Array | None:
  return None if rng is None else jax.random.fold_in(rng, j)


def global_expert_load(params, micro_batches: dict, graphdef, router_state, *,
                       rng: jax.Array | None) -> dict[int, jax.Array]:
  """Forward-only pass: {MoE layer: f [E'] of the whole global batch} (no gradient)."""
  model_state = (params, router_state or {})

  def body(counts, xs):
    batch, j = xs
    model = nnx.merge(graphdef, *model_state)
    _, aux = model(batch["inputs"], rng=_micro_rng(rng, j))
    layer_counts = _layer_stats(aux, "expert_counts")
    return jax.tree.map(jnp.add, counts, layer_counts), None

  first = jax.tree.map(lambda x: x[0], micro_batches)
  shapes = jax.eval_shape(
      lambda b: _layer_stats(nnx.merge(graphdef, *model_state)(b["inputs"])[1], "expert_counts"),
      first)
  zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, jnp.float32), shapes)
  steps = jax.tree.leaves(micro_batches)[0].shape[0]
  counts, _ = jax.lax.scan(body, zeros, (micro_batches, jnp.arange(steps)))
  counts = jax.lax.stop_gradient(counts)
  return {i: c / jnp.maximum(jnp.sum(c), 1.0) for i, c in counts.items()}


def accumulated_loss_and_grads(params, batch: dict, graphdef, router_state=None, *, steps: int,
                               rng: jax.Array | None = None, global_balance: bool = False):
  """Loss, metrics and float32-summed gradients of the global batch from `steps` micro-batches.

  Args:
    params: the model parameters (nnx pure dict).
    batch: {"inputs", "targets", "weights"} of the global batch, [B, S] each.
    graphdef: the model's graph definition.
    router_state: rule-updated router variables (pure dict) or None.
    steps: k, the number of micro-batches (divides B).
    rng: the step's routing-noise key (micro-batch j uses fold_in(rng, j)) or None.
    global_balance: measure the global batch's expert load first and give it to every
      micro-batch's balance loss; pass `needs_global_load(config.model)`. False gives each
      micro-batch its own load (right for micro-batch scope; the naive accumulation otherwise).

  Returns:
    (total loss, (cross-entropy, aux), grads in the params' dtypes, new router state or None).
  """
  micro = split_micro_batches(batch, steps)
  global_load = (global_expert_load(params, micro, graphdef, router_state, rng=rng)
                 if global_balance else None)
  total_weight = jnp.maximum(jnp.sum(batch["weights"]), 1.0)

  def micro_loss(p, mb, j):
    model = nnx.merge(graphdef, p, router_state or {})
    logits, aux = model(mb["inputs"], rng=_micro_rng(rng, j), global_load=global_load)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, mb["targets"])
    ce_part = jnp.sum(ce * mb["weights"]) / total_weight
    return ce_part + aux["loss"] / steps, (ce_part, aux)

  grad_fn = jax.value_and_grad(micro_loss, has_aux=True)

  def body(acc, xs):
    mb, j = xs
    (total, (ce_part, aux)), grads = grad_fn(params, mb, j)
    acc = jax.tree.map(lambda a, g: a + g.astype(jnp.float32), acc, grads)
    return acc, (total, ce_part, aux)

  zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
  grads, (totals, ce_parts, auxes) = jax.lax.scan(body, zeros, (micro, jnp.arange(steps)))
  grads = jax.tree.map(lambda g, p: g.astype(p.dtype), grads, params)
  aux = _combine_aux(auxes)
  new_router_state = None
  if router_state:
    model = nnx.merge(graphdef, params, router_state)
    model.update_router_state(_router_stats(auxes))
    new_router_state = nnx.to_pure_dict(nnx.state(model, RouterState))
  return jnp.sum(totals), (jnp.sum(ce_parts), aux), grads, new_router_state


def _combine_aux(auxes: dict) -> dict:
  """Means over micro-batches; per-layer loads from the summed counts."""
  aux = jax.tree.map(lambda x: jnp.mean(x, axis=0), auxes)
  aux["loss"] = jnp.sum(auxes["loss"], axis=0) / auxes["loss"].shape[0]
  for i, counts in _layer_stats(auxes, "expert_counts").items():
    total = jnp.sum(counts, axis=0)
    aux[f"layer{i}/expert_counts"] = total
    aux[f"layer{i}/expert_load"] = total / jnp.maximum(jnp.sum(total), 1.0)
  return aux


def _router_stats(auxes: dict) -> dict[int, dict]:
  """Per MoE layer: expert counts summed and gate sparsity averaged over the micro-batches."""
  stats = {i: {"expert_counts": jnp.sum(c, axis=0)}
           for i, c in _layer_stats(auxes, "expert_counts").items()}
  for i, sparsity in _layer_stats(auxes, "gate_sparsity").items():
    stats.setdefault(i, {})["gate_sparsity"] = jnp.mean(sparsity, axis=0)
  return stats
