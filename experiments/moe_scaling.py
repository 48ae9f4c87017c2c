r"""Scaling studies of issue #13: expert count, granularity, balance scope, routers in an encoder.

  python experiments/moe_scaling.py --config=configs/moe_scaling.py:experts \
      --workdir=/tmp/moe_scaling_experts
  python experiments/moe_scaling.py --config=configs/moe_scaling.py:granularity \
      --workdir=/tmp/moe_scaling_granularity
  python experiments/moe_scaling.py --config=configs/moe_scaling.py:balance_scope \
      --workdir=/tmp/moe_scaling_balance_scope
  python experiments/moe_scaling.py --config=configs/moe_scaling.py:encoder \
      --workdir=/tmp/moe_scaling_encoder

(`:STUDY,quick` runs a seconds-long version on the tiny base; the studies, their cells and the
equal-FLOPs arithmetic are in configs/moe_scaling.py, which also gives the runtime estimate: about
2 h 35 min for all four alone on 2 CPU cores: experts 45 min, granularity 42 min, balance_scope
18 min, encoder 50 min.) Each command resumes where it stopped: finished runs
are reused, a run stopped by SIGTERM resumes from its checkpoint. Fields can be overridden as usual,
e.g. `--config.cells=dense,e8 --config.seeds=0,1,2,3,4`.

Every (cell, seed) run is trained by experiments/compare_routers.py's machinery (`run_plan`:
WORKDIR/runs/CELL_seed{s}/result.json, resume, the per-step routing statistics over the final
`tail_fraction` of the steps) and summarised by its `summarize` (mean, std and standard error
over seeds). On top of that this study reports, per cell,
  * the model's total parameters and the active FFN hidden units per token per MoE layer
    (`active_ffn_hidden`; equal in every cell of a study, which the tests check);
  * tokens/s and seconds per training step at that throughput (compilation excluded);
  * the difference to the first (reference) cell with its standard error sqrt(se_a^2 + se_b^2),
    and "resolved" only when the intervals mean +- k * s.e. of the two cells do not overlap
    (k = `config.interval_sems`, default 2; `intervals_disjoint`);
  * experts study: the change of bits/byte per doubling of E, the least-squares slope against
    log2(E) fitted per seed, mean +- s.e. over seeds (`per_doubling`);
  * balance_scope study: expert specialisation from experiments/routing_stats.py on
    `routing_batches` validation batches (`specialisation`): over the disjoint byte classes
    letter, digit, whitespace, punctuation, other, the load-weighted mean entropy of each expert's
    class distribution H(class | expert), the mutual information I(class; expert) = H(class) -
    H(class | expert), and the experts a class uses, 2 ** H(expert | class) averaged over classes
    by their share of the assignments (1 = each class goes to one expert, E = spread evenly).

Writes into WORKDIR: results.csv (one row per cell, SUMMARY_COLUMNS), runs.csv (one row per run),
results.md (the table, its notes and, for the experts study, the slope per doubling), val_loss.png
(validation bits/byte against step, mean over seeds, min-max band), loss_vs_experts.png (experts
study: final bits/byte against E on a log axis, +- s.e., dense as a band) and study_config.json.
"""
from __future__ import annotations

import math
import os
import sys
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
from flax import nnx  # noqa: E402

from configs import default  # noqa: E402
from configs import encoder as encoder_configs  # noqa: E402
from configs import moe_scaling as scaling_configs  # noqa: E402
from configs import routers as router_configs  # noqa: E402
from experiments import compare_routers as cr  # noqa: E402
from moe_jax import routing  # noqa: E402
from moe_jax.models.transformer import Transformer  # noqa: E402
from moe_jax.validation import validate_config  # noqa: E402

SUMMARY_COLUMNS = ("cell", "n_seeds", "bpb_mean", "bpb_std", "bpb_sem", "eval_stderr",
                   "delta_vs_ref", "delta_sem", "resolved_vs_ref", "tokens_per_s_mean",
                   "s_per_step", "total_params", "active_ffn_hidden", "num_experts", "top_k",
                   "num_shared_experts", "load_imbalance", "dropped_fraction",
                   "experts_per_token", "class_entropy_bits", "class_expert_mi_bits",
                   "experts_per_class")
RUN_COLUMNS = ("cell", "seed", "steps", "bpb", "bpb_stderr", "tokens_per_s", "s_per_step",
               "load_imbalance", "dropped_fraction", "experts_per_token", "class_entropy_bits",
               "class_expert_mi_bits", "experts_per_class", "train_seconds")
SPECIALISATION_NAMES = ("class_entropy_bits", "class_expert_mi_bits", "experts_per_class")
SPECIALISATION_FILE = "specialisation.json"
# routing_stats.CLASSES minus "keyword" (a subset of the letters): disjoint and exhaustive.
DISJOINT_CLASSES = ("letter", "digit", "whitespace", "punctuation", "other")


# ------------------------------------------------------------------------------------- cells


def parse_cells(study) -> list[str]:
  """The comma-separated cells of `study.cells`, checked against the study's cell names."""
  names = [n.strip() for n in str(study.cells).split(",") if n.strip()]
  if not names:
    raise ValueError(f"config.cells is empty; give comma-separated cells of study {study.study!r}.")
  if len(set(names)) != len(names):
    raise ValueError(f"config.cells={study.cells!r} names a cell twice.")
  for name in names:
    cell_config(study, name)  # raises for an unknown cell
  return names


def _experts_cell(base, cell: str):
  if cell == "dense":
    return router_configs.apply_router(base, "dense")
  if cell.startswith("e") and cell[1:].isdigit() and int(cell[1:]) >= base.model.moe.top_k:
    base.model.moe.num_experts = int(cell[1:])
    return base
  raise ValueError(f"experts study: cell {cell!r}; allowed: 'dense' or 'eN' with N >= top_k="
                   f"{base.model.moe.top_k} experts.")


def _granularity_cell(base, cell: str):
  m_text, _, shared = cell.partition("_")
  if m_text.startswith("m") and m_text[1:].isdigit() and shared in ("", "shared"):
    router_configs.fine_grained(base.model.moe, int(m_text[1:]), int(shared == "shared"),
                                keep_total_params=True)
    return base
  raise ValueError(f"granularity study: cell {cell!r}; allowed: 'mM' or 'mM_shared' (M divides "
                   "expert_hidden_dim).")


def cell_config(study, cell: str) -> ml_collections.ConfigDict:
  """The experiment config of `cell` in `study` (before the study's length and seed)."""
  if study.study not in scaling_configs.STUDIES:
    raise ValueError(f"config.study={study.study!r}; allowed: {scaling_configs.STUDIES}.")
  if study.base not in ("", "tiny"):
    raise ValueError(f"config.base={study.base!r}; allowed: '' or 'tiny'.")
  tiny = study.base == "tiny"
  if study.study == "encoder":
    if cell not in encoder_configs.VARIANTS:
      raise ValueError(f"encoder study: cell {cell!r}; allowed: {encoder_configs.VARIANTS}.")
    return encoder_configs.get_config(f"{cell},quick" if tiny else cell)
  base = default.get_config("tiny" if tiny else None)
  if study.study == "experts":
    return _experts_cell(base, cell)
  if study.study == "granularity":
    return _granularity_cell(base, cell)
  if cell == "global":
    return base
  if cell == "micro_batch":
    router_configs.apply_router(base, "micro_batch_balance")
    base.model.moe.balance_micro_batch_size = study.micro_batch_size
    return base
  raise ValueError(f"balance_scope study: cell {cell!r}; allowed: 'global', 'micro_batch'.")


def run_config(study, cell: str, seed: int) -> ml_collections.ConfigDict:
  """The experiment config of one run: the cell with the study's length and `seed`."""
  return cr.apply_study_schedule(cell_config(study, cell), study, seed)


def active_ffn_hidden(config) -> float:
  """FFN hidden units one token passes through per MoE layer (dense: mlp_dim), nominal.

  Token choice: (K + shared) * F; expert choice: (c + shared) * F (c experts per token on
  average); Soft MoE: (E * slots / group tokens + shared) * F; capacity dispatch computes at
  most this (dropped assignments compute nothing).
  """
  model, moe = config.model, config.model.moe
  if not model.moe_every:
    return float(model.mlp_dim)
  shared = moe.get("num_shared_experts", 0)
  if moe.router == "expert_choice":
    routed = moe.capacity_factor
  elif moe.router == "soft":
    if moe.get("group_by", "sequence") == "position":
      group = moe.get("group_size", 0) or config.data.batch_size
    else:
      group = moe.get("group_size", 0) or config.data.seq_len
    routed = moe.num_experts * moe.soft_slots_per_expert / group
  else:
    routed = routing.slots_per_token(moe)
  return float((routed + shared) * moe.expert_hidden_dim)


def total_params(config) -> int:
  """The model's parameter count, from shapes only (nothing is initialised)."""
  model = nnx.eval_shape(lambda: Transformer(config.model, rngs=nnx.Rngs(0)))
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


# ------------------------------------------------------------------------------- statistics


def intervals_disjoint(mean_a: float, sem_a: float, mean_b: float, sem_b: float,
                       k: float) -> bool:
  """True when [mean_a +- k sem_a] and [mean_b +- k sem_b] do not overlap (a resolved difference).

  A cell with a single seed has no standard error and resolves nothing (False).
  """
  if not all(math.isfinite(v) for v in (mean_a, sem_a, mean_b, sem_b)):
    return False
  if sem_a <= 0 or sem_b <= 0:
    return False
  return abs(mean_a - mean_b) > k * (sem_a + sem_b)


def per_doubling(runs: Sequence[dict]) -> dict:
  """Least-squares slope of bits/byte against log2(E) per seed, over the MoE cells "eN".

  Returns:
    {"mean", "sem" (over seeds; NaN with one seed), "n_seeds", "slopes" {seed: slope}}; seeds
    with fewer than two expert counts are left out.
  """
  by_seed: dict[int, list[tuple[float, float]]] = {}
  for run in runs:
    name = run["router"]
    if name.startswith("e") and name[1:].isdigit():
      by_seed.setdefault(int(run["seed"]), []).append((math.log2(int(name[1:])), run["bpb"]))
  slopes = {}
  for seed, points in sorted(by_seed.items()):
    x, y = np.asarray(points, np.float64).T
    if len(set(x)) >= 2:
      slopes[seed] = float(np.polyfit(x, y, 1)[0])
  values = np.asarray(list(slopes.values()), np.float64)
  return {"mean": float(values.mean()) if values.size else math.nan,
          "sem": float(values.std(ddof=1) / math.sqrt(values.size)) if values.size > 1
          else math.nan, "n_seeds": int(values.size), "slopes": slopes}


def specialisation_from_counts(class_counts: np.ndarray) -> dict:
  """Specialisation of one MoE layer from its assignment counts [E, C] over disjoint classes.

  Returns:
    {"class_entropy_bits": H(class | expert) = sum_e P(e) H(class | e), "class_expert_mi_bits":
    H(class) - H(class | expert), "experts_per_class": sum_c P(c) 2 ** H(expert | c)}, where P is
    the distribution of the assignments (token, choice).
  """
  counts = np.asarray(class_counts, np.float64)
  total = counts.sum()

  def entropy_bits(p):
    p = p[p > 0]
    return float(-(p * np.log2(p)).sum())

  expert_mass = counts.sum(axis=1) / total
  class_mass = counts.sum(axis=0) / total
  conditional = sum(expert_mass[e] * entropy_bits(counts[e] / counts[e].sum())
                    for e in range(len(counts)) if counts[e].sum() > 0)
  per_class = sum(class_mass[c] * 2.0 ** entropy_bits(counts[:, c] / counts[:, c].sum())
                  for c in range(counts.shape[1]) if counts[:, c].sum() > 0)
  return {"class_entropy_bits": conditional,
          "class_expert_mi_bits": entropy_bits(class_mass) - conditional,
          "experts_per_class": per_class}


def specialisation(run_dir: str, num_batches: int, step: int) -> dict:
  """`specialisation_from_counts` of every MoE layer of the run's final checkpoint, averaged.

  Cached in run_dir/specialisation.json with the checkpoint step and batch count it used, and
  reused when both match.
  """
  path = os.path.join(run_dir, SPECIALISATION_FILE)
  if os.path.exists(path):
    cached = cr.read_record(path)
    if cached.get("num_batches") == num_batches and cached.get("step") == step:
      return {name: cached[name] for name in SPECIALISATION_NAMES}
  from experiments import routing_stats  # pylint: disable=g-import-not-at-top
  from moe_jax import sample  # pylint: disable=g-import-not-at-top
  stats = routing_stats.compute_routing_stats(sample.load_params(run_dir), num_batches=num_batches)
  columns = [routing_stats.CLASSES.index(name) for name in DISJOINT_CLASSES]
  layers = [specialisation_from_counts(layer.class_counts[:, columns]) for layer in stats.layers]
  result = {name: float(np.mean([layer[name] for layer in layers]))
            for name in SPECIALISATION_NAMES}
  cr.write_json(path, dict(result, num_batches=num_batches, step=stats.step))
  return result


def summarize_cells(runs: Sequence[dict], cells: Sequence[str], configs: dict, *,
                    interval_sems: float) -> list[dict]:
  """One row per cell (SUMMARY_COLUMNS): `compare_routers.summarize` plus this study's columns.

  Args:
    runs: run records (`train_run`'s, the cell under "router"), with "s_per_step" and, where
      measured, the SPECIALISATION_NAMES.
    cells: the row order; the first cell is the reference.
    configs: {cell: its experiment config} for the parameter and FLOP columns.
    interval_sems: k of `intervals_disjoint`.
  """
  rows = []
  for row in cr.summarize(runs, cells):
    group = [r for r in runs if r["router"] == row["router"]]
    config = configs[row["router"]]
    moe = config.model.moe
    row = dict(row, cell=row.pop("router"))
    row.update({
        # Seconds per step at the mean throughput, so that the two columns agree.
        "s_per_step": (config.data.batch_size * config.data.seq_len / row["tokens_per_s_mean"]
                       if row["tokens_per_s_mean"] > 0 else math.nan),
        "total_params": total_params(config),
        "active_ffn_hidden": active_ffn_hidden(config),
        "num_experts": moe.num_experts if config.model.moe_every else 0,
        "top_k": moe.top_k if config.model.moe_every else 0,
        "num_shared_experts": moe.get("num_shared_experts", 0) if config.model.moe_every else 0,
        **{name: cr.finite_mean(r.get(name, math.nan) for r in group)
           for name in SPECIALISATION_NAMES},
    })
    rows.append(row)
  if rows:
    ref = rows[0]
    for row in rows:
      row["delta_vs_ref"] = row["bpb_mean"] - ref["bpb_mean"]
      row["delta_sem"] = math.sqrt(row["bpb_sem"] ** 2 + ref["bpb_sem"] ** 2)
      row["resolved_vs_ref"] = ("-" if row is ref else
                                "yes" if intervals_disjoint(row["bpb_mean"], row["bpb_sem"],
                                                            ref["bpb_mean"], ref["bpb_sem"],
                                                            interval_sems) else "no")
  return rows


# ---------------------------------------------------------------------------------- outputs


def markdown_table(rows: Sequence[dict], study, *, seeds: Sequence[int], corpus: str,
                   doubling: dict | None = None) -> str:
  """The study's header, the per-cell Markdown table and (experts study) the slope per doubling."""
  reference = rows[0]["cell"] if rows else "-"
  encoder = study.study == "encoder"
  base = "configs/encoder.py" if encoder else "configs/default.py"
  base += (":quick" if encoder else ":tiny") if study.base == "tiny" else ""
  lines = [
      f"Study {study.study!r}: {study.steps} steps per run, seeds "
      f"{', '.join(str(s) for s in seeds)}, base {base}. bits/byte = final validation "
      + ("masked-byte bits/byte (masked positions only)" if encoder else "bits/byte")
      + ", mean ± standard error over seeds; Δ = difference to the reference "
      f"cell {reference!r} ± sqrt(s.e.² + s.e._ref²); resolved = the intervals mean ± "
      f"{study.interval_sems:g} s.e. of the cell and the reference do not overlap; eval s.e. = "
      "mean over seeds of each run's standard error over its evaluation batches; active hidden "
      "= FFN hidden units per token per MoE layer." + (f" Corpus: {corpus}." if corpus else ""),
      "",
  ]
  specialised = study.study == "balance_scope"
  header = ["cell", "seeds", "bits/byte", "Δ vs ref", "resolved", "eval s.e.", "s/step",
            "tokens/s", "params", "active hidden", "load imbalance", "dropped"]
  if specialised:
    # A bare "|" would end the table cell.
    header += ["H(class\\|expert) bits", "I(class;expert) bits", "experts/class"]
  lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  for row in rows:
    cells = [row["cell"], str(row["n_seeds"]),
             f"{row['bpb_mean']:.4f} ± {row['bpb_sem']:.4f}",
             "-" if row["resolved_vs_ref"] == "-" else
             f"{row['delta_vs_ref']:+.4f} ± {row['delta_sem']:.4f}",
             row["resolved_vs_ref"], cr.fmt(row["eval_stderr"], ".4f"),
             cr.fmt(row["s_per_step"], ".3f"), cr.fmt(row["tokens_per_s_mean"], ",.0f"),
             f"{row['total_params']:,}", f"{row['active_ffn_hidden']:g}",
             cr.fmt(row["load_imbalance"], ".2f"), cr.fmt(row["dropped_fraction"], ".1%")]
    if specialised:
      cells += [cr.fmt(row[name], spec) for name, spec in
                zip(SPECIALISATION_NAMES, (".3f", ".3f", ".2f"))]
    lines.append("| " + " | ".join(cells) + " |")
  if doubling is not None:
    lines += ["", f"Bits/byte per doubling of E (least-squares slope against log2 E over the MoE "
                  f"cells, per seed): {cr.fmt(doubling['mean'], '+.4f')} ± "
                  f"{cr.fmt(doubling['sem'], '.4f')} (mean ± s.e. over {doubling['n_seeds']} "
                  "seeds)."]
  return "\n".join(lines) + "\n"


def plot_loss_vs_experts(rows: Sequence[dict], path: str, title: str) -> bool:
  """Final bits/byte ± s.e. against E (log axis), dense as a band; False without matplotlib."""
  try:
    import matplotlib  # pylint: disable=g-import-not-at-top
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    logging.warning("matplotlib is not installed (%s); skipping %s.", e, path)
    return False
  moe = sorted((r for r in rows if r["num_experts"]), key=lambda r: r["num_experts"])
  fig, ax = plt.subplots(figsize=(6, 4))
  ax.errorbar([r["num_experts"] for r in moe], [r["bpb_mean"] for r in moe],
              yerr=[r["bpb_sem"] for r in moe], marker="o", capsize=3, label="MoE, top-2")
  for r in rows:
    if not r["num_experts"]:
      ax.axhline(r["bpb_mean"], color="gray", linestyle="--", label=f"{r['cell']} (± s.e.)")
      ax.axhspan(r["bpb_mean"] - r["bpb_sem"], r["bpb_mean"] + r["bpb_sem"], color="gray",
                 alpha=0.2)
  ax.set_xscale("log", base=2)
  ax.set_xticks([r["num_experts"] for r in moe], [str(r["num_experts"]) for r in moe])
  ax.set_xlabel("experts E (log scale)")
  ax.set_ylabel("final validation bits/byte")
  ax.set_title(title, fontsize=9)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  fig.savefig(path, dpi=120, bbox_inches="tight")
  plt.close(fig)
  return True


# ------------------------------------------------------------------------------------ study


def run_study(study, workdir: str) -> list[dict]:
  """Trains (or reuses) every (cell, seed) run, writes tables and plots; returns the summary rows.

  Every run config is built and validated before the first step trains, so a typo fails at once.
  """
  cells, seeds = parse_cells(study), cr.parse_seeds(study.seeds)
  if not 0 < study.tail_fraction <= 1:
    raise ValueError(f"config.tail_fraction={study.tail_fraction}; allowed: (0, 1].")
  plan, configs = [], {}
  for cell in cells:
    configs[cell] = cell_config(study, cell)
    for seed in seeds:
      config = run_config(study, cell, seed)
      validate_config(config)
      plan.append((cell, seed, config))
  cr.write_study_config(study, workdir)
  runs = cr.run_plan(plan, workdir, tail_fraction=study.tail_fraction)
  for run, (cell, seed, config) in zip(runs, plan):
    run["cell"] = cell
    run["s_per_step"] = config.data.batch_size * config.data.seq_len / run["tokens_per_s"]
    if study.study == "balance_scope":
      run.update(specialisation(os.path.join(workdir, "runs", f"{cell}_seed{seed}"),
                                study.routing_batches, run["steps"]))

  rows = summarize_cells(runs, cells, configs, interval_sems=study.interval_sems)
  cr.write_csv(os.path.join(workdir, "results.csv"), rows, SUMMARY_COLUMNS)
  cr.write_csv(os.path.join(workdir, "runs.csv"),
               [{c: r.get(c, math.nan) for c in RUN_COLUMNS} for r in runs], RUN_COLUMNS)
  doubling = per_doubling(runs) if study.study == "experts" else None
  table = markdown_table(rows, study, seeds=seeds, corpus=cr.corpus_description(runs),
                         doubling=doubling)
  note = (f"{cr.machine_description()}; s/step and tokens/s exclude the first (compiling) step "
          "and the evaluations; load imbalance (max/mean expert load) and dropped are means over "
          f"the last {study.tail_fraction:.0%} of the steps; '-' = not reported.")
  if study.study == "balance_scope":
    note += (f" Specialisation over {study.routing_batches} validation batches and the byte "
             f"classes {', '.join(DISJOINT_CLASSES)} (experiments/routing_stats.py), mean over "
             "MoE layers: lower H(class|expert) and experts/class, higher I(class;expert) = more "
             "specialised experts.")
  with open(os.path.join(workdir, "results.md"), "w") as f:
    f.write(table + "\n" + note + "\n")
  title = (f"study {study.study}: {study.steps} steps; mean over seeds "
           f"{', '.join(str(s) for s in seeds)}")
  cr.plot_val_loss(runs, cells, os.path.join(workdir, "val_loss.png"),
                   title + ", band = min-max")
  if study.study == "experts":
    plot_loss_vs_experts(rows, os.path.join(workdir, "loss_vs_experts.png"), title)
  logging.info("Wrote %s:\n%s", os.path.join(workdir, "results.md"), table)
  return rows


# ------------------------------------------------------------------------------------- main


def _define_flags():
  # Defined only when run as a script, so that tests can import this module.
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  config_flags.DEFINE_config_file("config", os.path.join(repo, "configs", "moe_scaling.py"),
                                  "Study config file (configs/moe_scaling.py:STUDY[,quick]).")
  flags.DEFINE_string("workdir", None, "Output: runs/, results.csv, runs.csv, results.md, plots.")
  flags.mark_flags_as_required(["workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  try:
    run_study(flags.FLAGS.config, flags.FLAGS.workdir)
  except cr.StudyPreempted as e:
    logging.warning("Study stopped: %s. Rerun the same command to resume.", e)
    return
  except ValueError as e:
    raise app.UsageError(str(e)) from None
  with open(os.path.join(flags.FLAGS.workdir, "results.md")) as f:
    print(f.read())


if __name__ == "__main__":
  _define_flags()
  app.run(main)
