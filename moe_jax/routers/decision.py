"""The index-form routing decision shared by every sparse router.

Following the unified formulation of "Routers in Vision Mixture of Experts" (2024), a router yields
a dispatch and a combine weighting over (tokens, experts, slots). Sparse routers give it in index
form: for each of the T tokens, K assignment slots, each an (expert, weight) pair. K is the most
experts one token can get: top_k for token choice, E for expert choice, ReLU and top-p routing
(a token may get 0..E experts there). The capacity slot of an assignment is given by the dispatch
(`dispatch.capacity_plan`), so one decision works with the dropless, the capacity and the
expert-parallel dispatch alike, and no T x E x C tensor is ever built.

An assignment whose expert index is >= the number of FFN experts goes to no FFN expert: the sentinel
`num_experts` (= router outputs) marks an unassigned slot (padding, unselected), and indices of
zero-computation or null experts (MoE++, AdaMoE) sit between the FFN experts and the sentinel.
"""
from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp


@flax.struct.dataclass
class RoutingDecision:
  """Index-form routing decision for T tokens, E router outputs and K slots per token.

  Attributes:
    expert_index: [T, K] int32 in [0, E]; E marks an unassigned slot.
    combine_weight: [T, K] float32 weight of each assignment in the output (0 when unassigned).
    router_probs: [T, E] float32 per-token distribution over experts, for balance losses and
      metrics (softmax; normalised scores for sigmoid and ReLU routers).
    router_logits: [T, E] float32 router logits before any noise (for the z-loss).
    valid: [T] bool, False for padding tokens.
    noisy_logits: [T, E] float32 logits with the training noise that selected the experts (noisy
      top-k); None without noise.
    noise_std: [T, E] float32 std of that noise when it is learned per token and expert
      (Softplus(x W_noise), Shazeer et al. 2017 eq. 4); None for fixed-std noise or no noise.
  """
  expert_index: jax.Array
  combine_weight: jax.Array
  router_probs: jax.Array
  router_logits: jax.Array
  valid: jax.Array
  noisy_logits: jax.Array | None = None
  noise_std: jax.Array | None = None

  @property
  def num_experts(self) -> int:
    """E, the router outputs (FFN experts plus any zero-computation or null experts)."""
    return self.router_probs.shape[-1]

  @property
  def slots(self) -> int:
    """K, the assignment slots per token."""
    return self.expert_index.shape[-1]


def unassign(expert_index: jax.Array, combine_weight: jax.Array, keep: jax.Array,
             num_experts: int) -> tuple[jax.Array, jax.Array]:
  """Marks slots where `keep` is False as unassigned (index E, weight 0)."""
  return (jnp.where(keep, expert_index, num_experts).astype(jnp.int32),
          jnp.where(keep, combine_weight, 0.0).astype(jnp.float32))
