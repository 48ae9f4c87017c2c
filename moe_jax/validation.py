"""Whole-config validation, run before any compute or file write.

`validate_config` collects every problem and raises one `ConfigError` whose lines each name the field,
the bad value and what is allowed.
"""
from __future__ import annotations

import warnings
from typing import Any, Callable

from moe_jax import data, expert_parallel, losses, routing, sharding
from moe_jax.experts import ACTIVATIONS

DTYPES = ("float32", "bfloat16", "float16")


class ConfigError(ValueError):
  """A config value is invalid; the message lists every bad field."""


def _check_gmm_tiling(problems: list[str], moe) -> None:
  """`model.moe.gmm_tiling` must be one the chosen backend accepts (checked by the backend)."""
  tiling = moe.get("gmm_tiling", None)
  if tiling is None:
    return
  from pallas_kernels.gmm import ops as gmm_ops  # the tiling rules live with the kernels
  backend = moe.get("gmm_backend", "auto")
  if backend not in gmm_ops.BACKENDS:
    return  # reported by the gmm_backend check
  backend = gmm_ops.resolve_backend(backend)
  try:
    gmm_ops.static_tiling(tiling.to_dict() if hasattr(tiling, "to_dict") else tiling, backend)
  except (ValueError, TypeError) as e:
    problems.append(f"config.model.moe.gmm_tiling={tiling!r} is invalid for gmm backend "
                    f"{backend!r}: {e}")


def _check(problems: list[str], config, path: str, allowed: str,
           predicate: Callable[[Any], bool]) -> None:
  """Records a problem unless `predicate(value)` holds for the field at dotted `path`."""
  node = config
  *parents, leaf = path.split(".")
  for name in parents:
    node = node[name]
  if leaf not in node:
    problems.append(f"config.{path} is missing; expected {allowed}.")
    return
  value = node[leaf]
  try:
    ok = predicate(value)
  except TypeError:
    ok = False
  if not ok:
    problems.append(f"config.{path}={value!r} is invalid; allowed: {allowed}.")


def _positive_int(v) -> bool:
  return isinstance(v, int) and not isinstance(v, bool) and v > 0


def _nonnegative_int(v) -> bool:
  return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _nonnegative_number(v) -> bool:
  return isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 0


def validate_config(config, num_devices: int | None = None) -> None:
  """Checks model, MoE, mesh, data and train fields; raises ConfigError listing every problem.

  Args:
    config: the experiment ConfigDict (see configs/default.py).
    num_devices: devices the mesh must fit on (default: `jax.device_count()`).
  """
  import pallas_kernels  # the backend list lives with the kernels

  problems: list[str] = []
  # With config.init naming a checkpoint, the rest is checked on the model it gives.
  config = _check_init(problems, config)
  check = lambda path, allowed, predicate: _check(problems, config, path, allowed, predicate)

  for name in ("vocab_size", "d_model", "num_layers", "num_heads", "head_dim", "mlp_dim", "max_len"):
    check(f"model.{name}", "a positive integer", _positive_int)
  check("model.head_dim", "an even integer (RoPE rotates pairs)", lambda v: v % 2 == 0)
  check("model.dtype", f"one of {DTYPES}", lambda v: v in DTYPES)
  check("model.param_dtype", f"one of {DTYPES}", lambda v: v in DTYPES)
  check("model.moe_every", "an integer >= 0 (0 = dense)", _nonnegative_int)
  check("model.activation", f"one of {ACTIVATIONS}", lambda v: v in ACTIVATIONS)

  _check_attention(problems, config.model)
  moe = config.model.moe
  if config.model.get("moe_every", 0) or config.model.get("moe_layers"):
    check("model.moe.router", f"one of {routing.ROUTERS}", lambda v: v in routing.ROUTERS)
    check("model.moe.num_experts", "a positive integer", _positive_int)
    check("model.moe.top_k", f"an integer in [1, num_experts={moe.get('num_experts')}]",
          lambda v: _positive_int(v) and v <= moe.num_experts)
    check("model.moe.capacity_factor", "None (dropless) or a number > 0",
          lambda v: v is None or (_nonnegative_number(v) and v > 0))
    check("model.moe.group_size", "an integer >= 0 (0 = one sequence per group)", _nonnegative_int)
    check("model.moe.expert_hidden_dim", "a positive integer", _positive_int)
    check("model.moe.num_shared_experts", "an integer >= 0", _nonnegative_int)
    check("model.moe.load_balance_loss_weight", "a number >= 0", _nonnegative_number)
    check("model.moe.router_z_loss_weight", "a number >= 0", _nonnegative_number)
    check("model.moe.gmm_backend", f"one of {pallas_kernels.BACKENDS}",
          lambda v: v in pallas_kernels.BACKENDS)
    check("model.moe.ep_exchange", f"one of {expert_parallel.EXCHANGES}",
          lambda v: v in expert_parallel.EXCHANGES)
    _check_ragged_exchange(problems, moe, check)
    _check_gmm_tiling(problems, moe)
    _check_router_fields(problems, config, check)
    _check_causal_routing(problems, config)
    group_size = moe.get("group_size", 0)
    tokens = config.data.batch_size * config.data.seq_len
    if moe.get("capacity_factor") is not None and _positive_int(group_size) and tokens % group_size:
      problems.append(f"config.model.moe.group_size={group_size} must divide the tokens per batch "
                      f"(batch_size * seq_len = {tokens}).")

  check("data.task", f"one of {data.TASKS}", lambda v: v in data.TASKS)
  check("data.reader", f"one of {data.READERS}", lambda v: v in data.READERS)
  check("data.batch_size", "a positive integer", _positive_int)
  check("data.seq_len", f"a positive integer <= model.max_len={config.model.get('max_len')}",
        lambda v: _positive_int(v) and v <= config.model.max_len)
  check("data.eval_batches", "a positive integer", _positive_int)
  if config.data.get("task") == "text_files":
    check("data.path", "a non-empty glob of text files (needed by task 'text_files')", bool)
  tokenizer = config.data.get("tokenizer", "") or ""
  if tokenizer:
    _check_tokenizer(problems, config, tokenizer)
  else:
    check("model.vocab_size", "at least 259 (byte vocabulary: 256 bytes + pad, eos, unk); a model "
          "with its own vocabulary needs data.tokenizer=PATH (its tokenizer.json)",
          lambda v: v >= 259)
  _check_objective(problems, config)

  for name in ("steps", "log_every", "eval_every", "checkpoint_every", "keep_checkpoints"):
    check(f"train.{name}", "a positive integer", _positive_int)
  check("train.warmup_steps", "an integer >= 0", _nonnegative_int)
  _check_schedule(problems, config.train)
  check("train.learning_rate", "a number > 0", lambda v: _nonnegative_number(v) and v > 0)
  check("train.grad_clip_norm", "a number >= 0 (0 disables clipping)", _nonnegative_number)
  check("train.weight_decay", "a number >= 0", _nonnegative_number)

  _check_grad_accum(problems, config)
  _check_mesh(problems, config, num_devices)
  if problems:
    raise ConfigError("Invalid config:\n  " + "\n  ".join(problems))


def _check_init(problems: list[str], config):
  """`config.init` (configs/finetune.py): its fields, and the model its checkpoint gives.

  Returns the config to validate further: `train.resolve_config(config)` (the checkpoint's model
  section), or `config` itself when there is no source or it cannot be read (a problem then).
  """
  init = config.get("init")
  if init is None:
    return config
  from moe_jax import train  # pylint: disable=g-import-not-at-top
  from moe_jax.models.transformer import moe_layer_indices  # pylint: disable=g-import-not-at-top

  def check(name, allowed, predicate):
    if name in init:
      _check(problems, init, name, allowed, predicate)

  start = len(problems)
  check("hf_path", "a string ('' = none): a Hugging Face checkpoint directory",
        lambda v: isinstance(v, str))
  check("workdir", "a string ('' = none): a converted or trained workdir",
        lambda v: isinstance(v, str))
  for name in ("freeze_router", "freeze_experts", "remat"):
    check(name, "True or False", lambda v: isinstance(v, bool))
  check("dtype", f"one of {train.INIT_DTYPES} ('' = the checkpoint's)",
        lambda v: v in train.INIT_DTYPES)
  for name in ("load_balance_loss_weight", "router_z_loss_weight"):
    check(name, "None (= the checkpoint's) or a number >= 0",
          lambda v: v is None or _nonnegative_number(v))
  problems[start:] = [p.replace("config.", "config.init.", 1) for p in problems[start:]]
  if len(problems) > start:
    return config
  try:
    resolved = train.resolve_config(config)
  except (ValueError, FileNotFoundError, KeyError) as e:
    problems.append(f"config.init: {e}")
    return config
  frozen = [f for f in train.FREEZE_FRAGMENTS if init.get(f, False)]
  if frozen and not moe_layer_indices(resolved.model):
    problems.append(f"config.init.{frozen[0]}=True is invalid for a model without MoE layers; "
                    "allowed: False (there is no router or expert to freeze).")
  return resolved


def _check_tokenizer(problems: list[str], config, tokenizer) -> None:
  """`data.tokenizer`: a loadable tokenizer.json with an EOS id, whose every id the model holds."""
  if not isinstance(tokenizer, str):
    problems.append(f"config.data.tokenizer={tokenizer!r} is invalid; allowed: '' (bytes) or a "
                    "path to a tokenizer.json or a directory holding one.")
    return
  try:
    tok = data.text_tokenizer(tokenizer)
  except ImportError as e:
    problems.append(f"config.data.tokenizer={tokenizer!r} needs the `tokenizers` package ({e}).")
    return
  except Exception as e:  # pylint: disable=broad-except  (tokenizers raises plain Exceptions)
    problems.append(f"config.data.tokenizer={tokenizer!r} is invalid: {e}")
    return
  vocab = config.model.get("vocab_size")
  if _positive_int(vocab) and tok.vocab_size > vocab:
    problems.append(f"config.model.vocab_size={vocab} is smaller than the vocabulary of "
                    f"config.data.tokenizer={tokenizer!r} ({tok.vocab_size} ids); allowed: "
                    f"model.vocab_size >= {tok.vocab_size}.")
  if config.data.get("objective", "lm") != "lm":
    problems.append(f"config.data.objective={config.data.objective!r} is invalid with "
                    f"config.data.tokenizer={tokenizer!r}; allowed: 'lm' (the masked objective "
                    f"needs the byte vocabulary's [MASK] id {data.MASK_ID}).")


def _check_attention(problems: list[str], model) -> None:
  """Fields of grouped-query attention, qk-norm, RoPE scaling and the layer layout (optional:
  configs written before they existed take the defaults)."""
  from moe_jax.models import attention, norms, rope  # pylint: disable=g-import-not-at-top

  def check(name, allowed, predicate):
    if name in model:
      _check(problems, model, name, allowed, predicate)

  prefix = lambda text: text.replace("config.", "config.model.", 1)
  start = len(problems)
  heads = model.get("num_heads")
  check("num_kv_heads", f"0 (= num_heads) or a positive divisor of num_heads={heads}",
        lambda v: v == 0 or (_positive_int(v) and _positive_int(heads) and heads % v == 0))
  check("qk_norm", f"one of {attention.QK_NORMS}", lambda v: v in attention.QK_NORMS)
  check("norm", f"one of {tuple(norms.NORMS)}", lambda v: v in norms.NORMS)
  check("attention", "one of ('mha', 'mla')", lambda v: v in ("mha", "mla"))
  check("clip_qkv", "None or a number > 0", lambda v: v is None or (_number(v) and v > 0))
  for name in ("embedding_multiplier", "residual_multiplier", "logit_divisor"):
    check(name, "a number > 0 (1 = off)", lambda v: _number(v) and v > 0)
  mla = model.get("attention", "mha") == "mla"
  check("attention_scale", "0 (= head_dim^-0.5)" + ("; attention='mla' sets its own scale" if mla
                                                     else " or a number > 0"),
        lambda v: _number(v) and (v == 0 or (v > 0 and not mla)))
  check("sliding_window", "an integer >= 0 (0 = no window)", _nonnegative_int)
  check("sliding_window_layers", f"None or layer indices in [0, num_layers={model.get('num_layers')})",
        lambda v: v is None or all(isinstance(i, int) and 0 <= i < model.num_layers for i in v))
  layers = model.get("num_layers")
  check("moe_layers", f"None or distinct layer indices in [0, num_layers={layers})",
        lambda v: v is None or (all(isinstance(i, int) and 0 <= i < layers for i in v)
                                and len(set(v)) == len(v)))
  scaling = model.get("rope_scaling")
  if scaling is not None:
    kind = scaling.get("kind", "none")
    if kind not in rope.SCALINGS:
      problems.append(f"config.rope_scaling.kind={kind!r} is invalid; allowed: one of "
                      f"{rope.SCALINGS}.")
    elif kind != "none" and not scaling.get("original_max_len", 0) > 0:
      problems.append(f"config.rope_scaling.original_max_len={scaling.get('original_max_len')!r} "
                      f"is invalid; allowed: a positive integer (needed by kind {kind!r}).")
  problems[start:] = [prefix(p) for p in problems[start:]]


def _number(v) -> bool:
  return isinstance(v, (int, float)) and not isinstance(v, bool)


def _check_router_fields(problems: list[str], config, check) -> None:
  """The routing-method fields of config.model.moe (see configs/default.py); all optional."""
  moe = config.model.moe
  router = moe.get("router")
  check_present = check

  def check(path, allowed, predicate):  # a missing field takes its default in the code
    if path.split(".")[-1] in moe:
      check_present(path, allowed, predicate)

  check("model.moe.group_by", "'sequence' or 'position'",
        lambda v: v in ("sequence", "position"))
  check("model.moe.capacity_priority", "'position' or 'score'",
        lambda v: v in ("position", "score"))
  check("model.moe.score_function", f"one of {routing.SCORE_FUNCTIONS}",
        lambda v: v in routing.SCORE_FUNCTIONS)
  check("model.moe.balance_scope", f"one of {losses.BALANCE_SCOPES}",
        lambda v: v in losses.BALANCE_SCOPES)
  if moe.get("balance_scope", "global") == "micro_batch":  # only used there
    check("model.moe.balance_micro_batch_size",
          f"a positive integer dividing data.batch_size={config.data.get('batch_size')}",
          lambda v: _positive_int(v) and config.data.batch_size % v == 0)
  for name in ("bias_update_rate", "router_jitter", "router_noise_std", "top_p_loss_weight",
               "importance_loss_weight", "noisy_load_loss_weight"):
    check(f"model.moe.{name}", "a number >= 0", _nonnegative_number)
  check("model.moe.router_jitter", "a number in [0, 1)", lambda v: v < 1)
  check("model.moe.router_noise", f"one of {routing.ROUTER_NOISES}",
        lambda v: v in routing.ROUTER_NOISES)
  if moe.get("router_noise", "fixed") == "learned" and (
      router != "token_choice" or moe.get("router_noise_std", 0)):
    problems.append("config.model.moe.router_noise='learned' needs router='token_choice' and "
                    "router_noise_std=0 (the std is learned: Softplus(x W_noise)).")
  check("model.moe.routed_scaling_factor", "a number > 0", lambda v: _number(v) and v > 0)
  for name in ("num_zero_experts", "num_copy_experts", "num_constant_experts",
               "num_null_experts"):
    check(f"model.moe.{name}", "an integer >= 0", _nonnegative_int)
  check("model.moe.zero_expert_balance_weight", "a number >= 0 (MoE++ tau)", _nonnegative_number)
  experts = moe.get("num_experts")
  if _positive_int(experts):
    check("model.moe.num_expert_groups", f"a positive integer dividing num_experts={experts}",
          lambda v: _positive_int(v) and experts % v == 0)
    groups = moe.get("num_expert_groups", 1)
    if _positive_int(groups) and experts % groups == 0:
      check("model.moe.top_k_groups", f"an integer in [1, num_expert_groups={groups}]",
            lambda v: _positive_int(v) and v <= groups)
      check("model.moe.group_score", f"one of {routing.GROUP_SCORES}",
            lambda v: v in routing.GROUP_SCORES)
      top_k_groups = moe.get("top_k_groups", 1)
      if (groups > 1 and _positive_int(top_k_groups) and _positive_int(moe.get("top_k"))
          and moe.top_k > top_k_groups * experts // groups):
        problems.append(f"config.model.moe.top_k={moe.top_k} exceeds the experts in the top "
                        f"{top_k_groups} of {groups} expert groups ({top_k_groups * experts // groups}).")
  if router == "expert_choice" and moe.get("capacity_factor") is None:
    problems.append("config.model.moe.capacity_factor=None is invalid for router='expert_choice'; "
                    "allowed: a number > 0 (each expert takes capacity_factor * N / E tokens).")
  if router == "top_p":
    check("model.moe.top_p_threshold", "a number in (0, 1]", lambda v: _number(v) and 0 < v <= 1)
    check("model.moe.max_experts_per_token", f"an integer in [0, num_experts={experts}] (0 = E)",
          lambda v: _nonnegative_int(v) and v <= experts)
  if router == "relu":
    check("model.moe.relu_target_sparsity", "a number in [0, 1) (0 = 1 - top_k / num_experts)",
          lambda v: _number(v) and 0 <= v < 1)
    check("model.moe.relu_l1_initial", "a number > 0", lambda v: _number(v) and v > 0)
    check("model.moe.relu_l1_update_factor", "a number > 1", lambda v: _number(v) and v > 1)
  if router == "soft":
    check("model.moe.soft_slots_per_expert",
          "a positive integer (ceil(top_k * group tokens / num_experts) matches top-k FLOPs)",
          _positive_int)
    if routing.num_extra_experts(moe):
      problems.append("config.model.moe: zero-computation / null experts need a sparse router; "
                      "router='soft' has none.")
  zero_computation = sum(moe.get(f"num_{kind}_experts", 0) or 0
                         for kind in ("zero", "copy", "constant"))
  if moe.get("num_null_experts", 0) and zero_computation:
    problems.append("config.model.moe: num_null_experts > 0 cannot be combined with zero, copy or "
                    "constant experts (AdaMoE renormalises the weights over FFN experts only, "
                    "which would silence the MoE++ experts); use one or the other.")
  if moe.get("bias_update_rate", 0) and router != "token_choice":
    problems.append(f"config.model.moe.bias_update_rate={moe.bias_update_rate} needs "
                    f"router='token_choice' (got {router!r}): the bias steers top-k selection.")
  if moe.get("noisy_load_loss_weight", 0) and not (
      moe.get("router_noise_std", 0) or moe.get("router_noise", "fixed") == "learned"):
    problems.append("config.model.moe.noisy_load_loss_weight > 0 needs router_noise_std > 0 "
                    "or router_noise='learned' (the load loss is defined by the selection noise).")


def noncausal_routing(config) -> str | None:
  """Why the MoE routing of `config` lets a token's output depend on later tokens, or None.

  In a causal decoder every position must see only itself and earlier positions. A group that
  holds several positions of one sequence breaks that for expert choice and soft MoE (a token's
  selection / slot contents depend on the whole group), for capacity dropping (rank-major slot
  claiming lets a later token's first choice take the slot an earlier token's second choice
  needed; only top-1 with position priority is causal) and for batch-prioritized routing (a later,
  more confident token claims capacity first). Groups of one position (`group_by="position"`,
  `group_size` 0 or dividing the batch) hold one token per sequence and are causal. This looks at
  the routing only: in a bidirectional encoder nothing leaks (`leaks_future`).
  """
  moe = config.model.moe
  if not config.model.get("moe_every", 0):
    return None
  router = moe.get("router", "token_choice")
  capacity = moe.get("capacity_factor") is not None
  by_score = moe.get("capacity_priority", "position") == "score"
  sensitive = router in ("expert_choice", "soft") or (capacity and (
      by_score or router not in ("token_choice", "random") or moe.get("top_k", 1) > 1))
  if not sensitive:
    return None
  group_size = moe.get("group_size", 0) or 0
  if moe.get("group_by", "sequence") == "position":
    batch_size = config.data.get("batch_size", 0)
    if group_size == 0 or (_positive_int(batch_size) and batch_size % group_size == 0):
      return None
    return (f"model.moe.group_by='position' with group_size={group_size} not dividing "
            f"data.batch_size={batch_size} makes groups span positions")
  if group_size == 1:
    return None
  what = (f"router={router!r}" if router in ("expert_choice", "soft") else
          "capacity_priority='score' (batch-prioritized routing)" if capacity and by_score else
          f"capacity_factor={moe.capacity_factor} (capacity dropping with "
          f"top_k={moe.get('top_k')})")
  return (f"model.moe.{what} with group_by='sequence' lets a token's output depend on later "
          "tokens of its sequence")


def _check_ragged_exchange(problems: list[str], moe, check) -> None:
  """`ep_exchange="ragged_all_to_all"` is dropless only; its receive-buffer factor is >= 0.

  A factor in (0, 1) is allowed but warned about: the balanced load is T_local * K rows per
  device, so such a buffer overflows on almost every step, and each overflowing step falls back
  to the padded exchange (exact, but the padded exchange's cost plus the count exchange).
  """
  if moe.get("ep_exchange") == "ragged_all_to_all" and moe.get("capacity_factor") is not None:
    problems.append(f"config.model.moe.ep_exchange='ragged_all_to_all' needs dropless dispatch "
                    f"(capacity_factor=None), got capacity_factor={moe.capacity_factor}; "
                    "capacity buffers have a fixed size, so ep_exchange='all_to_all' already "
                    "sends exactly them.")
  if "ep_recv_buffer_factor" not in moe:
    return  # the code's default, 0 = the exact worst case
  check("model.moe.ep_recv_buffer_factor",
        "a number >= 0 (0 = the exact worst case ep * T_local * K rows; f > 0 = ceil(f * T_local "
        "* K) rows)", _nonnegative_number)
  factor = moe.ep_recv_buffer_factor
  if (moe.get("ep_exchange") == "ragged_all_to_all" and _nonnegative_number(factor)
      and 0 < factor < 1):
    warnings.warn(f"config.model.moe.ep_recv_buffer_factor={factor} < 1 is below the balanced "
                  "load (T_local * K rows per device): most steps will overflow the receive "
                  "buffer and fall back to the padded all-to-all.", stacklevel=3)


def leaks_future(config) -> str | None:
  """Why `config` is a causal decoder whose MoE routing sees later tokens, or None.

  `noncausal_routing` for a decoder; None for a bidirectional encoder (`model.causal=False`),
  where every position sees the whole sequence anyway, so no routing can leak anything.
  """
  if not config.model.get("causal", True):
    return None
  return noncausal_routing(config)


def _check_causal_routing(problems: list[str], config) -> None:
  """A causal decoder must not see the future unless `model.moe.allow_noncausal` says so."""
  if config.model.moe.get("allow_noncausal", False):
    return
  reason = leaks_future(config)
  if reason:
    problems.append(
        f"config.{reason} in this causal decoder, so its validation loss would not be a "
        "language-model loss. Use config.model.moe.group_by='position' (groups of one position, "
        "causal; group_size 0 or dividing data.batch_size), or set "
        "config.model.moe.allow_noncausal=True to accept the leak.")


def _check_objective(problems: list[str], config) -> None:
  """`data.objective` and `model.causal` agree: "lm" trains a causal decoder, "mlm" an encoder.

  A causal model cannot predict a masked byte from the context after it, and a bidirectional
  model trained on next bytes would see its targets; the [MASK] id (`data.MASK_ID`) must fit in
  the vocabulary.
  """
  objective = config.data.get("objective", "lm")
  causal = config.model.get("causal", True)
  if objective not in data.OBJECTIVES:
    problems.append(f"config.data.objective={objective!r} is invalid; allowed: one of "
                    f"{data.OBJECTIVES} ('lm' = next byte, causal decoder; 'mlm' = masked bytes, "
                    "bidirectional encoder).")
    return
  if not isinstance(causal, bool):
    problems.append(f"config.model.causal={causal!r} is invalid; allowed: True (decoder) or "
                    "False (bidirectional encoder).")
    return
  if objective == "lm" and not causal:
    problems.append("config.model.causal=False is invalid with config.data.objective='lm'; "
                    "allowed: causal=True, or data.objective='mlm' (a bidirectional encoder "
                    "trained on next bytes would see its own targets).")
  if objective == "mlm":
    if causal:
      problems.append("config.model.causal=True is invalid with config.data.objective='mlm'; "
                      "allowed: model.causal=False (a masked byte is predicted from the context "
                      "on both sides, which a causal model does not see).")
    rate = config.data.get("mask_rate", 0.15)
    if not (_number(rate) and 0 < rate <= 1):
      problems.append(f"config.data.mask_rate={rate!r} is invalid; allowed: a number in (0, 1].")
    vocab = config.model.get("vocab_size")
    if _positive_int(vocab) and vocab <= data.MASK_ID:
      problems.append(f"config.model.vocab_size={vocab} is invalid with "
                      f"config.data.objective='mlm'; allowed: at least {data.MASK_ID + 1} (the "
                      f"byte vocabulary plus the [MASK] id {data.MASK_ID}).")


def _check_schedule(problems: list[str], train_config) -> None:
  """The learning-rate schedule fields of config.train (see configs/default.py)."""
  from moe_jax import train  # the schedule list lives with the schedules

  if "schedule" in train_config and train_config.schedule not in train.SCHEDULES:
    problems.append(f"config.train.schedule={train_config.schedule!r} is invalid; allowed: one of "
                    f"{train.SCHEDULES}.")
  horizon = train_config.get("schedule_steps", 0)
  warmup = train_config.get("warmup_steps", 0)
  if not _nonnegative_int(horizon) or (horizon and _nonnegative_int(warmup) and horizon <= warmup):
    problems.append(f"config.train.schedule_steps={horizon!r} is invalid; allowed: 0 (= train.steps"
                    f" at the first start) or an integer > train.warmup_steps={warmup}.")
  fraction = train_config.get("decay_fraction", 0.1)
  if not (_number(fraction) and 0 < fraction <= 1):
    problems.append(f"config.train.decay_fraction={fraction!r} is invalid; allowed: a number in "
                    "(0, 1].")


def _check_grad_accum(problems: list[str], config) -> None:
  """`train.grad_accum_steps`: divides the batch; refuses MoE terms micro-batches cannot sum.

  Accumulation is exact when every loss term is a mean over tokens (or sequences) with global
  statistics supplied (`moe_jax.grad_accum`). Refused: the importance and noisy-load losses (a
  squared coefficient of variation over the whole batch), and groups across the batch rows
  (`group_by="position"` with capacity dispatch, expert choice or Soft MoE), which a micro-batch
  would cut into different groups.
  """
  accum = config.train.get("grad_accum_steps", 1)
  if not _positive_int(accum):
    problems.append(f"config.train.grad_accum_steps={accum!r} is invalid; allowed: a positive "
                    "integer (1 = no accumulation).")
    return
  if accum == 1:
    return
  batch_size = config.data.get("batch_size")
  if _positive_int(batch_size) and batch_size % accum:
    problems.append(f"config.train.grad_accum_steps={accum} must divide "
                    f"config.data.batch_size={batch_size}.")
    return
  moe = config.model.moe
  if not config.model.get("moe_every", 0):
    return
  for name in ("importance_loss_weight", "noisy_load_loss_weight"):
    if moe.get(name, 0.0):
      problems.append(f"config.model.moe.{name}={moe[name]} is not supported with "
                      f"train.grad_accum_steps={accum}: the loss is not a mean over tokens, so "
                      "micro-batches cannot sum to it; set it to 0 or grad_accum_steps=1.")
  spans_rows = (moe.get("capacity_factor") is not None or moe.get("router") in ("expert_choice", "soft"))
  if moe.get("group_by", "sequence") == "position" and spans_rows:
    problems.append(f"config.model.moe.group_by='position' with {moe.get('router')!r} routing"
                    f"{' and capacity dispatch' if moe.get('capacity_factor') is not None else ''} "
                    f"is not supported with train.grad_accum_steps={accum}: position groups span "
                    "the batch rows, so micro-batches would form different groups; use "
                    "group_by='sequence' or grad_accum_steps=1.")
  per_micro = moe.get("balance_micro_batch_size", 1)
  if (moe.get("balance_scope", "global") == "micro_batch" and _positive_int(per_micro)
      and _positive_int(batch_size) and (batch_size // accum) % per_micro):
    problems.append(f"config.model.moe.balance_micro_batch_size={per_micro} must divide the "
                    f"accumulation micro-batch ({batch_size // accum} sequences) with "
                    f"train.grad_accum_steps={accum}.")


def _check_mesh(problems: list[str], config, num_devices: int | None) -> None:
  """Mesh fits the devices, experts split evenly over `expert`, the batch over the batch axes."""
  if num_devices is None:
    import jax
    num_devices = jax.device_count()
  try:
    sizes = sharding.resolve_mesh_shape(config.mesh, num_devices)
  except ValueError as e:
    problems.append(str(e))
    return
  moe = config.model.moe
  if config.model.get("moe_every", 0) and _positive_int(moe.get("num_experts")):
    if moe.num_experts % sizes["expert"]:
      problems.append(f"config.model.moe.num_experts={moe.num_experts} must be divisible by "
                      f"config.mesh.expert={sizes['expert']}.")
  shards = 1
  for axis in sharding.BATCH_AXES:
    shards *= sizes[axis]
  batch_size = config.data.get("batch_size")
  accum = config.train.get("grad_accum_steps", 1)
  what = "config.data.batch_size"
  if _positive_int(batch_size) and _positive_int(accum) and accum > 1 and batch_size % accum == 0:
    # The model runs on micro-batches: they must shard (and group) the way a batch does.
    batch_size //= accum
    what = "the micro-batch size (data.batch_size / train.grad_accum_steps)"
  if _positive_int(batch_size) and batch_size % shards:
    problems.append(f"{what}={batch_size} must be divisible by the batch shards "
                    f"{' * '.join(sharding.BATCH_AXES)} = {shards} of mesh {sizes}.")
  elif (_positive_int(batch_size) and sizes["expert"] > 1 and config.model.get("moe_every", 0)
        and moe.get("capacity_factor") is not None and _positive_int(moe.get("group_size"))):
    local_tokens = batch_size // shards * config.data.seq_len
    if local_tokens % moe.group_size:
      problems.append(f"config.model.moe.group_size={moe.group_size} must divide the tokens each "
                      f"device holds ({local_tokens}) with expert parallelism: a capacity group "
                      "may not span devices.")
  elif (_positive_int(batch_size) and sizes["expert"] > 1 and config.model.get("moe_every", 0)
        and moe.get("capacity_factor") is not None and moe.get("router") != "soft"
        and moe.get("group_by", "sequence") == "position" and not moe.get("group_size", 0)
        and _positive_int(config.data.get("seq_len")) and config.data.seq_len % shards):
    # Position groups transpose the batch to [S, B] tokens; the capacity shard_map splits those
    # S * B rows over the batch shards, so each device must hold whole positions (groups of B).
    problems.append(f"config.data.seq_len={config.data.seq_len} is invalid with "
                    "model.moe.group_by='position', capacity dispatch and expert parallelism "
                    f"(mesh.expert={sizes['expert']}); allowed: a multiple of the batch shards "
                    f"{' * '.join(sharding.BATCH_AXES)} = {shards} of mesh {sizes} (each device "
                    "holds seq_len / shards whole position groups), or group_by='sequence'.")
