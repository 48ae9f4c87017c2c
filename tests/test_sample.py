"""Sampling (`moe_jax.sample`) and the KV-cached decode path of the Transformer."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import tiny_checkpoint
from configs.default import get_config
from moe_jax import data, sample, sharding, train
from moe_jax.models import transformer


def rel_err(actual, expected):
  actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
  return np.linalg.norm(actual - expected) / max(np.linalg.norm(expected), 1e-30)


# ---------------------------------------------------------------------- cached == uncached logits


def model_config(**overrides):
  config = get_config("tiny").model
  config.vocab_size = 61
  for name, value in overrides.items():
    if name in config.moe:
      config.moe[name] = value
    else:
      config[name] = value
  return config


@functools.lru_cache(maxsize=None)
def decode_fns(graphdef):
  forward = jax.jit(lambda params, tokens: nnx.merge(graphdef, params)(tokens)[0])
  step = jax.jit(lambda params, tokens, cache, index:
                 nnx.merge(graphdef, params).decode(tokens, cache, index))
  return forward, step


def cached_logits(graphdef, params, tokens, prefill: int):
  """Logits of every position from a prefill of `prefill` tokens and then one token per call."""
  _, step = decode_fns(graphdef)
  model = nnx.merge(graphdef, params)
  cache = model.init_cache(tokens.shape[0], tokens.shape[1])
  logits, cache = step(params, tokens[:, :prefill], cache, 0)
  outputs = [logits]
  for t in range(prefill, tokens.shape[1]):
    logits, cache = step(params, tokens[:, t:t + 1], cache, t)
    outputs.append(logits)
  return np.concatenate(outputs, axis=1)


@pytest.mark.parametrize("overrides", [dict(moe_every=0), dict(moe_every=1),
                                       dict(moe_every=2, num_shared_experts=1, top_k=1)],
                         ids=["dense", "moe", "moe-shared-top1"])
def test_cached_decode_matches_uncached_forward(overrides):
  """Prefill + one-token steps reproduce the full forward pass's logits at every position."""
  model = transformer.Transformer(model_config(**overrides), rngs=nnx.Rngs(3))
  graphdef, params = nnx.split(model)
  tokens = np.random.default_rng(0).integers(0, 61, size=(2, 14)).astype(np.int32)
  forward, _ = decode_fns(graphdef)
  expected = np.asarray(forward(params, jnp.asarray(tokens)))
  for prefill in (1, 5):
    got = cached_logits(graphdef, params, jnp.asarray(tokens), prefill)
    assert got.shape == expected.shape
    assert rel_err(got, expected) < 1e-5, prefill
    # Per position too: an error at one late position must not hide in the global norm.
    for t in range(tokens.shape[1]):
      assert rel_err(got[:, t], expected[:, t]) < 1e-5, (prefill, t)


def test_capacity_model_decodes_dropless():
  """A capacity-dispatch model decodes as its dropless twin (same params) computes."""
  capacity = transformer.Transformer(model_config(moe_every=1, capacity_factor=0.5),
                                     rngs=nnx.Rngs(4))
  graphdef, params = nnx.split(capacity)
  dropless_graphdef, _ = nnx.split(transformer.Transformer(model_config(moe_every=1),
                                                           rngs=nnx.Rngs(4)))
  tokens = jnp.asarray(np.random.default_rng(1).integers(0, 61, size=(2, 12)).astype(np.int32))
  forward_dropless, _ = decode_fns(dropless_graphdef)
  forward_capacity, _ = decode_fns(graphdef)
  got = cached_logits(graphdef, params, tokens, 4)
  assert rel_err(got, forward_dropless(params, tokens)) < 1e-5
  # Capacity 0.5 really drops in the full forward pass, so the two functions differ.
  assert rel_err(forward_capacity(params, tokens), forward_dropless(params, tokens)) > 1e-3


# ------------------------------------------------------------------------- the trained checkpoint


@pytest.fixture(scope="module")
def loaded():
  workdir, result = tiny_checkpoint.trained_workdir()
  return sample.load_params(workdir), result


def test_load_params_restores_the_latest_trained_params(loaded):
  """The restored params give the final evaluation loss the training run reported."""
  model, result = loaded
  assert model.step == tiny_checkpoint.STEPS
  mesh = sample.single_device_mesh()
  eval_fn = jax.jit(lambda p, b: train.eval_step(p, b, graphdef=model.graphdef))
  metrics = train.evaluate(model.params, data.load_dataset(model.config.data, "validation"),
                           model.config, eval_fn=eval_fn,
                           batch_sharding=sharding.batch_sharding(mesh))
  np.testing.assert_allclose(metrics["eval/loss"], result["eval/loss"], rtol=1e-5)


def test_greedy_is_deterministic_and_matches_uncached_argmax(loaded):
  model, _ = loaded
  prompt = sample.encode("the ")
  first = sample.generate(model, prompt, max_new_tokens=20, greedy=True)
  second = sample.generate(model, prompt, max_new_tokens=20, greedy=True, seed=123)
  assert first == second and len(first) == 20
  forward = jax.jit(lambda params, tokens: nnx.merge(model.graphdef, params)(tokens)[0])
  # The model is causal, so right-padding to one length (one compilation) leaves the logits at
  # the last real position unchanged.
  length = len(prompt) + len(first)
  sequence = list(prompt)
  for token in first:
    padded = np.zeros((1, length), np.int32)
    padded[0, :len(sequence)] = sequence
    logits = np.asarray(forward(model.params, jnp.asarray(padded)))
    assert int(np.argmax(logits[0, len(sequence) - 1])) == token
    sequence.append(token)


def test_temperature_zero_and_tiny_top_p_are_greedy(loaded):
  model, _ = loaded
  prompt = sample.encode("and ")
  greedy = sample.generate(model, prompt, max_new_tokens=20, greedy=True)
  assert sample.generate(model, prompt, max_new_tokens=20, temperature=0.0, seed=5) == greedy
  for seed in (0, 1, 2):
    assert sample.generate(model, prompt, max_new_tokens=20, temperature=1.0, top_p=1e-6,
                           seed=seed) == greedy


def test_temperature_sampling_is_reproducible_per_seed(loaded):
  model, _ = loaded
  prompt = sample.encode("she ")
  kwargs = dict(max_new_tokens=20, temperature=1.5, top_p=1.0)
  a = sample.generate(model, prompt, seed=0, **kwargs)
  assert a == sample.generate(model, prompt, seed=0, **kwargs)
  assert a != sample.generate(model, prompt, seed=1, **kwargs)


def test_stops_at_eos(loaded):
  """Generation ends right after the EOS id (here the id greedy decoding emits third)."""
  model, _ = loaded
  prompt = sample.encode("the ")
  greedy = sample.generate(model, prompt, max_new_tokens=20, greedy=True)
  stop_id = greedy[2]
  first = greedy.index(stop_id)
  assert sample.generate(model, prompt, max_new_tokens=20, greedy=True,
                         eos_id=stop_id) == greedy[:first + 1]
  assert sample.decode(sample.encode("ab") + [data.EOS_ID] + sample.encode("cd")) == "ab"


def test_sample_text_returns_prompt_and_continuation(loaded):
  model, _ = loaded
  workdir, _ = tiny_checkpoint.trained_workdir()
  text = sample.sample_text(workdir, "the ", max_new_tokens=20, greedy=True)
  expected = sample.decode(sample.generate(model, sample.encode("the "), max_new_tokens=20,
                                           greedy=True))
  assert text == "the " + expected


def test_encode_decode_round_trip():
  text = "def f(x):\n  return 'héllo'\n"
  ids = sample.encode(text)
  assert min(ids) >= data.NUM_SPECIAL_IDS and len(ids) == len(text.encode())
  assert sample.decode(ids) == text
  assert sample.decode([0xC3 + 3]) == "\ufffd"  # a cut UTF-8 sequence is replaced, not an error


def test_nucleus_keeps_the_smallest_set_reaching_top_p():
  """With probs (0.5, 0.3, 0.15, 0.05), top_p=0.7 keeps the first two; the draws show it."""
  probs = jnp.asarray([[0.15, 0.5, 0.05, 0.3]])
  logits = jnp.log(probs)
  draw = jax.jit(jax.vmap(lambda key: sample.sample_logits(logits, key, temperature=1.0,
                                                           top_p=0.7)[0]))
  draws = np.asarray(draw(jax.random.split(jax.random.key(0), 2000)))
  assert set(np.unique(draws)) == {1, 3}
  assert abs(np.mean(draws == 1) - 0.5 / 0.8) < 0.05
  draws_all = np.asarray(jax.vmap(lambda key: sample.sample_logits(
      logits, key, temperature=1.0, top_p=1.0)[0])(jax.random.split(jax.random.key(1), 2000)))
  assert set(np.unique(draws_all)) == {0, 1, 2, 3}


@pytest.mark.parametrize("kwargs, match", [
    (dict(top_p=0.0), "top_p"), (dict(top_p=1.5), "top_p"), (dict(top_p=-0.1), "top_p"),
    (dict(temperature=-1.0), "temperature"), (dict(temperature=float("nan")), "temperature"),
    (dict(max_new_tokens=0), "max_new_tokens"), (dict(max_new_tokens=64), "max_len"),
])
def test_bad_settings_raise(loaded, kwargs, match):
  model, _ = loaded
  with pytest.raises(ValueError, match=match):
    sample.generate(model, sample.encode("the "), **kwargs)


def test_empty_prompt_and_missing_workdir_raise(loaded, tmp_path):
  model, _ = loaded
  workdir, _ = tiny_checkpoint.trained_workdir()
  with pytest.raises(ValueError, match="prompt is empty"):
    sample.generate(model, [], max_new_tokens=4)
  with pytest.raises(ValueError, match="prompt is empty"):
    sample.sample_text(workdir, "", max_new_tokens=4)
  with pytest.raises(FileNotFoundError, match="config.json"):
    sample.load_params(str(tmp_path))
