"""Soft MoE routing (Puigcerver et al. 2023, "From Sparse to Soft Mixtures of Experts")."""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from moe_jax import sharding


def _l2_normalize(x: jax.Array, axis: int, eps: float = 1e-6) -> jax.Array:
  return x * jax.lax.rsqrt(jnp.sum(x * x, axis=axis, keepdims=True) + eps)


def soft_weights(x: jax.Array, phi: jax.Array, scale: jax.Array | None, *,
                 valid: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
  """Dense dispatch and combine weights of Soft MoE (Puigcerver et al. 2023, Sec. 2.1, eq. 1-3).

      logits = X Phi  [N, S]  (S = E * slots_per_expert);
      D = softmax over tokens (each slot is a convex mix of the group's tokens);
      C = softmax over slots  (each token's output is a convex mix of the slot outputs).

  With `scale` (Sec. 2.3, "Normalization"), X is L2-normalised over D, each column of Phi too, and
  the logits are multiplied by the learned scalar: logits = scale * l2n(X) l2n(Phi).

  Not causal: a slot mixes every token of its group. Use groups of one position (the tokens at the
  same position across the batch) in a decoder, or whole sequences for images.

  Args:
    x: [G, N, D] tokens in groups.
    phi: [D, S] slot parameters.
    scale: scalar or None (no normalisation).
    valid: [G, N] bool; padding takes no part in any slot and gets zero combine weights.

  Returns:
    (dispatch [G, N, S], combine [G, N, S]) float32; dispatch columns sum to one over valid tokens,
    combine rows over slots.
  """
  x = x.astype(jnp.float32)
  phi = phi.astype(jnp.float32)
  if scale is not None:
    logits = scale * jnp.einsum("gnd,ds->gns", _l2_normalize(x, -1), _l2_normalize(phi, 0))
  else:
    logits = jnp.einsum("gnd,ds->gns", x, phi)
  if valid is None:
    valid = jnp.ones(x.shape[:2], bool)
  masked = jnp.where(valid[:, :, None], logits, -jnp.inf)
  # A group with no valid token would give 0/0; its slots then mix nothing.
  any_valid = jnp.any(valid, axis=1, keepdims=True)[:, :, None]
  dispatch = jax.nn.softmax(jnp.where(any_valid, masked, 0.0), axis=1)
  dispatch = jnp.where(valid[:, :, None], dispatch, 0.0)
  combine = jnp.where(valid[:, :, None], jax.nn.softmax(logits, axis=-1), 0.0)
  return dispatch, combine


def _entropy(probs: jax.Array, axis: int) -> jax.Array:
  return -jnp.sum(probs * jnp.log(jnp.maximum(probs, 1e-30)), axis=axis)


def soft_routing_metrics(dispatch: jax.Array, combine: jax.Array, valid: jax.Array,
                         num_experts: int) -> dict[str, jax.Array]:
  """What Soft MoE's weights measurably do, per layer (all float32 scalars or [E]).

  Every slot's dispatch column sums to one, so each expert receives the same dispatch mass by
  construction; the load that varies is in the combine weights. Reported:
    expert_load [E]: each expert's share of the combine weight mass over valid tokens
      (sum over its slots, mean over tokens; sums to 1, uniform = 1/E);
    router_entropy: mean over valid tokens of the entropy (nats) of the token's combine weight
      summed per expert (comparable with token choice's router entropy; log E = uniform);
    soft_combine_entropy: mean over valid tokens of the entropy over all S slots (log S max);
    soft_dispatch_entropy: mean over slots of the entropy of the dispatch weights over the
      group's tokens (log N = a slot averages the whole group; 0 = it copies one token).

  Args:
    dispatch, combine: [G, N, S] from `soft_weights`, S = E * slots per expert.
    valid: [G, N] bool.
    num_experts: E.
  """
  groups, tokens, slots = combine.shape
  weight = valid.astype(jnp.float32)
  count = jnp.maximum(jnp.sum(weight), 1.0)
  per_expert = combine.reshape(groups, tokens, num_experts, slots // num_experts).sum(-1)
  load = jnp.einsum("gne,gn->e", per_expert, weight)
  has_valid = jnp.any(valid, axis=1).astype(jnp.float32)  # [G]: slots of empty groups mix nothing
  return {
      "expert_load": load / jnp.maximum(jnp.sum(load), 1e-30),
      "router_entropy": jnp.sum(_entropy(per_expert, -1) * weight) / count,
      "soft_combine_entropy": jnp.sum(_entropy(combine, -1) * weight) / count,
      "soft_dispatch_entropy": (jnp.sum(_entropy(dispatch, 1) * has_valid[:, None])
                                / jnp.maximum(jnp.sum(has_valid) * slots, 1.0)),
  }


class SoftRouter(nnx.Module):
  """Soft MoE slot parameters Phi [D, E * slots_per_expert] and the normalisation scale."""

  def __init__(self, d_model: int, num_experts: int, slots_per_expert: int, *, rngs: nnx.Rngs,
               normalize: bool = True, param_dtype=jnp.float32):
    self.num_slots = num_experts * slots_per_expert
    init = sharding.logical(nnx.initializers.normal(stddev=d_model ** -0.5), ("embed", None))
    self.phi = nnx.Param(init(rngs.params(), (d_model, self.num_slots), param_dtype))
    self.scale = nnx.Param(jnp.ones((), param_dtype)) if normalize else None

  def __call__(self, x: jax.Array, valid: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """x [G, N, D] -> (dispatch, combine) [G, N, S]; see `soft_weights`."""
    scale = None if self.scale is None else self.scale[...].astype(jnp.float32)
    return soft_weights(x, self.phi[...], scale, valid=valid)
