"""Router state that lives outside the optimizer and the gradient, updated once per training step.

  * The auxiliary-loss-free balancing bias (Wang et al. 2024, "Auxiliary-Loss-Free Load Balancing
    Strategy for Mixture-of-Experts", Alg. 1; DeepSeek-V3 2024, Sec. 2.1.2).
  * ReMoE's adaptive L1 coefficient (Liu et al. 2024, "ReMoE", eq. 7).

Both are `RouterState` variables of the MoE layer: the training state keeps them beside the
parameters (`state["router_state"]`), orbax checkpoints them, and the optimizer never sees them.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx


class RouterState(nnx.Variable):
  """A router variable updated by a rule, not by gradients (not an `nnx.Param`)."""


def loss_free_bias_update(bias: jax.Array, expert_counts: jax.Array, rate: float) -> jax.Array:
  """b_i <- b_i + u * sign(mean_j c_j - c_i) (Wang et al. 2024, Alg. 1; DeepSeek-V3 eq. 16 ff.).

  Overloaded experts (c_i above the mean) get a lower bias and are selected less. Counts are taken
  over the whole (global) batch of the step.

  Args:
    bias: [E] float32. expert_counts: [E] assignments per expert in this step. rate: u.
  """
  counts = jax.lax.stop_gradient(expert_counts.astype(jnp.float32))
  return bias + rate * jnp.sign(jnp.mean(counts) - counts)


def l1_coefficient_update(coefficient: jax.Array, sparsity: jax.Array, target_sparsity: float,
                          factor: float) -> jax.Array:
  """lambda <- lambda * alpha ** sign(target - sparsity) (ReMoE, Liu et al. 2024, eq. 7).

  When the gates are denser than the target (sparsity below it) the L1 penalty grows by `factor`
  (alpha, 1.2 in the paper); when sparser, it shrinks.
  """
  direction = jnp.sign(target_sparsity - jax.lax.stop_gradient(sparsity))
  return coefficient * jnp.power(jnp.float32(factor), direction)
