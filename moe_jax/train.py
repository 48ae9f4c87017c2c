"""Training and evaluation: pure, jitted step functions over explicit shardings, and the loop.

The model lives as (graphdef, params[, router_state]): nested dicts of arrays (nnx pure dicts),
merged back into the NNX module inside the step. `router_state` holds the rule-updated router
variables (auxiliary-loss-free bias, ReMoE's L1 coefficient; `moe_jax.router_state`), which the
optimizer never sees; models without them have none. The training state is a plain pytree
{"step", "params", "opt_state"[, "router_state"]} that orbax saves and restores. Batch number s is a pure function of
s (see `data.TokenDataset.train_batch`), so a resumed run sees exactly the batches it would have seen.

Fine-tuning (`config.init`, configs/finetune.py): with `init.hf_path` (a Hugging Face checkpoint)
or `init.workdir` (a converted or trained workdir) the model section comes from that checkpoint
(`resolve_config`), the parameters are loaded from it onto the training mesh instead of the random
init, and the optimizer starts fresh at step 0; a workdir that already holds checkpoints resumes
as usual without reading the source's parameters again. `init.freeze_router` /
`init.freeze_experts` zero the updates of the router / expert parameters (`make_optimizer`).
"""
from __future__ import annotations

import copy
import functools
import json
import math
import os
import shutil
import time
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from flax import nnx

from moe_jax import checkpoint, data, grad_accum, sharding
from moe_jax.models.transformer import Transformer
from moe_jax.router_state import RouterState
from moe_jax.validation import validate_config

State = dict[str, Any]


# ------------------------------------------------------------------------------------- the model


def abstract_model(config, mesh):
  """(graphdef, abstract params (ShapeDtypeStructs with their shardings), param shardings)."""
  abstract = nnx.eval_shape(lambda: Transformer(config.model, rngs=nnx.Rngs(params=config.seed)))
  graphdef, abstract_params, _ = nnx.split(abstract, nnx.Param, RouterState)
  shardings = sharding.state_shardings(mesh, abstract_params)
  abstract_params = jax.tree.map(
      lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
      nnx.to_pure_dict(abstract_params), shardings)
  return graphdef, abstract_params, shardings


def build_model(config, mesh, compiler_options: dict | None = None):
  """Returns (graphdef, params, param_shardings); params are initialised directly sharded.

  `nnx.merge(graphdef, params, router_state)` is the model, with `router_state` from
  `init_router_state` (an empty dict, which may be left out, for routers without state).
  `compiler_options` go to XLA for the init (the fuzzer compiles unoptimised to save time).
  """
  seed = config.seed

  def create():
    return Transformer(config.model, rngs=nnx.Rngs(params=seed))

  abstract = nnx.eval_shape(create)
  graphdef, abstract_params, _ = nnx.split(abstract, nnx.Param, RouterState)
  shardings = sharding.state_shardings(mesh, abstract_params)

  init = jax.jit(lambda: nnx.to_pure_dict(nnx.state(create(), nnx.Param)),
                 out_shardings=shardings)
  return graphdef, init.lower().compile(compiler_options)(), shardings


# ------------------------------------------------------------------ starting from a checkpoint

# The `config.init` section (configs/finetune.py); a config without it trains from scratch.
INIT_DTYPES = ("", "float32", "bfloat16", "float16")
# Name fragments of the parameters each freeze flag fixes (a path component containing one).
FREEZE_FRAGMENTS = {"freeze_router": "router", "freeze_experts": "experts"}


def init_source(config) -> tuple[str, str] | None:
  """("hf", path) for `config.init.hf_path`, ("workdir", path) for `init.workdir`, else None.

  Raises:
    ValueError: both are set.
  """
  init = config.get("init")
  if not init:
    return None
  hf_path, workdir = init.get("hf_path") or "", init.get("workdir") or ""
  if hf_path and workdir:
    raise ValueError(f"config.init.hf_path={hf_path!r} and config.init.workdir={workdir!r} are "
                     "both set; give one checkpoint to start from.")
  if hf_path:
    return "hf", hf_path
  if workdir:
    return "workdir", workdir
  return None


def _flat(tree: dict, prefix: str = "") -> dict:
  out = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      out.update(_flat(value, f"{prefix}{key}."))
    else:
      out[f"{prefix}{key}"] = tuple(value) if isinstance(value, list) else value
  return out


def _changed_model_fields(model) -> list[str]:
  """`config.model` fields that differ from configs/default.py's (they would be ignored)."""
  from moe_jax.hf import common  # pylint: disable=g-import-not-at-top

  ours = _flat(model.to_dict())
  default = _flat(common.default_experiment_config().model.to_dict())
  return [f"model.{k}={ours.get(k)!r}" for k in sorted(set(ours) | set(default))
          if ours.get(k) != default.get(k)]


def resolve_config(config):
  """The config a run trains: with `config.init` naming a checkpoint, the model is the checkpoint's.

  `config.model` is replaced entirely by the checkpoint's model section: the hub config of
  `init.hf_path` (`moe_jax.hf.api.config_from_hub`, which adds the `hf` section) or the
  config.json of `init.workdir` (with its `hf` section, if converted). `config.model` itself must
  keep configs/default.py's values, since it would be ignored; the training-side choices are
  `init.dtype` ("" = the checkpoint's parameter and compute dtype), `init.remat`, and
  `init.load_balance_loss_weight` / `init.router_z_loss_weight` (None = the checkpoint's: the hub
  config's router_aux_loss_coef and no z-loss, or the workdir's values). With `data.tokenizer`
  empty it becomes the checkpoint's tokenizer: HF_PATH/tokenizer.json or WORKDIR/tokenizer/, when
  present (a source without one keeps the byte vocabulary, which validation accepts only for a
  vocabulary of >= 259 ids). A config without a source, or one already resolved (its model is
  the checkpoint's), is returned as it is (a copy, when resolved).

  Raises:
    ValueError: both sources, a changed `config.model`, or an unsupported checkpoint config
      (`moe_jax.hf.UnsupportedConfigError`); FileNotFoundError: no config.json at the source.
  """
  source = init_source(config)
  if source is None:
    return config
  kind, path = source
  init = config.init
  dtype = init.get("dtype") or None
  if kind == "hf":
    from moe_jax.hf import api  # pylint: disable=g-import-not-at-top

    imported = api.config_from_hub(api.read_hub_config(path), dtype=dtype)
    model, hf = imported.model, imported.hf
    tokenizer_dir = path
  else:
    from moe_jax import sample  # pylint: disable=g-import-not-at-top  (sample imports train)

    saved = sample.load_config(path)
    model, hf = saved.model, saved.get("hf")
    if dtype:
      model.dtype = model.param_dtype = dtype
    tokenizer_dir = os.path.join(path, "tokenizer")
  if init.get("remat"):
    model.remat = True
  for name in ("load_balance_loss_weight", "router_z_loss_weight"):
    if init.get(name) is not None:
      model.moe[name] = float(init[name])
  # A resolved config (e.g. a fine-tuning workdir's config.json) resolves to itself.
  if _flat(config.model.to_dict()) != _flat(model.to_dict()):
    changed = _changed_model_fields(config.model)
    if changed:
      raise ValueError(
          f"config.init.{'hf_path' if kind == 'hf' else 'workdir'}={path!r} gives the model "
          "section, so config.model must keep configs/default.py's values; changed: "
          f"{', '.join(changed)}. Set training-side options in config.init (dtype, remat, "
          "load_balance_loss_weight, router_z_loss_weight).")
  resolved = copy.deepcopy(config)
  with resolved.unlocked():
    resolved.model = model
    if hf is not None:
      resolved.hf = copy.deepcopy(hf)
    if (not resolved.data.get("tokenizer")
        and os.path.isfile(os.path.join(tokenizer_dir, "tokenizer.json"))):
      resolved.data.tokenizer = tokenizer_dir
  return resolved


def frozen_fragments(config) -> tuple[str, ...]:
  """Name fragments of the frozen parameters (`config.init.freeze_*`); () when none."""
  init = config.get("init") or {}
  return tuple(fragment for flag, fragment in FREEZE_FRAGMENTS.items() if init.get(flag, False))


def param_labels(params, frozen: Sequence[str]):
  """"frozen" for every parameter with a path component containing a fragment of `frozen`
  (router: blocks/i/ffn/router/*; experts: the routed and shared experts), else "trained"."""
  def label(path, _):
    names = [str(getattr(k, "key", getattr(k, "idx", k))) for k in path]
    return "frozen" if any(f in name for name in names for f in frozen) else "trained"

  return jax.tree_util.tree_map_with_path(label, params)


def _has_checkpoint(workdir: str) -> bool:
  directory = os.path.join(workdir, "checkpoints")
  return os.path.isdir(directory) and any(s.isdigit() for s in os.listdir(directory))


def params_from_source(config, mesh) -> tuple[Any, dict, Any, dict]:
  """(graphdef, params, param_shardings, router_state) read from `config.init`'s checkpoint.

  The parameters are placed with the training shardings as they are read (no random init):
  `moe_jax.hf.api.load_params` for `init.hf_path`; for `init.workdir` the params (and router
  state, when the model has any) of its latest checkpoint, in `config.model.param_dtype`.
  """
  kind, path = init_source(config)
  graphdef, abstract, shardings = abstract_model(config, mesh)
  router_state = init_router_state(config, mesh)
  if kind == "hf":
    from moe_jax.hf import api  # pylint: disable=g-import-not-at-top

    params = api.load_params(path, config, mesh)
    params = jax.tree.map(jax.device_put, params, shardings)  # a no-op where already placed
    return graphdef, params, shardings, router_state
  if not _has_checkpoint(path):
    raise FileNotFoundError(f"config.init.workdir={path!r} holds no checkpoint.")
  ckpt = checkpoint.Checkpointer(path, keep=config.train.keep_checkpoints)
  try:
    step = ckpt.latest_step()
    restored = ckpt.restore_params(
        step, abstract, checkpoint.abstract_like(router_state) if router_state else None)
  finally:
    ckpt.close()
  logging.info("Read the parameters of step %d of %s.", step, path)
  return graphdef, restored["params"], shardings, restored.get("router_state", router_state)


def copy_tokenizer(tokenizer: str, workdir: str) -> None:
  """Copies data.tokenizer's files to WORKDIR/tokenizer/ (read by moe_jax.sample and convert)."""
  from moe_jax.hf import tokenizer as hf_tokenizer  # pylint: disable=g-import-not-at-top

  file = data.tokenizer_file(tokenizer)
  target = os.path.join(workdir, "tokenizer")
  if os.path.isfile(os.path.join(target, "tokenizer.json")) and os.path.samefile(
      os.path.join(target, "tokenizer.json"), file):
    return
  if os.path.basename(file) == "tokenizer.json":
    hf_tokenizer.copy_tokenizer_files(os.path.dirname(file), target)
  else:
    os.makedirs(target, exist_ok=True)
    shutil.copyfile(file, os.path.join(target, "tokenizer.json"))


def init_router_state(config, mesh) -> dict:
  """The initial rule-updated router variables (pure dict, replicated); {} when there are none."""
  model = nnx.eval_shape(lambda: Transformer(config.model, rngs=nnx.Rngs(params=config.seed)))
  if not jax.tree.leaves(nnx.state(model, RouterState)):
    return {}

  @functools.partial(jax.jit, out_shardings=sharding.replicated(mesh))
  def init():
    fresh = Transformer(config.model, rngs=nnx.Rngs(params=config.seed))
    return nnx.to_pure_dict(nnx.state(fresh, RouterState))

  return init()


def routing_key(seed: int, step: jax.Array) -> jax.Array:
  """The PRNG key of a training step's routing noise (a pure function of seed and step)."""
  return jax.random.fold_in(jax.random.key(seed ^ 0x5EED), step)


def count_params(params) -> int:
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))


SCHEDULES = ("cosine", "wsd")


def schedule_horizon(train_config) -> int:
  """The step count the learning-rate schedule is laid out over: train.schedule_steps or steps."""
  return train_config.get("schedule_steps", 0) or train_config.steps


def make_schedule(train_config, horizon: int | None = None) -> optax.Schedule:
  """The learning rate per step over `horizon` steps (default `schedule_horizon(train_config)`).

  "cosine": linear warmup to the peak, cosine decay to `end_learning_rate_fraction` * peak at
  the horizon. "wsd" (warmup-stable-decay; Hu et al., "MiniCPM", 2024, Sec. 4.1; DeepSeek-V3 2024
  keeps a constant rate before its decay): linear warmup, the peak held, then a linear decay to
  the end value over the last `decay_fraction` of the horizon. Both hold the end value after the
  horizon, so a run continued past it never sees the rate jump back up. A WSD run can be extended
  (a larger horizon) while it is in its stable phase without changing any rate it already used.
  """
  horizon = horizon or schedule_horizon(train_config)
  peak, warmup = train_config.learning_rate, train_config.warmup_steps
  end = peak * train_config.end_learning_rate_fraction
  kind = train_config.get("schedule", "cosine")
  if kind == "cosine":
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=peak, warmup_steps=warmup,
        decay_steps=max(horizon, warmup + 1), end_value=end)
  if kind == "wsd":
    decay = max(1, round(train_config.get("decay_fraction", 0.1) * horizon))
    stable_end = max(warmup, horizon - decay)
    return optax.join_schedules(
        [optax.linear_schedule(0.0, peak, max(warmup, 1)),
         optax.constant_schedule(peak),
         optax.linear_schedule(peak, end, max(horizon - stable_end, 1))],
        boundaries=[warmup, stable_end])
  raise ValueError(f"train.schedule={kind!r} is not one of {SCHEDULES}.")


def make_optimizer(train_config, horizon: int | None = None, *, frozen: Sequence[str] = ()
                   ) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """AdamW on `make_schedule(train_config, horizon)` with global-norm clipping; decay on matrices.

  `frozen`: name fragments (`param_labels`) of parameters whose updates are zero
  (`optax.set_to_zero`: they stay bit-identical, hold no Adam moments and do not count in the
  clipping norm); see `frozen_fragments`.
  """
  schedule = make_schedule(train_config, horizon)
  decay_mask = lambda params: jax.tree.map(lambda x: x.ndim >= 2, params)
  tx = optax.adamw(schedule, b1=train_config.b1, b2=train_config.b2,
                   weight_decay=train_config.weight_decay, mask=decay_mask)
  if train_config.grad_clip_norm:
    tx = optax.chain(optax.clip_by_global_norm(train_config.grad_clip_norm), tx)
  if frozen:
    tx = optax.multi_transform({"trained": tx, "frozen": optax.set_to_zero()},
                               functools.partial(param_labels, frozen=tuple(frozen)))
  return tx, schedule


def resumed_horizon(train_config, saved: int | None, step: int) -> tuple[int, str]:
  """The schedule horizon of a run resumed at `step` whose checkpoint saved horizon `saved`.

  A resume never changes the schedule silently: with `train.schedule_steps` unset (0) the saved
  horizon is kept even when `train.steps` grew (steps past it hold the final rate); an explicit
  `train.schedule_steps` replaces it. Returns (horizon, a log line saying which happened).
  """
  requested = train_config.get("schedule_steps", 0) or 0
  if saved is None:  # a checkpoint written before horizons were saved
    horizon = schedule_horizon(train_config)
    return horizon, (f"checkpoint holds no schedule horizon; using {horizon} from the config")
  if requested and requested != saved:
    old = float(make_schedule(train_config, saved)(step))
    new = float(make_schedule(train_config, requested)(step))
    return requested, (f"train.schedule_steps={requested} replaces the saved schedule horizon "
                       f"{saved}: learning rate at step {step} {old:.3g} -> {new:.3g}")
  if train_config.steps > saved:
    final = float(make_schedule(train_config, saved)(saved))
    return saved, (f"keeping the saved schedule horizon {saved} (train.steps={train_config.steps}):"
                   f" steps past {saved} hold the final learning rate {final:.3g}; set "
                   "train.schedule_steps to lay the schedule over a new horizon")
  return saved, f"schedule horizon {saved} (saved with the checkpoint)"


def fresh_state(config, mesh, tx, compiler_options: dict | None = None) -> tuple[Any, State]:
  """(graphdef, the step-0 training state {"step", "params", "opt_state"[, "router_state"]}).

  For tools that run `train_step` outside the loop (benchmarks, tests, the fuzzer); the loop
  builds its own state with shardings and the saved schedule horizon. `compiler_options`: as
  for `build_model`.
  """
  graphdef, params, _ = build_model(config, mesh, compiler_options)
  router_state = init_router_state(config, mesh)
  state = {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": tx.init(params)}
  if router_state:
    state["router_state"] = router_state
  return graphdef, state


def optimizer_shardings(tx, params, param_shardings, mesh):
  """Optimizer-state shardings: moments shard like their parameters, counters are replicated.

  Frozen parameters (`make_optimizer(frozen=...)`) have no moments: `optax.MaskedNode`s stay.
  """
  abstract_state = jax.eval_shape(tx.init, params)
  masked = lambda x: isinstance(x, optax.MaskedNode)  # noqa: E731
  return optax.tree_map_params(
      tx, lambda leaf, param_sharding: leaf if masked(leaf) else param_sharding, abstract_state,
      param_shardings, transform_non_params=lambda _: sharding.replicated(mesh), is_leaf=masked)


# ------------------------------------------------------------------------------------- the steps


def loss_fn(params, batch, graphdef, router_state=None, *, train: bool = False,
            rng: jax.Array | None = None) -> tuple[jax.Array, tuple[jax.Array, dict]]:
  """Token-weighted mean cross-entropy plus the MoE auxiliary loss; returns (total, (ce, aux)).

  With `train`, the MoE layers update their router state and `aux["router_state"]` holds the new
  values (when the model has any); `rng` drives the training-time routing noise.
  """
  model = nnx.merge(graphdef, params, router_state or {})
  logits, aux = model(batch["inputs"], train=train, rng=rng)
  if train and router_state:
    aux = dict(aux, router_state=nnx.to_pure_dict(nnx.state(model, RouterState)))
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"])
  weights = batch["weights"]
  ce_loss = jnp.sum(ce * weights) / jnp.maximum(jnp.sum(weights), 1.0)
  return ce_loss + aux["loss"], (ce_loss, aux)


def train_step(state: State, batch: dict, *, graphdef, tx, seed: int = 0, grad_accum_steps: int = 1,
               global_balance: bool = False) -> tuple[State, dict]:
  """One optimiser step. Pure: (state, batch) -> (new state, metrics).

  With `grad_accum_steps` k > 1 the batch is k micro-batches whose gradients are summed in
  float32 (`moe_jax.grad_accum`); `global_balance` (= `grad_accum.needs_global_load`) gives their
  balance loss the global batch's expert load.
  """
  rng = routing_key(seed, state["step"])
  if grad_accum_steps > 1:
    total, (ce_loss, aux), grads, new_router_state = grad_accum.accumulated_loss_and_grads(
        state["params"], batch, graphdef, state.get("router_state"), steps=grad_accum_steps,
        rng=rng, global_balance=global_balance)
  else:
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    (total, (ce_loss, aux)), grads = grad_fn(
        state["params"], batch, graphdef, state.get("router_state"), train=True, rng=rng)
    new_router_state = aux.pop("router_state", None)
  updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
  params = optax.apply_updates(state["params"], updates)
  metrics = {"loss": ce_loss, "total_loss": total, "grad_norm": optax.tree.norm(grads)}
  metrics.update({f"aux/{name}": value for name, value in aux.items()})
  # Other entries (the schedule horizon) pass through unchanged.
  new_state = dict(state, step=state["step"] + 1, params=params, opt_state=opt_state)
  if new_router_state is not None:
    new_state["router_state"] = jax.lax.stop_gradient(new_router_state)
  return new_state, metrics


def eval_step(params, batch: dict, *, graphdef, router_state=None) -> dict:
  """Summed token cross-entropy and token count of one batch (summed over batches by the caller)."""
  model = nnx.merge(graphdef, params, router_state or {})
  logits, _ = model(batch["inputs"])
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"])
  return {"ce_sum": jnp.sum(ce * batch["weights"]), "weight_sum": jnp.sum(batch["weights"])}


# ------------------------------------------------------------------------------------- the loop


class _LoggingOnlyWriter:
  """Stand-in for clu's writer where TensorFlow/TensorBoard are absent: summaries are skipped."""

  def write_scalars(self, step, scalars):
    del step, scalars

  def write_hparams(self, hparams):
    del hparams

  def flush(self):
    pass

  def close(self):
    pass


def _summary_writer(workdir: str):
  """TensorBoard summaries in `workdir` (process 0 only; the console log is written separately)."""
  if jax.process_index() > 0:
    return _LoggingOnlyWriter()
  try:
    from clu.metric_writers import SummaryWriter  # imports TensorFlow and TensorBoard
  except ImportError as e:
    logging.warning("TensorBoard summaries disabled (%s); logging to the console only.", e)
    return _LoggingOnlyWriter()
  return SummaryWriter(workdir)


def _format_duration(seconds: float) -> str:
  seconds = int(round(seconds))
  hours, rest = divmod(seconds, 3600)
  minutes, seconds = divmod(rest, 60)
  return f"{hours}h{minutes:02d}m{seconds:02d}s" if hours else f"{minutes}m{seconds:02d}s"


def _device_batch(np_batch: dict, batch_sharding, global_batch: int) -> dict:
  """Global arrays from this process's rows of the batch (all rows with one process)."""
  return {k: jax.make_array_from_process_local_data(batch_sharding, v,
                                                    (global_batch,) + v.shape[1:])
          for k, v in np_batch.items()}


def evaluate_batches(params, eval_dataset: data.TokenDataset, config, *, eval_fn, batch_sharding,
                     router_state=None) -> tuple[np.ndarray, np.ndarray]:
  """Summed cross-entropy and token count of each evaluation batch: (float64 [n], float64 [n]).

  The batches are `eval_dataset.eval_batches(config.data.batch_size, config.data.eval_batches)`:
  the same sample, in the same order, for every model evaluated on that split.
  """
  ce_sums, weight_sums = [], []
  batch_size = config.data.batch_size
  rows = sharding.process_batch_rows(batch_sharding, batch_size)
  for np_batch in eval_dataset.eval_batches(batch_size, config.data.eval_batches):
    local = {k: v[rows] for k, v in np_batch.items()}
    extra = (router_state,) if router_state else ()
    out = jax.device_get(eval_fn(params, _device_batch(local, batch_sharding, batch_size), *extra))
    ce_sums.append(float(out["ce_sum"]))
    weight_sums.append(float(out["weight_sum"]))
  return np.array(ce_sums), np.array(weight_sums)


def mean_and_stderr(ce_sums: np.ndarray, weight_sums: np.ndarray) -> tuple[float, float]:
  """Token-weighted mean loss and its standard error over batches (NaN with one batch).

  The standard error is std(per-batch means, ddof=1) / sqrt(batches) over the full batches (a
  padded last batch of a wholly evaluated small split is left out of the spread).
  """
  loss = float(ce_sums.sum() / max(weight_sums.sum(), 1.0))
  batch_means = ce_sums / np.maximum(weight_sums, 1.0)
  full = weight_sums == weight_sums.max()
  stderr = (float(np.std(batch_means[full], ddof=1) / math.sqrt(full.sum()))
            if full.sum() > 1 else float("nan"))
  return loss, stderr


def evaluate(params, eval_dataset: data.TokenDataset, config, *, eval_fn, batch_sharding,
             router_state=None) -> dict:
  """Validation loss over the evaluation sample (`TokenDataset.eval_batches`), with its error bar.

  The sample is `config.data.eval_batches` batches of chunks spread over the whole split (every
  file represented; the whole split when it is smaller); see `mean_and_stderr`. Bits per byte
  divide by the split's bytes per token (1 for the byte vocabulary; see `moe_jax.data`).

  Returns:
    {"eval/loss", "eval/loss_stderr" (nats/token), "eval/bits_per_byte",
     "eval/bits_per_byte_stderr", "eval/batches", "eval/tokens"}.
  """
  ce_sums, weight_sums = evaluate_batches(params, eval_dataset, config, eval_fn=eval_fn,
                                          batch_sharding=batch_sharding,
                                          router_state=router_state)
  loss, stderr = mean_and_stderr(ce_sums, weight_sums)
  bytes_per_token = getattr(eval_dataset, "bytes_per_token", 1.0)
  return {"eval/loss": loss, "eval/loss_stderr": stderr,
          "eval/bits_per_byte": data.bits_per_byte(loss, bytes_per_token),
          "eval/bits_per_byte_stderr": data.bits_per_byte(stderr, bytes_per_token),
          "eval/batches": len(ce_sums), "eval/tokens": int(weight_sums.sum())}


def write_config(config, workdir: str, corpus: dict | None = None) -> None:
  """Writes WORKDIR/config.json: the resolved config, with the corpus fingerprint as "corpus"."""
  resolved = json.loads(config.to_json_best_effort(sort_keys=True))
  if corpus is not None:
    resolved["corpus"] = corpus
  with open(os.path.join(workdir, "config.json"), "w") as f:
    json.dump(resolved, f, indent=2, sort_keys=True)


def train_and_evaluate(config, workdir: str, *,
                       step_callback: Callable[[int, dict], None] | None = None) -> dict:
  """Trains `config` in `workdir`, resuming from its latest checkpoint; returns the final metrics.

  Args:
    config: the experiment ConfigDict (configs/default.py; with `init`, configs/finetune.py and
      `resolve_config`: WORKDIR/config.json then holds the checkpoint's model section).
    workdir: checkpoints, config.json and TensorBoard summaries go here (and tokenizer/, a copy
      of `data.tokenizer`'s files).
    step_callback: called as step_callback(step, metrics) after every step with the host metrics
      (tests use it to record losses and to simulate preemption).

  Returns:
    {"step", "train/loss", "eval/loss", "eval/bits_per_byte" and the other `evaluate` entries,
    "preempted", "corpus" (`data.corpus_fingerprint`), "eval_history" (a list of (step, eval loss,
    bits per byte, its standard error) for every evaluation of this call), "train/tokens_per_s" (mean
    over the steps of this call after the first, which includes compilation; absent when fewer
    than two steps ran)}.
  """
  validate_config(config)
  requested_tokenizer = config.data.get("tokenizer", "")
  config = resolve_config(config)
  source = init_source(config)
  if source is not None:
    logging.info("Model section from %s %s: %s (%s, vocabulary %d).", *source,
                 config.get("hf", {}).get("model_type", "a workdir model"),
                 config.model.param_dtype, config.model.vocab_size)
    if config.data.get("tokenizer") != requested_tokenizer:
      logging.info("data.tokenizer defaults to the checkpoint's: %s.", config.data.tokenizer)
    if source[0] == "workdir" and os.path.abspath(source[1]) == os.path.abspath(workdir):
      raise ValueError(f"config.init.workdir={source[1]!r} is the workdir itself; fine-tune into "
                       "a new workdir (rerunning the same command resumes it).")
  mesh = sharding.make_mesh(config.mesh)
  # Data first: a bad path or task fails before the workdir is touched.
  train_data = data.load_dataset(config.data, "train")
  eval_data = data.load_dataset(config.data, "validation")
  # Built outside the mesh context: under a mesh, nnx.eval_shape reads logical names as mesh axes.
  if source is not None and not _has_checkpoint(workdir):
    graphdef, params, param_shardings, router_state = params_from_source(config, mesh)
    logging.info("Initialised from %s %s; the optimizer starts fresh at step 0.", *source)
  else:
    if source is not None:
      logging.info("%s holds checkpoints: resuming (config.init's parameters are not read).",
                   workdir)
    graphdef, params, param_shardings = build_model(config, mesh)
    router_state = init_router_state(config, mesh)
  corpus = data.corpus_fingerprint(config.data)
  logging.info("Corpus %s.", data.describe_fingerprint(corpus))
  os.makedirs(workdir, exist_ok=True)
  if jax.process_index() == 0:
    write_config(config, workdir, corpus)
    if config.data.get("tokenizer"):
      copy_tokenizer(config.data.tokenizer, workdir)
  # The mesh in context lets layers with manual collectives (expert parallelism) find their axes.
  with jax.set_mesh(mesh):
    result = _train_loop(config, workdir, mesh, train_data, eval_data, graphdef, params,
                         param_shardings, router_state, step_callback)
  result["corpus"] = corpus
  return result


def _train_loop(config, workdir, mesh, train_data, eval_data, graphdef, params, param_shardings,
                router_state, step_callback) -> dict:
  """The body of `train_and_evaluate`, run with `mesh` set."""
  logging.info("Mesh %s over %d devices (%s).", dict(mesh.shape), mesh.size, jax.default_backend())
  eval_chunks = len(eval_data.eval_chunks(config.data.batch_size * config.data.eval_batches))
  logging.info("Evaluation sample: %d of %d validation chunks (%s), spread over the split.",
               eval_chunks, len(eval_data),
               "the whole split" if eval_chunks == len(eval_data) else
               f"{config.data.eval_batches} batches of {config.data.batch_size}")
  logging.info("Data %s: %d train / %d validation sequences of %d tokens (%.3g bytes/token); train "
               "unigram entropy %.3f bits/byte (the loss a context-free model reaches).",
               config.data.task, len(train_data), len(eval_data), config.data.seq_len,
               train_data.bytes_per_token,
               train_data.unigram_entropy_bits() / train_data.bytes_per_token)

  logging.info("Model: %s parameters.", f"{count_params(params):,}")
  frozen = frozen_fragments(config)
  if frozen:
    labels = jax.tree.leaves(param_labels(params, frozen))
    num_frozen = sum(x.size for x, label in zip(jax.tree.leaves(params), labels)
                     if label == "frozen")
    logging.info("Frozen (zero updates): parameters named *%s*: %s of %s parameters.",
                 "* / *".join(frozen), f"{num_frozen:,}", f"{count_params(params):,}")
  horizon = schedule_horizon(config.train)
  tx, schedule = make_optimizer(config.train, horizon, frozen=frozen)
  opt_state = jax.jit(tx.init, out_shardings=optimizer_shardings(tx, params, param_shardings,
                                                               mesh))(params)
  replicated_int = lambda v: jax.device_put(jnp.asarray(v, jnp.int32), sharding.replicated(mesh))
  # The schedule horizon travels with the checkpoint, so a resume cannot change it silently.
  state = {"step": replicated_int(0), "params": params, "opt_state": opt_state,
           "schedule_horizon": replicated_int(horizon)}
  if router_state:
    state["router_state"] = router_state
  state_shardings = jax.tree.map(lambda x: x.sharding, state)
  batch_sharding = sharding.batch_sharding(mesh)
  # Each process reads only the rows of every batch that its own devices hold.
  process_rows = sharding.process_batch_rows(batch_sharding, config.data.batch_size)

  ckpt = checkpoint.Checkpointer(workdir, keep=config.train.keep_checkpoints)
  latest = ckpt.latest_step()
  if latest is not None:
    try:
      state = ckpt.restore(latest, state)
      saved_horizon = int(jax.device_get(state["schedule_horizon"]))
    except (ValueError, KeyError) as e:  # written before the horizon was saved (not tested)
      logging.warning("Checkpoint %d has no schedule horizon (%s).", latest, e)
      state = dict(ckpt.restore(latest, {k: v for k, v in state.items()
                                         if k != "schedule_horizon"}),
                   schedule_horizon=state["schedule_horizon"])
      saved_horizon = None
    logging.info("restored step %d from %s", latest, os.path.join(ckpt.directory, str(latest)))
    horizon, message = resumed_horizon(config.train, saved_horizon, latest)
    logging.info("Learning-rate schedule %r: %s.", config.train.get("schedule", "cosine"), message)
    if horizon != saved_horizon:
      state["schedule_horizon"] = replicated_int(horizon)
    tx, schedule = make_optimizer(config.train, horizon, frozen=frozen)  # same structure
  else:
    logging.info("Learning-rate schedule %r over %d steps.", config.train.get("schedule", "cosine"),
                 horizon)

  accum = config.train.get("grad_accum_steps", 1) or 1
  if accum > 1:
    logging.info("Gradient accumulation: %d micro-batches of %d sequences per step%s.", accum,
                 config.data.batch_size // accum,
                 "; a forward pass first measures the global batch's expert load for the balance "
                 "loss" if grad_accum.needs_global_load(config.model) else "")
  step_fn = jax.jit(functools.partial(train_step, graphdef=graphdef, tx=tx, seed=config.seed,
                                      grad_accum_steps=accum,
                                      global_balance=grad_accum.needs_global_load(config.model)),
                    in_shardings=(state_shardings, batch_sharding),
                    out_shardings=(state_shardings, sharding.replicated(mesh)), donate_argnums=0)
  eval_shardings = (param_shardings, batch_sharding)
  if router_state:
    eval_shardings += (jax.tree.map(lambda _: sharding.replicated(mesh), router_state),)
  eval_fn = jax.jit(lambda params, batch, *rest: eval_step(
                        params, batch, graphdef=graphdef, router_state=rest[0] if rest else None),
                    in_shardings=eval_shardings, out_shardings=sharding.replicated(mesh))
  writer = _summary_writer(workdir)
  total_steps = config.train.steps
  tokens_per_step = config.data.batch_size * config.data.seq_len
  step = int(jax.device_get(state["step"]))
  result = {"step": step, "preempted": False, "eval_history": []}
  if step >= total_steps:
    logging.info("Checkpoint step %d >= train.steps=%d: nothing to train.", step, total_steps)

  first_step = step + 1  # its time includes compilation
  window_start, window_steps = time.perf_counter(), 0
  steady_start, paused = None, 0.0  # throughput over the steps after the first (compilation)
  with checkpoint.PreemptionGuard() as guard:
    while step < total_steps:
      np_batch = train_data.train_batch(step, config.data.batch_size, config.seed, process_rows)
      state, metrics = step_fn(state, _device_batch(np_batch, batch_sharding,
                                                    config.data.batch_size))
      step += 1
      window_steps += 1
      if step == first_step:
        jax.block_until_ready(state)
        steady_start = time.perf_counter()
      is_last = step == total_steps
      if step_callback is not None:
        step_callback(step, jax.device_get(metrics))
      if step % config.train.log_every == 0 or is_last or step == first_step:
        host = jax.device_get(metrics)
        elapsed = time.perf_counter() - window_start
        step_time = elapsed / window_steps
        scalars = {k: float(v) for k, v in host.items() if np.ndim(v) == 0}
        scalars.update({"learning_rate": float(schedule(step - 1)), "step_time_s": step_time,
                        "tokens_per_s": tokens_per_step / step_time})
        writer.write_scalars(step, scalars)
        aux_text = " ".join(f"{k[4:] if k != 'aux/loss' else 'aux_loss'} {v:.4g}"
                            for k, v in sorted(scalars.items()) if k.startswith("aux/"))
        logging.info("step %d/%d loss %.4f %s lr %.3g grad_norm %.3g | %.0f tokens/s, %.3fs/step%s,"
                     " ETA %s", step, total_steps, scalars["loss"], aux_text,
                     scalars["learning_rate"], scalars["grad_norm"], scalars["tokens_per_s"],
                     step_time, " (incl. compile)" if step == first_step else "",
                     _format_duration((total_steps - step) * step_time))
        result["train/loss"] = scalars["loss"]
        window_start, window_steps = time.perf_counter(), 0
      stop = guard.stop_requested
      pause_start = time.perf_counter()
      if step % config.train.eval_every == 0 or is_last:
        eval_metrics = evaluate(state["params"], eval_data, config, eval_fn=eval_fn,
                                batch_sharding=batch_sharding,
                                router_state=state.get("router_state"))
        writer.write_scalars(step, eval_metrics)
        logging.info("step %d/%d eval loss %.4f ± %.4f (%.4f ± %.4f bits/byte; mean ± standard "
                     "error over %d batches, %d tokens)", step, total_steps,
                     eval_metrics["eval/loss"], eval_metrics["eval/loss_stderr"],
                     eval_metrics["eval/bits_per_byte"], eval_metrics["eval/bits_per_byte_stderr"],
                     eval_metrics["eval/batches"], eval_metrics["eval/tokens"])
        result.update(eval_metrics)
        result["eval_history"].append((step, eval_metrics["eval/loss"],
                                       eval_metrics["eval/bits_per_byte"],
                                       eval_metrics["eval/bits_per_byte_stderr"]))
      if step % config.train.checkpoint_every == 0 or is_last or stop:
        ckpt.save(step, state)
        logging.info("saved checkpoint for step %d in %s", step, ckpt.directory)
      if stop:
        logging.warning("Stopping at step %d after %s; rerun the same command to resume.", step,
                        "SIGTERM" if guard.received == 15 else "a signal")
        result["preempted"] = True
        break
      # Evaluation and checkpointing stay out of the training throughput.
      window_start += time.perf_counter() - pause_start
      paused += time.perf_counter() - pause_start
  if steady_start is not None and step > first_step:
    jax.block_until_ready(state)
    steady_time = time.perf_counter() - steady_start - paused
    result["train/tokens_per_s"] = (step - first_step) * tokens_per_step / steady_time
  ckpt.close()
  writer.flush()
  result["step"] = step
  return result
