r"""One command for a lent GPU or TPU: check every gmm backend, time it, train two configs.

    python experiments/device_check.py --out_dir=$OUT            # on the device, ~7 minutes
    python experiments/device_check.py --quick                   # CPU smoke test, tiny sizes

The idea: device time is scarce and the first run of a kernel on real hardware may fail in any
way, so one script does everything worth knowing from one lease, survives the failure of any part,
stops starting new work once `--budget_s` is spent, and leaves its findings on disk after every
part (a JSON file and BENCHMARKS.md-ready markdown in `--out_dir`), not only at the end.

Parts (`--parts`, in this order):
  check  Every gmm backend available on the platform ("xla", "blocked", "reference", and the
         compiled Pallas backend: "gpu" on CUDA, "tpu" on TPU; the Pallas one last, so that a
         kernel that wrecks the device context runs after the others have reported), forward
         and both gradients through `jax.vjp`, float32 and bfloat16, on shapes that are no
         multiple of any tile, with empty groups and NaN rows past `sum(group_sizes)`, against
         a float64 NumPy reference on the host: relative Frobenius error per output (float32
         within 1e-5, under `jax_default_matmul_precision="highest"`, since the default on a GPU
         is TF32 at ~3e-4; bfloat16 within 1e-2), and exact zeros where the result must be zero
         (rows past the end, empty groups' weight gradients). Each failure is reported as
         backend / dtype / case / pass and by how much.
  time   `experiments/bench_gmm.py` at a few MoE-sized bf16 shapes: gmm forward, forward+backward
         and tgmm of each backend that passed its check without raising, beside the dense matmul
         of equal FLOPs, `jax.lax.ragged_dot`, tokamax (if importable) and `torch._grouped_mm`
         (torch with CUDA; CUDA-event timing), each as a ratio to the dense matmul of the same run.
  train  `moe_jax.train.train_and_evaluate` on configs/default.py and the scaled-down Mixtral-like
         configs/mixtral_like.py:cpu8 (on the platform's devices; bf16 activations off CPU), for
         `--train_steps` steps on the offline stdlib byte corpus: tokens/s and MFU.

MFU = tokens/s * model FLOPs per token / peak bf16 FLOP/s of the chip, with model FLOPs per token
= 6 * N_active + 12 * L * H * Dh * S (PaLM, Chowdhery et al. 2022, App. B): N_active counts every
parameter a token multiplies (routed experts at top_k / num_experts of theirs, the input embedding
only when it is tied to the output projection, where it is a matmul); the second term is the
attention scores and values over the S positions this implementation computes (no causal saving).
Rematerialisation is not counted. Peaks (dense bf16, datasheets): H100 SXM and H200 989e12; others
in `PEAK_BF16_FLOPS`, or `--peak_flops`.

On CPU the Pallas backends cannot run compiled; "check" covers the three XLA backends there.
"""

import dataclasses
import datetime
import importlib
import json
import math
import os
import platform
import shutil
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Sequence

# JAX would otherwise take 75% of the GPU up front and leave the torch peer none.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
# Runs from a checkout without installing the package; bench_gmm lives beside this file.
_EXPERIMENTS = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(_EXPERIMENTS))
sys.path.insert(0, _EXPERIMENTS)

from absl import app  # noqa: E402
from absl import flags  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import jaxlib  # noqa: E402
import numpy as np  # noqa: E402

import bench_gmm  # noqa: E402  (its own flags are defined too, and unused here)
import pallas_kernels  # noqa: E402
from pallas_kernels.gmm import ops  # noqa: E402

PARTS = ("check", "time", "train")
# The compiled Pallas backend of each platform; it runs last in the check.
PALLAS_BACKEND = {"gpu": "gpu", "tpu": "tpu"}
TOLERANCE = {"float32": 1e-5, "bfloat16": 1e-2}
# Dense bf16 peak FLOP/s by `device_kind` substring, first match wins (datasheet numbers).
PEAK_BF16_FLOPS = (
    ("H100 PCIe", 756e12), ("H100", 989e12), ("H200", 989e12), ("H800", 989e12),
    ("A100", 312e12), ("L4", 121e12), ("TPU v6", 918e12), ("TPU v5 lite", 197e12),
    ("TPU v5e", 197e12), ("TPU v5", 459e12), ("TPU v4", 275e12),
)
# configs/<module>.py:<variant>; the Mixtral-like one is its scaled-down variant.
TRAIN_CONFIGS = ("default", "mixtral_like:cpu8")

_OUT_DIR = flags.DEFINE_string(
    "out_dir", None, "Where the JSON and markdown go (default: $OUT if set, else "
    "./device_check_out).")
_BUDGET_S = flags.DEFINE_float(
    "budget_s", 420.0, "Wall-clock budget: once spent, the parts, shapes and training runs not "
    "yet started are skipped (one already running finishes).")
_QUICK = flags.DEFINE_bool("quick", False, "Tiny shapes and a handful of steps (CPU smoke test).")
_PARTS = flags.DEFINE_list("parts", list(PARTS), f"Parts to run, from {PARTS}.")
_GMM_BACKENDS = flags.DEFINE_list(
    "gmm_backends", None, "Backends to check and time (default: every one the platform can run).")
_TRAIN_STEPS = flags.DEFINE_integer("train_steps", None, "Steps per training run (default 300; "
                                    "3 with --quick).")
_TRAIN_CONFIGS = flags.DEFINE_list("train_configs", list(TRAIN_CONFIGS),
                                   "configs/<name>.py[:variant] to train.")
_TRAIN_BACKENDS = flags.DEFINE_list(
    "train_gmm_backends", None, "model.moe.gmm_backend values to train with (default: 'auto', "
    "then the platform's Pallas backend if it passed the check).")
_PEAK_FLOPS = flags.DEFINE_float("peak_flops", None, "Peak FLOP/s for MFU (default: by device "
                                 "kind from PEAK_BF16_FLOPS; none on CPU).")


@dataclasses.dataclass(frozen=True)
class Options:
  """What to run; `main` fills it from the flags, tests directly."""
  out_dir: str
  budget_s: float = 420.0
  quick: bool = False
  parts: Sequence[str] = PARTS
  gmm_backends: Sequence[str] | None = None
  train_steps: int | None = None
  train_configs: Sequence[str] = TRAIN_CONFIGS
  train_gmm_backends: Sequence[str] | None = None
  peak_flops: float | None = None
  command: str = ""


class Budget:
  """The wall-clock budget shared by all parts."""

  def __init__(self, seconds: float):
    self.seconds, self.start = seconds, time.perf_counter()

  def elapsed(self) -> float:
    return time.perf_counter() - self.start

  def spent(self) -> bool:
    return self.elapsed() >= self.seconds


def platform_backends() -> list[str]:
  """The gmm backends this platform can run compiled, the Pallas one (if any) last."""
  names = ["xla", "blocked", "reference"]
  pallas = PALLAS_BACKEND.get(jax.default_backend())
  return names + [pallas] if pallas else names


def peak_flops(device_kind: str) -> float | None:
  """Dense bf16 peak FLOP/s of `device_kind` from `PEAK_BF16_FLOPS`, None when unknown."""
  return next((peak for name, peak in PEAK_BF16_FLOPS if name.lower() in device_kind.lower()),
              None)


# ------------------------------------------------------------------------------------ the check


@dataclasses.dataclass(frozen=True)
class Case:
  """One check problem: lhs [m, k], rhs [G, k, n]; rows past sum(sizes) are NaN."""
  name: str
  m: int
  k: int
  n: int
  sizes: tuple[int, ...]


def check_cases(quick: bool) -> list[Case]:
  """Shapes no tile divides, empty groups (first, middle, last), rows past the end."""
  if quick:
    return [Case("awkward", 45, 40, 72, (10, 0, 12, 5)),
            Case("many_small_groups", 40, 24, 40, (0, 3, 1, 0, 7, 2, 5, 0, 4, 1, 0)),
            Case("all_groups_empty", 20, 12, 24, (0, 0, 0))]
  rng = np.random.default_rng(7)
  many = rng.integers(0, 14, 24) * (rng.random(24) < 0.75)
  moe = rng.multinomial(4000, rng.dirichlet(np.ones(16)))
  moe[[3, 9]] = 0  # Two experts get no token; their rows go to the last one.
  moe[-1] += 4000 - moe.sum()
  return [Case("awkward", 333, 200, 264, (50, 0, 120, 7, 0, 100)),
          Case("many_small_groups", 200, 96, 80, tuple(int(s) for s in many)),
          Case("one_group_takes_all", 256, 128, 192, (0, 256, 0)),
          Case("all_groups_empty", 64, 128, 128, (0, 0, 0, 0)),
          Case("moe_sized", 4096, 1024, 1408, tuple(int(s) for s in moe))]


def _np_gmm(x, w, sizes):
  """float64 [m, k] x [G, k, n] -> [m, n]; rows past the last group stay zero."""
  out, start = np.zeros((x.shape[0], w.shape[2])), 0
  for i, size in enumerate(sizes):
    out[start:start + size] = x[start:start + size] @ w[i]
    start += size
  return out


def _np_tgmm(x, g, sizes):
  """float64 [m, k], [m, n] -> [G, k, n] over each group's rows."""
  out, start = np.zeros((len(sizes), x.shape[1], g.shape[1])), 0
  for i, size in enumerate(sizes):
    out[i] = x[start:start + size].T @ g[start:start + size]
    start += size
  return out


def _f64(a) -> np.ndarray:
  # Through float32, which holds bfloat16 exactly.
  return np.asarray(jnp.asarray(a, jnp.float32), np.float64)


def _rel_err(actual: np.ndarray, expected: np.ndarray) -> float:
  """Relative Frobenius error; NaN anywhere in `actual` gives NaN (which fails every check)."""
  return float(np.linalg.norm(actual - expected) / max(np.linalg.norm(expected), 1e-30))


def _case_data(case: Case, dtype, seed: int):
  """Device inputs in `dtype` and the float64 references of out, d_lhs and d_rhs."""
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((case.m, case.k), dtype=np.float32)
  w = rng.standard_normal((len(case.sizes), case.k, case.n), dtype=np.float32)
  ct = rng.standard_normal((case.m, case.n), dtype=np.float32)
  total = sum(case.sizes)
  x[total:] = np.nan  # Rows past the end must not reach anything.
  x_d, w_d, ct_d = (jnp.asarray(a, dtype) for a in (x, w, ct))
  x64, w64, ct64 = _f64(x_d)[:total], _f64(w_d), _f64(ct_d)[:total]
  refs = {"fwd": _np_gmm(x64, w64, case.sizes),
          "d_lhs": _np_gmm(ct64, w64.transpose(0, 2, 1), case.sizes),
          "d_rhs": _np_tgmm(x64, ct64, case.sizes)}
  return (x_d, w_d, jnp.asarray(case.sizes, jnp.int32), ct_d), refs


def _fwd_and_vjp(backend: str):
  def f(x, w, sizes, ct):
    out, pullback = jax.vjp(lambda a, b: pallas_kernels.gmm(a, b, sizes, backend=backend), x, w)
    return (out, *pullback(ct))
  return jax.jit(f)


def _judge(backend: str, dtype: str, case: Case, outputs, refs) -> list[dict]:
  """One row per pass: error against the reference and whether the must-be-zero parts are."""
  total, tol = sum(case.sizes), TOLERANCE[dtype]
  empty = np.asarray(case.sizes) == 0
  rows = []
  for name, value in zip(("fwd", "d_lhs", "d_rhs"), outputs):
    value = _f64(value)
    if name == "d_rhs":
      err, zeros = _rel_err(value, refs[name]), value[empty]
      zeros_where = "empty groups"
    else:
      err, zeros = _rel_err(value[:total], refs[name]), value[total:]
      zeros_where = "rows past the end"
    leaked = float(np.max(np.abs(zeros))) if zeros.size else 0.0  # NaN stays NaN.
    ok = bool(err <= tol) and leaked == 0.0  # NaN compares False: it fails.
    rows.append(dict(backend=backend, dtype=dtype, case=case.name, m=case.m, k=case.k, n=case.n,
                     groups=len(case.sizes), pass_=name, rel_err=err, tol=tol,
                     zeros_where=zeros_where, max_abs_where_zero=leaked, ok=ok, error="",
                     error_detail=""))
  return rows


def _failure_text(row: dict) -> str:
  where = f"{row['backend']} {row['dtype']} {row['case']} {row['pass_']}"
  if row["error"]:
    return f"{where}: raised {row['error']}"
  problems = []
  if not row["rel_err"] <= row["tol"]:
    problems.append(f"rel err {row['rel_err']:.3g} > tol {row['tol']:.0e}")
  if row["max_abs_where_zero"] != 0.0:
    problems.append(f"{row['zeros_where']} not zero (max |value| {row['max_abs_where_zero']:.3g})")
  return f"{where}: " + "; ".join(problems)


def run_check(backends: Sequence[str], quick: bool, budget: Budget,
              log: Callable[[str], None]) -> dict:
  """Forward, d_lhs and d_rhs of every backend, dtype and case against float64 NumPy.

  Returns:
    {"rows": one dict per (backend, dtype, case, pass), "failures": readable lines,
     "raised": backends that raised on some case, "skipped": cases left out by the budget}.
  """
  rows, skipped = [], []
  with jax.default_matmul_precision("highest"):
    for dtype in ("float32", "bfloat16"):
      for index, case in enumerate(check_cases(quick)):
        if budget.spent():
          skipped.append(f"{dtype} {case.name}")
          continue
        # Fresh inputs for every case and dtype; the reference once for all backends.
        args, refs = _case_data(case, jnp.dtype(dtype), seed=1000 * (dtype == "bfloat16") + index)
        for backend in backends:
          start = time.perf_counter()
          try:
            outputs = jax.block_until_ready(_fwd_and_vjp(backend)(*args))
            new = _judge(backend, dtype, case, outputs, refs)
          except Exception as e:  # noqa: BLE001 (report it, check the rest)
            message = f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:300]}"
            new = [dict(backend=backend, dtype=dtype, case=case.name, m=case.m, k=case.k,
                        n=case.n, groups=len(case.sizes), pass_="all", rel_err=float("nan"),
                        tol=TOLERANCE[dtype], zeros_where="", max_abs_where_zero=float("nan"),
                        ok=False, error=message, error_detail=str(e)[:4000])]
          rows += new
          worst = max(r["rel_err"] / r["tol"] for r in new) if all(r["ok"] for r in new) else None
          log(f"check {backend:9s} {dtype:8s} {case.name:20s} "
              + ("ok" if worst is not None else "FAILED: " + "; ".join(
                  _failure_text(r) for r in new if not r["ok"]))
              + (f" (worst err / tol {worst:.2g})" if worst is not None else "")
              + f" [{time.perf_counter() - start:.1f}s]")
  return {"rows": rows, "failures": [_failure_text(r) for r in rows if not r["ok"]],
          "raised": sorted({r["backend"] for r in rows if r["error"]}), "skipped": skipped}


# ------------------------------------------------------------------------------------- the timing


def timing_shapes(quick: bool) -> list[bench_gmm.Shape]:
  """MoE-sized bf16 shapes (M = T * top_k rows of width d through E experts of hidden f)."""
  if quick:
    return [bench_gmm.Shape("quick", d=64, f=224, experts=8, top_k=2, num_tokens=64)]
  return [
      # Mixtral 8x7B's experts at 4k tokens: M 8192, d 4096, f 14336, E 8.
      bench_gmm.Shape("mixtral_m8k", d=4096, f=14336, experts=8, top_k=2, num_tokens=4096),
      # DeepSeek-V2-Lite's experts at 4k tokens: M 24576, d 2048, f 1408, E 64.
      bench_gmm.Shape("deepseek_v2_m24k", d=2048, f=1408, experts=64, top_k=6, num_tokens=4096),
      # A narrow model with many rows: M 32768, d 1024, f 2816, E 16.
      bench_gmm.Shape("narrow_m32k", d=1024, f=2816, experts=16, top_k=2, num_tokens=16384),
  ]


def run_time(backends: Sequence[str], quick: bool, budget: Budget,
             log: Callable[[str], None]) -> dict:
  """bench_gmm's rows for every shape the budget allows; {"rows", "skipped", "notes"}."""
  rows, skipped, notes = [], [], []
  on_cpu = jax.default_backend() == "cpu"

  def bench_log(line: str):
    log(line)
    if line.startswith("# note"):
      notes.append(line)

  for shape in timing_shapes(quick):
    if budget.spent():
      skipped.append(shape.name)
      continue
    rows += bench_gmm.run_benchmark(
        [shape], num_tokens=shape.num_tokens, dtype="float32" if on_cpu else "bfloat16",
        skews=["balanced"], backends=list(backends), peers=list(bench_gmm.PEERS),
        repeats=1 if quick else 5, warmup=0 if quick else 1,
        calls_per_sample=1 if quick else None, include_tgmm=True, scale=1, log=bench_log)
  return {"rows": rows, "skipped": skipped, "notes": notes}


# ------------------------------------------------------------------------------------ training


def load_config(name: str):
  """configs/<module>.py:<variant> as a ConfigDict (imported from the checkout)."""
  module, _, variant = name.partition(":")
  return importlib.import_module(f"configs.{module}").get_config(variant or None)


def model_flops_per_token(model_config, seq_len: int) -> dict:
  """6 * N_active + 12 * L * H * Dh * S, from the model's abstract parameters (see the docstring).

  Returns:
    {"total_params", "active_params", "flops_per_token"}.
  """
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from moe_jax.models.transformer import Transformer  # pylint: disable=g-import-not-at-top
  abstract = nnx.eval_shape(lambda: Transformer(model_config, rngs=nnx.Rngs(params=0)))
  params = nnx.to_pure_dict(nnx.state(abstract, nnx.Param))
  moe = model_config.moe
  routed_fraction = moe.top_k / moe.num_experts
  total = active = 0.0
  for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    keys = [str(getattr(p, "key", p)) for p in path]
    size = float(np.prod(leaf.shape))
    total += size
    if keys[0] == "embed" and not model_config.tie_embeddings:
      continue  # A lookup, not a matmul.
    active += size * (routed_fraction if "experts" in keys else 1.0)
  m = model_config
  attention = 12 * m.num_layers * m.num_heads * m.head_dim * seq_len
  return {"total_params": int(total), "active_params": int(active),
          "flops_per_token": 6 * active + attention}


def train_config(name: str, backend: str, steps: int, quick: bool,
                 num_devices: int | None = None):
  """The config, fitted to `num_devices` (default: all) and to a short offline run.

  The recipe's mesh is kept when it fits; otherwise (cpu8's expert=8 on one GPU) the run is
  data-parallel over all devices. Off CPU activations are bf16, since MFU is against the bf16
  peak. `quick` also cuts the model to 2 layers and batches to 8 x 32 tokens.
  """
  from moe_jax.validation import ConfigError, validate_config  # pylint: disable=g-import-not-at-top
  config = load_config(name)
  config.data.task = "stdlib_bytes"  # Offline: the interpreter's own sources.
  # The same arrays as seqio's reader, without importing TensorFlow (which may grab the GPU).
  config.data.reader = "numpy"
  config.model.moe.gmm_backend = backend
  if jax.default_backend() != "cpu":
    config.model.dtype = "bfloat16"
  if quick:
    config.model.num_layers = min(config.model.num_layers, 2)
    config.data.seq_len = min(config.data.seq_len, 32)
    config.data.batch_size = 8
  config.data.eval_batches = 1 if quick else 2
  train = config.train
  train.steps = steps
  train.warmup_steps = min(train.warmup_steps, max(1, steps // 10))
  train.log_every = max(1, steps // 3)
  train.eval_every = train.checkpoint_every = steps  # Once, at the end.
  num_devices = num_devices or jax.device_count()
  try:
    validate_config(config, num_devices)
  except ConfigError:
    config.mesh.data, config.mesh.fsdp, config.mesh.expert, config.mesh.tensor = -1, 1, 1, 1
    batch = max(config.data.batch_size, num_devices)
    config.data.batch_size = batch - batch % num_devices
    validate_config(config, num_devices)
  return config


def run_train(configs: Sequence[str], backends: Sequence[str], steps: int, quick: bool,
              peak: float | None, budget: Budget, log: Callable[[str], None]) -> dict:
  """Trains each config with each gmm backend; {"rows", "skipped", "errors"}."""
  from moe_jax import train as train_lib  # pylint: disable=g-import-not-at-top
  rows, skipped, errors = [], [], []
  for backend in backends:
    for name in configs:
      if budget.spent():
        skipped.append(f"{name} [{backend}]")
        continue
      workdir = tempfile.mkdtemp(prefix="device_check_train_")  # Never under $OUT.
      start = time.perf_counter()
      try:
        config = train_config(name, backend, steps, quick)
        flops = model_flops_per_token(config.model, config.data.seq_len)
        result = train_lib.train_and_evaluate(config, workdir)
        tokens_per_s = result.get("train/tokens_per_s")
        achieved = tokens_per_s * flops["flops_per_token"] if tokens_per_s else None
        row = dict(config=name, gmm_backend=backend,
                   resolved_backend=ops.resolve_backend(backend),
                   dtype=config.model.dtype, steps=result["step"],
                   batch=config.data.batch_size, seq_len=config.data.seq_len,
                   mesh=dict(config.mesh), tokens_per_s=tokens_per_s, **flops,
                   model_flops_per_s=achieved, peak_flops=peak,
                   mfu=achieved / peak if achieved and peak else None,
                   train_loss=result.get("train/loss"), eval_loss=result.get("eval/loss"),
                   wall_s=time.perf_counter() - start)
        rows.append(row)
        mfu = f"{row['mfu']:.2%}" if row["mfu"] is not None else "n/a"
        log(f"train {name} [{backend}]: {tokens_per_s or float('nan'):,.0f} tokens/s, MFU {mfu}, "
            f"loss {row['train_loss']}, {row['wall_s']:.0f}s")
      except Exception as e:  # noqa: BLE001 (report it, train the rest)
        errors.append(f"{name} [{backend}]: {type(e).__name__}: "
                      f"{(str(e).strip().splitlines() or [''])[0][:300]}")
        log(f"train {name} [{backend}] FAILED: {errors[-1]}")
      finally:
        shutil.rmtree(workdir, ignore_errors=True)
  return {"rows": rows, "skipped": skipped, "errors": errors}


# ------------------------------------------------------------------------------------- reporting


def _fmt(value, spec: str = ".3g") -> str:
  if value is None or (isinstance(value, float) and math.isnan(value)):
    return "n/a"
  return format(value, spec)


def markdown(report: dict) -> str:
  """BENCHMARKS.md-ready sections for whatever parts `report` holds."""
  meta = report["meta"]
  lines = [f"## Device check: {meta['device_kind']} ({meta['platform']})", "",
           f"{meta['date']}, JAX {meta['jax_version']}, {meta['device_kind']} x "
           f"{meta['device_count']}, {meta['host']}" + (f", torch {meta['torch']}"
                                                        if meta.get("torch") else "") + ".", "",
           "```bash", meta["command"], "```", ""]
  check = report.get("check")
  if check and check.get("rows"):
    lines += ["### gmm against float64 NumPy (worst relative error over the cases)", "",
              "| backend | dtype | fwd | d_lhs | d_rhs | tol | exact zeros | cases | result |",
              "|---|---|---:|---:|---:|---:|---|---:|---|"]
    groups = {}
    for r in check["rows"]:
      groups.setdefault((r["backend"], r["dtype"]), []).append(r)
    for (backend, dtype), rs in groups.items():
      worst = {p: max((r["rel_err"] for r in rs if r["pass_"] == p),
                      key=lambda e: math.inf if math.isnan(e) else e, default=None)
               for p in ("fwd", "d_lhs", "d_rhs")}
      zeros = all(r["max_abs_where_zero"] == 0.0 for r in rs)
      failed = sum(not r["ok"] for r in rs)
      lines.append(f"| {backend} | {dtype} | {_fmt(worst['fwd'], '.2e')} | "
                   f"{_fmt(worst['d_lhs'], '.2e')} | {_fmt(worst['d_rhs'], '.2e')} | "
                   f"{rs[0]['tol']:.0e} | {'yes' if zeros else 'NO'} | "
                   f"{len({r['case'] for r in rs})} | "
                   f"{'ok' if not failed else f'**{failed} FAILED**'} |")
    lines += [""] + [f"- FAILED: {f}" for f in check["failures"]]
    lines += [f"- skipped (budget): {s}" for s in check.get("skipped", [])] + [""]
  timing = report.get("time")
  if timing and timing.get("rows"):
    lines += ["### gmm timing (median; vs dense = dense time / this time, same run)", "",
              "| shape | M | d | f | E | op | impl | ms | TFLOP/s | vs dense |",
              "|---|---:|---:|---:|---:|---|---|---:|---:|---:|"]
    for r in timing["rows"]:
      lines.append(f"| {r['shape']} | {r['m']} | {r['k']} | {r['n']} | {r['experts']} | "
                   f"{r['op']} | {r['impl']} | {r['ms']:.3f} | {r['tflops_per_s']:.3g} | "
                   f"{_fmt(r['vs_dense'], '.2f')} |")
    lines += [""] + [f"- {n[2:]}" for n in timing.get("notes", [])]
    lines += [f"- skipped (budget): {s}" for s in timing.get("skipped", [])] + [""]
  train = report.get("train")
  if train and (train.get("rows") or train.get("errors")):
    lines += ["### Training throughput (stdlib bytes; MFU = tokens/s x (6 N_active + 12 L H Dh S)"
              " / peak bf16)", "",
              "| config | gmm backend | dtype | batch x seq | steps | active params | "
              "FLOPs/token | tokens/s | MFU |",
              "|---|---|---|---|---:|---:|---:|---:|---:|"]
    for r in train["rows"]:
      backend = r["gmm_backend"] + (f" ({r['resolved_backend']})"
                                    if r["resolved_backend"] != r["gmm_backend"] else "")
      lines.append(f"| {r['config']} | {backend} | {r['dtype']} | {r['batch']} x {r['seq_len']} | "
                   f"{r['steps']} | {r['active_params']:,} | {r['flops_per_token']:.3g} | "
                   f"{_fmt(r['tokens_per_s'], ',.0f')} | {_fmt(r['mfu'], '.2%')} |")
    lines += [""] + [f"- FAILED: {e}" for e in train.get("errors", [])]
    lines += [f"- skipped (budget): {s}" for s in train.get("skipped", [])] + [""]
  for part, message in report.get("errors", {}).items():
    lines.append(f"- part {part} raised: {message.strip().splitlines()[-1]}")
  if report.get("skipped_parts"):
    lines.append(f"- parts skipped (budget): {', '.join(report['skipped_parts'])}")
  return "\n".join(lines).rstrip() + "\n"


def _write(report: dict, out_dir: str, lines: Sequence[str]) -> None:
  os.makedirs(out_dir, exist_ok=True)
  with open(os.path.join(out_dir, "device_check.log"), "w") as f:
    f.write("\n".join(lines) + "\n")
  with open(os.path.join(out_dir, "device_check.json"), "w") as f:
    json.dump(report, f, indent=1, default=str)
  with open(os.path.join(out_dir, "device_check.md"), "w") as f:
    f.write(markdown(report))


def _torch_version() -> str | None:
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError:
    return None
  return f"{torch.__version__} (CUDA {'yes' if torch.cuda.is_available() else 'no'})"


def run(options: Options, log: Callable[[str], None] = lambda line: print(line, flush=True)
        ) -> dict:
  """Runs the parts in order within the budget; writes and returns the report.

  Returns:
    {"meta", "check", "time", "train" (those that ran), "errors" (part -> traceback),
     "skipped_parts", "elapsed_s"}; written to `options.out_dir` after every part as
    device_check.json, device_check.md and (every line logged) device_check.log.
  """
  lines = []

  def log_line(line: str) -> None:
    lines.append(line)
    log(line)

  unknown = [p for p in options.parts if p not in PARTS]
  if unknown:
    raise ValueError(f"unknown parts {unknown}; choose from {PARTS}.")
  budget = Budget(options.budget_s)
  device = jax.devices()[0]
  report = {"meta": dict(
      device_kind=device.device_kind, platform=jax.default_backend(),
      device_count=jax.device_count(), jax_version=jax.__version__,
      jaxlib_version=jaxlib.__version__,
      date=datetime.date.today().isoformat(), command=options.command or "python " + " ".join(
          sys.argv), host=f"{platform.machine()}, {os.cpu_count()} CPUs, Python "
          f"{platform.python_version()}", torch=_torch_version(), quick=options.quick,
      budget_s=options.budget_s), "errors": {}, "skipped_parts": []}
  backends = list(options.gmm_backends or platform_backends())
  log_line(f"# device check: {device.device_kind} ({jax.default_backend()}), JAX "
           f"{jax.__version__}, backends {backends}, budget {options.budget_s:.0f}s")
  for part in PARTS:
    if part not in options.parts:
      continue
    if budget.spent():
      report["skipped_parts"].append(part)
      log_line(f"# {part}: skipped, budget of {options.budget_s:.0f}s spent")
      continue
    start = time.perf_counter()
    try:
      if part == "check":
        report["check"] = run_check(backends, options.quick, budget, log_line)
      elif part == "time":
        raised = set(report.get("check", {}).get("raised", []))
        timed = [b for b in backends if b not in raised and b != "reference"]
        if raised:
          log_line(f"# time: left out {sorted(raised)}, which raised in the check")
        report["time"] = run_time(timed, options.quick, budget, log_line)
      else:
        check = report.get("check", {})
        pallas = PALLAS_BACKEND.get(jax.default_backend())
        pallas_ok = pallas and any(r["backend"] == pallas for r in check.get("rows", [])) and all(
            r["ok"] for r in check.get("rows", []) if r["backend"] == pallas)
        train_backends = options.train_gmm_backends or (["auto"] + ([pallas] if pallas_ok else []))
        steps = options.train_steps or (3 if options.quick else 300)
        peak = options.peak_flops or peak_flops(device.device_kind)
        report["train"] = run_train(options.train_configs, train_backends, steps, options.quick,
                                    peak, budget, log_line)
    except Exception:  # noqa: BLE001 (one part's failure must not lose the others)
      report["errors"][part] = traceback.format_exc()
      log_line(f"# {part} raised:\n{report['errors'][part]}")
    log_line(f"# {part}: {time.perf_counter() - start:.0f}s (total {budget.elapsed():.0f}s)")
    report["elapsed_s"] = budget.elapsed()
    _write(report, options.out_dir, lines)
  report["elapsed_s"] = budget.elapsed()
  log_line("\n" + markdown(report))
  _write(report, options.out_dir, lines)
  return report


def main(argv):
  del argv
  out_dir = _OUT_DIR.value or os.environ.get("OUT") or os.path.join(os.getcwd(),
                                                                     "device_check_out")
  run(Options(out_dir=out_dir, budget_s=_BUDGET_S.value, quick=_QUICK.value, parts=_PARTS.value,
              gmm_backends=_GMM_BACKENDS.value, train_steps=_TRAIN_STEPS.value,
              train_configs=_TRAIN_CONFIGS.value, train_gmm_backends=_TRAIN_BACKENDS.value,
              peak_flops=_PEAK_FLOPS.value, command="python " + " ".join(sys.argv)))


if __name__ == "__main__":
  app.run(main)
