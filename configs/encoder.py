r"""A bidirectional byte encoder trained by masked-byte prediction, and the routers of study 4.

    python -m moe_jax.main --config=configs/encoder.py --workdir=/tmp/encoder
    python -m moe_jax.main --config=configs/encoder.py:expert_choice_c2 --workdir=/tmp/encoder_ec
    python experiments/moe_scaling.py --config=configs/moe_scaling.py:encoder \
        --workdir=/tmp/moe_scaling_encoder

The default LM (configs/default.py: 4 layers, d_model 128, MoE FFN in every other layer, 8 experts
of hidden 256, top-2) turned into an encoder: attention without the causal mask
(`model.causal=False`), trained to predict masked bytes (`data.objective="mlm"`, BERT 2019:
15% of each sequence's bytes, 80% replaced by [MASK], 10% by a random byte, 10% kept), and a
vocabulary of 260 ids for [MASK] (`moe_jax.data.MASK_ID` = 259). Evaluation reports bits/byte on
the masked positions only, the same positions for every model (`moe_jax.data`).

In an encoder every position sees the whole sequence, so the routers made for that setting run
over their natural groups, a whole sequence: expert choice and Soft MoE (groups of one sequence),
capacity dispatch and batch-prioritized routing (capacity claimed over the sequence). Validation
allows them without `model.moe.allow_noncausal`: nothing can leak in an encoder.

Variants, all at equal active FFN FLOPs per token, 512 expert hidden units (2 x 256 of top-2
token choice); `apply_encoder_router(config, name)` applies one to any encoder config:
  token_choice       softmax top-2, dropless (the default)
  dense              dense FFN of hidden top_k * expert_hidden_dim = 512 (configs/routers.py)
  token_choice_capacity  top-2 with capacity factor 1.0 over sequence groups, Switch priority
                     (C = ceil(1.0 * S * K / E) slots: at most T * K assignments computed)
  bpr                as above, capacity claimed by router confidence (V-MoE, Riquelme et al. 2021)
  expert_choice_c2   expert choice, c = 2 (each expert takes 2 * S / E tokens of a sequence: two
                     experts per token on average, of hidden 256; Zhou et al. 2022, EC-CF2)
  expert_choice_c1   expert choice, c = 1 with experts twice as wide (hidden 2 * 256 = 512): one
                     expert per token on average, c * width = 512 as above (more parameters)
  soft               Soft MoE over each sequence (Puigcerver et al. 2023): ceil(K * S / E) = 32
                     slots per expert, 256 slots for 128 tokens, 2 expert passes per token
Append ",quick" (e.g. `:soft,quick`; `:quick` alone is token choice) for the seconds-long encoder
on the `tiny` base (synthetic task), used by the tests and the `:encoder_quick` study.
"""
import ml_collections

from configs import default
from configs import routers
from moe_jax import data

VARIANTS = ("token_choice", "dense", "token_choice_capacity", "bpr", "expert_choice_c1",
            "expert_choice_c2", "soft")


def make_encoder(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Turns an LM config into the masked-byte encoder, in place (routing untouched)."""
  config.model.causal = False
  config.model.vocab_size = data.MASK_ID + 1
  config.data.objective = "mlm"
  config.data.mask_rate = 0.15
  return config


def apply_encoder_router(config: ml_collections.ConfigDict,
                         name: str) -> ml_collections.ConfigDict:
  """Switches an encoder config to routing variant `name` (see VARIANTS), in place.

  Starts from configs/routers.py's variant of the same method and regroups it over whole
  sequences, the setting its paper had.
  """
  if name not in VARIANTS:
    raise ValueError(f"Unknown encoder router variant {name!r}; allowed: {', '.join(VARIANTS)}.")
  moe = config.model.moe
  if name in ("token_choice", "dense", "token_choice_capacity", "bpr"):
    routers.apply_router(config, name)
    if name in ("token_choice_capacity", "bpr"):
      moe.capacity_factor = 1.0
  elif name.startswith("expert_choice"):
    routers.apply_router(config, "expert_choice")
    capacity = 1.0 if name == "expert_choice_c1" else 2.0
    moe.capacity_factor = capacity
    # c experts of width F' per token on average: c * F' = K * F keeps the active FLOPs.
    moe.expert_hidden_dim = int(moe.top_k * moe.expert_hidden_dim / capacity)
  elif name == "soft":
    routers.apply_router(config, "soft")
    # ceil(K * S / E): a group is one sequence of S tokens here.
    experts = moe.get_ref("num_experts")
    moe.soft_slots_per_expert = (moe.get_ref("top_k") * config.data.get_ref("seq_len")
                                 + experts - 1) // experts
  # Whole sequences are the groups: an encoder has nothing to hide from a token.
  moe.group_by = "sequence"
  return config


def get_config(variant: str | None = None) -> ml_collections.ConfigDict:
  """The encoder with routing `variant`: "ROUTER", "quick" or "ROUTER,quick" (default token choice).

  "quick" selects the tiny base (configs/default.py:tiny).
  """
  names = [n.strip() for n in (variant or "").split(",") if n.strip()]
  quick = "quick" in names
  names = [n for n in names if n != "quick"]
  if len(names) > 1 or (names and names[0] not in VARIANTS):
    raise ValueError(f"Unknown config variant {variant!r}; allowed: ROUTER, 'quick' or "
                     f"'ROUTER,quick' with ROUTER one of {', '.join(VARIANTS)}.")
  config = make_encoder(default.get_config("tiny" if quick else None))
  return apply_encoder_router(config, names[0] if names else "token_choice")
