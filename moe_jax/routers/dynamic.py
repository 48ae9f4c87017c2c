"""Routers that give each token a variable number of experts: top-p (dynamic) and ReLU routing."""
from __future__ import annotations

import jax
import jax.numpy as jnp

from moe_jax.routers.decision import RoutingDecision, unassign


def top_p(logits: jax.Array, threshold: float, *, max_experts: int | None = None,
          valid: jax.Array | None = None) -> RoutingDecision:
  """Top-p routing (Huang et al. 2024, "Harder Tasks Need More Experts: Dynamic Routing in MoE
  Models", eq. 2-4): each token takes experts in decreasing probability until their cumulative
  probability reaches p.

      P = softmax(logits);  sort P descending;  t = argmin_k { sum_{j<=k} P_(j) >= p };
      output = sum_{j<=t} P_(j) * FFN_(j)(x)   (raw probabilities, not renormalised).

  This is the smallest set of experts whose probability reaches p (a larger expert always comes
  first). `max_experts` caps the set (the slots K); None allows all E.

  Args:
    logits: [T, E]; threshold: p in (0, 1]; valid: [T] bool.

  Returns:
    RoutingDecision with K = max_experts slots; unused slots unassigned.
  """
  logits = logits.astype(jnp.float32)
  num_tokens, num_experts = logits.shape
  if not 0.0 < threshold <= 1.0:
    raise ValueError(f"top-p threshold must be in (0, 1], got {threshold}.")
  max_experts = num_experts if max_experts is None else max_experts
  if valid is None:
    valid = jnp.ones((num_tokens,), dtype=bool)
  probs = jax.nn.softmax(logits, axis=-1)
  sorted_probs, sorted_index = jax.lax.top_k(probs, max_experts)
  mass_before = jnp.cumsum(jax.lax.stop_gradient(sorted_probs), axis=-1) - jax.lax.stop_gradient(
      sorted_probs)
  # An expert joins while the mass before it is still short of p; the first always joins.
  keep = (mass_before < threshold) & valid[:, None]
  keep = keep.at[:, 0].set(valid)
  index, weight = unassign(sorted_index, sorted_probs, keep, num_experts)
  return RoutingDecision(expert_index=index, combine_weight=weight, router_probs=probs,
                         router_logits=logits, valid=valid)


def relu_routing(logits: jax.Array, *, valid: jax.Array | None = None) -> RoutingDecision:
  """ReLU routing (Liu et al. 2024, "ReMoE: Fully Differentiable Mixture-of-Experts with ReLU
  Routing", eq. 4): gates R = ReLU(logits); a token goes to every expert with a non-zero gate, with
  that gate as its weight. Sparsity is steered by the adaptive L1 penalty (`losses.relu_l1_loss`
  and `router_state.update_l1_coefficient`), not by a top-k.

  Returns:
    RoutingDecision with K = E slots (slot e holds expert e when its gate is > 0); router_probs are
    the gates normalised per token (uniform for a token with no active gate).
  """
  logits = logits.astype(jnp.float32)
  num_tokens, num_experts = logits.shape
  if valid is None:
    valid = jnp.ones((num_tokens,), dtype=bool)
  gates = jax.nn.relu(logits)
  keep = (gates > 0) & valid[:, None]
  expert_ids = jnp.broadcast_to(jnp.arange(num_experts, dtype=jnp.int32), gates.shape)
  index, weight = unassign(expert_ids, gates, keep, num_experts)
  total = jnp.sum(gates, axis=-1, keepdims=True)
  probs = jnp.where(total > 0, gates / jnp.where(total > 0, total, 1.0), 1.0 / num_experts)
  return RoutingDecision(expert_index=index, combine_weight=weight, router_probs=probs,
                         router_logits=logits, valid=valid)
