"""Zero-computation experts (MoE++, Jin et al. 2024) and null experts (AdaMoE, Zeng et al. 2024).

They sit after the E FFN experts in the router's outputs, in this order: zero, copy, constant,
null. A token routed to one costs (almost) no FLOPs, so tokens can use fewer than K FFN experts.

  zero      E(x) = 0                                   (MoE++ "discard")
  copy      E(x) = x                                   (MoE++ "skip")
  constant  E(x) = a1 * x + a2 * v,  [a1, a2] = softmax(W_c x),  v learned  (MoE++ "replace")
  null      E(x) = 0; the K weights are renormalised over the FFN experts only (AdaMoE)

MoE++'s gating residuals (adding the previous layer's router logits) are not implemented.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from moe_jax import sharding


def expert_ranges(config) -> dict[str, tuple[int, int]]:
  """[start, stop) router-output ids of each kind of zero-computation or null expert."""
  start = config.num_experts
  ranges = {}
  for kind in ("zero", "copy", "constant", "null"):
    count = config.get(f"num_{kind}_experts", 0) or 0
    ranges[kind] = (start, start + count)
    start += count
  return ranges


def renormalize_over_ffn_experts(expert_index: jax.Array, combine_weight: jax.Array,
                                 num_ffn_experts: int) -> jax.Array:
  """AdaMoE: weights [T, K] of FFN-expert slots rescaled to sum to one; null slots get 0."""
  is_ffn = expert_index < num_ffn_experts
  ffn_weight = jnp.where(is_ffn, combine_weight, 0.0)
  total = jnp.sum(ffn_weight, axis=-1, keepdims=True)
  return jnp.where(total > 0, ffn_weight / jnp.where(total > 0, total, 1.0), 0.0)


class ZeroComputationExperts(nnx.Module):
  """Outputs of the zero, copy and constant experts for the slots routed to them."""

  def __init__(self, config, d_model: int, *, rngs: nnx.Rngs, param_dtype=jnp.float32):
    self.ranges = expert_ranges(config)
    num_constant = self.ranges["constant"][1] - self.ranges["constant"][0]
    if num_constant:
      init = sharding.logical(nnx.initializers.normal(stddev=d_model ** -0.5),
                              (None, "embed", None))
      self.constant_gate = nnx.Param(init(rngs.params(), (num_constant, d_model, 2), param_dtype))
      self.constant_vector = nnx.Param(
          sharding.logical(nnx.initializers.normal(stddev=1.0), (None, "embed"))(
              rngs.params(), (num_constant, d_model), param_dtype))
    else:
      self.constant_gate = self.constant_vector = None

  def __call__(self, tokens: jax.Array, expert_index: jax.Array,
               combine_weight: jax.Array) -> jax.Array:
    """tokens [T, D], expert_index/combine_weight [T, K] -> summed outputs [T, D] float32."""
    x = tokens.astype(jnp.float32)
    start, stop = self.ranges["copy"]
    copy_weight = jnp.sum(jnp.where((expert_index >= start) & (expert_index < stop),
                                    combine_weight, 0.0), axis=-1)
    out = copy_weight[:, None] * x
    if self.constant_gate is not None:
      start, stop = self.ranges["constant"]
      per_expert = jax.nn.one_hot(expert_index - start, stop - start, dtype=jnp.float32)
      weight = jnp.einsum("tkc,tk->tc", per_expert, combine_weight)  # [T, C]
      mix = jax.nn.softmax(jnp.einsum("td,cdj->tcj", x, self.constant_gate[...].astype(
          jnp.float32)), axis=-1)  # [T, C, 2]
      vector = self.constant_vector[...].astype(jnp.float32)  # [C, D]
      outputs = mix[..., 0:1] * x[:, None, :] + mix[..., 1:2] * vector[None]  # [T, C, D]
      out = out + jnp.einsum("tc,tcd->td", weight, outputs)
    return out
