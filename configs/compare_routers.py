r"""Router comparison study (experiments/compare_routers.py): every router at equal active FLOPs.

    python experiments/compare_routers.py --config=configs/compare_routers.py \
        --workdir=/tmp/compare_routers
    python experiments/compare_routers.py --config=configs/compare_routers.py:quick \
        --workdir=/tmp/compare_routers_quick

This config describes the study, not one model: each (router, seed) run is the base LM config
(configs/default.py, or its `tiny` variant) turned into that router by
`configs.routers.apply_router`, with the training length and evaluation set below.

Variants (big_vision style, `--config=configs/compare_routers.py:VARIANT`):
  (none)  Twelve routers x 3 seeds x 250 steps on the default byte-level LM.
  quick   Three routers x 2 seeds x 6 steps on the tiny synthetic LM: a smoke test (seconds).
"""
import ml_collections

DEFAULT_ROUTERS = ("dense,token_choice,token_choice_capacity,bpr,expert_choice,soft,top_p,relu,"
                   "deepseek_v3,loss_free,micro_batch_balance,random")


def get_config(variant: str | None = None) -> ml_collections.ConfigDict:
  """Returns the study config; `variant` is the text after ':' in --config."""
  config = ml_collections.ConfigDict()
  config.routers = DEFAULT_ROUTERS  # Comma-separated configs/routers.py VARIANTS, in table order.
  config.seeds = "0,1,2"  # Comma-separated run seeds (parameters, data order, router noise).
  config.base = ""  # Base LM: "" = configs/default.py, "tiny" = configs/default.py:tiny.
  config.steps = 250  # Optimiser steps per run (the base config's train.steps is replaced).
  config.warmup_steps = 30  # Linear warmup steps per run; -1 keeps the base config's.
  config.eval_every = 50  # Steps between validation evaluations (and at the last step).
  # Validation batches per evaluation: the same sample, spread over the whole split, for every run.
  config.eval_batches = 32
  config.log_every = 50  # Steps between training log lines of each run.
  # Load imbalance, drops and experts/token are averaged over this final fraction of the steps,
  # once the router has had time to settle (the first steps mostly show the initialisation).
  config.tail_fraction = 0.2

  if variant in (None, ""):
    pass
  elif variant == "quick":
    config.base = "tiny"
    config.routers = "dense,token_choice,expert_choice"
    config.seeds = "0,1"
    config.steps = 6
    config.warmup_steps = 2
    config.eval_every = 3
    config.eval_batches = 2
    config.log_every = 3
  else:
    raise ValueError(f"Unknown config variant {variant!r}; allowed: '', 'quick'.")
  return config
