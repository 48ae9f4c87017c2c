r"""Router comparison study: every router of configs/routers.py trained at equal active FLOPs.

  python experiments/compare_routers.py --config=configs/compare_routers.py \
      --workdir=/tmp/compare_routers
  python experiments/compare_routers.py --config=configs/compare_routers.py:quick \
      --workdir=/tmp/compare_routers_quick

(`python -m experiments.compare_routers ...` from the repository root runs the same thing.) Fields
of the study config can be overridden as usual, e.g. `--config.routers=dense,soft --config.seeds=0`.

For every router variant R in `config.routers` and every seed s in `config.seeds`, this trains the
base LM (configs/default.py, or its `tiny` variant when `config.base = "tiny"`) turned into router R
by `configs.routers.apply_router` (which keeps the active FLOPs per token of the base), for
`config.steps` steps, in its own workdir WORKDIR/runs/R_seed{s}, and records
  * the validation bits/byte at the end and at every evaluation (`eval_history`), with each
    evaluation's standard error over its batches (the evaluation sample is spread over the whole
    validation split: `data.TokenDataset.eval_chunks`), and the corpus fingerprint;
  * the training throughput (tokens/s, compilation excluded);
  * over the last `config.tail_fraction` of the steps, averaged: the load imbalance (mean over MoE
    layers of max_i load_i / mean_i load_i, load_i the fraction of assignments that expert i
    receives; 1 = perfectly balanced; "-" for the dense model), the dropped fraction of
    assignments (0 for dropless routers and the dense model) and, where the router reports it,
    the number of routed experts per token (routers such as top-p and ReLU routing vary it).
Each finished run writes WORKDIR/runs/R_seed{s}/result.json; a rerun reuses it, so an interrupted
study resumes where it stopped (a run stopped by SIGTERM resumes from its checkpoint).

Writes into WORKDIR:
  results.csv   one row per router: seeds, bits/byte mean, std (ddof=1) and standard error over
                seeds, mean evaluation standard error, tokens/s, load imbalance, dropped fraction,
                experts/token, causal;
  runs.csv      one row per (router, seed);
  results.md    the per-router table in Markdown (bits/byte as mean ± std over seeds);
  val_loss.png  validation bits/byte against step, mean over seeds per router, min-max band
                (skipped with a warning where matplotlib is not installed);
  study_config.json  the study config.
"""
from __future__ import annotations

import csv
import datetime
import json
import math
import os
import platform
import re
import shutil
import sys
import time
from typing import Sequence

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# Runs from a checkout without installing the package (configs/ is not a package either).
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app  # noqa: E402
from absl import flags  # noqa: E402
from absl import logging  # noqa: E402
import jax  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402

from configs import default  # noqa: E402
from configs import routers as router_configs  # noqa: E402
from moe_jax import data, train  # noqa: E402
from moe_jax.validation import leaks_future, validate_config  # noqa: E402

SUMMARY_COLUMNS = ("router", "n_seeds", "bpb_mean", "bpb_std", "bpb_sem", "eval_stderr",
                   "tokens_per_s_mean", "load_imbalance", "dropped_fraction", "experts_per_token",
                   "causal")
RUN_COLUMNS = ("router", "seed", "steps", "bpb", "bpb_stderr", "eval_loss", "tokens_per_s",
               "load_imbalance", "dropped_fraction", "experts_per_token", "train_seconds")
# Per-step routing statistics that the tail of each run averages.
STAT_NAMES = ("load_imbalance", "dropped_fraction", "experts_per_token")
RESULT_FILE = "result.json"
# Written only when a run stops early on SIGTERM: what the rerun cannot recompute.
PARTIAL_FILE = "partial.json"
_EXPERT_LOAD_KEY = re.compile(r"aux/layer\d+/expert_load")


class StudyPreempted(Exception):
  """A run stopped on a signal after saving its checkpoint; rerunning the study resumes it."""


# ------------------------------------------------------------------------ routing statistics


def load_imbalance(loads: Sequence[np.ndarray]) -> float:
  """Mean over MoE layers of max_i(load_i) / mean_i(load_i); NaN when there is no MoE layer.

  Args:
    loads: one [E] array of per-expert load fractions per MoE layer.
  """
  ratios = []
  for load in loads:
    load = np.asarray(load, np.float64)
    if load.mean() > 0:  # a layer that saw no token has no imbalance to speak of
      ratios.append(load.max() / load.mean())
  return float(np.mean(ratios)) if ratios else math.nan


def step_stats(metrics: dict) -> dict:
  """The routing statistics of one training step from its metrics (step_callback's argument).

  The dense model reports no expert load (imbalance NaN) and drops nothing (0); routers that do not
  report `aux/experts_per_token` get NaN there.
  """
  loads = [v for k, v in metrics.items() if _EXPERT_LOAD_KEY.fullmatch(k)]
  return {
      "load_imbalance": load_imbalance(loads),
      "dropped_fraction": float(metrics.get("aux/dropped_fraction", 0.0)),
      "experts_per_token": float(metrics.get("aux/experts_per_token", math.nan)),
  }


def tail_first_step(steps: int, fraction: float) -> int:
  """First step of the final `fraction` of steps 1..steps (at least the last step)."""
  return steps - max(1, round(fraction * steps)) + 1


class TailRecorder:
  """step_callback that keeps `step_stats` of every step >= first_step, by step."""

  def __init__(self, first_step: int, records: dict[int, dict] | None = None):
    self.first_step = first_step
    self.records = dict(records or {})

  def __call__(self, step: int, metrics: dict) -> None:
    if step >= self.first_step:
      self.records[int(step)] = step_stats(metrics)

  def means(self) -> dict:
    return {name: finite_mean([r[name] for r in self.records.values()]) for name in STAT_NAMES}


# ---------------------------------------------------------------------------------- tables


def finite_mean(values) -> float:
  """Mean of the finite values; NaN when there are none (e.g. imbalance of the dense model)."""
  values = np.asarray([v for v in values if v is not None], np.float64)
  values = values[np.isfinite(values)]
  return float(values.mean()) if values.size else math.nan


def summarize(runs: Sequence[dict], routers: Sequence[str] | None = None) -> list[dict]:
  """One row per router (SUMMARY_COLUMNS) from per-run records, in the order of `routers`.

  Args:
    runs: dicts with at least "router", "bpb", "tokens_per_s" and the STAT_NAMES (NaN = missing).
    routers: the row order; default: the order of first appearance in `runs`. Routers without runs
      are left out.
  Returns:
    rows with bpb_mean, bpb_std over seeds (ddof=1; 0 for a single seed) and bpb_sem = bpb_std /
    sqrt(seeds), eval_stderr = the mean over seeds of each run's standard error over evaluation
    batches, the means over seeds of throughput and the routing statistics (ignoring NaNs), and
    `causal` ("yes", or "no" for a run that opted into non-causal routing).
  """
  if routers is None:
    routers = list(dict.fromkeys(r["router"] for r in runs))
  summary = []
  for router in routers:
    group = [r for r in runs if r["router"] == router]
    if not group:
      continue
    bpb = np.asarray([r["bpb"] for r in group], np.float64)
    summary.append({
        "router": router,
        "n_seeds": len(group),
        "bpb_mean": float(bpb.mean()),
        "bpb_std": float(bpb.std(ddof=1)) if len(group) >= 2 else 0.0,
        "bpb_sem": float(bpb.std(ddof=1) / math.sqrt(len(group))) if len(group) >= 2 else 0.0,
        "eval_stderr": finite_mean(r.get("bpb_stderr", math.nan) for r in group),
        "causal": "no" if any(r.get("noncausal") for r in group) else "yes",
        "tokens_per_s_mean": finite_mean(r["tokens_per_s"] for r in group),
        **{name: finite_mean(r[name] for r in group) for name in STAT_NAMES},
    })
  return summary


def fmt(value: float, spec: str) -> str:
  return "-" if value is None or not math.isfinite(value) else format(value, spec)


def markdown_table(summary: Sequence[dict], *, steps: int, seeds: Sequence[int],
                   base: str, corpus: str = "") -> str:
  """A header (steps, seeds, base, corpus) and the per-router Markdown table of `summarize`'s rows."""
  base_name = f"configs/default.py:{base}" if base else "configs/default.py"
  lines = [
      f"Router comparison: {steps} steps, seeds {', '.join(str(s) for s in seeds)}, base "
      f"{base_name}; bits/byte = final validation, mean ± std over seeds (± s.e. = std / "
      "sqrt(seeds) in the next column); eval s.e. = the mean over seeds of each run's standard "
      "error over its evaluation batches." + (f" Corpus: {corpus}." if corpus else ""),
      "",
      "| router | seeds | bits/byte | ± s.e. | eval s.e. | tokens/s | load imbalance (max/mean) "
      "| dropped | experts/token | causal |",
      "|---|---|---|---|---|---|---|---|---|---|",
  ]
  for row in summary:
    lines.append(
        f"| {row['router']} | {row['n_seeds']} | {row['bpb_mean']:.3f} ± {row['bpb_std']:.3f} | "
        f"{row['bpb_sem']:.3f} | {fmt(row['eval_stderr'], '.3f')} | "
        f"{fmt(row['tokens_per_s_mean'], ',.0f')} | {fmt(row['load_imbalance'], '.2f')} | "
        f"{fmt(row['dropped_fraction'], '.1%')} | {fmt(row['experts_per_token'], '.2f')} | "
        f"{row['causal']} |")
  return "\n".join(lines) + "\n"


def write_csv(path: str, rows: Sequence[dict], columns: Sequence[str]) -> None:
  """`rows` restricted to `columns`; missing statistics are written as "nan"."""
  with open(path, "w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=list(columns), extrasaction="ignore")
    writer.writeheader()
    for row in rows:
      writer.writerow({c: row[c] for c in columns})


def eval_curves(runs: Sequence[dict], routers: Sequence[str]) -> dict[str, dict]:
  """Per router: steps [N] and the mean, min and max over seeds [N] of validation bits/byte."""
  curves = {}
  for router in routers:
    by_step: dict[int, list[float]] = {}
    for run in runs:
      if run["router"] == router:
        for step, _, bpb, *_ in run["eval_history"]:
          by_step.setdefault(int(step), []).append(float(bpb))
    if by_step:
      steps = sorted(by_step)
      values = [np.asarray(by_step[s]) for s in steps]
      curves[router] = {"steps": np.asarray(steps), "mean": np.asarray([v.mean() for v in values]),
                        "min": np.asarray([v.min() for v in values]),
                        "max": np.asarray([v.max() for v in values])}
  return curves


def plot_val_loss(runs: Sequence[dict], routers: Sequence[str], path: str, title: str) -> bool:
  """Writes the validation bits/byte curves to `path`; False (with a warning) without matplotlib."""
  try:
    import matplotlib  # pylint: disable=g-import-not-at-top
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    logging.warning("matplotlib is not installed (%s); skipping %s.", e, path)
    return False
  fig, ax = plt.subplots(figsize=(8, 5))
  # Twelve routers need more distinct colours than the default cycle's ten: tab20's dark shades
  # first, then its light ones.
  palette = plt.get_cmap("tab20").colors
  colors = palette[0::2] + palette[1::2]
  for i, (router, curve) in enumerate(eval_curves(runs, routers).items()):
    color = colors[i % len(colors)]
    ax.plot(curve["steps"], curve["mean"], marker=".", color=color, label=router)
    ax.fill_between(curve["steps"], curve["min"], curve["max"], color=color, alpha=0.2)
  ax.set_xlabel("step")
  ax.set_ylabel("validation bits/byte")
  ax.set_title(title, fontsize=9)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8, ncol=2)
  fig.savefig(path, dpi=120, bbox_inches="tight")
  plt.close(fig)
  return True


# ------------------------------------------------------------------------------------ runs


def parse_routers(text: str) -> list[str]:
  """The comma-separated router names, checked against configs/routers.py VARIANTS."""
  names = [n.strip() for n in str(text).split(",") if n.strip()]
  if not names:
    raise ValueError("config.routers is empty; give comma-separated names from "
                     f"{list(router_configs.VARIANTS)}.")
  unknown = [n for n in names if n not in router_configs.VARIANTS]
  if unknown:
    raise ValueError(f"config.routers={text!r}: unknown {unknown}; allowed: "
                     f"{list(router_configs.VARIANTS)}.")
  if len(set(names)) != len(names):
    raise ValueError(f"config.routers={text!r} names a router twice.")
  return names


def parse_seeds(text) -> list[int]:
  """The comma-separated integer seeds."""
  try:
    seeds = [int(s) for s in str(text).split(",") if s.strip()]
  except ValueError:
    raise ValueError(f"config.seeds={text!r}; allowed: comma-separated integers.") from None
  if not seeds or len(set(seeds)) != len(seeds):
    raise ValueError(f"config.seeds={text!r}; allowed: distinct comma-separated integers.")
  return seeds


def run_config(study, router: str, seed: int) -> ml_collections.ConfigDict:
  """The experiment config of one run: the base LM with `router`, the study's length and seed."""
  if study.base not in ("", "tiny"):
    raise ValueError(f"config.base={study.base!r}; allowed: '' (configs/default.py), 'tiny'.")
  config = router_configs.apply_router(default.get_config(study.base or None), router)
  return apply_study_schedule(config, study, seed)


def apply_study_schedule(config, study, seed: int) -> ml_collections.ConfigDict:
  """Sets, in place, a run's seed and the study's length, warmup, logging and evaluation fields.

  Args:
    config: an experiment config.
    study: a study config with steps, warmup_steps (-1 keeps the config's), eval_every,
      log_every and eval_batches.
  """
  config.seed = seed
  config.train.steps = study.steps
  if study.warmup_steps >= 0:
    config.train.warmup_steps = study.warmup_steps
  config.train.eval_every = study.eval_every
  config.train.log_every = study.log_every
  # One checkpoint at the end (disk stays small); a SIGTERM still saves one where it stops.
  config.train.checkpoint_every = study.steps
  config.data.eval_batches = study.eval_batches
  return config


def _config_json(config) -> dict:
  """The config as JSON data, normalised the same way whether fresh or read back from disk."""
  return json.loads(config.to_json_best_effort(sort_keys=True))


# Config fields added after runs were recorded: a saved config without one ran with this value.
ADDED_FIELDS = {"model.causal": True, "data.objective": "lm", "data.mask_rate": 0.15}


def _config_diff(old: dict, new: dict, prefix: str = "") -> list[str]:
  """Dotted names of the fields where two config dicts differ."""
  diff = []
  for key in sorted(set(old) | set(new)):
    name = f"{prefix}{key}"
    a, b = old.get(key, "<absent>"), new.get(key, "<absent>")
    if a == "<absent>" and name in ADDED_FIELDS and b == ADDED_FIELDS[name]:
      continue
    if isinstance(a, dict) and isinstance(b, dict):
      diff += _config_diff(a, b, f"{name}.")
    elif a != b:
      diff.append(f"{name}: {a!r} -> {b!r}")
  return diff


def _check_same_config(saved: dict, config_json: dict, run_dir: str) -> None:
  diff = _config_diff(saved, config_json)
  if diff:
    raise ValueError(f"{run_dir} was trained with another config ({'; '.join(diff[:5])}); use a "
                     "new --workdir or delete that run directory.")


def _nan_to_none(value):
  return None if isinstance(value, float) and not math.isfinite(value) else value


def write_json(path: str, data: dict) -> None:
  """Writes atomically, so that an interrupted write never leaves a half result to reuse."""
  clean = {k: _nan_to_none(v) for k, v in data.items()}
  with open(path + ".tmp", "w") as f:
    json.dump(clean, f, indent=2)
  os.replace(path + ".tmp", path)


def read_record(path: str) -> dict:
  with open(path) as f:
    record = json.load(f)
  for name in ("tokens_per_s", "bpb_stderr") + STAT_NAMES:
    if record.get(name) is None:
      record[name] = math.nan
  return record


def train_run(config, run_dir: str, *, router: str, seed: int, tail_fraction: float) -> dict:
  """Trains one run (or resumes it after a SIGTERM) and writes run_dir/result.json; returns it.

  Raises StudyPreempted when training stopped on a signal; its checkpoint and run_dir/partial.json
  (the statistics and evaluations so far) let the next call finish it.
  """
  config_json = _config_json(config)
  first_tail = tail_first_step(config.train.steps, tail_fraction)
  records, eval_history, tokens_per_s = {}, [], math.nan
  partial_path = os.path.join(run_dir, PARTIAL_FILE)
  if os.path.exists(partial_path):
    with open(partial_path) as f:
      partial = json.load(f)
    _check_same_config(partial["config"], config_json, run_dir)
    records = {int(step): {k: math.nan if v is None else v for k, v in stats.items()}
               for step, stats in partial["records"].items()}
    eval_history, tokens_per_s = partial["eval_history"], partial["tokens_per_s"] or math.nan
    logging.info("Resuming %s from its checkpoint.", run_dir)
  elif os.path.exists(run_dir):
    # Killed without saving (only the final step is checkpointed): the per-step statistics of the
    # steps already run are lost, so the run starts over.
    logging.warning("%s holds an unfinished run without %s; training it from scratch.", run_dir,
                    PARTIAL_FILE)
    shutil.rmtree(run_dir)

  recorder = TailRecorder(first_tail, records)
  start = time.perf_counter()
  result = train.train_and_evaluate(config, run_dir, step_callback=recorder)
  seconds = time.perf_counter() - start
  eval_history = eval_history + [list(e) for e in result["eval_history"]]
  # A resumed run reports the throughput of its last part (each part's first step compiles and is
  # left out); the earlier part's number serves when the last part ran a single step.
  tokens_per_s = result.get("train/tokens_per_s", tokens_per_s)
  if result["preempted"]:
    write_json(partial_path, {"config": config_json, "eval_history": eval_history,
                              "tokens_per_s": tokens_per_s,
                              "records": {str(s): {k: _nan_to_none(v) for k, v in r.items()}
                                          for s, r in recorder.records.items()}})
    raise StudyPreempted(f"{router} seed {seed} stopped at step {result['step']}")
  if "eval/bits_per_byte" not in result:
    raise RuntimeError(f"{run_dir}: training returned no final evaluation ({result}).")
  record = {"router": router, "seed": seed, "steps": int(result["step"]),
            "bpb": float(result["eval/bits_per_byte"]), "eval_loss": float(result["eval/loss"]),
            "bpb_stderr": float(result["eval/bits_per_byte_stderr"]),
            "noncausal": leaks_future(config) is not None, "corpus": result["corpus"],
            "eval_history": eval_history, "tokens_per_s": float(tokens_per_s),
            **recorder.means(), "train_seconds": seconds, "config": config_json}
  write_json(os.path.join(run_dir, RESULT_FILE), record)
  if os.path.exists(partial_path):
    os.remove(partial_path)
  return record


def load_or_train_run(config, run_dir: str, *, router: str, seed: int,
                      tail_fraction: float) -> tuple[dict, bool]:
  """(record, trained): the run's saved result.json when it has one, else `train_run`'s."""
  result_path = os.path.join(run_dir, RESULT_FILE)
  if os.path.exists(result_path):
    record = read_record(result_path)
    _check_same_config(record["config"], _config_json(config), run_dir)
    return record, False
  return train_run(config, run_dir, router=router, seed=seed, tail_fraction=tail_fraction), True


def run_study(study, workdir: str) -> list[dict]:
  """Trains (or reuses) every (router, seed) run, writes the tables and plot; returns the summary.

  Every run config is built and validated before the first step trains, so a typo fails at once.
  """
  routers, seeds = parse_routers(study.routers), parse_seeds(study.seeds)
  if not 0 < study.tail_fraction <= 1:
    raise ValueError(f"config.tail_fraction={study.tail_fraction}; allowed: (0, 1].")
  plan = []
  for router in routers:
    for seed in seeds:
      config = run_config(study, router, seed)
      validate_config(config)
      plan.append((router, seed, config))
  write_study_config(study, workdir)
  runs = run_plan(plan, workdir, tail_fraction=study.tail_fraction)

  summary = summarize(runs, routers)
  write_csv(os.path.join(workdir, "results.csv"), summary, SUMMARY_COLUMNS)
  write_csv(os.path.join(workdir, "runs.csv"), runs, RUN_COLUMNS)
  table = markdown_table(summary, steps=study.steps, seeds=seeds, base=study.base,
                         corpus=corpus_description(runs))
  environment = (
      f"{machine_description()}; load "
      f"imbalance, dropped and experts/token are means over the last {study.tail_fraction:.0%} of "
      "the steps; tokens/s excludes the first (compiling) step; '-' = not reported (dense has no "
      "router). Soft MoE's load is each expert's share of the combine weight mass (its dispatch "
      "mass is equal by construction).\n")
  with open(os.path.join(workdir, "results.md"), "w") as f:
    f.write(table + "\n" + environment)
  base_name = f"configs/default.py:{study.base}" if study.base else "configs/default.py"
  plot_val_loss(runs, routers, os.path.join(workdir, "val_loss.png"),
                f"{study.steps} steps, base {base_name}; line = mean over seeds "
                f"{', '.join(str(s) for s in seeds)}, band = min-max")
  logging.info("Wrote %s:\n%s", os.path.join(workdir, "results.md"), table)
  return summary


def write_study_config(study, workdir: str) -> None:
  """Creates `workdir` and writes the study config to WORKDIR/study_config.json."""
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, "study_config.json"), "w") as f:
    f.write(study.to_json_best_effort(indent=2, sort_keys=True))


def run_plan(plan: Sequence[tuple[str, int, ml_collections.ConfigDict]], workdir: str, *,
             tail_fraction: float) -> list[dict]:
  """Trains or reuses each (name, seed, config) of `plan` in WORKDIR/runs/{name}_seed{seed}.

  Logs progress and an estimate of the time left; returns the run records (`train_run`'s, with
  the name under "router"), in plan order. Raises StudyPreempted when a run stops on a signal.
  """
  runs, trained_seconds, num_trained = [], 0.0, 0
  start = time.perf_counter()
  for i, (router, seed, config) in enumerate(plan):
    run_dir = os.path.join(workdir, "runs", f"{router}_seed{seed}")
    logging.info("Run %d of %d: router %s, seed %d (%s).", i + 1, len(plan), router, seed, run_dir)
    record, trained = load_or_train_run(config, run_dir, router=router, seed=seed,
                                        tail_fraction=tail_fraction)
    runs.append(record)
    if trained:
      trained_seconds += record["train_seconds"]
      num_trained += 1
    # Reused runs cost nothing, so the estimate extrapolates from the runs trained in this call.
    remaining = (trained_seconds / num_trained * (len(plan) - i - 1)) if num_trained else math.nan
    logging.info(
        "Run %d of %d done (%s): router %s, seed %d, final %.4f bits/byte, %s tokens/s, "
        "imbalance %s; elapsed %s, estimated remaining %s.", i + 1, len(plan),
        "trained" if trained else "reused result.json", router, seed, record["bpb"],
        fmt(record["tokens_per_s"], ",.0f"), fmt(record["load_imbalance"], ".3f"),
        _duration(time.perf_counter() - start), _duration(remaining))
  return runs


def corpus_description(runs: Sequence[dict]) -> str:
  """The corpus fingerprints of the runs, one `data.describe_fingerprint` line each, joined."""
  corpora = {json.dumps(r["corpus"], sort_keys=True) for r in runs if r.get("corpus")}
  return "; ".join(data.describe_fingerprint(json.loads(c)) for c in sorted(corpora))


def machine_description() -> str:
  """Date, JAX version, devices and processor, for the note under a study's table."""
  return (f"Date {datetime.date.today()}, JAX {jax.__version__}, {jax.device_count()} "
          f"{jax.default_backend()} device(s) ({platform.processor() or platform.machine()})")


def _duration(seconds: float) -> str:
  if not math.isfinite(seconds):
    return "?"
  minutes, seconds = divmod(int(round(seconds)), 60)
  hours, minutes = divmod(minutes, 60)
  return f"{hours}h{minutes:02d}m{seconds:02d}s" if hours else f"{minutes}m{seconds:02d}s"


# ------------------------------------------------------------------------------------ main


def _define_flags():
  # Defined only when run as a script, so that tests can import this module next to others that
  # define a --config flag too.
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  # The default resolves from any working directory; --config=PATH is relative to it as usual.
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  config_flags.DEFINE_config_file("config", os.path.join(repo, "configs", "compare_routers.py"),
                                  "Study config file (configs/compare_routers.py[:quick]).")
  flags.DEFINE_string("workdir", None, "Output: runs/, results.csv, runs.csv, results.md, plot.")
  flags.mark_flags_as_required(["workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  try:
    run_study(flags.FLAGS.config, flags.FLAGS.workdir)
  except StudyPreempted as e:
    logging.warning("Study stopped: %s. Rerun the same command to resume.", e)
    return
  except ValueError as e:
    raise app.UsageError(str(e)) from None
  with open(os.path.join(flags.FLAGS.workdir, "results.md")) as f:
    print(f.read())


if __name__ == "__main__":
  _define_flags()
  app.run(main)
