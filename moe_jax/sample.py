"""Text generation from a checkpoint with a KV cache: greedy, temperature and nucleus sampling.

    python -m moe_jax.sample --workdir=DIR --prompt="def " \
        [--max_new_tokens=200 --temperature=0.8 --top_p=0.95 --greedy --seed=0]

The model is rebuilt from DIR/config.json and only its parameters are restored from the latest
checkpoint in DIR/checkpoints (the optimizer state stays on disk). The prompt is encoded as
`seqio.ByteVocabulary` ids (byte + 3), or with DIR/tokenizer/tokenizer.json when DIR was converted
from a Hugging Face model (`moe_jax.convert`; then EOS is the hub config's `eos_token_id`), prefilled through `Transformer.decode` in one call, and then
one token per step is sampled inside a single jitted `lax.while_loop` that stops at EOS (id 1) or
after `max_new_tokens`. MoE layers route every new token dropless (see
`models.transformer.moe_decode_ffn`). Nucleus (top-p) sampling follows Holtzman et al., "The Curious
Case of Neural Text Degeneration" (2020).
"""
from __future__ import annotations

import functools
import json
import os
from typing import NamedTuple

# TensorFlow (pulled in by seqio and clu) must not grab an accelerator or flood the log.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from absl import app  # noqa: E402
from absl import flags  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from moe_jax import checkpoint, data, sharding, train  # noqa: E402


class LoadedModel(NamedTuple):
  """A model restored from a workdir: `nnx.merge(graphdef, params, router_state)` is the
  Transformer (router_state is {} for routers without rule-updated state)."""
  config: ml_collections.ConfigDict
  graphdef: nnx.GraphDef
  params: dict
  step: int
  router_state: dict = {}


# --------------------------------------------------------------------------------------- loading


def load_config(workdir: str) -> ml_collections.ConfigDict:
  """The resolved experiment config a training run saved as WORKDIR/config.json."""
  path = os.path.join(workdir, "config.json")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path} does not exist: --workdir must be a training workdir "
                            "(python -m moe_jax.main --workdir=...).")
  with open(path) as f:
    saved = json.load(f)
  saved.pop("corpus", None)  # the corpus fingerprint train.write_config adds is not config
  return ml_collections.ConfigDict(saved)


def single_device_mesh():
  """A mesh of one device with every axis of size 1: sampling and analysis need no parallelism."""
  sizes = ml_collections.ConfigDict({axis: 1 for axis in sharding.MESH_AXES})
  return sharding.make_mesh(sizes, jax.devices()[:1])


def load_params(workdir: str, step: int | None = None) -> LoadedModel:
  """Rebuilds the model of `workdir` and restores its parameters (only) from a checkpoint.

  Args:
    workdir: a training workdir holding config.json and checkpoints/.
    step: the checkpoint step; default the latest.

  Returns:
    LoadedModel(config, graphdef, params, step) with params on one device.

  Raises:
    FileNotFoundError: no config.json or no checkpoint in `workdir`.
  """
  config = load_config(workdir)
  ckpt_dir = os.path.join(os.path.abspath(workdir), "checkpoints")
  if not os.path.isdir(ckpt_dir):
    raise FileNotFoundError(f"{ckpt_dir} does not exist: {workdir} holds no checkpoint.")
  # The freshly initialised params only serve as the restore target (shapes, dtypes, shardings).
  graphdef, target, _ = train.build_model(config, single_device_mesh())
  ckpt = checkpoint.Checkpointer(workdir, keep=config.train.keep_checkpoints)
  try:
    step = ckpt.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"{ckpt_dir} holds no checkpoint.")
    router_state = train.init_router_state(config, single_device_mesh())
    restored = ckpt.restore_params(
        step, checkpoint.abstract_like(target),
        checkpoint.abstract_like(router_state) if router_state else None)
  finally:
    ckpt.close()
  return LoadedModel(config, graphdef, restored["params"], int(step),
                     restored.get("router_state", {}))


# -------------------------------------------------------------------------------------- sampling


def check_sampling_args(*, temperature: float, top_p: float, max_new_tokens: int) -> None:
  """Raises ValueError naming the argument when a sampling setting is out of range."""
  if not 0.0 < top_p <= 1.0:
    raise ValueError(f"top_p={top_p} is invalid; allowed: 0 < top_p <= 1 (1 disables the nucleus "
                     "filter; a tiny value is greedy).")
  if not temperature >= 0.0:  # also rejects NaN
    raise ValueError(f"temperature={temperature} is invalid; allowed: temperature >= 0 "
                     "(0 means greedy).")
  if max_new_tokens < 1:
    raise ValueError(f"max_new_tokens={max_new_tokens} is invalid; allowed: an integer >= 1.")


def sample_logits(logits: jax.Array, rng: jax.Array, *, temperature: jax.Array | float,
                  top_p: jax.Array | float, greedy: bool = False) -> jax.Array:
  """Draws one token per row from logits [B, V]; returns int32 [B].

  Greedy takes the argmax (the lowest id on ties). Otherwise the logits are divided by
  `temperature` and the draw is restricted to the nucleus (Holtzman et al. 2020): the smallest set
  of most probable tokens whose probabilities sum to at least `top_p`. The most probable token is
  always in it, so a tiny `top_p` is greedy and `top_p=1` keeps every token. Ranking uses the stable
  `lax.top_k`, so ties inside the nucleus boundary break like the argmax does.
  """
  logits = logits.astype(jnp.float32)
  if greedy:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  scaled = logits / temperature
  probs = jax.nn.softmax(scaled, axis=-1)
  sorted_probs, sorted_ids = jax.lax.top_k(probs, probs.shape[-1])
  # A token is in the nucleus when the mass of the tokens ranked above it is still below top_p.
  keep_sorted = jnp.cumsum(sorted_probs, axis=-1) - sorted_probs < top_p
  keep_sorted = keep_sorted.at[:, 0].set(True)
  rows = jnp.arange(logits.shape[0])[:, None]
  keep = jnp.zeros_like(keep_sorted).at[rows, sorted_ids].set(keep_sorted)
  return jax.random.categorical(rng, jnp.where(keep, scaled, -jnp.inf), axis=-1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("graphdef", "max_new_tokens", "greedy", "eos_id"))
def _generate(params, prompt, rng, temperature, top_p, *, graphdef, max_new_tokens: int,
              greedy: bool, eos_id: int):
  """Prefill + sampling loop. prompt [B, P] -> (new tokens [B, max_new_tokens], count)."""
  model = nnx.merge(graphdef, *params)  # (params, router_state)
  batch, prompt_len = prompt.shape
  cache = model.init_cache(batch, prompt_len + max_new_tokens)
  logits, cache = model.decode(prompt, cache, 0)

  def cond(carry):
    i, _, _, _, done, _ = carry
    return (i < max_new_tokens) & ~jnp.all(done)

  def body(carry):
    i, last_logits, cache, out, done, rng = carry
    rng, step_rng = jax.random.split(rng)
    token = sample_logits(last_logits, step_rng, temperature=temperature, top_p=top_p,
                          greedy=greedy)
    token = jnp.where(done, data.PAD_ID, token)  # finished rows emit padding
    out = out.at[:, i].set(token)
    done = done | (token == eos_id)
    logits, cache = model.decode(token[:, None], cache, prompt_len + i)
    return i + 1, logits[:, -1], cache, out, done, rng

  out = jnp.full((batch, max_new_tokens), data.PAD_ID, jnp.int32)
  init = (jnp.zeros((), jnp.int32), logits[:, -1], cache, out, jnp.zeros((batch,), bool), rng)
  count, _, _, out, _, _ = jax.lax.while_loop(cond, body, init)
  return out, count


def generate(model: LoadedModel | tuple, prompt_ids, *, max_new_tokens: int = 200,
             temperature: float = 1.0, top_p: float = 1.0, greedy: bool = False, seed: int = 0,
             eos_id: int = data.EOS_ID) -> list[int]:
  """Continues `prompt_ids` (ints, >= 1 of them); returns the new ids, ending with EOS if drawn.

  Args:
    model: a LoadedModel, or any (config, graphdef, params, ...) tuple.
    prompt_ids: the prompt's token ids.
    max_new_tokens: the most tokens to generate; prompt + these must fit `config.model.max_len`.
    temperature: softmax temperature (> 0; 0 means greedy).
    top_p: nucleus mass in (0, 1].
    greedy: take the argmax at every step (ignores temperature, top_p and seed).
    seed: PRNG seed of the draws.
    eos_id: generation stops after this id (default EOS = 1).
  """
  config, graphdef, params = model[0], model[1], model[2]
  router_state = model[4] if len(model) > 4 else {}
  check_sampling_args(temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens)
  prompt = np.asarray(prompt_ids, np.int32).reshape(1, -1)
  if prompt.shape[1] == 0:
    raise ValueError("prompt is empty; give at least one byte to condition on (there is no BOS "
                     "token).")
  max_len = config.model.max_len
  if prompt.shape[1] + max_new_tokens > max_len:
    raise ValueError(f"prompt length {prompt.shape[1]} + max_new_tokens={max_new_tokens} exceeds "
                     f"config.model.max_len={max_len}; shorten the prompt or lower max_new_tokens.")
  out, count = _generate((params, router_state), jnp.asarray(prompt), jax.random.key(seed),
                         jnp.float32(max(temperature, 1e-30)), jnp.float32(top_p),
                         graphdef=graphdef, max_new_tokens=max_new_tokens,
                         greedy=greedy or temperature == 0.0, eos_id=eos_id)
  ids = np.asarray(out[0, :int(count)]).tolist()
  return ids[:ids.index(eos_id) + 1] if eos_id in ids else ids


def encode(text: str) -> list[int]:
  """UTF-8 bytes of `text` as ByteVocabulary ids (byte + 3)."""
  return [b + data.NUM_SPECIAL_IDS for b in text.encode("utf-8")]


def decode(ids) -> str:
  """ByteVocabulary ids back to text: stops at EOS, skips the other special ids (pad, unk)."""
  out = bytearray()
  for i in ids:
    if i == data.EOS_ID:
      break
    if i >= data.NUM_SPECIAL_IDS:
      out.append(i - data.NUM_SPECIAL_IDS)
  return out.decode("utf-8", errors="replace")


def sample_text(workdir: str, prompt: str, **kwargs) -> str:
  """Loads `workdir`'s latest checkpoint and returns prompt + its continuation (see `generate`)."""
  if not prompt:
    raise ValueError("prompt is empty; give at least one byte to condition on (there is no BOS "
                     "token).")
  check_sampling_args(temperature=kwargs.get("temperature", 1.0), top_p=kwargs.get("top_p", 1.0),
                      max_new_tokens=kwargs.get("max_new_tokens", 200))
  model = load_params(workdir)
  encode_fn, decode_fn, eos_id = text_codec(workdir, model.config)
  kwargs.setdefault("eos_id", eos_id)
  return prompt + decode_fn(generate(model, encode_fn(prompt), **kwargs))


def text_codec(workdir: str, config):
  """(encode, decode, eos id) of a workdir: its Hugging Face tokenizer (WORKDIR/tokenizer/, from
  `moe_jax.convert --from_hf`) when it has one, else the byte vocabulary."""
  tokenizer_dir = os.path.join(workdir, "tokenizer")
  if not os.path.isfile(os.path.join(tokenizer_dir, "tokenizer.json")):
    return encode, decode, data.EOS_ID
  from moe_jax.hf import tokenizer as hf_tokenizer  # pylint: disable=g-import-not-at-top

  tok = hf_tokenizer.load_tokenizer(tokenizer_dir)
  eos_id = hf_tokenizer.eos_token_id(config.get("hf", {}).get("config_json"))

  def decode_ids(ids):
    ids = list(ids)
    return tok.decode(ids[:ids.index(eos_id)] if eos_id in ids else ids)

  return (lambda text: tok.encode(text).ids), decode_ids, eos_id


# ------------------------------------------------------------------------------------------- CLI

def _define_flags():
  # Defined only when run as a program, so that library users (routing_stats, notebooks) can import
  # this module next to their own --workdir flag.
  flags.DEFINE_string("workdir", None, "Training workdir (config.json + checkpoints/).")
  flags.DEFINE_string("prompt", None, "Text to continue (non-empty).")
  flags.DEFINE_integer("max_new_tokens", 200, "Most tokens (bytes) to generate.")
  flags.DEFINE_float("temperature", 0.8, "Softmax temperature (>= 0; 0 = greedy).")
  flags.DEFINE_float("top_p", 0.95, "Nucleus mass in (0, 1]; 1 disables the filter.")
  flags.DEFINE_bool("greedy", False, "Argmax decoding (ignores temperature, top_p and seed).")
  flags.DEFINE_integer("seed", 0, "PRNG seed of the draws.")
  flags.mark_flags_as_required(["workdir", "prompt"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  f = flags.FLAGS
  try:
    text = sample_text(f.workdir, f.prompt, max_new_tokens=f.max_new_tokens,
                       temperature=f.temperature, top_p=f.top_p, greedy=f.greedy, seed=f.seed)
  except (ValueError, FileNotFoundError) as e:
    raise app.UsageError(str(e)) from None
  print(text)


if __name__ == "__main__":
  _define_flags()
  app.run(main)
