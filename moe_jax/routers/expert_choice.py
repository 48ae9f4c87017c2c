"""Expert-choice routing (Zhou et al. 2022, "Mixture-of-Experts with Expert Choice Routing")."""
from __future__ import annotations

import jax
import jax.numpy as jnp

from moe_jax.routers.decision import RoutingDecision, unassign


def expert_choice(logits: jax.Array, capacity: int, group_size: int, *,
                  valid: jax.Array | None = None) -> RoutingDecision:
  """Each expert takes its top-C tokens of every group of N tokens (Zhou et al. 2022, eq. 1-2).

      S = softmax(X W) [N, E] per group;  G, I = TopK(S^T, C)  (over tokens, for each expert);
      output of token t = sum over the experts e that chose t of S[t, e] * FFN_e(x_t).

  Every expert processes exactly C tokens per group, so the load is perfectly balanced without a
  loss; a token gets 0..E experts. C = capacity_factor * N / E (the paper's c is the average
  number of experts per token; c = 2 matches top-2 token choice in FLOPs).

  Not causal: whether a token is chosen depends on the scores of the other tokens in its group,
  including later positions of the same sequence. A decoder that groups whole sequences leaks
  future tokens; `group_by="position"` (groups of the tokens at one position across the batch)
  does not.

  Padding tokens are never chosen; when a group has fewer than C valid tokens, the expert's extra
  slots stay unassigned.

  Args:
    logits: [T, E] router logits, T a multiple of `group_size`, tokens of a group consecutive.
    capacity: C, 1 <= C <= group_size.
    group_size: N.
    valid: [T] bool.

  Returns:
    RoutingDecision with K = E slots per token: slot e holds expert e if e chose the token.
  """
  logits = logits.astype(jnp.float32)
  num_tokens, num_experts = logits.shape
  if num_tokens % group_size:
    raise ValueError(f"group_size={group_size} must divide the number of tokens ({num_tokens}).")
  if not 1 <= capacity <= group_size:
    raise ValueError(f"expert-choice capacity must be in [1, group_size={group_size}], got "
                     f"{capacity}.")
  if valid is None:
    valid = jnp.ones((num_tokens,), dtype=bool)
  probs = jax.nn.softmax(logits, axis=-1)
  groups = num_tokens // group_size
  grouped = probs.reshape(groups, group_size, num_experts)
  grouped_valid = valid.reshape(groups, group_size)
  # Padding gets -1 < any probability, so it is chosen only when a group runs out of valid tokens.
  selection = jnp.where(grouped_valid[:, :, None], jax.lax.stop_gradient(grouped), -1.0)
  _, chosen_tokens = jax.lax.top_k(selection.transpose(0, 2, 1), capacity)  # [G, E, C]
  chosen = jnp.sum(jax.nn.one_hot(chosen_tokens, group_size, dtype=jnp.int32), axis=2)  # [G, E, N]
  chosen = (chosen.transpose(0, 2, 1) > 0) & grouped_valid[:, :, None]  # [G, N, E]
  expert_ids = jnp.broadcast_to(jnp.arange(num_experts, dtype=jnp.int32), chosen.shape)
  index, weight = unassign(expert_ids, grouped, chosen, num_experts)
  return RoutingDecision(expert_index=index.reshape(num_tokens, num_experts),
                         combine_weight=weight.reshape(num_tokens, num_experts),
                         router_probs=probs, router_logits=logits, valid=valid)
