"""The routing zoo on the default LM: one variant per routing method, at equal active FLOPs.

    python -m moe_jax.main --config=configs/routers.py:expert_choice --workdir=/tmp/ec
    python experiments/compare_routers.py --config=configs/compare_routers.py --workdir=/tmp/cr

Every variant starts from configs/default.py (8 experts of hidden 256, top-2: 512 active hidden
units per token) and changes only the routing, keeping the FFN FLOPs per token of top-2 token
choice (exactly, or on average where the method makes the count vary: see each entry).
`apply_router(config, name)` applies a variant to any base config (the study uses it on the
`tiny` base too).

Variants:
  dense                  dense FFN of hidden K * expert_hidden_dim (the equal-FLOPs baseline)
  token_choice           softmax top-2, dropless (the default)
  token_choice_capacity  top-2 with capacity factor 1.25, Switch position priority, groups of one
                         position (causal)
  bpr                    as above with batch-prioritized routing (V-MoE), groups of one position
  expert_choice          expert choice, c = K, groups of one position (causal)
  soft                   Soft MoE, groups of one position (causal), ceil(K * B / E) slots/expert
  top_p                  top-p dynamic routing, p = 0.4 (experts per token vary)
  relu                   ReMoE ReLU routing, target sparsity 1 - K/E (K experts on average)
  deepseek_v3            sigmoid scores, 4 expert groups / top-2 groups, loss-free bias
  loss_free              softmax top-2 with the auxiliary-loss-free bias and no balance loss
  micro_batch_balance    top-2 with the balance loss per micro-batch of 2 sequences
  vmoe                   noisy top-2 (std 1/E) with V-MoE importance + load losses
  jitter                 top-2 with Switch router jitter 0.01
  random                 K uniform random experts per token (no learned routing)
  fine_grained           DeepSeekMoE segmentation m = 4: 32 experts of hidden 64, top-8
  shared                 m = 4 segmentation with 1 shared expert: 32 routed of hidden 64, top-7
  moe_plus_plus          MoE++: 8 FFN + 1 zero, 1 copy, 2 constant experts, top-2 (<= top-2 FLOPs)
  null                   AdaMoE: 8 FFN + 8 null experts, top-4 (2 FFN experts per token if routing
                         were uniform; the study reports the measured count)
"""

import ml_collections

from configs import default

VARIANTS = ("dense", "token_choice", "token_choice_capacity", "bpr", "expert_choice", "soft",
            "top_p", "relu", "deepseek_v3", "loss_free", "micro_batch_balance", "vmoe", "jitter",
            "random", "fine_grained", "shared", "moe_plus_plus", "null")


def fine_grained(moe: ml_collections.ConfigDict, m: int, num_shared_experts: int = 0, *,
                 keep_total_params: bool = False) -> ml_collections.ConfigDict:
  """DeepSeekMoE fine-grained expert segmentation (Dai et al. 2024, Sec. 3.1-3.2), in place.

  Splits each expert into m experts of 1/m the hidden size and routes to m*K of them, so the
  active FFN FLOPs per token stay equal; `num_shared_experts` of the m*K active segments become
  always-on shared experts (Sec. 3.2), so top-k drops by that many. With `keep_total_params`
  the shared experts are also taken out of the m*E segments (m*E - shared routed experts, the
  paper's mN - K_s), so the total expert parameters stay equal too; otherwise they come on top.
  """
  if m < 1 or moe.expert_hidden_dim % m:
    raise ValueError(f"granularity m={m} must be >= 1 and divide expert_hidden_dim="
                     f"{moe.expert_hidden_dim}.")
  moe.num_experts = moe.num_experts * m - (num_shared_experts if keep_total_params else 0)
  moe.expert_hidden_dim //= m
  moe.top_k = moe.top_k * m - num_shared_experts
  moe.num_shared_experts = num_shared_experts
  if moe.top_k < 1:
    raise ValueError(f"num_shared_experts={num_shared_experts} leaves no routed expert.")
  return moe


def apply_router(config: ml_collections.ConfigDict, name: str) -> ml_collections.ConfigDict:
  """Switches `config` (a full experiment config) to routing variant `name`, in place."""
  model, moe = config.model, config.model.moe
  if name not in VARIANTS:
    raise ValueError(f"Unknown router variant {name!r}; allowed: {', '.join(VARIANTS)}.")
  # Derived sizes are FieldReferences, so command-line overrides of top_k, expert_hidden_dim,
  # num_experts or batch_size keep the pairing (tests/test_config.py).
  if name == "dense":
    model.moe_every = 0
    model.mlp_dim = moe.get_ref("top_k") * moe.get_ref("expert_hidden_dim")
  elif name == "token_choice":
    pass
  elif name in ("token_choice_capacity", "bpr"):
    moe.capacity_factor = 1.25
    moe.capacity_priority = "score" if name == "bpr" else "position"
    # Position groups keep dropping causal: a slot goes only to tokens at the same position.
    moe.group_by = "position"
  elif name == "expert_choice":
    moe.router = "expert_choice"
    moe.capacity_factor = moe.get_ref("top_k").to_float()  # c = K experts per token on average
    moe.group_by = "position"
    moe.load_balance_loss_weight = 0.0  # every expert takes exactly C tokens
  elif name == "soft":
    moe.router = "soft"
    moe.group_by = "position"
    # ceil(K * B / E): a group is the B tokens at one position.
    experts = moe.get_ref("num_experts")
    moe.soft_slots_per_expert = (moe.get_ref("top_k") * config.data.get_ref("batch_size")
                                 + experts - 1) // experts
    moe.load_balance_loss_weight = 0.0
    moe.router_z_loss_weight = 0.0
  elif name == "top_p":
    moe.router = "top_p"
    moe.top_p_threshold = 0.4
  elif name == "relu":
    moe.router = "relu"
    moe.load_balance_loss_weight = 0.0  # ReMoE balances through its L1 penalty
    moe.router_z_loss_weight = 0.0
  elif name == "deepseek_v3":
    moe.score_function = "sigmoid"
    moe.num_expert_groups = 4
    moe.top_k_groups = 2
    moe.bias_update_rate = 1e-3
    moe.load_balance_loss_weight = 0.0
  elif name == "loss_free":
    moe.bias_update_rate = 1e-3
    moe.load_balance_loss_weight = 0.0
  elif name == "micro_batch_balance":
    moe.balance_scope = "micro_batch"
    moe.balance_micro_batch_size = 2
  elif name == "vmoe":
    moe.router_noise_std = 1.0 / moe.get_ref("num_experts").to_float()
    moe.importance_loss_weight = 0.005
    moe.noisy_load_loss_weight = 0.005
    moe.load_balance_loss_weight = 0.0
  elif name == "jitter":
    moe.router_jitter = 0.01
  elif name == "random":
    moe.router = "random"
    moe.load_balance_loss_weight = 0.0
    moe.router_z_loss_weight = 0.0
  elif name == "fine_grained":
    fine_grained(moe, 4)
  elif name == "shared":
    fine_grained(moe, 4, num_shared_experts=1)
  elif name == "moe_plus_plus":
    moe.num_zero_experts, moe.num_copy_experts, moe.num_constant_experts = 1, 1, 2
  elif name == "null":
    moe.num_null_experts = moe.num_experts
    moe.top_k *= 2
  return config


def get_config(variant: str | None = None) -> ml_collections.ConfigDict:
  """The default LM with routing variant `variant` (default "token_choice")."""
  return apply_router(default.get_config(), variant or "token_choice")
