r"""Sparse upcycling experiment: upcycled MoE vs. the dense model trained for the same extra steps.

Komatsuzaki et al., "Sparse Upcycling: Training Mixture-of-Experts from Dense Checkpoints" (2023);
Vavre et al., "Llama 3 Meets MoE: Efficient Upcycling" (2024).

From the latest checkpoint (step S) of a dense run in --dense_workdir, this
  1. builds the MoE model (every --moe_every-th FFN an MoE layer of --num_experts experts, top
     --top_k, dropless, renormalised top-k) with expert_hidden_dim = the dense mlp_dim, upcycles the
     dense parameters and optimizer state (`moe_jax.upcycle`) into WORKDIR/moe at step S, and trains
     it to step S + --extra_steps;
  2. copies the dense checkpoint into WORKDIR/dense_continued and trains the dense model to the same
     step S + --extra_steps (same data order, same learning-rate schedule);
  3. writes the validation loss and bits/byte of both, and of both models at step S, to
     WORKDIR/upcycle_results.md (and prints it).
Both continue the dense run's learning-rate schedule: its horizon is saved with the checkpoint and
kept (`train.resumed_horizon`), so set it when training the dense model; with
`--dense_config.train.schedule_steps=S + extra_steps` the dense run stops part-way through its cosine
and both continuations finish it (without it, both hold the final learning rate past S). Note
that the upcycled MoE does top_k times the dense FFN FLOPs per token (each expert is as wide as the
dense MLP), unlike configs/default.py's equal-FLOP dense variant.

If --dense_workdir holds no checkpoint, the dense model is first trained there from --dense_config:

  python experiments/upcycle.py --dense_workdir=/tmp/dense --workdir=/tmp/upcycle \
      --dense_config=configs/default.py:dense --dense_config.train.steps=300 \
      --dense_config.train.schedule_steps=500 --extra_steps=200

From a dense Hugging Face checkpoint (Llama, Qwen3; "Llama 3 Meets MoE") instead of a workdir,
--dense_hf=DIR: the dense model is DIR's (`moe_jax.hf`), step S is 0, and --dense_config (default
configs/finetune.py; its model section is ignored) gives the data, schedule and mesh of both
continuations. The upcycled MoE starts from DIR's parameters with a fresh optimizer (the hub has no
optimizer state), the auxiliary losses at configs/default.py's weights (0.01 balance, 1e-3 z-loss;
`init.load_balance_loss_weight` / `init.router_z_loss_weight` of --dense_config override them),
and the dense model is fine-tuned from DIR (`config.init.hf_path`) for the same steps. The text is
tokenised with DIR's tokenizer.json unless --dense_config.data.tokenizer names another:

  python experiments/upcycle.py --dense_hf=/ckpt/Llama-3.2-1B --workdir=/tmp/upcycle_llama \
      --dense_config=configs/finetune.py --dense_config.data.path='/data/*.txt' \
      --num_experts=8 --top_k=2 --moe_every=1 --extra_steps=500

Rerunning the command resumes whatever is unfinished.
"""
import datetime
import json
import os
import platform
import shutil
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# Runs from a checkout without installing the package.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app  # noqa: E402
from absl import flags  # noqa: E402
from absl import logging  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import ml_collections  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from configs import finetune  # noqa: E402
from moe_jax import checkpoint, data, sharding, train  # noqa: E402
from moe_jax.hf import api as hf_api  # noqa: E402
from moe_jax.hf import common as hf_common  # noqa: E402
from moe_jax.sample import load_config, load_params, single_device_mesh  # noqa: E402
from moe_jax.upcycle import abstract_params, check_compatible  # noqa: E402
from moe_jax.upcycle import upcycle_opt_state, upcycle_params  # noqa: E402
from moe_jax.validation import validate_config  # noqa: E402

def _define_flags():
  # Defined only when run as a script, so that tests can import this module next to other
  # scripts' flags (bench_gmm's --seed, say).
  flags.DEFINE_string("dense_workdir", None, "Dense training workdir (the source).")
  flags.DEFINE_string(
      "dense_hf", None, "Or a dense Hugging Face checkpoint directory (Llama, Qwen3) as the source.")
  flags.DEFINE_string("workdir", None, "Output: moe/, dense_continued/, results table.")
  config_flags.DEFINE_config_file(
      "dense_config", None, "Config to train the dense model with when --dense_workdir is empty; "
      "with --dense_hf, the data / train / mesh sections of both runs (default "
      "configs/finetune.py).")
  flags.DEFINE_integer("extra_steps", 200, "Steps both models train past step S.")
  flags.DEFINE_integer("num_experts", 8, "Experts E per MoE layer.")
  flags.DEFINE_integer("top_k", 2, "Experts per token K (>= 2 keeps the dense function).")
  flags.DEFINE_integer("moe_every", 2, "Every n-th FFN becomes an MoE layer.")
  flags.DEFINE_float("noise_std", 0.0, "Relative noise on the expert copies.")
  flags.DEFINE_float("router_init_std", 0.02, "Std of the router's normal init.")
  flags.DEFINE_integer("seed", 0, "Seed of the router init and the noise.")


def moe_config_from_dense(dense_config, *, num_experts: int, top_k: int,
                          moe_every: int) -> ml_collections.ConfigDict:
  """The dense config with MoE layers whose experts have the dense MLP's width.

  Every attention / RoPE / norm field is the dense model's (`upcycle.check_compatible`); the
  routing is the function-preserving one (dropless, renormalised top-k, no routed scaling, no
  zero-computation or null experts). An `init` section loses its checkpoint source (the MoE
  starts from its own upcycled checkpoint) and an `hf` section is dropped: the MoE is no longer
  the hub family it came from (export it with `--model_type`, e.g. mixtral or qwen3_moe).
  """
  config = ml_collections.ConfigDict(dense_config.to_dict())
  config.model.moe_every = moe_every
  config.model.moe_layers = None
  moe = config.model.moe
  moe.router = "token_choice"
  moe.num_experts = num_experts
  moe.top_k = top_k
  moe.expert_hidden_dim = dense_config.model.mlp_dim
  moe.capacity_factor = None
  moe.normalize_top_k = True
  moe.num_shared_experts = 0
  moe.routed_scaling_factor = 1.0
  for kind in ("zero", "copy", "constant", "null"):
    moe[f"num_{kind}_experts"] = 0
  if "init" in config:
    config.init.hf_path = config.init.workdir = ""
    config.init.freeze_router = config.init.freeze_experts = False
  if "hf" in config:
    del config["hf"]
  return config


def dense_hf_config(dense_hf: str, base_config) -> ml_collections.ConfigDict:
  """`base_config` fine-tuning the dense checkpoint `dense_hf` (init.hf_path), resolved.

  The base's model section is replaced by the checkpoint's (`train.resolve_config`); its init
  section's freeze flags are cleared (nothing to freeze in a dense model).
  """
  config = ml_collections.ConfigDict(base_config.to_dict())
  config.model = hf_common.default_experiment_config().model
  if "init" not in config:
    config.init = finetune.get_config().init
  config.init.hf_path, config.init.workdir = dense_hf, ""
  config.init.freeze_router = config.init.freeze_experts = False
  resolved = train.resolve_config(config)
  if resolved.model.get("moe_every", 0) or resolved.model.get("moe_layers"):
    raise ValueError(f"--dense_hf={dense_hf!r} is a {resolved.hf.model_type!r} MoE checkpoint; "
                     "upcycling starts from a dense one (llama, qwen3).")
  return resolved


def moe_config_from_dense_hf(dense_config, **kwargs) -> ml_collections.ConfigDict:
  """`moe_config_from_dense` of an imported dense model, with the auxiliary losses switched on
  (the hub config of a dense model has none): configs/default.py's weights unless the base
  config's `init` section sets them."""
  config = moe_config_from_dense(dense_config, **kwargs)
  default_moe = hf_common.default_experiment_config().model.moe
  for name in ("load_balance_loss_weight", "router_z_loss_weight"):
    chosen = dense_config.init.get(name)
    config.model.moe[name] = float(default_moe[name] if chosen is None else chosen)
  return config


def _fresh_state(config, mesh):
  """An initialised training state (params + optimizer) and its optimizer, as the train loop has."""
  graphdef, params, param_shardings = train.build_model(config, mesh)
  tx, _ = train.make_optimizer(config.train)
  opt_state = jax.jit(tx.init, out_shardings=train.optimizer_shardings(tx, params, param_shardings,
                                                                     mesh))(params)
  replicated_int = lambda v: jax.device_put(jnp.asarray(v, jnp.int32), sharding.replicated(mesh))
  return graphdef, {"step": replicated_int(0), "params": params, "opt_state": opt_state,
                    "schedule_horizon": replicated_int(train.schedule_horizon(config.train))}


def evaluate_params(config, graphdef, params, mesh) -> dict:
  """Validation loss and bits/byte of `params` exactly as the training loop measures them."""
  eval_fn = jax.jit(lambda p, b: train.eval_step(p, b, graphdef=graphdef))
  return train.evaluate(params, data.load_dataset(config.data, "validation"), config,
                        eval_fn=eval_fn, batch_sharding=sharding.batch_sharding(mesh))


def upcycle_checkpoint(dense_workdir: str, moe_workdir: str, moe_config, *, noise_std: float,
                       router_init_std: float, seed: int) -> dict:
  """Writes the upcycled state at the dense checkpoint's step S to moe_workdir; returns evals."""
  dense_config = load_config(dense_workdir)
  mesh = sharding.make_mesh(dense_config.mesh)
  dense_ckpt = checkpoint.Checkpointer(dense_workdir, keep=dense_config.train.keep_checkpoints)
  step = dense_ckpt.latest_step()
  dense_graphdef, template = _fresh_state(dense_config, mesh)
  dense_state = dense_ckpt.restore(step, template)
  dense_ckpt.close()

  moe_graphdef, moe_template = _fresh_state(moe_config, mesh)
  params = upcycle_params(dense_state["params"], dense_config, moe_config, noise_std=noise_std,
                          rng=jax.random.key(seed), router_init_std=router_init_std)
  opt_state = upcycle_opt_state(dense_state["opt_state"], moe_template["opt_state"], dense_config,
                                moe_config)
  # Placed like a fresh state so that the checkpoint carries the training shardings.
  state = jax.tree.map(lambda x, t: jax.device_put(x, t.sharding),
                       {"step": dense_state["step"], "params": params, "opt_state": opt_state,
                        # The MoE continues the dense run's learning-rate schedule.
                        "schedule_horizon": dense_state["schedule_horizon"]},
                       moe_template)
  evals = {"step": int(step),
           "dense": evaluate_params(dense_config, dense_graphdef, dense_state["params"], mesh),
           "moe": evaluate_params(moe_config, moe_graphdef, state["params"], mesh)}
  if os.path.exists(moe_workdir):  # left by an attempt that stopped before finishing this step
    shutil.rmtree(moe_workdir)
  os.makedirs(moe_workdir)
  train.write_config(moe_config, moe_workdir)
  moe_ckpt = checkpoint.Checkpointer(moe_workdir, keep=moe_config.train.keep_checkpoints)
  moe_ckpt.save(int(step), state)
  moe_ckpt.close()
  return evals


def upcycle_hf_checkpoint(dense_hf: str, moe_workdir: str, dense_config, moe_config, *,
                          noise_std: float, router_init_std: float, seed: int) -> dict:
  """Writes the MoE upcycled from the Hugging Face checkpoint `dense_hf` at step 0 (a fresh
  optimizer) to moe_workdir; returns the validation metrics of both models at step 0."""
  mesh = sharding.make_mesh(dense_config.mesh)
  dense_params = hf_api.load_params(dense_hf, dense_config, mesh)
  dense_graphdef, _, _ = train.abstract_model(dense_config, mesh)
  moe_graphdef, moe_template = _fresh_state(moe_config, mesh)
  params = upcycle_params(dense_params, dense_config, moe_config, noise_std=noise_std,
                          rng=jax.random.key(seed), router_init_std=router_init_std)
  # The template's optimizer state is already the fresh one (zero moments, count 0).
  state = dict(moe_template, params=jax.tree.map(lambda x, t: jax.device_put(x, t.sharding),
                                                 params, moe_template["params"]))
  evals = {"step": 0,
           "dense": evaluate_params(dense_config, dense_graphdef, dense_params, mesh),
           "moe": evaluate_params(moe_config, moe_graphdef, state["params"], mesh)}
  if os.path.exists(moe_workdir):  # left by an attempt that stopped before finishing this step
    shutil.rmtree(moe_workdir)
  os.makedirs(moe_workdir)
  train.write_config(moe_config, moe_workdir)
  if moe_config.data.get("tokenizer"):
    train.copy_tokenizer(moe_config.data.tokenizer, moe_workdir)
  moe_ckpt = checkpoint.Checkpointer(moe_workdir, keep=moe_config.train.keep_checkpoints)
  moe_ckpt.save(0, state)
  moe_ckpt.close()
  return evals


def final_evals(workdir: str) -> dict:
  """Validation metrics of the latest checkpoint in `workdir` (also if a rerun trained nothing)."""
  model = load_params(workdir)
  return evaluate_params(model.config, model.graphdef, model.params, single_device_mesh())


def continue_dense(dense_workdir: str, workdir: str, dense_config, step: int) -> None:
  """Copies the dense checkpoint of `step` (only) into workdir/checkpoints to resume from it."""
  target = os.path.join(workdir, "checkpoints", str(step))
  if not os.path.exists(target):
    shutil.copytree(os.path.join(os.path.abspath(dense_workdir), "checkpoints", str(step)), target)
  train.write_config(dense_config, workdir)


def _count(params) -> int:
  return train.count_params(params)  # works on ShapeDtypeStructs too


def results_table(rows: list[dict]) -> str:
  lines = ["| model | total params | step | validation loss (nats/token) | bits/byte | wall time |",
           "|---|---|---|---|---|---|"]
  for r in rows:
    lines.append(f"| {r['name']} | {r['params']:,} | {r['step']} | {r['loss']:.4f} | "
                 f"{r['bpb']:.4f} ± {r['bpb_se']:.4f} | {r['time']} |")
  return "\n".join(lines)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  dense_workdir, dense_hf, workdir = flags.FLAGS.dense_workdir, flags.FLAGS.dense_hf, flags.FLAGS.workdir
  if bool(dense_workdir) == bool(dense_hf) or not workdir:
    raise app.UsageError("--workdir and one of --dense_workdir or --dense_hf are required.")
  if flags.FLAGS.extra_steps < 1:
    raise app.UsageError(f"--extra_steps={flags.FLAGS.extra_steps}; allowed: >= 1.")
  times = {}
  sizes = dict(num_experts=flags.FLAGS.num_experts, top_k=flags.FLAGS.top_k, moe_every=flags.FLAGS.moe_every)
  if dense_hf:
    try:
      dense_config = dense_hf_config(dense_hf, flags.FLAGS.dense_config or finetune.get_config())
    except (ValueError, FileNotFoundError) as e:
      raise app.UsageError(str(e)) from None
    moe_config = moe_config_from_dense_hf(dense_config, **sizes)
    # Step S = 0: both runs lay their schedule over the extra steps (saved with the MoE's state).
    dense_config.train.steps = moe_config.train.steps = flags.FLAGS.extra_steps
  else:
    has_checkpoint = os.path.isdir(os.path.join(dense_workdir, "checkpoints")) and any(
        s.isdigit() for s in os.listdir(os.path.join(dense_workdir, "checkpoints")))
    if not has_checkpoint:
      if flags.FLAGS.dense_config is None:
        raise app.UsageError(f"{dense_workdir} holds no checkpoint; pass --dense_config to train "
                             "it.")
      start = time.perf_counter()
      train.train_and_evaluate(flags.FLAGS.dense_config, dense_workdir)
      times["dense"] = time.perf_counter() - start
    dense_config = load_config(dense_workdir)
    moe_config = moe_config_from_dense(dense_config, **sizes)
  moe_dir = os.path.join(workdir, "moe")
  dense_dir = os.path.join(workdir, "dense_continued")
  try:
    if dense_hf:
      validate_config(dense_config)
    validate_config(moe_config)
    check_compatible(dense_config, moe_config)
  except ValueError as e:
    raise app.UsageError(str(e)) from None
  start_file = os.path.join(workdir, "upcycle_start.json")
  if os.path.exists(start_file):  # a rerun resumes the two trainings
    with open(start_file) as f:
      start_evals = json.load(f)
  else:
    upcycle_args = dict(noise_std=flags.FLAGS.noise_std, router_init_std=flags.FLAGS.router_init_std,
                        seed=flags.FLAGS.seed)
    try:
      if dense_hf:
        start_evals = upcycle_hf_checkpoint(dense_hf, moe_dir, dense_config, moe_config,
                                            **upcycle_args)
      else:
        start_evals = upcycle_checkpoint(dense_workdir, moe_dir, moe_config, **upcycle_args)
    except ValueError as e:
      raise app.UsageError(str(e)) from None
    os.makedirs(workdir, exist_ok=True)
    with open(start_file, "w") as f:
      json.dump(start_evals, f, indent=2)
  step = start_evals["step"]
  final_step = step + flags.FLAGS.extra_steps
  logging.info("Upcycled step %d: dense %s, MoE %s", step, start_evals["dense"],
               start_evals["moe"])

  dense_config.train.steps = moe_config.train.steps = final_step
  if not dense_hf:
    continue_dense(dense_workdir, dense_dir, dense_config, step)
  # With --dense_hf the dense run is a fine-tune from the checkpoint (config.init.hf_path).
  start = time.perf_counter()
  train.train_and_evaluate(dense_config, dense_dir)
  dense_time = time.perf_counter() - start
  start = time.perf_counter()
  train.train_and_evaluate(moe_config, moe_dir)
  moe_time = time.perf_counter() - start
  dense_result, moe_result = final_evals(dense_dir), final_evals(moe_dir)

  dense_params = abstract_params(dense_config.model)
  moe_params = abstract_params(moe_config.model)
  fmt = lambda s: f"{s:.0f} s"  # noqa: E731
  rows = [
      {"name": "dense (source checkpoint)", "params": _count(dense_params), "step": step,
       "loss": start_evals["dense"]["eval/loss"],
       "bpb": start_evals["dense"]["eval/bits_per_byte"],
       "bpb_se": start_evals["dense"]["eval/bits_per_byte_stderr"],
       "time": fmt(times["dense"]) if "dense" in times else "-"},
      {"name": "upcycled MoE, before training", "params": _count(moe_params), "step": step,
       "loss": start_evals["moe"]["eval/loss"], "bpb": start_evals["moe"]["eval/bits_per_byte"],
       "bpb_se": start_evals["moe"]["eval/bits_per_byte_stderr"],
       "time": "-"},
      {"name": "dense, continued", "params": _count(dense_params), "step": final_step,
       "loss": dense_result["eval/loss"], "bpb": dense_result["eval/bits_per_byte"],
       "bpb_se": dense_result["eval/bits_per_byte_stderr"],
       "time": fmt(dense_time)},
      {"name": "upcycled MoE, trained", "params": _count(moe_params), "step": final_step,
       "loss": moe_result["eval/loss"], "bpb": moe_result["eval/bits_per_byte"],
       "bpb_se": moe_result["eval/bits_per_byte_stderr"],
       "time": fmt(moe_time)},
  ]
  moe = moe_config.model.moe
  header = (
      f"# Sparse upcycling: {dense_workdir or dense_hf} (step {step}) + {flags.FLAGS.extra_steps} "
      "steps\n\n"
      f"Date {datetime.date.today()}, JAX {jax.__version__}, {jax.device_count()} "
      f"{jax.default_backend()} device(s) ({platform.processor() or platform.machine()}, "
      f"{os.cpu_count()} cores visible). Task {dense_config.data.task}, batch "
      f"{dense_config.data.batch_size} x {dense_config.data.seq_len} tokens.\n\n"
      f"MoE: moe_every={moe_config.model.moe_every}, {moe.num_experts} experts of hidden "
      f"{moe.expert_hidden_dim} (= dense mlp_dim), top-{moe.top_k} renormalised, dropless; "
      f"noise_std {flags.FLAGS.noise_std}, router init N(0, {flags.FLAGS.router_init_std}^2); optimizer "
      f"state {'fresh (a Hugging Face source)' if dense_hf else 'upcycled'}. Learning rate: "
      f"{dense_config.train.get('schedule', 'cosine')} schedule "
      f"over the dense run's horizon of {train.schedule_horizon(dense_config.train)} steps, "
      "continued by both runs. Validation: mean ± standard error over evaluation batches "
      f"({dense_config.data.eval_batches} x {dense_config.data.batch_size} chunks spread over the "
      f"split). Corpus: {data.describe_fingerprint(data.corpus_fingerprint(dense_config.data))}. "
      f"The MoE's FFN layers do {moe.top_k}x the dense FFN FLOPs per token. Wall "
      "times are this invocation's training (with compilation); a resumed run shows only its "
      "own part.\n\n"
      f"Command: `{' '.join(['python'] + sys.argv)}`\n\n")
  text = header + results_table(rows) + "\n"
  with open(os.path.join(workdir, "upcycle_results.md"), "w") as f:
    f.write(text)
  print(text)


if __name__ == "__main__":
  _define_flags()
  flags.mark_flags_as_required(["workdir"])
  app.run(main)
