"""Routers: router logits -> a routing decision (which experts, with what weight).

A sparse routing decision is in *index form* ("Routers in Vision Mixture of Experts", 2024): for each of
the T tokens, K (expert, weight) pairs. It never materialises a T x E x C tensor; slots inside capacity
buffers are assigned later by the dispatch (`dispatch.capacity_plan`), so one decision works with the
dropless and the capacity dispatch alike.

An assignment whose expert index equals `num_experts` is "unassigned" (a padding token, for instance):
it is routed nowhere, counts toward no load, takes no capacity and has zero combine weight.
"""
from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp
from flax import nnx

from moe_jax import sharding

ROUTERS = ("token_choice",)


@flax.struct.dataclass
class RoutingDecision:
  """Index-form routing decision for T tokens, E experts and K choices per token.

  Attributes:
    expert_index: [T, K] int32 in [0, E]; E marks an unassigned choice.
    combine_weight: [T, K] float32 weight of each choice in the output (0 when unassigned).
    router_probs: [T, E] float32 router probabilities (for losses and metrics).
    router_logits: [T, E] float32 router logits (for the z-loss).
    valid: [T] bool, False for padding tokens.
  """
  expert_index: jax.Array
  combine_weight: jax.Array
  router_probs: jax.Array
  router_logits: jax.Array
  valid: jax.Array

  @property
  def num_experts(self) -> int:
    return self.router_probs.shape[-1]


def token_choice_top_k(logits: jax.Array, top_k: int, *, valid: jax.Array | None = None,
                       normalize: bool = True) -> RoutingDecision:
  """Each token picks its K most probable experts (Shazeer et al. 2017; GShard 2020; Switch 2021).

  probs = softmax(logits) in float32, taken *before* the top-k so that even K=1 gives the router a
  gradient (Switch Transformer, eq. 1-2). Ties go to the lower expert index (`lax.top_k` is stable), so
  recomputation under remat routes identically. With `normalize` and K > 1, the K weights are
  renormalised to sum to one (Mixtral, 2024); otherwise they are the raw probabilities
  (Switch/GShard). At K = 1 renormalising would make every weight 1 and cut the router off from the
  task gradient, so K = 1 always keeps the raw probability, as in Switch Transformer.

  Args:
    logits: [T, E] router logits (cast to float32 here).
    top_k: K, 1 <= K <= E.
    valid: [T] bool; False tokens are unassigned. Default: all valid.
    normalize: renormalise the selected probabilities (ignored at K = 1).
  """
  logits = logits.astype(jnp.float32)
  num_tokens, num_experts = logits.shape
  if not 1 <= top_k <= num_experts:
    raise ValueError(f"top_k must be in [1, num_experts={num_experts}], got {top_k}.")
  if valid is None:
    valid = jnp.ones((num_tokens,), dtype=bool)
  probs = jax.nn.softmax(logits, axis=-1)
  top_probs, top_index = jax.lax.top_k(probs, top_k)
  if normalize and top_k > 1:
    top_probs = top_probs / jnp.sum(top_probs, axis=-1, keepdims=True)
  top_index = jnp.where(valid[:, None], top_index, num_experts).astype(jnp.int32)
  top_probs = jnp.where(valid[:, None], top_probs, 0.0)
  return RoutingDecision(expert_index=top_index, combine_weight=top_probs, router_probs=probs,
                         router_logits=logits, valid=valid)


class Router(nnx.Module):
  """Linear router: tokens [T, D] -> logits [T, E] in float32, whatever the model dtype."""

  def __init__(self, d_model: int, num_experts: int, *, rngs: nnx.Rngs, param_dtype=jnp.float32):
    init = sharding.logical(nnx.initializers.normal(stddev=d_model ** -0.5), ("embed", None))
    self.kernel = nnx.Param(init(rngs.params(), (d_model, num_experts), param_dtype))

  def __call__(self, x: jax.Array) -> jax.Array:
    # float32 logits: a bf16 router picks different experts on near-ties (DESIGN.md pitfalls).
    return jnp.dot(x.astype(jnp.float32), self.kernel[...].astype(jnp.float32))


def route(config, logits: jax.Array, valid: jax.Array) -> RoutingDecision:
  """Applies the router named by `config.router` (a `config.model.moe` ConfigDict)."""
  if config.router == "token_choice":
    return token_choice_top_k(logits, config.top_k, valid=valid,
                              normalize=config.get("normalize_top_k", True))
  raise ValueError(f"config.model.moe.router={config.router!r} is not one of {ROUTERS}.")
