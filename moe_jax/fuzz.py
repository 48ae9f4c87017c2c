"""Parallelism fuzzer: a random MoE training config must take the same step on every mesh.

Silent numerical bugs live in combinations of parallelism features that no hand-written test
pairs up (Megatron-LM #7452, a wrong gradient under one combination of parallel sizes, was found
by a CPU fuzzer). Every layout here is meant to compute the function of one device, so the
oracle is simple: case i draws a tiny config from `numpy.random.default_rng(seed + i)` (router
variant of `configs/routers.py` or Soft MoE, dropless / capacity / batch-prioritized dispatch,
expert exchange, a mesh over 8 CPU devices with axes data, fsdp, expert, tensor, remat, gradient
accumulation, float32 or bfloat16, sequence or position groups, shared experts, E, K, layers),
redraws while `validate_config` refuses it (counted as skipped), runs one `train.train_step` on
the drawn mesh and on a one-device mesh with the same global batch, and compares

  loss          cross-entropy and total loss (relative error)
  grads         Adam's first moment after the step, (1 - b1) * the clipped gradient, per leaf
                (the gradient through the whole step, accumulation included)
  params        the updated parameters, per leaf (where the update is well conditioned: see
                WELL_CONDITIONED_GRAD)
  router_state  loss-free bias / ReMoE coefficient after the step (a sign rule of integer
                counts: any routing difference shows up in full)
  metrics       every other step metric (gradient norm, balance and z-losses, expert loads and
                counts, dropped fraction, ...)

Differences are relative norms per leaf, ||a - b|| / ||b||, the denominator floored at 1e-6 of
the quantity's whole norm (so a leaf that is zero on one device does not turn rounding into an
infinite ratio). A case can differ only by float rounding: capacity groups lie inside one
device's tokens (validation enforces it), routing noise is drawn on the global batch and
parameters are initialised from the same key on every mesh. Float32 tolerances: 2e-5 on
gradients and parameters, 1e-5 on the loss and metrics, 1e-6 on router state; the worst float32
rounding of `--cases=40 --seed=0` (2026-12-02, 38 cases) was 6.9e-6 on Soft MoE's scalar slot
scale (every other gradient leaf <= 6e-7), 4.0e-7 on the loss and 7.6e-7 on the metrics.
bfloat16 cases use 1000x. Where a mesh rounds a bf16 activation differently from one device
(a bf16-output product whose contraction the mesh splits is rounded per shard before the
cross-shard sum), a near-tie routing decision can flip, and one moved assignment changes the
router's gradient by a few percent; the per-case line says how many assignments moved.

    python -m moe_jax.fuzz --cases=40 --seed=0
    python -m moe_jax.fuzz --seed=0 --case=17          # rerun one case
    python -m moe_jax.fuzz --overrides='{"mesh.expert": 4, "model.moe.router": "soft"}'

A failure prints the config overrides (on `configs/default.py:tiny`) that reproduce it and makes
the run exit with status 1. `tests/test_fuzz.py` runs a fixed set of cases.
"""
from __future__ import annotations

import os
import sys

if __name__ == "__main__":
  # 8 emulated CPU devices; must precede the first JAX import (an importer sets up its own).
  _flags = os.environ.get("XLA_FLAGS", "")
  if "--xla_force_host_platform_device_count" not in _flags:
    _flags += " --xla_force_host_platform_device_count=8"
  if "--full_optimization" not in sys.argv and "--xla_backend_optimization_level" not in _flags:
    # FAST_COMPILE (below) for every compilation of the process, parameter init included.
    _flags += " --xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
  os.environ["XLA_FLAGS"] = _flags.strip()
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import argparse  # noqa: E402
import collections  # noqa: E402
import dataclasses  # noqa: E402
import functools  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
from typing import Any, Callable, Iterable  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

# configs/ is not a package: it is found in the checkout this module runs from.
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
  sys.path.insert(0, _ROOT)

from configs import default, routers  # noqa: E402
from moe_jax import data, expert_parallel, grad_accum, sharding, train  # noqa: E402
from moe_jax.validation import ConfigError, validate_config  # noqa: E402

NUM_DEVICES = 8
#: Every routing variant of configs/routers.py but the dense baseline and the two that only set
#: the dispatch (capacity, BPR), which is drawn separately.
ROUTER_VARIANTS = tuple(v for v in routers.VARIANTS
                        if v not in ("dense", "token_choice_capacity", "bpr"))
# Expert choice and Soft MoE take code paths of their own (no dispatch choice; Soft MoE no
# shard_map), so they are drawn 3x as often as each token-choice flavour.
_VARIANT_WEIGHTS = np.array([3.0 if v in ("expert_choice", "soft") else 1.0
                             for v in ROUTER_VARIANTS])
#: Mesh layouts (data, fsdp, expert, tensor) over at most 8 devices.
MESHES = (
    dict(data=8), dict(data=2, expert=4), dict(expert=8), dict(fsdp=2, expert=4),
    dict(data=2, expert=2, tensor=2), dict(fsdp=2, expert=2, tensor=2), dict(data=4, tensor=2),
    dict(fsdp=8), dict(expert=4), dict(data=2, fsdp=2, expert=2), dict(expert=2, tensor=4),
    dict(fsdp=4, tensor=2), dict(expert=4, tensor=2), dict(data=2, fsdp=2, tensor=2),
    dict(expert=2), dict(tensor=8),
)
QUANTITIES = ("loss", "grads", "params", "router_state", "metrics")
_FLOAT32_TOLERANCES = {"loss": 1e-5, "grads": 2e-5, "params": 2e-5, "router_state": 1e-6,
                       "metrics": 1e-5}
TOLERANCES = {"float32": _FLOAT32_TOLERANCES,
              "bfloat16": {q: 1000 * t for q, t in _FLOAT32_TOLERANCES.items()}}
MAX_DRAWS = 200  # per case; validation refuses a fraction of the draws
# Adam's first step moves a parameter by lr * g / (|g| + eps), eps = 1e-8 (optax.adamw's default):
# for |g| near or below eps that ratio turns the gradient's float rounding (relative to the
# leaf's largest entries) into an O(lr) change. Measured: one entry of 1,024 with g = 1.5e-9 vs
# 1.3e-9 made a 2e-5 relative parameter difference while the leaf's gradients agreed to 3e-7.
# Parameters are compared where |g| >= 1000 eps; the gradients themselves are compared in full.
WELL_CONDITIONED_GRAD = 1e-5
# The train step is compiled without XLA:CPU's LLVM optimisations (about half the compile time
# of these tiny models). The passes under test (SPMD partitioning, shard_map collectives) are
# HLO passes and run unchanged; both meshes of a case are compiled alike.
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


@dataclasses.dataclass(frozen=True)
class Case:
  """One drawn case: `overrides` (dotted path -> value) on configs/default.py:tiny."""
  index: int
  overrides: dict
  skipped: int = 0  # draws validation refused before this one
  variant: str = ""  # the configs/routers.py variant it was drawn from (for the summary)
  seed: int | None = None  # the run seed it was drawn with (None: given as overrides)

  def config(self):
    return config_from_overrides(self.overrides)


# ------------------------------------------------------------------------------------ drawing


def _set(config, path: str, value) -> None:
  node = config
  *parents, leaf = path.split(".")
  for name in parents:
    node = node[name]
  node[leaf] = value


def config_from_overrides(overrides: dict):
  """configs/default.py:tiny with `overrides` ({"model.moe.top_k": 2, ...}) applied."""
  config = default.get_config("tiny")
  for path, value in overrides.items():
    _set(config, path, value)
  return config


def _flatten(tree: dict, prefix: str = "") -> dict:
  flat = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      flat.update(_flatten(value, f"{prefix}{key}."))
    else:
      flat[f"{prefix}{key}"] = value
  return flat


def _overrides_of(config) -> dict:
  """The resolved fields of `config` that differ from configs/default.py:tiny."""
  base = _flatten(default.get_config("tiny").to_dict())
  drawn = _flatten(config.to_dict())
  return {path: value for path, value in drawn.items() if base.get(path, object()) != value}


def _pick(rng: np.random.Generator, options):
  value = options[int(rng.integers(len(options)))]
  return value.item() if isinstance(value, np.generic) else value


def draw_config(rng: np.random.Generator):
  """(one random config, maybe invalid; its router variant): the fuzzed dimensions, tiny model."""
  config = default.get_config("tiny")
  model, moe = config.model, config.model.moe
  model.num_layers = _pick(rng, (1, 2))
  model.moe_every = _pick(rng, (1, 2)) if model.num_layers == 2 else 1
  model.remat = _pick(rng, (False, True))
  model.activation = _pick(rng, ("swiglu", "gelu"))
  if rng.random() < 0.15:
    model.dtype = model.param_dtype = "bfloat16"
  moe.num_experts = _pick(rng, (4, 8))
  moe.top_k = _pick(rng, (1, 2))
  moe.num_shared_experts = _pick(rng, (0, 1))
  config.data.batch_size = _pick(rng, (8, 16))
  config.data.seq_len = _pick(rng, (16, 32))
  config.seed = int(rng.integers(1000))
  config.train.warmup_steps = 0  # a non-zero learning rate at step 0: the update is compared
  config.train.grad_accum_steps = _pick(rng, (1, 2))

  variant = str(rng.choice(ROUTER_VARIANTS, p=_VARIANT_WEIGHTS / _VARIANT_WEIGHTS.sum()))
  routers.apply_router(config, variant)
  moe.allow_noncausal = True  # the fuzzer checks parallelism, not causality
  moe.group_by = _pick(rng, ("sequence", "position"))
  moe.group_size = _pick(rng, (0, 0, 0, 8))
  if moe.router == "expert_choice":
    moe.capacity_factor = _pick(rng, (1.0, 1.5, 2.0))
  elif moe.router != "soft":
    dispatch = _pick(rng, ("dropless", "dropless", "capacity", "bpr"))
    if dispatch != "dropless":
      moe.capacity_factor = _pick(rng, (1.0, 1.5))
      moe.capacity_priority = "score" if dispatch == "bpr" else "position"
  dropless = moe.capacity_factor is None and moe.router != "expert_choice"
  moe.ep_exchange = _pick(rng, expert_parallel.EXCHANGES if dropless else
                          tuple(e for e in expert_parallel.EXCHANGES if e != "ragged_all_to_all"))
  if moe.ep_exchange == "ragged_all_to_all":
    moe.ep_recv_buffer_factor = _pick(rng, (0.0, 1.0, 2.0))
  layout = _pick(rng, MESHES)
  for axis in sharding.MESH_AXES:
    config.mesh[axis] = layout.get(axis, 1)
  return config, variant


def _single_device_config(config):
  single = config_from_overrides(_overrides_of(config))
  for axis in sharding.MESH_AXES:
    single.mesh[axis] = 1
  return single


def _validate(config) -> str | None:
  """Why `config` (on 8 devices) or its one-device twin is refused, or None."""
  try:
    validate_config(config, num_devices=NUM_DEVICES)
    validate_config(_single_device_config(config), num_devices=1)
  except ConfigError as e:
    return str(e)
  return None


def draw_case(seed: int, index: int) -> Case:
  """Case `index` of run `seed`: redraws from default_rng(seed + index) until a config validates."""
  rng = np.random.default_rng(seed + index)
  for skipped in range(MAX_DRAWS):
    config, variant = draw_config(rng)
    if _validate(config) is None:
      return Case(index, _overrides_of(config), skipped, variant, seed)
  raise RuntimeError(f"case {index} of seed {seed}: no valid config in {MAX_DRAWS} draws.")


def summary(config, variant: str = "") -> str:
  """A short description of a case's config, for the per-case line."""
  model, moe = config.model, config.model.moe
  mesh = "".join(f"{axis[0]}{config.mesh[axis]}" for axis in sharding.MESH_AXES
                 if config.mesh[axis] != 1) or "1"
  if moe.router == "soft":
    dispatch = f"slots{moe.soft_slots_per_expert}"
  elif moe.capacity_factor is None:
    dispatch = "dropless"
  else:
    bpr = "bpr" if moe.capacity_priority == "score" and moe.router != "expert_choice" else "cap"
    dispatch = f"{bpr}{moe.capacity_factor:g}"
  exchange = {"all_to_all": "a2a", "allgather": "ag", "ragged_all_to_all": "ragged"}[
      moe.ep_exchange]
  if moe.ep_exchange == "ragged_all_to_all":
    exchange += f"{moe.ep_recv_buffer_factor:g}"
  if config.mesh.expert == 1:
    exchange = "-"  # no exchange without expert parallelism
  parts = [variant or _variant_name(config), dispatch, mesh, exchange,
           f"L{model.num_layers}/{model.moe_every}", f"E{moe.num_experts}", f"K{moe.top_k}",
           f"B{config.data.batch_size}x{config.data.seq_len}", moe.group_by[:3]
           + (f"{moe.group_size}" if moe.group_size else ""),
           f"acc{config.train.grad_accum_steps}", "bf16" if model.dtype == "bfloat16" else "f32"]
  if model.remat:
    parts.append("remat")
  if moe.num_shared_experts:
    parts.append(f"shared{moe.num_shared_experts}")
  if model.activation != "swiglu":
    parts.append(model.activation)
  return " ".join(parts)


def features(config) -> set[str]:
  """The parallelism features a case exercises (for coverage counts and the CI case set)."""
  moe, mesh = config.model.moe, config.mesh
  found = {f"router:{moe.router}"}
  if mesh.expert > 1:
    found.add("expert_parallel")
    if moe.router != "soft":  # Soft MoE's slots are sharded by GSPMD, without an exchange
      found.add(f"exchange:{moe.ep_exchange}")
  found.update(axis for axis in ("fsdp", "tensor") if mesh[axis] > 1)
  if moe.router not in ("soft", "expert_choice"):
    found.add("dropless" if moe.capacity_factor is None else
              "bpr" if moe.capacity_priority == "score" else "capacity")
  if config.train.grad_accum_steps > 1:
    found.add("grad_accum")
  if config.model.remat:
    found.add("remat")
  if config.model.dtype == "bfloat16":
    found.add("bfloat16")
  if moe.group_by == "position":
    found.add("group_by:position")
  if moe.num_shared_experts:
    found.add("shared_experts")
  return found


def _variant_name(config) -> str:
  moe = config.model.moe
  if moe.router != "token_choice":
    return moe.router
  for field, name in (("num_null_experts", "null"), ("num_zero_experts", "moe++"),
                      ("num_expert_groups", "deepseek_v3"), ("importance_loss_weight", "vmoe"),
                      ("bias_update_rate", "loss_free"), ("router_jitter", "jitter")):
    if moe.get(field, 0) and (field != "num_expert_groups" or moe[field] > 1):
      return name
  if moe.balance_scope == "micro_batch":
    return "micro_batch_balance"
  return "token_choice"


# ---------------------------------------------------------------------------------- the step


def _batch(config) -> dict:
  """Batch 0 of the training stream, the same global batch for every mesh (NumPy)."""
  return _dataset(config.data.task, config.data.seq_len).train_batch(
      0, config.data.batch_size, config.seed)


@functools.lru_cache(maxsize=None)
def _dataset(task: str, seq_len: int):
  config = default.get_config("tiny").data
  config.task, config.seq_len = task, seq_len
  return data.load_dataset(config, "train")


def run_train_step(config, devices, fast_compile: bool = True) -> dict:
  """One `train.train_step` from the step-0 state on `config.mesh` over `devices`.

  Returns {"loss", "grads", "params", "router_state", "metrics"}: nested dicts of NumPy arrays
  (float64 for the comparison). "grads" are Adam's first moments, (1 - b1) * clipped gradients.
  """
  mesh = sharding.make_mesh(config.mesh, devices=devices)
  tx, _ = train.make_optimizer(config.train)
  options = FAST_COMPILE if fast_compile else None
  # Outside the mesh context (see train.train_and_evaluate).
  graphdef, state = train.fresh_state(config, mesh, tx, compiler_options=options)
  batch = jax.device_put(_batch(config), sharding.batch_sharding(mesh))
  step = functools.partial(train.train_step, graphdef=graphdef, tx=tx, seed=config.seed,
                           grad_accum_steps=config.train.grad_accum_steps,
                           global_balance=grad_accum.needs_global_load(config.model))
  with jax.set_mesh(mesh):
    compiled = jax.jit(step).lower(state, batch).compile(options)
    new_state, metrics = compiled(state, batch)
  new_state, metrics = jax.device_get((new_state, metrics))
  as_f64 = lambda tree: jax.tree.map(lambda x: np.asarray(x, np.float64), tree)
  moments = [s.mu for s in jax.tree.leaves(new_state["opt_state"],
                                           is_leaf=lambda s: isinstance(s, optax.ScaleByAdamState))
             if isinstance(s, optax.ScaleByAdamState)]
  losses = {name: metrics.pop(name) for name in ("loss", "total_loss")}
  grads = as_f64(moments[0])
  threshold = (1 - config.train.b1) * WELL_CONDITIONED_GRAD
  return {"loss": as_f64(losses), "grads": grads, "params": as_f64(new_state["params"]),
          "router_state": as_f64(new_state.get("router_state", {})), "metrics": as_f64(metrics),
          "params_compared": jax.tree.map(lambda g: np.abs(g) >= threshold, grads)}


def relative_differences(results: dict, reference: dict) -> dict[str, tuple[float, str]]:
  """Per quantity: (worst relative leaf difference, that leaf's path); (0.0, "") when empty.

  A leaf's difference is ||a - b|| / max(||b||, 1e-6 ||all of b's quantity||); inf when the
  trees, shapes or finiteness disagree. Parameters are compared where the reference gradient is
  at least WELL_CONDITIONED_GRAD (see there).
  """
  out = {}
  for quantity in QUANTITIES:
    ref_leaves, ref_tree = jax.tree_util.tree_flatten_with_path(reference[quantity])
    leaves, tree = jax.tree_util.tree_flatten_with_path(results[quantity])
    if tree != ref_tree:
      out[quantity] = (float("inf"), f"tree structure {tree} != {ref_tree}")
      continue
    masks = (jax.tree.leaves(reference["params_compared"]) if quantity == "params" else
             [True] * len(ref_leaves))
    total = np.sqrt(sum(float(np.sum(np.square(x))) for _, x in ref_leaves))
    worst, where = 0.0, ""
    for (path, ref), (_, value), mask in zip(ref_leaves, leaves, masks):
      name = jax.tree_util.keystr(path)
      if value.shape != ref.shape or not np.isfinite(value).all():
        rel = float("inf")
      else:
        diff = float(np.linalg.norm(np.where(mask, value - ref, 0.0).ravel()))
        scale = max(float(np.linalg.norm(ref.ravel())), 1e-6 * total)
        rel = 0.0 if diff == 0 else diff / scale if scale > 0 else float("inf")
      if rel > worst or not where:
        worst, where = rel, name
    out[quantity] = (worst, where)
  return out


# ----------------------------------------------------------------------------------- the cases


_REFERENCES: dict[str, dict] = {}


def _reference(config, fast_compile: bool = True) -> dict:
  """The one-device result of `config`, cached on the fields that can change it.

  The mesh and the exchange (which only exists between devices) are left out of the key, so
  cases that differ only there share one compilation.
  """
  single = _single_device_config(config)
  fields = {k: v for k, v in _overrides_of(single).items()
            if not k.startswith("mesh.") and not k.startswith("model.moe.ep_")}
  key = json.dumps([fields, fast_compile], sort_keys=True, default=str)
  if key not in _REFERENCES:
    _REFERENCES[key] = run_train_step(single, jax.devices()[:1], fast_compile)
  return _REFERENCES[key]


@dataclasses.dataclass
class Outcome:
  case: Case
  summary: str
  differences: dict  # quantity -> (worst, leaf)
  tolerances: dict
  seconds: float
  error: str = ""
  moved: int = 0  # routing assignments whose expert differs (at least; from expert counts)

  @property
  def failed_quantities(self) -> list[str]:
    return [q for q, (worst, _) in self.differences.items() if not worst <= self.tolerances[q]]

  @property
  def passed(self) -> bool:
    return not self.error and not self.failed_quantities


def run_case(case: Case, tolerance_scale: float = 1.0, fast_compile: bool = True) -> Outcome:
  """Runs `case` on its mesh and on one device and compares every quantity."""
  config = case.config()
  tolerances = {q: t * tolerance_scale for q, t in TOLERANCES[_dtype(config)].items()}
  start = time.perf_counter()
  try:
    reference = _reference(config, fast_compile)
    results = run_train_step(config, jax.devices()[:NUM_DEVICES], fast_compile)
    differences = relative_differences(results, reference)
    moved = moved_assignments(results, reference)
    error = ""
  except Exception as e:  # a crash on a config validation accepts is a finding too
    differences = {q: (float("nan"), "") for q in QUANTITIES}
    moved = 0
    error = "".join(traceback.format_exception(e)[-6:])
  return Outcome(case, summary(config, case.variant), differences, tolerances,
                 time.perf_counter() - start, error, moved)


def moved_assignments(results: dict, reference: dict) -> int:
  """Assignments routed to another expert than on one device: half the L1 distance of every MoE
  layer's expert counts (a lower bound: two swapped assignments leave the counts equal)."""
  return int(round(sum(np.abs(value - reference["metrics"][name]).sum() / 2
                       for name, value in results["metrics"].items()
                       if name.endswith("/expert_counts"))))


def format_outcome(outcome: Outcome) -> str:
  diffs = " ".join(f"{q} {worst:.1e}" for q, (worst, _) in outcome.differences.items())
  status = "ERROR" if outcome.error else "PASS" if outcome.passed else "FAIL"
  moved = f" | routing moved {outcome.moved}" if outcome.moved else ""
  return (f"case {outcome.case.index:3d} {status:5s} {outcome.summary} | {diffs}{moved} | "
          f"{outcome.seconds:.1f}s")


def reproducer(outcome: Outcome) -> str:
  """Lines that rerun a case: by seed and index (a drawn case) and by its explicit overrides."""
  case = outcome.case
  lines = [f"  rerun: python -m moe_jax.fuzz --seed={case.seed} --case={case.index}"
           ] if case.seed is not None else []
  lines.append("  overrides on configs/default.py:tiny: python -m moe_jax.fuzz "
               f"--overrides='{json.dumps(case.overrides, sort_keys=True)}'")
  for quantity in outcome.failed_quantities:
    worst, leaf = outcome.differences[quantity]
    lines.append(f"  {quantity}: {worst:.3g} > {outcome.tolerances[quantity]:.3g} at {leaf}")
  if outcome.error:
    lines.append("  " + outcome.error.strip().replace("\n", "\n  "))
  return "\n".join(lines)


def _dtype(config) -> str:
  return "bfloat16" if "bfloat16" in (config.model.dtype, config.model.param_dtype) else "float32"


def fuzz(cases: Iterable[Case], *, seed: int | None = None, tolerance_scale: float = 1.0,
         fast_compile: bool = True, time_budget_s: float | None = None,
         log: Callable[[str], Any] = print) -> dict:
  """Runs `cases`, logging one line each (and a reproducer per failure); returns the summary.

  With `time_budget_s`, no case starts after that many seconds (the rest are not drawn).
  """
  start = time.perf_counter()
  outcomes = []
  worst: dict[tuple[str, str], tuple[float, Outcome]] = {}  # (dtype, quantity) -> worst
  stopped = False
  for case in cases:
    if time_budget_s is not None and time.perf_counter() - start > time_budget_s:
      stopped = True
      break
    outcome = run_case(case, tolerance_scale, fast_compile)
    outcomes.append(outcome)
    log(format_outcome(outcome))
    if not outcome.passed:
      log(reproducer(outcome))
    dtype = _dtype(case.config())
    for q, (diff, _) in outcome.differences.items():
      if not np.isnan(diff) and ((dtype, q) not in worst or diff > worst[dtype, q][0]):
        worst[dtype, q] = (diff, outcome)
  failures = [o for o in outcomes if not o.passed]
  return {
      "seed": seed,
      "tolerance_scale": tolerance_scale,
      "cases": len(outcomes),
      "stopped_by_time_budget": stopped,
      "draws": sum(o.case.skipped + 1 for o in outcomes),
      "skipped_invalid": sum(o.case.skipped for o in outcomes),
      "coverage": dict(sorted(collections.Counter(
          f for o in outcomes for f in features(o.case.config())).items())),
      "failures": [{"case": o.case.index, "summary": o.summary, "error": o.error,
                    "failed": o.failed_quantities, "overrides": o.case.overrides}
                   for o in failures],
      "worst": {f"{dtype}/{q}": {"difference": diff, "case": o.case.index, "summary": o.summary,
                                 "leaf": o.differences[q][1], "tolerance": o.tolerances[q]}
                for (dtype, q), (diff, o) in sorted(worst.items())},
      "per_case": [{"case": o.case.index, "summary": o.summary, "passed": o.passed,
                    "seconds": round(o.seconds, 2), "error": o.error, "routing_moved": o.moved,
                    "differences": {q: d for q, (d, _) in o.differences.items()},
                    "worst_leaves": {q: leaf for q, (_, leaf) in o.differences.items()}}
                   for o in outcomes],
  }


def format_summary(result: dict) -> str:
  lines = [f"seed {result['seed']}: {result['draws']} draws, {result['cases']} valid cases run, "
           f"{result['skipped_invalid']} skipped (invalid), {len(result['failures'])} failures"
           + (" (stopped by the time budget)" if result["stopped_by_time_budget"] else "")]
  for name, w in result["worst"].items():
    lines.append(f"  worst {name:21s} {w['difference']:.2e} (tolerance {w['tolerance']:.0e}) "
                 f"case {w['case']}: {w['summary']} {w['leaf']}")
  coverage = ", ".join(f"{k} {v}" for k, v in result["coverage"].items())
  lines.append(f"  coverage (cases): {coverage}")
  for f in result["failures"]:
    lines.append(f"  FAILED case {f['case']}: {f['summary']} ({', '.join(f['failed']) or 'error'})")
  return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m moe_jax.fuzz",
                                   description=__doc__.split("\n")[0])
  parser.add_argument("--cases", type=int, default=20, help="cases to draw and run")
  parser.add_argument("--seed", type=int, default=0, help="case i draws from default_rng(seed + i)")
  parser.add_argument("--tolerance", type=float, default=1.0, help="scales every tolerance")
  parser.add_argument("--case", type=int, default=None, help="run only this case index")
  parser.add_argument("--overrides", type=str, default=None,
                      help="run one case given as JSON overrides on configs/default.py:tiny")
  parser.add_argument("--json_out", type=str, default=None, help="write the summary here (JSON)")
  parser.add_argument("--max_minutes", type=float, default=None,
                      help="start no case after this many minutes (a prefix of the cases runs)")
  parser.add_argument("--full_optimization", action="store_true",
                      help="compile with XLA:CPU's LLVM optimisations (slower; see FAST_COMPILE)")
  args = parser.parse_args(argv)
  jax.config.update("jax_default_matmul_precision", "highest")
  if len(jax.devices()) < NUM_DEVICES:
    raise SystemExit(f"needs {NUM_DEVICES} devices, found {len(jax.devices())}: run with "
                     "XLA_FLAGS=--xla_force_host_platform_device_count=8 JAX_PLATFORMS=cpu.")
  start = time.perf_counter()
  if args.overrides is not None:
    overrides = json.loads(args.overrides)
    reason = _validate(config_from_overrides(overrides))
    if reason:
      raise SystemExit(reason)
    cases = [Case(args.case or 0, overrides)]
  elif args.case is not None:
    cases = [draw_case(args.seed, args.case)]
  else:
    cases = (draw_case(args.seed, i) for i in range(args.cases))
  result = fuzz(cases, seed=None if args.overrides is not None else args.seed,
                tolerance_scale=args.tolerance,
                fast_compile=not args.full_optimization,
                time_budget_s=None if args.max_minutes is None else 60 * args.max_minutes)
  result["wall_seconds"] = round(time.perf_counter() - start, 1)
  print(format_summary(result))
  print(f"wall time {result['wall_seconds']:.0f}s on {jax.default_backend()} "
        f"({len(jax.devices())} devices)")
  if args.json_out:
    with open(args.json_out, "w") as f:
      json.dump(result, f, indent=2, default=float)
  return 1 if result["failures"] else 0


if __name__ == "__main__":
  sys.exit(main())
