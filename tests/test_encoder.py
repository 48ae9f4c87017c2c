"""The bidirectional encoder and masked-byte prediction: masks vs their definition, attention
without the causal mask, the MLM loss vs NumPy, validation, and a quick end-to-end run."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import default
from configs import encoder
from moe_jax import data, masking, train
from moe_jax.models.transformer import Transformer
from moe_jax.validation import ConfigError, leaks_future, validate_config

BYTES = (data.NUM_SPECIAL_IDS, data.NUM_SPECIAL_IDS + 256)


# ------------------------------------------------------------------------------------ masking


def _masked_big_batch(rate=0.15, seed=0):
  rng = np.random.default_rng(seed)
  tokens = rng.integers(*BYTES, size=(600, 128))
  lengths = rng.integers(1, 129, size=600)  # right-padded rows of every length
  valid = np.arange(128)[None, :] < lengths[:, None]
  tokens[~valid] = data.PAD_ID
  keys = np.stack([np.full(600, 7), np.arange(600)], axis=1)
  out = masking.mask_tokens(tokens, valid, keys, rate=rate, mask_id=data.MASK_ID,
                            random_ids=BYTES)
  return tokens, valid, out


def test_masking_follows_the_bert_definition_on_a_big_batch():
  tokens, valid, out = _masked_big_batch()
  chosen = out["weights"] == 1.0
  assert set(np.unique(out["weights"])) <= {0.0, 1.0}
  # Exactly round-half-up(15% of the valid positions) per row, at least one.
  expected = np.maximum(1, np.floor(0.15 * valid.sum(1) + 0.5)).astype(int)
  np.testing.assert_array_equal(chosen.sum(1), expected)
  assert not (chosen & ~valid).any()  # padding is never chosen
  assert (out["inputs"][~valid] == data.PAD_ID).all()
  np.testing.assert_array_equal(out["targets"], tokens)  # targets are the original bytes
  np.testing.assert_array_equal(out["inputs"][~chosen], tokens[~chosen])
  masked = out["inputs"][chosen] == data.MASK_ID
  changed = ~masked & (out["inputs"][chosen] != tokens[chosen])
  kept = out["inputs"][chosen] == tokens[chosen]
  n = chosen.sum()
  assert n > 5000
  # 80 / 10 / 10; a random byte equals the original with probability 1/256. Tolerance ~4 sigma.
  tol = 4 * math.sqrt(0.25 / n)
  assert abs(masked.mean() - 0.8) < tol
  assert abs(changed.mean() - 0.1 * 255 / 256) < tol
  assert abs(kept.mean() - (0.1 + 0.1 / 256)) < tol
  replaced = out["inputs"][chosen][~masked]
  assert ((replaced >= BYTES[0]) & (replaced < BYTES[1])).all()
  # Positions are chosen uniformly among the valid ones: the first and second half of each row's
  # valid positions get the same share of the masks.
  first_half = np.arange(128)[None, :] < (valid.sum(1) // 2)[:, None]
  long_rows = valid.sum(1) >= 40
  share = (chosen & first_half)[long_rows].sum() / chosen[long_rows].sum()
  half_share = (first_half & valid)[long_rows].sum() / valid[long_rows].sum()
  assert abs(share - half_share) < 0.03


def test_masking_is_a_function_of_the_keys():
  tokens, valid, out = _masked_big_batch()
  keys = np.stack([np.full(600, 7), np.arange(600)], axis=1)
  again = masking.mask_tokens(tokens, valid, keys, rate=0.15, mask_id=data.MASK_ID,
                              random_ids=BYTES)
  for name in out:
    np.testing.assert_array_equal(again[name], out[name])
  # A row's masks depend on its own key only: reordering rows reorders the masks.
  order = np.random.default_rng(1).permutation(600)
  shuffled = masking.mask_tokens(tokens[order], valid[order], keys[order], rate=0.15,
                                 mask_id=data.MASK_ID, random_ids=BYTES)
  np.testing.assert_array_equal(shuffled["inputs"], out["inputs"][order])
  other = masking.mask_tokens(tokens, valid, keys + [[1, 0]], rate=0.15,
                              mask_id=data.MASK_ID, random_ids=BYTES)
  assert (other["weights"] != out["weights"]).any()


def test_all_padding_row_gets_no_target_and_bad_rate_raises():
  tokens = np.full((2, 5), data.PAD_ID)
  valid = np.zeros((2, 5), bool)
  out = masking.mask_tokens(tokens, valid, np.zeros((2, 1), int), rate=0.5,
                            mask_id=data.MASK_ID, random_ids=BYTES)
  assert out["weights"].sum() == 0
  with pytest.raises(ValueError, match="mask rate 0"):
    masking.mask_tokens(tokens, valid, np.zeros((2, 1), int), rate=0, mask_id=data.MASK_ID,
                        random_ids=BYTES)


def _mlm_dataset(split="train", **kwargs):
  config = default.get_config("tiny").data
  config.objective = "mlm"
  config.update(kwargs)
  return data.load_dataset(config, split)


def test_train_masks_depend_on_seed_and_step_only_and_not_on_the_rows_read():
  dataset = _mlm_dataset()
  lm = data.load_dataset(default.get_config("tiny").data, "train")
  batch = dataset.train_batch(3, 8, seed=1)
  np.testing.assert_array_equal(batch["targets"], lm.train_batch(3, 8, seed=1)["inputs"])
  for name, value in dataset.train_batch(3, 8, seed=1).items():
    np.testing.assert_array_equal(value, batch[name])  # a resumed run sees the same masks
  # A process reading rows 4..7 sees exactly those rows of the global batch.
  part = dataset.train_batch(3, 8, seed=1, rows=slice(4, 8))
  for name, value in part.items():
    np.testing.assert_array_equal(value, batch[name][4:8])
  assert (dataset.train_batch(4, 8, seed=1)["weights"] != batch["weights"]).any()
  assert (batch["weights"].sum(1) == round(0.15 * 32)).all()
  # Another seed reorders the chunks; with the chunks of step 3 its masks differ too.
  other = dataset.train_batch(3, 8, seed=2)
  assert (other["weights"] != batch["weights"]).any()


def test_eval_masks_are_per_chunk_whatever_the_batching():
  dataset = _mlm_dataset("validation")

  def concat(batches):
    batches = list(batches)
    return {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}

  a = concat(dataset.eval_batches(8, 2))
  b = concat(dataset.eval_batches(4, 4))
  for name in a:
    np.testing.assert_array_equal(a[name], b[name])
  assert a["weights"].sum() == 16 * round(0.15 * 32)
  # The whole (small) split with a padded last batch: padded rows carry no target.
  whole = list(dataset.eval_batches(5, 1000))
  rows = sum(int((b["weights"].sum(1) > 0).sum()) for b in whole)
  assert rows == len(dataset)
  assert whole[-1]["weights"][len(dataset) % 5 or 5:].sum() == 0


# ---------------------------------------------------------------------------------- attention


def _model(causal, moe_every=0):
  config = default.get_config("tiny").model
  config.vocab_size = 61
  config.moe_every = moe_every
  config.causal = causal
  model = Transformer(config, rngs=nnx.Rngs(0))
  return model, jax.jit(lambda tokens: model(tokens)[0])


@pytest.mark.parametrize("moe_every", [0, 1], ids=["dense", "dropless-moe"])
def test_bidirectional_attention_sees_later_tokens(moe_every):
  tokens = np.random.default_rng(0).integers(0, 61, size=(2, 13)).astype(np.int32)
  changed = tokens.copy()
  changed[0, 9] = (tokens[0, 9] + 17) % 61
  for causal in (True, False):
    _, forward = _model(causal, moe_every)
    before, after = np.asarray(forward(tokens)), np.asarray(forward(changed))
    earlier = np.abs(after[0, :9] - before[0, :9]).max(axis=-1)
    if causal:
      assert earlier.max() < 1e-6
    else:
      assert (earlier > 1e-4).all(), earlier  # every earlier position sees the change
    np.testing.assert_allclose(after[1], before[1], atol=1e-6)  # rows stay independent


def test_noncausal_attention_matches_numpy_full_softmax():
  model, _ = _model(causal=False)
  attn = model.blocks[0].attn
  rng = np.random.default_rng(3)
  x = rng.normal(size=(2, 7, 32)).astype(np.float32)
  positions = np.broadcast_to(np.arange(7), (2, 7))
  out = np.asarray(attn(jnp.asarray(x), jnp.asarray(positions)))

  def rope(v):  # half-split RoPE pairs (i, i + Dh/2), theta_i = base^(-2i/Dh), in float64
    half = v.shape[-1] // 2
    theta = 10_000.0 ** (-2.0 * np.arange(half) / v.shape[-1])
    angle = positions[..., None, None] * theta
    a, b = v[..., :half], v[..., half:]
    return np.concatenate([a * np.cos(angle) - b * np.sin(angle),
                           b * np.cos(angle) + a * np.sin(angle)], -1)

  w = {n: np.asarray(getattr(attn, n)[...], np.float64) for n in ("w_q", "w_k", "w_v", "w_o")}
  q = rope(np.einsum("bsd,dhk->bshk", x, w["w_q"]))
  k = rope(np.einsum("bsd,dhk->bshk", x, w["w_k"]))
  v = np.einsum("bsd,dhk->bshk", x, w["w_v"])
  scores = np.einsum("bqhk,bshk->bhqs", q, k) / math.sqrt(q.shape[-1])
  p = np.exp(scores - scores.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  expected = np.einsum("bhqs,bshk,hkd->bqd", p, v, w["w_o"])
  np.testing.assert_allclose(out, expected, rtol=2e-4, atol=2e-5)


def test_decode_refuses_an_encoder():
  model, _ = _model(causal=False)
  with pytest.raises(ValueError, match=r"model.causal=False"):
    model.decode(jnp.zeros((1, 2), jnp.int32), model.init_cache(1, 4), 0)


# --------------------------------------------------------------------------------------- loss


@pytest.mark.parametrize("variant", ["dense", "bpr", "expert_choice_c1", "soft"])
def test_mlm_loss_is_the_cross_entropy_over_masked_positions(variant):
  config = encoder.get_config(f"{variant},quick")
  graphdef, params, _ = train.build_model(config, _one_device_mesh())
  batch = data.load_dataset(config.data, "train").train_batch(0, 8, seed=0)
  jbatch = {k: jnp.asarray(v) for k, v in batch.items()}
  total, (ce, aux) = train.loss_fn(params, jbatch, graphdef)
  logits, _ = nnx.merge(graphdef, params)(jbatch["inputs"])
  logits = np.asarray(logits, np.float64)
  log_probs = logits - logits.max(-1, keepdims=True)
  log_probs -= np.log(np.exp(log_probs).sum(-1, keepdims=True))
  chosen = batch["weights"] == 1
  picked = np.take_along_axis(log_probs, batch["targets"][..., None], -1)[..., 0]
  expected = -picked[chosen].mean()
  np.testing.assert_allclose(float(ce), expected, rtol=1e-5)
  np.testing.assert_allclose(float(total), expected + float(aux["loss"]), rtol=1e-5)
  if variant == "dense":
    assert float(aux["loss"]) == 0.0
  out = train.eval_step(params, jbatch, graphdef=graphdef)
  np.testing.assert_allclose(float(out["ce_sum"]), -picked[chosen].sum(), rtol=1e-5)
  assert float(out["weight_sum"]) == chosen.sum() == 8 * round(0.15 * 32)


def _one_device_mesh():
  from moe_jax import sample  # pylint: disable=g-import-not-at-top
  return sample.single_device_mesh()


# --------------------------------------------------------------------------------- validation


def _problems(config):
  with pytest.raises(ConfigError) as info:
    validate_config(config, 1)
  return str(info.value)


def test_validation_pairs_objective_and_causality_and_needs_a_mask_id():
  config = default.get_config("tiny")
  config.model.causal = False
  message = _problems(config)
  assert "config.model.causal=False is invalid with config.data.objective='lm'" in message
  config = default.get_config("tiny")
  config.data.objective = "mlm"
  message = _problems(config)
  assert "config.model.causal=True is invalid with config.data.objective='mlm'" in message
  assert "config.model.vocab_size=259" in message and "at least 260" in message
  config = encoder.get_config("quick")
  config.data.objective = "bert"
  assert "config.data.objective='bert' is invalid" in _problems(config)
  config = encoder.get_config("quick")
  config.data.mask_rate = 0.0
  assert "config.data.mask_rate=0.0 is invalid" in _problems(config)
  config = encoder.get_config("quick")
  with config.model.ignore_type():
    config.model.causal = "no"
  assert "config.model.causal='no' is invalid" in _problems(config)


@pytest.mark.parametrize("variant", encoder.VARIANTS)
def test_encoder_variants_route_over_sequences_without_the_noncausal_opt_in(variant):
  for name in (variant, f"{variant},quick"):
    config = encoder.get_config(name)
    assert not config.model.moe.allow_noncausal
    validate_config(config, 1)
    validate_config(config, 8)
    assert leaks_future(config) is None
  if variant in ("token_choice_capacity", "bpr", "expert_choice_c1", "expert_choice_c2", "soft"):
    # The same routing over sequence groups in a decoder would leak, and is refused there.
    decoder = encoder.get_config(variant)
    decoder.model.causal, decoder.data.objective = True, "lm"
    assert leaks_future(decoder) is not None
    assert "allow_noncausal" in _problems(decoder)


def test_encoder_soft_slots_follow_sequence_length_and_experts():
  """A group is one sequence: ceil(K * S / E) slots per expert, following overrides."""
  config = encoder.get_config("soft")
  assert config.model.moe.soft_slots_per_expert == math.ceil(2 * 128 / 8)
  config.data.seq_len, config.model.moe.num_experts = 100, 6
  assert config.model.moe.soft_slots_per_expert == math.ceil(2 * 100 / 6)


def test_unknown_encoder_variant_is_rejected():
  with pytest.raises(ValueError, match="variant 'switch'"):
    encoder.get_config("switch")


# ---------------------------------------------------------------------------------- end to end


def test_quick_encoder_learns(tmp_path):
  config = encoder.get_config("quick")
  result = train.train_and_evaluate(config, str(tmp_path))
  history = result["eval_history"]
  assert [step for step, *_ in history] == [20, 40]
  bpb = [b for _, _, b, _ in history]
  assert all(np.isfinite(bpb)) and bpb[-1] < bpb[0] < math.log2(config.model.vocab_size)
  assert result["eval/tokens"] == config.data.eval_batches * config.data.batch_size * round(
      0.15 * config.data.seq_len)
