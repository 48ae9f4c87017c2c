"""Routing analysis (experiments/routing_stats.py) on a tiny trained checkpoint."""
import importlib.util
import keyword
import os
import re
import string
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import tiny_checkpoint
from moe_jax import data, sample

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _import_script():
  spec = importlib.util.spec_from_file_location(
      "routing_stats", os.path.join(REPO, "experiments", "routing_stats.py"))
  module = importlib.util.module_from_spec(spec)
  sys.modules[spec.name] = module  # dataclasses look their module up here
  spec.loader.exec_module(module)
  return module


routing_stats = _import_script()


@pytest.fixture(scope="module")
def analysed():
  workdir, _ = tiny_checkpoint.trained_workdir()
  model = sample.load_params(workdir)
  return model, routing_stats.compute_routing_stats(model, num_batches=2, batch_size=8)


def reference_classes(tokens):
  """Independent byte classes [B, S, C]: str methods per byte and a word split for keywords."""
  out = np.zeros(tokens.shape + (6,), bool)
  for b, row in enumerate(tokens):
    text = "".join(chr(t - 3) if t >= 3 else "\0" for t in row)
    for s, char in enumerate(text):
      ascii_char = ord(char) < 128 and char != "\0"
      out[b, s, 0] = ascii_char and char.isalpha()
      out[b, s, 1] = ascii_char and char.isdigit()
      out[b, s, 2] = char in " \t\n\r\x0b\x0c"
      out[b, s, 3] = char in string.punctuation
      out[b, s, 5] = not out[b, s, :4].any()
    for word in re.finditer(r"[A-Za-z0-9_]+", text):
      if word.group() in keyword.kwlist:
        out[b, word.start():word.end(), 4] = True
  return out


def test_classify_tokens_matches_reference():
  text = b"def f(x):\n  return x1 if not None else 'in' # undef deff\n\xc3\xa9"
  tokens = np.asarray([[b + 3 for b in text] + [data.EOS_ID]])
  got = routing_stats.classify_tokens(tokens)
  np.testing.assert_array_equal(got, reference_classes(tokens))
  keyword_bytes = bytes(b for b, k in zip(text, got[0, :-1, 4]) if k)
  assert keyword_bytes == b"defreturnifnotNoneelsein"  # not 'undef' or 'deff'


def test_loads_sum_to_one_and_stats_are_sane(analysed):
  model, stats = analysed
  assert [layer.layer for layer in stats.layers] == [1]  # tiny: MoE in every other layer
  for layer in stats.layers:
    np.testing.assert_allclose(layer.load.sum(), 1.0, rtol=1e-9)
    assert layer.assignments.sum() == stats.num_tokens * stats.top_k
    assert layer.dropped_fraction == 0.0  # dropless
    assert 0.0 < layer.router_entropy <= np.log(stats.num_experts) + 1e-6
  assert stats.num_tokens == 2 * 8 * model.config.data.seq_len


def test_class_preferences_match_independent_counts(analysed):
  """Recompute every expert's class counts by walking the blocks by hand and compare."""
  model, stats = analysed
  config = model.config
  m = nnx.merge(model.graphdef, model.params)
  dataset = data.load_dataset(config.data, "validation")
  num_experts, top_k = config.model.moe.num_experts, config.model.moe.top_k
  counts = np.zeros((num_experts, 6), np.int64)
  class_tokens = np.zeros(6, np.int64)
  for batch in dataset.eval_batches(8, 2):
    tokens = batch["inputs"]
    classes = reference_classes(tokens).reshape(-1, 6)
    class_tokens += classes.sum(0)
    x = m.embed(jnp.asarray(tokens))
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
    for block in m.blocks:
      if block.is_moe:
        h = block.ffn_norm(x + block.attn(block.attn_norm(x), positions))
        probs = jax.nn.softmax(block.ffn.router(h.reshape(-1, h.shape[-1])), axis=-1)
        chosen = np.asarray(jax.lax.top_k(probs, top_k)[1])
        for k in range(top_k):
          for c in range(6):
            counts[:, c] += np.bincount(chosen[classes[:, c], k], minlength=num_experts)
      x, _ = block(x, positions, None)
  layer = stats.layers[0]
  np.testing.assert_array_equal(stats.class_tokens, class_tokens)
  np.testing.assert_array_equal(layer.class_counts, counts)
  with np.errstate(invalid="ignore"):  # 0/0 for a class absent from the data -> NaN
    expected_pref = (counts / layer.assignments[:, None]) / (class_tokens / stats.num_tokens)
  np.testing.assert_allclose(stats.preference(layer), expected_pref, rtol=1e-12)
  # The synthetic corpus has letters, spaces and newlines but no digits.
  assert class_tokens[1] == 0 and class_tokens[0] > 0 and class_tokens[2] > 0


def test_markdown_and_heatmap_are_written(analysed, tmp_path):
  _, stats = analysed
  text = routing_stats.to_markdown(stats, "tiny")
  layer = stats.layers[0]
  rows = [line for line in text.splitlines() if re.match(r"\| \d+ \|", line)]
  assert len(rows) == stats.num_experts
  for e, row in enumerate(rows):
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert float(cells[1]) == pytest.approx(layer.load[e], abs=5e-4)
    pref = stats.preference(layer)[e]
    for value, cell in zip(pref, cells[2:]):
      assert cell == "-" if np.isnan(value) else float(cell) == pytest.approx(value, abs=5e-3)
  path = tmp_path / "heatmap.png"
  routing_stats.plot_heatmap(stats, str(path))
  assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 5000


def test_dense_model_is_rejected(analysed):
  model, _ = analysed
  config = model.config.copy_and_resolve_references()
  config.model.moe_every = 0
  with pytest.raises(ValueError, match="no MoE layer"):
    routing_stats.compute_routing_stats(model._replace(config=config))
