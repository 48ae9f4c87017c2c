"""Auxiliary router losses and routing metrics, computed from a `RoutingDecision`.

All statistics run over the valid tokens of the whole batch handed to the layer. Under `jax.jit` with
a sharded batch this is the global batch, so the value and its gradient do not change with the number
of data-parallel devices.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from moe_jax.routing import RoutingDecision


def _valid_mean(values: jax.Array, valid: jax.Array) -> jax.Array:
  """Mean of `values` [T, ...] over the valid tokens [T] (first axis)."""
  weight = valid.astype(jnp.float32).reshape(valid.shape + (1,) * (values.ndim - 1))
  return jnp.sum(values * weight, axis=0) / jnp.maximum(jnp.sum(valid), 1)


def expert_load(decision: RoutingDecision) -> jax.Array:
  """f_i: fraction of the T*K (token, choice) assignments sent to expert i, before dropping. [E].

  Sums to 1 over experts when every token is assigned K experts; uniform load gives 1/E each.
  """
  num_experts = decision.num_experts
  counts = jax.nn.one_hot(decision.expert_index, num_experts, dtype=jnp.float32).sum(axis=(0, 1))
  top_k = decision.expert_index.shape[-1]
  return counts / jnp.maximum(jnp.sum(decision.valid) * top_k, 1)


def switch_load_balance_loss(decision: RoutingDecision) -> jax.Array:
  """Switch Transformer load-balancing loss (Fedus et al. 2021, eq. 4), generalised to top-k.

      loss = E * sum_i f_i * P_i,
      f_i = (# assignments to expert i) / (T * K),   P_i = mean over tokens of router_probs[:, i].

  f_i is divided by K so that the loss is 1 under perfectly uniform routing for every K (the same
  normalisation for every router here); f_i carries no gradient, P_i does.
  """
  load = jax.lax.stop_gradient(expert_load(decision))
  mean_prob = _valid_mean(decision.router_probs, decision.valid)
  return decision.num_experts * jnp.sum(load * mean_prob)


def router_z_loss(decision: RoutingDecision) -> jax.Array:
  """ST-MoE router z-loss (Zoph et al. 2022, eq. 5): mean over tokens of logsumexp(logits)^2."""
  log_z = jax.nn.logsumexp(decision.router_logits, axis=-1)
  return _valid_mean(log_z ** 2, decision.valid)


def router_entropy(decision: RoutingDecision) -> jax.Array:
  """Mean entropy (nats) of the per-token router distribution; log(E) is maximal uncertainty."""
  probs = decision.router_probs
  entropy = -jnp.sum(probs * jnp.log(jnp.maximum(probs, 1e-30)), axis=-1)
  return _valid_mean(entropy, decision.valid)
