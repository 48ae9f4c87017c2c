r"""Scaling studies of issue #13 (experiments/moe_scaling.py): one variant per study.

    python experiments/moe_scaling.py --config=configs/moe_scaling.py:experts \
        --workdir=/tmp/moe_scaling_experts
    python experiments/moe_scaling.py --config=configs/moe_scaling.py:experts,quick \
        --workdir=/tmp/moe_scaling_experts_quick

Like configs/compare_routers.py this describes a study, not one model: each (cell, seed) run is
a base config (configs/default.py, or configs/encoder.py for the encoder study; their `tiny` /
`quick` forms with `base="tiny"`) changed as the cell says, trained for `steps` steps.

Variants (`:STUDY` or `:STUDY,quick`):
  experts        Study 1 (Switch Transformer 2021, Fig. 4; "Can Mixture-of-Experts Surpass Dense
                 LLMs Under Strictly Equal Resources?" 2025): dense and E = 4, 8, 16, 32, 64
                 experts, top-2, each expert of hidden 256 and the dense FFN of hidden 2 * 256:
                 equal active FFN FLOPs per token (only the router's D x E grows with E).
  granularity    Study 2 (DeepSeekMoE 2024, Sec. 3; "Scaling Laws for Fine-Grained MoE" 2024):
                 segmentation m = 1, 2, 4 of the default's 8 experts of hidden F = 256 into 8m
                 experts of F / m, top-2m, with and without one shared expert (`_shared`).
                 Arithmetic: active hidden units per token 2m * F / m = 2F = 512 and total expert
                 hidden units 8m * F / m = 8F = 2048 for every m; with a shared expert one of the
                 8m segments becomes always-on, so 8m - 1 routed experts and top-(2m - 1) keep
                 both sums (DeepSeekMoE's mN - K_s routed experts). Only the router (D x routed
                 experts) differs: 128 x 32 vs 128 x 8 weights per MoE layer, 0.3% of the model.
  balance_scope  Study 3 ("Demons in the Detail", Qiu et al. 2025): the Switch balance loss over
                 the global batch vs per micro-batch of `micro_batch_size` sequences, on loss
                 and on expert specialisation (experiments/routing_stats.py byte classes).
  encoder        Study 4: the routers of configs/encoder.py in the bidirectional masked-byte
                 encoder, at equal active FLOPs, over whole-sequence groups.
`quick` = the tiny base, fewer cells, 2 seeds, 4 steps: a smoke test run by the tests.

Runtime on 2 CPU cores, estimated as runs x (steps x 0.34 s x f + 30 s): 0.34 s/step is the
default MoE's measured step time (16 x 128 tokens, README), f a cell's step time relative to it
and 30 s per run pays for compilation, 4 evaluations of 32 batches and the checkpoint. f was
measured in 16-step runs on 2 cores shared with other jobs (2026-12-02; noisy, +-20%): dense
0.8-1.0, E = 4-16 1.0, E = 32 1.2, E = 64 1.8 (1.35 vs 0.74 s/step back to back with E = 8);
m = 2, 4 with or without a shared expert 1.0-1.1; the encoder's routers 1.0-1.2 (token choice,
capacity, BPR, expert choice c = 1 and 2, Soft MoE within 0.54-0.66 s/step while the decoder MoE
took 0.54).
  experts        18 runs x 300 steps: 3 x (300 x 0.34 x 7.0 + 6 x 30) s = 45 min
  granularity    18 runs x 300 steps: 3 x (300 x 0.34 x 6.4 + 6 x 30) s = 42 min
  balance_scope  6 runs x 400 steps, plus the routing analysis (about 10 s a run): 18 min
  encoder        21 runs x 300 steps: 3 x (300 x 0.34 x 7.7 + 7 x 30) s = 50 min
  all four: about 2 h 35 min alone on the two cores; proportionally longer while they are shared.
  Measured 2026-12-02 (2 cores shared with test jobs): experts 29 min, granularity 31 min,
  balance_scope 18 min, encoder 45 min: 2 h 3 min in all (RESULTS.md).
Every study resumes where it stopped: rerun the same command (finished runs are reused, a run
stopped by SIGTERM resumes from its checkpoint).
"""
import ml_collections

STUDIES = ("experts", "granularity", "balance_scope", "encoder")
# Cells per study, in table order; the first is the reference the others are compared with.
DEFAULT_CELLS = {
    "experts": "dense,e4,e8,e16,e32,e64",
    "granularity": "m1,m2,m4,m1_shared,m2_shared,m4_shared",
    "balance_scope": "global,micro_batch",
    "encoder": ("token_choice,dense,token_choice_capacity,bpr,expert_choice_c1,expert_choice_c2,"
                "soft"),
}
# Two cells each, so that every quick study runs in well under a minute.
QUICK_CELLS = {
    "experts": "dense,e8",
    "granularity": "m1,m2_shared",
    "balance_scope": "global,micro_batch",
    "encoder": "token_choice,expert_choice_c2",
}
STEPS = {"experts": 300, "granularity": 300, "balance_scope": 400, "encoder": 300}


def get_config(variant: str | None = None) -> ml_collections.ConfigDict:
  """The study config; `variant` is "STUDY" or "STUDY,quick" (default "experts")."""
  names = [n.strip() for n in (variant or "experts").split(",") if n.strip()]
  quick = "quick" in names
  names = [n for n in names if n != "quick"] or ["experts"]
  if len(names) > 1 or names[0] not in STUDIES:
    raise ValueError(f"Unknown config variant {variant!r}; allowed: STUDY or 'STUDY,quick' with "
                     f"STUDY one of {', '.join(STUDIES)}.")
  study = names[0]
  config = ml_collections.ConfigDict()
  config.study = study  # Which study: one of STUDIES.
  config.cells = DEFAULT_CELLS[study]  # Comma-separated cells (see the docstring), table order.
  config.seeds = "0,1,2"  # Comma-separated run seeds (parameters, data order, routing noise).
  # "" = configs/default.py (encoder study: configs/encoder.py); "tiny" = their tiny forms.
  config.base = ""
  config.steps = STEPS[study]  # Optimiser steps per run, the same for every cell.
  config.warmup_steps = config.steps // 10  # Linear warmup steps; -1 keeps the base config's.
  config.eval_every = config.steps // 4  # Steps between validation evaluations (and the last).
  config.eval_batches = 32  # Validation batches per evaluation (the same sample for every run).
  config.log_every = 50  # Steps between training log lines of each run.
  config.tail_fraction = 0.2  # Routing statistics are averaged over this final fraction of steps.
  # A difference to the reference cell counts as resolved when the intervals mean +- k * s.e.
  # (standard error over seeds) of the two cells do not overlap; k = interval_sems.
  config.interval_sems = 2.0
  config.micro_batch_size = 2  # balance_scope: sequences per micro-batch of the "micro_batch" cell.
  config.routing_batches = 8  # balance_scope: validation batches of the specialisation analysis.

  if quick:
    config.base = "tiny"
    config.cells = QUICK_CELLS[study]
    config.seeds = "0,1"
    config.steps = 4
    config.warmup_steps = 1
    config.eval_every = 2
    config.eval_batches = 2
    config.log_every = 2
    config.routing_batches = 2
  return config
