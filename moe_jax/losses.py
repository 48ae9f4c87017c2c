"""Auxiliary router losses and routing metrics, computed from a `RoutingDecision`.

All statistics run over the valid tokens of the whole batch handed to the layer. Under `jax.jit` with
a sharded batch this is the global batch, so the value and its gradient do not change with the number
of data-parallel devices. The load-balance loss can instead be computed per micro-batch (`segments`),
as frameworks that average it over data-parallel ranks do (Qiu et al. 2025).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from moe_jax.routing import RoutingDecision

BALANCE_SCOPES = ("global", "micro_batch")


def _valid_mean(values: jax.Array, valid: jax.Array) -> jax.Array:
  """Mean of `values` [T, ...] over the valid tokens [T] (first axis)."""
  weight = valid.astype(jnp.float32).reshape(valid.shape + (1,) * (values.ndim - 1))
  return jnp.sum(values * weight, axis=0) / jnp.maximum(jnp.sum(valid), 1)


def expert_counts(decision: RoutingDecision) -> jax.Array:
  """Assignments per expert (before any dropping): [E] float32."""
  return jax.nn.one_hot(decision.expert_index, decision.num_experts,
                        dtype=jnp.float32).sum(axis=(0, 1))


def expert_load(decision: RoutingDecision) -> jax.Array:
  """f_i: fraction of all assignments sent to expert i, before dropping. [E], sums to 1.

  For top-k token choice this is (# assignments to i) / (T * K); for routers with a variable
  number of experts per token the denominator is the actual number of assignments. Uniform load
  gives 1/E each.
  """
  counts = expert_counts(decision)
  return counts / jnp.maximum(jnp.sum(counts), 1.0)


def experts_per_token(decision: RoutingDecision, num_ffn_experts: int) -> jax.Array:
  """Mean number of FFN experts (not zero-computation or null) assigned per valid token."""
  is_ffn = (decision.expert_index < num_ffn_experts).astype(jnp.float32)
  return _valid_mean(jnp.sum(is_ffn, axis=-1), decision.valid)


def switch_load_balance_loss(decision: RoutingDecision, segments: jax.Array | None = None,
                             num_segments: int = 1, expert_weight: jax.Array | None = None,
                             global_load: jax.Array | None = None) -> jax.Array:
  """Switch Transformer load-balancing loss (Fedus et al. 2021, eq. 4), generalised to top-k.

      loss = E * sum_i f_i * P_i,
      f_i = (# assignments to expert i) / (# assignments),   P_i = mean over tokens of p_i(x).

  f_i is divided by the number of assignments (T * K for top-k) so that the loss is 1 under
  perfectly uniform routing for every K and every router here; f_i carries no gradient, P_i does.

  Global-batch vs micro-batch balance (Qiu et al. 2025, "Demons in the Detail", eq. 1-3): with
  `segments` [T] int in [0, num_segments) (the micro-batch of each token), f_i and P_i are taken
  within each micro-batch and the loss is the mean over micro-batches of E * sum_i f_i P_i; with one
  segment it is the global-batch loss.

  `expert_weight` [E] (eta_i) weights each expert's term, E * sum_i eta_i f_i P_i: MoE++'s
  heterogeneous load balance loss (`zero_expert_balance_weights`). None = 1 for every expert.

  `global_load` [E] replaces this batch's f_i with the f_i of a larger batch that this one is part
  of (gradient accumulation: the whole global batch, measured by a forward pass before the
  gradient pass). Each micro-batch's loss E * sum_i f_i^global P_i^micro then averages over equal
  micro-batches to exactly the global-batch loss, and so do its gradients.
  """
  eta = 1.0 if expert_weight is None else jnp.asarray(expert_weight, jnp.float32)
  if segments is None or num_segments == 1:
    load = jax.lax.stop_gradient(expert_load(decision) if global_load is None else global_load)
    mean_prob = _valid_mean(decision.router_probs, decision.valid)
    return decision.num_experts * jnp.sum(eta * load * mean_prob)
  num_experts = decision.num_experts
  valid = decision.valid.astype(jnp.float32)
  onehot = jax.nn.one_hot(decision.expert_index, num_experts, dtype=jnp.float32).sum(axis=1)
  counts = jax.ops.segment_sum(onehot, segments, num_segments)  # [M, E]
  load = jax.lax.stop_gradient(counts / jnp.maximum(counts.sum(-1, keepdims=True), 1.0))
  prob_sum = jax.ops.segment_sum(decision.router_probs * valid[:, None], segments, num_segments)
  tokens = jax.ops.segment_sum(valid, segments, num_segments)
  mean_prob = prob_sum / jnp.maximum(tokens, 1.0)[:, None]
  return num_experts * jnp.mean(jnp.sum(eta * load * mean_prob, axis=-1))


def zero_expert_balance_weights(num_outputs: int, zero_computation: tuple[int, int],
                                tau: float) -> jax.Array:
  """eta [E'] of the heterogeneous load balance loss of MoE++ (Jin et al. 2024, "MoE++:
  Accelerating Mixture-of-Experts Methods with Zero-Computation Experts", the loss L_b):

      L_b = sum_{i=1}^{N+M} eta_i f_i P_i,   eta_i = 1 for an FFN expert, tau for a
      zero-computation (zero, copy or constant) expert,

  with N FFN and M zero-computation experts; tau sets how many tokens the loss steers to the
  zero-computation experts relative to the FFN ones (tau < 1 balances them less strictly, so
  tokens may crowd them, saving FFN compute). tau = 1 is the ordinary balance loss over all N + M
  outputs. Here f_i and P_i are those of `switch_load_balance_loss` (with its factor E'), which
  differ from the paper's f_i (fraction of tokens) by constant factors only, absorbed by the loss
  weight. Null experts (AdaMoE) are not MoE++ experts and keep weight 1.

  Args:
    num_outputs: E', the router outputs.
    zero_computation: [start, stop) ids of the zero-computation experts
      (`zero_experts.expert_ranges`: zero, copy and constant are contiguous).
    tau: their weight, >= 0.
  """
  start, stop = zero_computation
  ids = jnp.arange(num_outputs)
  return jnp.where((ids >= start) & (ids < stop), jnp.float32(tau), jnp.float32(1.0))


def router_z_loss(decision: RoutingDecision) -> jax.Array:
  """ST-MoE router z-loss (Zoph et al. 2022, eq. 5): mean over tokens of logsumexp(logits)^2."""
  log_z = jax.nn.logsumexp(decision.router_logits, axis=-1)
  return _valid_mean(log_z ** 2, decision.valid)


def router_entropy(decision: RoutingDecision) -> jax.Array:
  """Mean entropy (nats) of the per-token router distribution; log(E) is maximal uncertainty.

  Also the dynamic loss of top-p routing (Huang et al. 2024, eq. 6): minimising it sharpens the
  distribution so that fewer experts reach the threshold p.
  """
  probs = decision.router_probs
  entropy = -jnp.sum(probs * jnp.log(jnp.maximum(probs, 1e-30)), axis=-1)
  return _valid_mean(entropy, decision.valid)


def _squared_cv(values: jax.Array) -> jax.Array:
  """(std / mean)^2 of a vector (population std), 0 for a constant vector."""
  mean = jnp.mean(values)
  return jnp.var(values) / jnp.maximum(mean * mean, 1e-30)


def importance_loss(decision: RoutingDecision) -> jax.Array:
  """V-MoE importance loss (Riquelme et al. 2021, App. A, eq. 6-7; Shazeer et al. 2017 eq. 6).

      Imp_i(X) = sum over tokens of p_i(x)  (the gates, noisy in training);  loss = CV(Imp)^2.
  """
  valid = decision.valid.astype(jnp.float32)[:, None]
  return _squared_cv(jnp.sum(decision.router_probs * valid, axis=0))


def noisy_load_loss(decision: RoutingDecision, noise_std, top_k: int, *,
                    exclude_self: bool = False) -> jax.Array:
  """Load loss of noisy top-k: CV^2 of the smooth per-expert load estimates.

      P_i(x) = Pr[(W x)_i + std_i(x) * eps_new >= threshold_i(x)]
             = 1 - Phi((threshold_i(x) - (W x)_i) / std_i(x));
      load_i(X) = sum over tokens of P_i(x);   loss = CV(load)^2.

  Two variants of the threshold and the std, one per paper:
    * V-MoE (Riquelme et al. 2021, App. A, eq. 8-10): a fixed `noise_std` (a number) and
      threshold(x) = the K-th largest noisy logit (`exclude_self=False`).
    * Shazeer et al. 2017 (eq. 8-10): the learned std_i(x) = Softplus((x W_noise)_i) ([T, E],
      `decision.noise_std`) and threshold_i(x) = kth_excluding(H(x), K, i), the K-th largest noisy
      logit of the other experts (`exclude_self=True`): the K+1-th largest for an expert in the
      top K, the K-th otherwise.

  Args:
    decision: a noisy top-k decision; without noise (evaluation) the loss is 0.
    noise_std: a number or an array broadcastable to [T, E] (None or <= 0: no noise, loss 0).
    top_k: K.
    exclude_self: Shazeer et al.'s kth_excluding threshold (with K = E every expert is always
      picked: every P_i = 1 and the loss is 0).
  """
  if decision.noisy_logits is None or noise_std is None or (
      isinstance(noise_std, (int, float)) and noise_std <= 0) or (
      exclude_self and top_k >= decision.num_experts):
    return jnp.zeros((), jnp.float32)
  top = jax.lax.top_k(decision.noisy_logits, top_k + 1 if exclude_self else top_k)[0]
  threshold = top[:, top_k - 1:top_k]  # K-th largest
  if exclude_self:  # an expert at or above the K-th largest is in the top K: the next one counts
    threshold = jnp.where(decision.noisy_logits >= threshold, top[:, top_k:top_k + 1], threshold)
  prob = 1.0 - jax.scipy.stats.norm.cdf((threshold - decision.router_logits) / noise_std)
  valid = decision.valid.astype(jnp.float32)[:, None]
  return _squared_cv(jnp.sum(prob * valid, axis=0))


def relu_l1_loss(decision: RoutingDecision, top_k: int) -> jax.Array:
  """ReMoE's load-balanced L1 penalty on the ReLU gates (Liu et al. 2024, eq. 8-9).

      f_i = E / (K * T) * #{tokens with gate_i > 0}   (no gradient),
      loss = 1 / T * sum_t sum_i f_i * gate_{t,i}.

  Multiplied by the adaptive coefficient lambda (`router_state.l1_coefficient_update`) in the layer.
  """
  gates = jax.nn.relu(decision.router_logits)
  valid = decision.valid.astype(jnp.float32)[:, None]
  tokens = jnp.maximum(jnp.sum(valid), 1.0)
  active = jnp.sum((gates > 0) * valid, axis=0)
  frequency = jax.lax.stop_gradient(decision.num_experts * active / (top_k * tokens))
  return jnp.sum(gates * valid * frequency) / tokens


def gate_sparsity(decision: RoutingDecision) -> jax.Array:
  """Fraction of (valid token, expert) router gates that are zero (ReLU routing's sparsity)."""
  gates = jax.nn.relu(decision.router_logits)
  zero = jnp.mean((gates <= 0).astype(jnp.float32), axis=-1)
  return _valid_mean(zero, decision.valid)
