r"""Paired comparison of trained models on the identical evaluation sample.

    python experiments/compare_checkpoints.py --workdirs=/tmp/dense_default,/tmp/moe_default

Each workdir's latest checkpoint is evaluated on the same validation batches (the sample of
`data.TokenDataset.eval_chunks`, spread over the whole split). The table gives each model's
bits/byte with its standard error over batches, and each model's difference to the first one
(the baseline) with the *paired* standard error: std over batches of the per-batch difference /
sqrt(batches). Both models see the same chunks, so chunk difficulty cancels in the difference and
its error bar is much smaller than either model's own. A difference is called resolved when it
exceeds twice its paired standard error; this measures evaluation noise only, not seed-to-seed
variation (one checkpoint per model).
"""
from __future__ import annotations

import math
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# Runs from a checkout without installing the package.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app  # noqa: E402
from absl import flags  # noqa: E402
import jax  # noqa: E402
import numpy as np  # noqa: E402

from moe_jax import data, sample, sharding, train  # noqa: E402

_WORKDIRS = flags.DEFINE_list("workdirs", None, "Training workdirs; the first is the baseline.")
_EVAL_BATCHES = flags.DEFINE_integer("eval_batches", 0,
                                     "Evaluation batches (0 = the baseline's data.eval_batches).")
_OUT = flags.DEFINE_string("out", "", "Also write the Markdown table to this file.")

# Data fields that must agree for the batches to be the same.
_SAME_DATA = ("task", "path", "seq_len", "batch_size")


def per_batch_losses(workdir: str, data_config) -> tuple[np.ndarray, np.ndarray, int]:
  """(per-batch mean loss [n] nats/token, per-batch tokens [n], step) of workdir's latest model."""
  model = sample.load_params(workdir)
  config = model.config
  config.data.update({k: data_config[k] for k in (*_SAME_DATA, "eval_batches")})
  mesh = sample.single_device_mesh()
  extra = (model.router_state,) if model.router_state else ()
  eval_fn = jax.jit(lambda params, batch, *rest: train.eval_step(
      params, batch, graphdef=model.graphdef, router_state=rest[0] if rest else None))
  with jax.set_mesh(mesh):
    ce, tokens = train.evaluate_batches(
        model.params, data.load_dataset(config.data, "validation"), config,
        eval_fn=lambda p, b: eval_fn(p, b, *extra), batch_sharding=sharding.batch_sharding(mesh))
  return ce / np.maximum(tokens, 1.0), tokens, model.step


def paired_difference(baseline: np.ndarray, other: np.ndarray,
                      tokens: np.ndarray) -> tuple[float, float]:
  """Token-weighted mean of other - baseline and its paired standard error over full batches."""
  diff = other - baseline
  mean = float(np.sum(diff * tokens) / np.sum(tokens))
  full = tokens == tokens.max()
  stderr = float(np.std(diff[full], ddof=1) / math.sqrt(full.sum())) if full.sum() > 1 else math.nan
  return mean, stderr


def compare(workdirs: list[str], eval_batches: int = 0) -> str:
  """The Markdown comparison of `workdirs` (first = baseline); see the module docstring."""
  if len(workdirs) < 2:
    raise ValueError(f"--workdirs={workdirs}: give at least two workdirs.")
  base_config = sample.load_config(workdirs[0])
  data_config = base_config.data
  if eval_batches:
    data_config.eval_batches = eval_batches
  for workdir in workdirs[1:]:
    other = sample.load_config(workdir).data
    differ = [k for k in _SAME_DATA if other.get(k) != data_config.get(k)]
    if differ:
      raise ValueError(f"{workdir} was trained on other data ({', '.join(differ)} differ from "
                       f"{workdirs[0]}); its evaluation batches would not be the same.")
  results = [per_batch_losses(w, data_config) for w in workdirs]
  base_loss, tokens, _ = results[0]
  bits = 1 / math.log(2)
  lines = [
      f"Paired comparison on {int(tokens.sum()):,} validation tokens ({len(tokens)} batches of "
      f"{data_config.batch_size} x {data_config.seq_len}); corpus "
      f"{data.describe_fingerprint(data.corpus_fingerprint(data_config))}.",
      "",
      "| model | step | bits/byte ± s.e. | difference to the first ± paired s.e. | resolved (> 2 s.e.) |",
      "|---|---|---|---|---|",
  ]
  for workdir, (loss, batch_tokens, step) in zip(workdirs, results):
    mean, stderr = train.mean_and_stderr(loss * batch_tokens, batch_tokens)
    if workdir == workdirs[0]:
      diff_text, resolved = "(baseline)", "-"
    else:
      diff, diff_se = paired_difference(base_loss, loss, tokens)
      diff_text = f"{diff * bits:+.4f} ± {diff_se * bits:.4f}"
      resolved = "yes" if abs(diff) > 2 * diff_se else "no"
    lines.append(f"| {workdir} | {step} | {mean * bits:.4f} ± {stderr * bits:.4f} | {diff_text} | "
                 f"{resolved} |")
  return "\n".join(lines) + "\n"


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  try:
    text = compare(_WORKDIRS.value, _EVAL_BATCHES.value)
  except (ValueError, FileNotFoundError) as e:
    raise app.UsageError(str(e)) from None
  print(text)
  if _OUT.value:
    with open(_OUT.value, "w") as f:
      f.write(text)


if __name__ == "__main__":
  flags.mark_flags_as_required(["workdirs"])
  app.run(main)
