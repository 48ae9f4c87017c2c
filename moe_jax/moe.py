"""The MoE layer (router -> dispatch -> experts -> combine) and the dense MLP it replaces."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from moe_jax import dispatch, expert_parallel, losses, router_state, routing, sharding
from moe_jax.experts import Experts, apply_activation, batched_ffn, ffn_init, is_gated
from moe_jax.routers.soft import SoftRouter, soft_routing_metrics
from moe_jax.zero_experts import ZeroComputationExperts, renormalize_over_ffn_experts


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
                   if is_gated(activation) else None)
    self.w_down = nnx.Param(init_out(rngs.params(), (hidden_dim, d_model), param_dtype))

  def __call__(self, x: jax.Array) -> jax.Array:
    x = x.astype(self.dtype)

    def dot(lhs, param):
      return jnp.dot(lhs, param[...].astype(self.dtype), preferred_element_type=jnp.float32)

    gate = dot(x, self.w_gate) if self.w_gate is not None else None
    hidden = apply_activation(self.activation, gate, dot(x, self.w_up)).astype(self.dtype)
    return dot(hidden, self.w_down).astype(self.dtype)


class MoELayer(nnx.Module):
  """Mixture-of-Experts FFN (Shazeer et al. 2017; GShard 2020; Switch Transformer 2021).

  `layer(x, mask, train=..., rng=...)` with x [B, S, D] and optional mask [B, S] (False = padding,
  routed nowhere) returns (y [B, S, D], aux). `aux["loss"]` is the weighted auxiliary loss
  (scalar); the other entries are unweighted losses and metrics: `load_balance_loss`,
  `router_z_loss`, `expert_load` [E'] (fraction of assignments per router output, before
  dropping), `dropped_fraction`, `router_entropy`, `experts_per_token` (mean FFN experts per
  valid token), and router-specific terms.

  The router (`config.router`, see `moe_jax.routing`) gives an index-form decision, the dispatch
  moves tokens (dropless sort + grouped matmul when `capacity_factor` is None, capacity buffers
  otherwise, expert-parallel `shard_map` when the mesh has an `expert` axis > 1), the experts
  compute, and the combine sums the weighted outputs in float32. Soft MoE mixes tokens into slots
  with dense weights instead. Zero-computation / null experts (MoE++, AdaMoE), shared experts
  (DeepSeekMoE) and router state (auxiliary-loss-free bias, ReMoE's L1 coefficient) are added
  around that core.

  Groups (capacity groups, expert choice, soft MoE, micro-batch balance) are formed from the
  layout selected by `config.group_by`: "sequence" (runs of consecutive tokens of a sequence) or
  "position" (the tokens at one position across the batch, which keeps expert choice and soft
  MoE causal in a decoder).

  Args:
    config: the `config.model.moe` ConfigDict (see configs/default.py for every field).
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
    self.is_soft = config.router == "soft"
    num_outputs = routing.num_router_outputs(config)
    if self.is_soft:
      self.router = SoftRouter(d_model, config.num_experts, soft_slots_per_expert(config),
                               rngs=rngs, normalize=config.get("soft_normalize", True),
                               param_dtype=param_dtype)
    else:
      self.router = routing.Router(
          d_model, num_outputs, rngs=rngs, param_dtype=param_dtype,
          learned_noise=config.get("router_noise", "fixed") == "learned",
          bias=config.get("router_bias", False))
    self.experts = Experts(config.num_experts, d_model, config.expert_hidden_dim,
                           activation=activation, rngs=rngs, dtype=dtype, param_dtype=param_dtype,
                           gmm_backend=config.get("gmm_backend", "auto"),
                           gmm_tiling=_gmm_tiling(config),
                           bias=config.get("expert_bias", False))
    num_shared = config.get("num_shared_experts", 0) or 0
    shared_hidden = (config.get("shared_expert_hidden_dim", 0)
                     or num_shared * config.expert_hidden_dim)
    self.shared_experts = (MLP(d_model, shared_hidden, rngs=rngs, activation=activation,
                               dtype=dtype, param_dtype=param_dtype)
                           if num_shared > 0 else None)
    # Qwen2-MoE's shared expert gate: the shared output times sigmoid(x w) per token, w [D, 1].
    self.shared_expert_gate = (
        nnx.Param(sharding.logical(nnx.initializers.zeros, ("embed", None))(
            rngs.params(), (d_model, 1), param_dtype))
        if num_shared > 0 and config.get("shared_expert_gate", False) else None)
    self.zero_experts = (ZeroComputationExperts(config, d_model, rngs=rngs,
                                                param_dtype=param_dtype)
                         if routing.num_extra_experts(config) else None)
    self.bias_update_rate = config.get("bias_update_rate", 0.0) or 0.0
    self.selection_bias = (router_state.RouterState(jnp.zeros((num_outputs,), jnp.float32))
                           if self.bias_update_rate > 0 or config.get("selection_bias", False)
                           else None)
    self.l1_coefficient = (router_state.RouterState(
        jnp.asarray(config.get("relu_l1_initial", 1e-8), jnp.float32))
                           if config.router == "relu" else None)

  def __call__(self, x: jax.Array, mask: jax.Array | None = None, *, train: bool = False,
               rng: jax.Array | None = None,
               global_load: jax.Array | None = None) -> tuple[jax.Array, dict]:
    """x [B, S, D], mask [B, S] -> (y [B, S, D], aux).

    Args:
      train: update router state (loss-free bias, L1 coefficient) from this batch's routing.
      rng: PRNG key for training-time routing noise (jitter, noisy top-k, random routing); None
        means no noise.
      global_load: [E'] expert load f_i of the global batch this batch is a micro-batch of, for
        the global-scope balance loss under gradient accumulation (see
        `losses.switch_load_balance_loss`); None = this batch's own load.
    """
    by_position = self.config.get("group_by", "sequence") == "position"
    if by_position:  # groups = the tokens at one position across the batch
      x = x.transpose(1, 0, 2)
      mask = None if mask is None else mask.T
    rows, seq, d_model = x.shape
    tokens = x.reshape(rows * seq, d_model)
    valid = (jnp.ones((rows * seq,), bool) if mask is None else mask.reshape(-1).astype(bool))
    group_size = self.config.get("group_size", 0) or seq
    if self.is_soft:
      y, aux = self._soft(tokens, valid, group_size)
    else:
      # Each token's sequence (batch row), for micro-batch balance statistics.
      token_id = jnp.arange(rows * seq)
      batch_row = token_id % seq if by_position else token_id // seq
      y, aux = self._sparse(tokens, valid, group_size, batch_row, seq if by_position else rows,
                            train=train, rng=rng, global_load=global_load)
    y = y.reshape(rows, seq, d_model)
    if self.shared_experts is not None:
      # padding gets no output from any expert
      y = y + self.shared_output(x) * valid.reshape(rows, seq, 1)
    if by_position:
      y = y.transpose(1, 0, 2)
    return y.astype(x.dtype), aux

  def shared_output(self, x: jax.Array) -> jax.Array:
    """The shared experts' output [..., D] float32 (gated per token when `shared_expert_gate`)."""
    shared = self.shared_experts(x).astype(jnp.float32)
    if self.shared_expert_gate is None:
      return shared
    gate = jnp.dot(x.astype(jnp.float32), self.shared_expert_gate[...].astype(jnp.float32))
    return shared * jax.nn.sigmoid(gate)

  # ------------------------------------------------------------------------------ sparse routers

  def route(self, tokens: jax.Array, valid: jax.Array, group_size: int, *,
            rng: jax.Array | None = None) -> routing.RoutingDecision:
    """Router logits and the routing decision for tokens [T, D] (no state update)."""
    if rng is not None and self.config.get("router_jitter", 0.0):
      # Switch Transformer's jitter: multiplicative uniform noise on the router input.
      eps = self.config.router_jitter
      rng, jitter_rng = jax.random.split(rng)
      tokens = tokens * jax.random.uniform(jitter_rng, tokens.shape, jnp.float32, 1 - eps,
                                           1 + eps).astype(tokens.dtype)
    bias = None if self.selection_bias is None else self.selection_bias[...]
    # Noisy top-k with a learned std (Shazeer et al. 2017 eq. 4): training only, like the noise.
    noise_std = self.router.noise_std(tokens) if rng is not None else None
    decision = routing.route(self.config, self.router(tokens), valid, rng=rng,
                             selection_bias=bias, group_size=group_size, noise_std=noise_std)
    if self.config.get("num_null_experts", 0) and self.config.get("normalize_top_k", True):
      # AdaMoE: null experts only make room; the kept FFN experts' weights sum to one again
      # (times DeepSeek-V3's routed scaling, which the renormalisation would otherwise undo).
      decision = decision.replace(combine_weight=renormalize_over_ffn_experts(
          decision.expert_index, decision.combine_weight, self.num_experts)
                                  * self.config.get("routed_scaling_factor", 1.0))
    return decision

  def ffn_assignments(self, decision: routing.RoutingDecision) -> tuple[jax.Array, jax.Array]:
    """(expert_index, combine_weight) [T, K] restricted to FFN experts (others -> sentinel E)."""
    is_ffn = decision.expert_index < self.num_experts
    return (jnp.where(is_ffn, decision.expert_index, self.num_experts),
            jnp.where(is_ffn, decision.combine_weight, 0.0))

  def dropless_output(self, tokens: jax.Array, decision: routing.RoutingDecision) -> jax.Array:
    """Routed-expert output [T, D] float32 with dropless dispatch (no shared experts)."""
    y = self._dropless(tokens, *self.ffn_assignments(decision))
    if self.zero_experts is not None:
      y = y + self.zero_experts(tokens, decision.expert_index, decision.combine_weight)
    return y

  def _dropless(self, tokens: jax.Array, index: jax.Array, weight: jax.Array) -> jax.Array:
    """Sort by expert, grouped matmul, unsort and combine: [T, D] -> [T, D] float32."""
    plan = dispatch.dropless_plan(index, self.num_experts)
    x_sorted = dispatch.dropless_dispatch(tokens, plan, index.shape[-1])
    y_sorted = self.experts.grouped(x_sorted, plan.group_sizes)
    return dispatch.dropless_combine(y_sorted, plan, weight)

  def _capacity(self, group_size: int) -> int:
    if self.config.router == "expert_choice":
      return routing.expert_choice_capacity(self.config, group_size)
    return dispatch.expert_capacity(group_size, self.num_experts, self.top_k,
                                    self.config.capacity_factor)

  def _sparse(self, tokens, valid, group_size, batch_row, num_batch_rows, *, train, rng,
              global_load=None):
    decision = self.route(tokens, valid, group_size, rng=rng)
    index, weight = self.ffn_assignments(decision)
    mesh = jax.sharding.get_abstract_mesh()
    if self.config.capacity_factor is None:
      dropped = jnp.zeros((), jnp.float32)
      if expert_parallel.expert_axis_size(mesh) > 1:
        y = self._expert_parallel(tokens, index, weight, group_size, mesh)[0]
      else:
        y = self._dropless(tokens, index, weight)
    else:
      if tokens.shape[0] % group_size:
        raise ValueError(f"config.model.moe.group_size={group_size} must divide the number of "
                         f"tokens in the batch ({tokens.shape[0]}).")
      priority = (jnp.max(decision.router_probs, axis=-1)
                  if self.config.get("capacity_priority", "position") == "score" else None)
      if expert_parallel.expert_axis_size(mesh) > 1:
        y, kept = self._expert_parallel(tokens, index, weight, group_size, mesh, priority)
      else:
        y, kept = self._with_capacity(tokens, index, weight, group_size, priority)
      assigned = jnp.sum(index < self.num_experts)
      dropped = (1.0 - jnp.sum(kept) / jnp.maximum(assigned, 1)).astype(jnp.float32)
    if self.zero_experts is not None:
      y = y + self.zero_experts(tokens, decision.expert_index, decision.combine_weight)
    aux = self._sparse_aux(decision, dropped, batch_row, num_batch_rows, global_load)
    if train:
      self._update_router_state(decision)
    return y, aux

  def _sparse_aux(self, decision, dropped, batch_row, num_batch_rows, global_load=None) -> dict:
    """Weighted auxiliary loss and metrics; `batch_row` [T] is each token's sequence."""
    config = self.config
    # MoE++'s heterogeneous balance loss: weight tau on the zero-computation experts' terms.
    tau = config.get("zero_expert_balance_weight", 1.0)
    eta = None
    if tau != 1.0 and self.zero_experts is not None:
      ranges = self.zero_experts.ranges  # zero, copy, constant: contiguous ids
      eta = losses.zero_expert_balance_weights(
          decision.num_experts, (ranges["zero"][0], ranges["constant"][1]), tau)
    if config.get("balance_scope", "global") == "micro_batch":
      per_micro = config.get("balance_micro_batch_size", 1)
      balance = losses.switch_load_balance_loss(decision, batch_row // per_micro,
                                                -(-num_batch_rows // per_micro), eta)
    else:
      balance = losses.switch_load_balance_loss(decision, expert_weight=eta,
                                                global_load=global_load)
    z_loss = losses.router_z_loss(decision)
    entropy = losses.router_entropy(decision)
    total = config.load_balance_loss_weight * balance + config.router_z_loss_weight * z_loss
    aux = {
        "load_balance_loss": balance,
        "router_z_loss": z_loss,
        "expert_load": losses.expert_load(decision),
        # Assignments per router output: what gradient accumulation sums over micro-batches.
        "expert_counts": losses.expert_counts(decision),
        "dropped_fraction": dropped,
        "router_entropy": entropy,
        "experts_per_token": losses.experts_per_token(decision, self.num_experts),
    }
    if config.get("importance_loss_weight", 0.0):
      aux["importance_loss"] = losses.importance_loss(decision)
      total = total + config.importance_loss_weight * aux["importance_loss"]
    if config.get("noisy_load_loss_weight", 0.0):
      # Learned std: Shazeer et al. 2017 eq. 8-10; fixed std: V-MoE (Riquelme et al. 2021).
      learned = config.get("router_noise", "fixed") == "learned"
      aux["noisy_load_loss"] = losses.noisy_load_loss(
          decision, decision.noise_std if learned else config.get("router_noise_std", 0.0),
          self.top_k, exclude_self=learned)
      total = total + config.noisy_load_loss_weight * aux["noisy_load_loss"]
    if config.router == "top_p":
      total = total + config.get("top_p_loss_weight", 0.0) * entropy
    if self.l1_coefficient is not None:
      aux["relu_l1_loss"] = losses.relu_l1_loss(decision, self.top_k)
      aux["gate_sparsity"] = losses.gate_sparsity(decision)
      aux["l1_coefficient"] = self.l1_coefficient[...]
      total = total + jax.lax.stop_gradient(self.l1_coefficient[...]) * aux["relu_l1_loss"]
    aux["loss"] = total
    return aux

  def _update_router_state(self, decision: routing.RoutingDecision) -> None:
    """Rule-based updates after routing this (global) batch; outside the gradient."""
    self.update_router_state(losses.expert_counts(decision),
                             losses.gate_sparsity(decision) if self.l1_coefficient is not None
                             else None)

  def update_router_state(self, expert_counts: jax.Array, gate_sparsity: jax.Array | None) -> None:
    """One rule-based update from a whole batch's statistics (see `_update_router_state`).

    Args:
      expert_counts: [E'] assignments per router output over the batch (loss-free bias).
      gate_sparsity: scalar fraction of zero ReLU gates over the batch (ReMoE), or None.
    """
    if self.selection_bias is not None:
      self.selection_bias[...] = router_state.loss_free_bias_update(
          self.selection_bias[...], expert_counts, self.bias_update_rate)
    if self.l1_coefficient is not None:
      target = self.config.get("relu_target_sparsity", 0.0) or 1.0 - self.top_k / self.num_experts
      self.l1_coefficient[...] = router_state.l1_coefficient_update(
          self.l1_coefficient[...], gate_sparsity, target,
          self.config.get("relu_l1_update_factor", 1.2))

  def _expert_parallel(self, tokens, index, weight, group_size, mesh, priority=None):
    """The same computation with experts sharded over the mesh's `expert` axis (shard_map)."""
    experts = self.experts
    common = dict(mesh=mesh, exchange=self.config.get("ep_exchange", "all_to_all"),
                  activation=experts.activation, dtype=experts.dtype)
    if self.config.capacity_factor is None:
      y = expert_parallel.dropless(
          tokens, index, weight, experts.weights(), backend=experts.gmm_backend,
          tiling=experts.gmm_tiling,
          recv_buffer_factor=self.config.get("ep_recv_buffer_factor", 0.0), **common)
      return y, None
    return expert_parallel.with_capacity(tokens, index, weight, experts.weights(),
                                         group_size=group_size,
                                         capacity=self._capacity(group_size),
                                         priority=priority, **common)

  def _with_capacity(self, tokens, index, weight, group_size, priority):
    """Capacity buffers per group, batched expert matmul, combine: returns ([T, D], kept [T, K])."""
    num_tokens, d_model = tokens.shape
    groups = num_tokens // group_size
    capacity = self._capacity(group_size)
    slots = index.shape[-1]
    expert_index = index.reshape(groups, group_size, slots)
    plan = dispatch.capacity_plan(expert_index, self.num_experts, capacity,
                                  None if priority is None else priority.reshape(groups, -1))
    buffers = dispatch.capacity_dispatch(tokens.reshape(groups, group_size, d_model), expert_index,
                                         plan, self.num_experts)
    y_buffers = self.experts.batched(buffers.reshape(self.num_experts, groups * capacity, d_model))
    y_buffers = y_buffers.reshape(self.num_experts, groups, capacity, d_model)
    y = dispatch.capacity_combine(y_buffers, expert_index, weight.reshape(groups, group_size, slots),
                                  plan)
    return y.reshape(num_tokens, d_model), plan.kept.reshape(num_tokens, slots)

  # ------------------------------------------------------------------------------------ soft MoE

  def _soft(self, tokens, valid, group_size):
    """Soft MoE (Puigcerver et al. 2023): slots = D^T X per group, experts on slots, Y = C Y~."""
    num_tokens, d_model = tokens.shape
    if num_tokens % group_size:
      raise ValueError(f"config.model.moe.group_size={group_size} must divide the number of "
                       f"tokens in the batch ({num_tokens}).")
    groups = num_tokens // group_size
    x = tokens.reshape(groups, group_size, d_model)
    group_valid = valid.reshape(groups, group_size)
    dispatch_w, combine_w = self.router(x, group_valid)  # [G, N, E * P]
    slots_in = jnp.einsum("gns,gnd->gsd", dispatch_w, x.astype(jnp.float32))
    per_expert = slots_in.shape[1] // self.num_experts
    slots_in = slots_in.reshape(groups, self.num_experts, per_expert, d_model)
    slots_in = slots_in.transpose(1, 0, 2, 3).reshape(self.num_experts, groups * per_expert, d_model)
    # Under a mesh the expert axis of the weights shards this batched matmul (no shard_map needed).
    slots_out = batched_ffn(slots_in, self.experts.weights(), activation=self.experts.activation,
                            dtype=self.dtype)
    slots_out = slots_out.reshape(self.num_experts, groups, per_expert, d_model).transpose(1, 0, 2, 3)
    y = jnp.einsum("gns,gsd->gnd", combine_w, slots_out.reshape(groups, -1, d_model))
    # Soft MoE has no balance or z-loss and drops nothing; its load and entropies are measured.
    aux = {"loss": jnp.zeros((), jnp.float32), "dropped_fraction": jnp.zeros((), jnp.float32),
           # FFN passes per token, the FLOP-equivalent of experts per token.
           "experts_per_token": jnp.asarray(self.num_experts * per_expert / group_size, jnp.float32),
           **soft_routing_metrics(dispatch_w, combine_w, group_valid, self.num_experts)}
    return y.reshape(num_tokens, d_model), aux


def _gmm_tiling(config):
  """`config.gmm_tiling` as `pallas_kernels.gmm` takes it (a per-pass ConfigDict -> dict)."""
  tiling = config.get("gmm_tiling", None)
  return tiling.to_dict() if hasattr(tiling, "to_dict") else tiling


def soft_slots_per_expert(config) -> int:
  """Soft MoE slots per expert (`config.soft_slots_per_expert`, > 0).

  Equal FLOPs to top-K token choice on groups of N tokens: ceil(K * N / E) slots per expert.
  """
  slots = config.get("soft_slots_per_expert", 0) or 0
  if slots <= 0:
    raise ValueError("config.model.moe.soft_slots_per_expert must be > 0 for router='soft' "
                     "(ceil(top_k * group tokens / num_experts) matches top-k FLOPs).")
  return slots
