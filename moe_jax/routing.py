"""Routers: router logits -> a routing decision (which experts, with what weight).

`route(config, logits, valid, ...)` applies the router named by `config.router` (a
`config.model.moe` ConfigDict) and returns an index-form `RoutingDecision` (see
`moe_jax.routers.decision`). Soft MoE returns dense weights instead and is applied by the layer
(`moe_jax.routers.soft`). Routers:

  token_choice   top-k of softmax or sigmoid scores; optional noisy top-k (fixed std, V-MoE, or a
                 learned per-expert std, Shazeer et al. 2017), group-limited routing (DeepSeek-V2
                 or V3 group scores), auxiliary-loss-free selection bias, routed scaling
                 (`routers/token_choice.py`)
  expert_choice  each expert takes its top-C tokens per group (`routers/expert_choice.py`)
  top_p          experts until cumulative probability >= p (`routers/dynamic.py`)
  relu           ReLU gates, sparsity by an adaptive L1 penalty (`routers/dynamic.py`)
  random         K uniform random experts per token, ignoring the router
  soft           Soft MoE slots (`routers/soft.py`; dense weights, applied in `moe.py`)
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from moe_jax import dispatch, sharding
from moe_jax.routers.decision import RoutingDecision, unassign  # noqa: F401  (public names)
from moe_jax.routers.dynamic import relu_routing, top_p
from moe_jax.routers.expert_choice import expert_choice
from moe_jax.routers.token_choice import (GROUP_SCORES, SCORE_FUNCTIONS, random_top_k,  # noqa: F401
                                         token_choice_top_k)

ROUTERS = ("token_choice", "expert_choice", "soft", "top_p", "relu", "random")
SPARSE_ROUTERS = tuple(r for r in ROUTERS if r != "soft")
#: Routers whose decision depends on other tokens of the group (not causal with sequence groups).
GROUP_ROUTERS = ("expert_choice", "soft")
#: Noisy top-k (`config.router_noise`): "fixed" std router_noise_std (V-MoE, Riquelme et al. 2021)
#: or "learned" per-token, per-expert std Softplus(x W_noise) (Shazeer et al. 2017, eq. 4).
ROUTER_NOISES = ("fixed", "learned")


class Router(nnx.Module):
  """Linear router: tokens [T, D] -> logits [T, E] in float32, whatever the model dtype.

  With `learned_noise` it also holds W_noise [D, E] of Shazeer et al. 2017's noisy top-k gating
  (eq. 4), zero-initialised as in the paper's code (every expert starts at std Softplus(0) =
  log 2 and learns its own); `noise_std(x)` gives Softplus(x W_noise).
  """

  def __init__(self, d_model: int, num_experts: int, *, rngs: nnx.Rngs, param_dtype=jnp.float32,
               learned_noise: bool = False, bias: bool = False):
    init = sharding.logical(nnx.initializers.normal(stddev=d_model ** -0.5), ("embed", None))
    self.kernel = nnx.Param(init(rngs.params(), (d_model, num_experts), param_dtype))
    self.noise_kernel = (nnx.Param(sharding.logical(nnx.initializers.zeros, ("embed", None))(
        rngs.params(), (d_model, num_experts), param_dtype)) if learned_noise else None)
    # A learned logit bias b [E] (GPT-OSS): logits x W + b.
    self.bias = (nnx.Param(sharding.logical(nnx.initializers.zeros, (None,))(
        rngs.params(), (num_experts,), param_dtype)) if bias else None)

  def __call__(self, x: jax.Array) -> jax.Array:
    # float32 logits: a bf16 router picks different experts on near-ties (DESIGN.md pitfalls).
    logits = jnp.dot(x.astype(jnp.float32), self.kernel[...].astype(jnp.float32))
    return logits if self.bias is None else logits + self.bias[...].astype(jnp.float32)

  def noise_std(self, x: jax.Array) -> jax.Array | None:
    """Softplus(x W_noise) [T, E] float32, the learned noise std (None without W_noise)."""
    if self.noise_kernel is None:
      return None
    return jax.nn.softplus(jnp.dot(x.astype(jnp.float32),
                                   self.noise_kernel[...].astype(jnp.float32)))


def num_extra_experts(config) -> int:
  """Zero-computation (MoE++) and null (AdaMoE) experts beside the FFN experts."""
  return sum(config.get(name, 0) or 0 for name in
             ("num_zero_experts", "num_copy_experts", "num_constant_experts", "num_null_experts"))


def num_router_outputs(config) -> int:
  """E' = FFN experts + zero-computation and null experts: the router's logits per token."""
  return config.num_experts + num_extra_experts(config)


def slots_per_token(config) -> int:
  """K, the assignment slots per token of the decision `route` gives (`RoutingDecision.slots`).

  The dispatch and the expert-parallel exchange size their buffers by it (the dropless all-to-all
  of `expert_parallel.py` sends T_local * K rows to every destination): top_k for token choice and
  random routing; E' (`num_router_outputs`) for expert choice and ReLU routing; for top-p,
  max_experts_per_token, or E' when that is 0. Read off the router itself with `jax.eval_shape`
  (shapes only, nothing is computed), so it cannot drift from what the routers return.
  """
  if config.router == "soft":
    raise ValueError("router='soft' gives dense slot weights, no index-form decision with slots "
                     "per token.")
  logits = jax.ShapeDtypeStruct((1, num_router_outputs(config)), jnp.float32)
  valid = jax.ShapeDtypeStruct((1,), jnp.bool_)
  decision = jax.eval_shape(lambda l, v: route(config, l, v, group_size=1), logits, valid)
  return decision.expert_index.shape[-1]


def expert_choice_capacity(config, group_size: int) -> int:
  """C = ceil(capacity_factor * N / E) tokens per expert and group (Zhou et al. 2022)."""
  return min(group_size, dispatch.expert_capacity(group_size, config.num_experts, 1,
                                                  config.capacity_factor))


def add_logit_noise(logits: jax.Array, std, rng: jax.Array) -> jax.Array:
  """Noisy top-k logits H = logits + std * N(0, 1), one standard normal draw per (token, expert).

  `std` is a number (V-MoE's fixed noise, Riquelme et al. 2021, which uses std = 1/E) or a
  [T, E] array (Shazeer et al. 2017, eq. 4: H(x)_i = (x W_g)_i + StandardNormal() *
  Softplus((x W_noise)_i), the std from `Router.noise_std`).
  """
  return logits + std * jax.random.normal(rng, logits.shape, logits.dtype)


def route(config, logits: jax.Array, valid: jax.Array, *, rng: jax.Array | None = None,
          selection_bias: jax.Array | None = None, group_size: int | None = None,
          noise_std: jax.Array | None = None) -> RoutingDecision:
  """Applies the sparse router named by `config.router`.

  Args:
    config: the `config.model.moe` ConfigDict.
    logits: [T, E'] router logits (E' = `num_router_outputs(config)`).
    valid: [T] bool, False for padding.
    rng: PRNG key for training-time randomness (noisy top-k, random routing); None = no noise
      (evaluation); random routing then uses a fixed key.
    selection_bias: [E'] auxiliary-loss-free bias (token choice only), or None.
    group_size: tokens per group (expert choice).
    noise_std: [T, E'] learned noise std (`Router.noise_std`, router_noise="learned"), or None for
      the fixed `router_noise_std`. Token choice only; the decision keeps it for the load loss.
  """
  router = config.router
  top_k = config.top_k
  if router == "token_choice":
    learned = noise_std is not None
    if not learned:
      noise_std = config.get("router_noise_std", 0.0) or 0.0
    noisy = add_logit_noise(logits.astype(jnp.float32), noise_std, rng) if (
        (learned or noise_std > 0) and rng is not None) else None
    decision = token_choice_top_k(
        logits, top_k, valid=valid, normalize=config.get("normalize_top_k", True),
        score_function=config.get("score_function", "softmax"), selection_bias=selection_bias,
        num_groups=config.get("num_expert_groups", 1) or 1,
        top_k_groups=config.get("top_k_groups", 1) or 1,
        group_score=config.get("group_score", "top2_sum"),
        scaling=config.get("routed_scaling_factor", 1.0), noisy_logits=noisy)
    return decision.replace(noise_std=noise_std) if learned and noisy is not None else decision
  if router == "expert_choice":
    return expert_choice(logits, expert_choice_capacity(config, group_size), group_size,
                         valid=valid)
  if router == "top_p":
    return top_p(logits, config.top_p_threshold, max_experts=config.get("max_experts_per_token")
                 or None, valid=valid)
  if router == "relu":
    return relu_routing(logits, valid=valid)
  if router == "random":
    key = rng if rng is not None else jax.random.key(0)
    return random_top_k(key, logits.shape[0], logits.shape[1], top_k, valid=valid, logits=logits)
  raise ValueError(f"config.model.moe.router={router!r} is not a sparse router; allowed: "
                   f"{SPARSE_ROUTERS} (and 'soft', applied by the MoE layer).")
