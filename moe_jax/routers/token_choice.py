"""Token-choice top-k routing and its variants: softmax or sigmoid scores, noisy top-k, a selection
bias (auxiliary-loss-free balancing), group-limited routing and a routed scaling factor."""
from __future__ import annotations

import jax
import jax.numpy as jnp

from moe_jax.routers.decision import RoutingDecision, unassign

SCORE_FUNCTIONS = ("softmax", "sigmoid")
#: Group scores of group-limited routing: DeepSeek-V3's sum of the two highest scores of a group,
#: or DeepSeek-V2's highest score of a group (its device-limited routing picks the devices holding
#: the highest-affinity experts).
GROUP_SCORES = ("top2_sum", "max")


def token_choice_top_k(logits: jax.Array, top_k: int, *, valid: jax.Array | None = None,
                       normalize: bool = True, score_function: str = "softmax",
                       selection_bias: jax.Array | None = None, num_groups: int = 1,
                       top_k_groups: int = 1, group_score: str = "top2_sum", scaling: float = 1.0,
                       noisy_logits: jax.Array | None = None) -> RoutingDecision:
  """Each token picks its K highest-scoring experts.

  Scores (float32, taken *before* the top-k so that even K=1 gives the router a gradient; Switch
  Transformer 2021, eq. 1-2):
    * "softmax": s = softmax(logits) (Shazeer et al. 2017; GShard 2020).
    * "sigmoid": s = sigmoid(logits) (DeepSeek-V3 2024, eq. 15).
  With `noisy_logits` (noisy top-k: fixed-std noise as in V-MoE, Riquelme et al. 2021, or the
  learned per-expert std of Shazeer et al. 2017 eq. 3-5; see `routing.add_logit_noise`), scores
  come from the noisy logits and so do the selections; the z-loss still sees the clean ones.

  Selection uses s + b, where `selection_bias` b [E] only steers which experts are picked
  ("Auxiliary-Loss-Free Load Balancing Strategy for Mixture-of-Experts", Wang et al. 2024, eq. 3;
  DeepSeek-V3 eq. 16): the combine weights are the unbiased scores.
  Group-limited routing: the E experts form `num_groups` equal groups; each token keeps its
  `top_k_groups` best groups and picks its K experts inside them. A group's score (`group_score`)
  is "top2_sum", the sum of its two highest selection scores (DeepSeek-V3 2024, Sec. 2.1.2,
  node-limited routing: a node's score is the sum of its K_r/M highest affinities, 8/4 = 2 in V3;
  the max for groups of one expert), or "max", its highest selection score (DeepSeek-V2 2024,
  Sec. 2.2.2, device-limited routing: the M devices holding the highest-affinity experts). Ties
  between groups go to the lower group index.
  Ties go to the lower index (`lax.top_k` is stable), so recomputation under remat routes alike.

  Weights: the selected scores, renormalised to sum to one when `normalize` and K > 1 (Mixtral;
  DeepSeek-V3 eq. 13), then multiplied by `scaling` (DeepSeek-V3's routed scaling factor). K = 1
  keeps the raw score: renormalising would give weight 1 and no router gradient.

  Args:
    logits: [T, E] router logits (cast to float32).
    top_k: K, 1 <= K <= E (and K <= top_k_groups * E / num_groups).
    valid: [T] bool; False tokens are unassigned. Default: all valid.

  Returns:
    RoutingDecision with expert_index/combine_weight [T, K]; router_probs are the scores
    normalised to sum to one per token (softmax itself for "softmax").
  """
  logits = logits.astype(jnp.float32)
  num_tokens, num_experts = logits.shape
  if not 1 <= top_k <= num_experts:
    raise ValueError(f"top_k must be in [1, num_experts={num_experts}], got {top_k}.")
  if score_function not in SCORE_FUNCTIONS:
    raise ValueError(f"score_function={score_function!r} is not one of {SCORE_FUNCTIONS}.")
  if num_groups > 1 and top_k > top_k_groups * (num_experts // num_groups):
    raise ValueError(f"top_k={top_k} exceeds the {top_k_groups * (num_experts // num_groups)} "
                     f"experts in the top {top_k_groups} of {num_groups} expert groups.")
  if valid is None:
    valid = jnp.ones((num_tokens,), dtype=bool)
  scoring_logits = logits if noisy_logits is None else noisy_logits.astype(jnp.float32)
  if score_function == "softmax":
    scores = jax.nn.softmax(scoring_logits, axis=-1)
    probs = scores
  else:
    scores = jax.nn.sigmoid(scoring_logits)
    probs = scores / jnp.sum(scores, axis=-1, keepdims=True)
  selection = scores if selection_bias is None else scores + jax.lax.stop_gradient(selection_bias)
  selection = jax.lax.stop_gradient(selection)  # which experts, not how much: no gradient
  if group_score not in GROUP_SCORES:
    raise ValueError(f"group_score={group_score!r} is not one of {GROUP_SCORES}.")
  if num_groups > 1:
    selection = _limit_to_top_groups(selection, num_groups, top_k_groups, group_score)
  _, top_index = jax.lax.top_k(selection, top_k)
  top_scores = jnp.take_along_axis(scores, top_index, axis=-1)
  if normalize and top_k > 1:
    top_scores = top_scores / jnp.sum(top_scores, axis=-1, keepdims=True)
  top_scores = top_scores * scaling
  keep = jnp.broadcast_to(valid[:, None], top_index.shape)
  index, weight = unassign(top_index, top_scores, keep, num_experts)
  return RoutingDecision(expert_index=index, combine_weight=weight, router_probs=probs,
                         router_logits=logits, valid=valid, noisy_logits=noisy_logits)


def _limit_to_top_groups(selection: jax.Array, num_groups: int, top_k_groups: int,
                         group_score: str = "top2_sum") -> jax.Array:
  """Sets the selection scores [T, E] outside each token's top groups to -inf."""
  num_tokens, num_experts = selection.shape
  if num_experts % num_groups:
    raise ValueError(f"num_expert_groups={num_groups} must divide num_experts={num_experts}.")
  grouped = selection.reshape(num_tokens, num_groups, num_experts // num_groups)
  if group_score == "max":  # DeepSeek-V2
    group_scores = jnp.max(grouped, axis=-1)  # [T, G]
  else:  # DeepSeek-V3: the sum of the two highest
    best = jax.lax.top_k(grouped, min(2, grouped.shape[-1]))[0]
    group_scores = jnp.sum(best, axis=-1)  # [T, G]
  _, top_groups = jax.lax.top_k(group_scores, top_k_groups)
  allowed = jnp.any(jax.nn.one_hot(top_groups, num_groups, dtype=bool), axis=1)  # [T, G]
  grouped = jnp.where(allowed[:, :, None], grouped, -jnp.inf)
  return grouped.reshape(num_tokens, num_experts)


def random_top_k(key: jax.Array, num_tokens: int, num_experts: int, top_k: int, *,
                 valid: jax.Array | None = None, logits: jax.Array | None = None
                 ) -> RoutingDecision:
  """Random routing: K distinct experts per token drawn uniformly, weight 1/K, ignoring the router.

  A load-balanced baseline for performance testing (every expert gets T*K/E assignments in
  expectation) and the "random" router of ablations (e.g. "Hash Layers For Large Sparse Models",
  Roller et al. 2021, compare against it). `logits`, when given, are kept for metrics only.
  """
  if valid is None:
    valid = jnp.ones((num_tokens,), dtype=bool)
  noise = jax.random.uniform(key, (num_tokens, num_experts))
  _, top_index = jax.lax.top_k(noise, top_k)
  weight = jnp.full(top_index.shape, 1.0 / top_k, jnp.float32)
  keep = jnp.broadcast_to(valid[:, None], top_index.shape)
  index, weight = unassign(top_index, weight, keep, num_experts)
  if logits is None:
    logits = jnp.zeros((num_tokens, num_experts), jnp.float32)
  logits = logits.astype(jnp.float32)
  return RoutingDecision(expert_index=index, combine_weight=weight,
                         router_probs=jax.nn.softmax(logits, axis=-1), router_logits=logits,
                         valid=valid)
