"""The MoE layer (router -> dispatch -> experts -> combine) and the dense MLP it replaces."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from moe_jax import dispatch, expert_parallel, losses, routing, sharding
from moe_jax.experts import Experts, apply_activation, ffn_init


class MLP(nnx.Module):
  """Dense FFN [..., D] -> [..., D] with the experts' activation (SwiGLU or GELU).

  A dense baseline of equal active FLOPs to a top-K MoE layer uses hidden_dim = K * expert_hidden_dim.
  """

  def __init__(self, d_model: int, hidden_dim: int, *, rngs: nnx.Rngs, activation: str = "swiglu",
               dtype=jnp.float32, param_dtype=jnp.float32):
    self.activation = activation
    self.dtype = dtype
    init_in = sharding.logical(ffn_init(), ("embed", "mlp"))
    init_out = sharding.logical(ffn_init(), ("mlp", "embed"))
    self.w_up = nnx.Param(init_in(rngs.params(), (d_model, hidden_dim), param_dtype))
    self.w_gate = (nnx.Param(init_in(rngs.params(), (d_model, hidden_dim), param_dtype))
                   if activation == "swiglu" else None)
    self.w_down = nnx.Param(init_out(rngs.params(), (hidden_dim, d_model), param_dtype))

  def __call__(self, x: jax.Array) -> jax.Array:
    x = x.astype(self.dtype)

    def dot(lhs, param):
      return jnp.dot(lhs, param[...].astype(self.dtype), preferred_element_type=jnp.float32)

    gate = dot(x, self.w_gate) if self.w_gate is not None else None
    hidden = apply_activation(self.activation, gate, dot(x, self.w_up)).astype(self.dtype)
    return dot(hidden, self.w_down).astype(self.dtype)


class MoELayer(nnx.Module):
  """Sparse Mixture-of-Experts FFN (Shazeer et al. 2017; GShard 2020; Switch Transformer 2021).

  `layer(x, mask)` with x [B, S, D] and optional mask [B, S] (False = padding, routed nowhere) returns
  (y [B, S, D], aux). `aux["loss"]` is the weighted auxiliary loss (scalar); the other entries are
  unweighted losses and metrics: `load_balance_loss`, `router_z_loss`, `expert_load` [E] (fraction of
  assignments per expert, before dropping), `dropped_fraction`, `router_entropy`.

  Args:
    config: the `config.model.moe` ConfigDict (router, num_experts, top_k, capacity_factor,
      group_size, expert_hidden_dim, num_shared_experts, loss weights, gmm_backend).
    d_model: D.
    rngs: parameter initialisation RNGs.
    activation, dtype, param_dtype: as for `MLP`.
  """

  def __init__(self, config, d_model: int, *, rngs: nnx.Rngs, activation: str = "swiglu",
               dtype=jnp.float32, param_dtype=jnp.float32):
    # Frozen: hashable static metadata of the NNX graph (a ConfigDict is neither hashable nor static).
    self.config = ml_collections.FrozenConfigDict(config)
    self.num_experts = config.num_experts
    self.top_k = config.top_k
    self.dtype = dtype
    self.router = routing.Router(d_model, config.num_experts, rngs=rngs, param_dtype=param_dtype)
    self.experts = Experts(config.num_experts, d_model, config.expert_hidden_dim,
                           activation=activation, rngs=rngs, dtype=dtype, param_dtype=param_dtype,
                           gmm_backend=config.get("gmm_backend", "auto"))
    num_shared = config.get("num_shared_experts", 0) or 0
    self.shared_experts = (MLP(d_model, num_shared * config.expert_hidden_dim, rngs=rngs,
                               activation=activation, dtype=dtype, param_dtype=param_dtype)
                           if num_shared > 0 else None)

  def __call__(self, x: jax.Array, mask: jax.Array | None = None) -> tuple[jax.Array, dict]:
    batch, seq, d_model = x.shape
    tokens = x.reshape(batch * seq, d_model)
    valid = (jnp.ones((batch * seq,), bool) if mask is None else mask.reshape(-1).astype(bool))
    decision = routing.route(self.config, self.router(tokens), valid)

    mesh = jax.sharding.get_abstract_mesh()
    if expert_parallel.expert_axis_size(mesh) > 1:
      y, dropped_fraction = self._expert_parallel(tokens, decision, seq, mesh)
    elif self.config.capacity_factor is None:
      y, dropped_fraction = self._dropless(tokens, decision), jnp.zeros((), jnp.float32)
    else:
      y, dropped_fraction = self._with_capacity(tokens, decision, seq)
    y = y.reshape(batch, seq, d_model)
    if self.shared_experts is not None:
      shared = self.shared_experts(x).astype(jnp.float32)
      y = y + shared * valid.reshape(batch, seq, 1)  # padding gets no output from any expert

    balance = losses.switch_load_balance_loss(decision)
    z_loss = losses.router_z_loss(decision)
    aux = {
        "loss": (self.config.load_balance_loss_weight * balance
                 + self.config.router_z_loss_weight * z_loss),
        "load_balance_loss": balance,
        "router_z_loss": z_loss,
        "expert_load": losses.expert_load(decision),
        "dropped_fraction": dropped_fraction,
        "router_entropy": losses.router_entropy(decision),
    }
    return y.astype(x.dtype), aux

  def _dropless(self, tokens: jax.Array, decision: routing.RoutingDecision) -> jax.Array:
    """Sort by expert, grouped matmul, unsort and combine: [T, D] -> [T, D] float32."""
    plan = dispatch.dropless_plan(decision.expert_index, self.num_experts)
    x_sorted = dispatch.dropless_dispatch(tokens, plan, self.top_k)
    y_sorted = self.experts.grouped(x_sorted, plan.group_sizes)
    return dispatch.dropless_combine(y_sorted, plan, decision.combine_weight)

  def _expert_parallel(self, tokens: jax.Array, decision: routing.RoutingDecision, seq_len: int,
                       mesh) -> tuple[jax.Array, jax.Array]:
    """The same computation with experts sharded over the mesh's `expert` axis (shard_map)."""
    experts = self.experts
    common = dict(mesh=mesh, exchange=self.config.get("ep_exchange", "all_to_all"),
                  activation=experts.activation, dtype=experts.dtype)
    if self.config.capacity_factor is None:
      y = expert_parallel.dropless(tokens, decision, experts.weights(),
                                   backend=experts.gmm_backend, **common)
      return y, jnp.zeros((), jnp.float32)
    group_size = self.config.get("group_size", 0) or seq_len
    capacity = dispatch.expert_capacity(group_size, self.num_experts, self.top_k,
                                        self.config.capacity_factor)
    y, kept = expert_parallel.with_capacity(tokens, decision, experts.weights(),
                                            group_size=group_size, capacity=capacity, **common)
    assigned = jnp.sum(decision.expert_index < self.num_experts)
    return y, (1.0 - jnp.sum(kept) / jnp.maximum(assigned, 1)).astype(jnp.float32)

  def _with_capacity(self, tokens: jax.Array, decision: routing.RoutingDecision,
                     seq_len: int) -> tuple[jax.Array, jax.Array]:
    """Capacity buffers per group, batched expert matmul, combine: returns ([T, D], dropped)."""
    num_tokens, d_model = tokens.shape
    group_size = self.config.get("group_size", 0) or seq_len
    if num_tokens % group_size:
      raise ValueError(f"config.model.moe.group_size={group_size} must divide the number of tokens "
                       f"in the batch ({num_tokens}).")
    groups = num_tokens // group_size
    capacity = dispatch.expert_capacity(group_size, self.num_experts, self.top_k,
                                        self.config.capacity_factor)
    expert_index = decision.expert_index.reshape(groups, group_size, self.top_k)
    weight = decision.combine_weight.reshape(groups, group_size, self.top_k)
    plan = dispatch.capacity_plan(expert_index, self.num_experts, capacity)
    buffers = dispatch.capacity_dispatch(tokens.reshape(groups, group_size, d_model), expert_index,
                                         plan, self.num_experts)
    y_buffers = self.experts.batched(buffers.reshape(self.num_experts, groups * capacity, d_model))
    y_buffers = y_buffers.reshape(self.num_experts, groups, capacity, d_model)
    y = dispatch.capacity_combine(y_buffers, expert_index, weight, plan)
    assigned = jnp.sum(expert_index < self.num_experts)
    dropped = 1.0 - jnp.sum(plan.kept) / jnp.maximum(assigned, 1)
    return y.reshape(num_tokens, d_model), dropped.astype(jnp.float32)
