"""Sparse upcycling (`moe_jax.upcycle`): the upcycled MoE computes the dense model's function."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from configs.default import get_config
from moe_jax import train, upcycle
from moe_jax.models.transformer import Transformer


def rel_err(actual, expected):
  actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
  return np.linalg.norm(actual - expected) / max(np.linalg.norm(expected), 1e-30)


def configs(*, top_k=2, normalize=True, moe_every=1, num_layers=3, expert_hidden_dim=None):
  dense = get_config("tiny")
  dense.model.moe_every = 0
  dense.model.num_layers = num_layers
  moe = get_config("tiny")
  moe.model.num_layers = num_layers
  moe.model.moe_every = moe_every
  moe.model.moe.num_experts = 4
  moe.model.moe.top_k = top_k
  moe.model.moe.normalize_top_k = normalize
  moe.model.moe.expert_hidden_dim = expert_hidden_dim or dense.model.mlp_dim
  return dense, moe


def dense_params(dense_config, seed=0):
  model = Transformer(dense_config.model, rngs=nnx.Rngs(params=seed))
  return nnx.to_pure_dict(nnx.state(model, nnx.Param))


def logits(config, params, tokens):
  graphdef, _ = nnx.split(nnx.eval_shape(lambda: Transformer(config.model, rngs=nnx.Rngs(0))))
  return np.asarray(jax.jit(lambda p, t: nnx.merge(graphdef, p)(t)[0])(params, tokens))


TOKENS = jnp.asarray(np.random.default_rng(0).integers(3, 259, size=(2, 16)).astype(np.int32))


@pytest.mark.parametrize("top_k, moe_every", [(2, 1), (3, 2)])
def test_upcycled_model_computes_the_dense_function(top_k, moe_every):
  """Renormalised top-K (K >= 2), no noise: every expert is the MLP and the weights sum to 1."""
  dense_config, moe_config = configs(top_k=top_k, moe_every=moe_every)
  params = dense_params(dense_config)
  moe_params = upcycle.upcycle_params(params, dense_config, moe_config, rng=jax.random.key(1))
  expected = logits(dense_config, params, TOKENS)
  np.testing.assert_allclose(logits(moe_config, moe_params, TOKENS), expected, rtol=1e-5,
                             atol=1e-5 * np.abs(expected).max())
  # The structure is exactly the MoE model's, and the experts are copies of the MLP.
  template = upcycle.abstract_params(moe_config.model)
  assert jax.tree.structure(moe_params) == jax.tree.structure(template)
  for layer in range(moe_config.model.num_layers):
    ffn = moe_params["blocks"][layer]["ffn"]
    if "experts" in ffn:
      dense_ffn = params["blocks"][layer]["ffn"]
      for e in range(4):
        # Gate and up are interleaved column by column in the experts' fused weight.
        gate_up = np.asarray(ffn["experts"]["w_gate_up"][e])
        np.testing.assert_array_equal(gate_up[:, 0::2], dense_ffn["w_gate"])
        np.testing.assert_array_equal(gate_up[:, 1::2], dense_ffn["w_up"])
        np.testing.assert_array_equal(ffn["experts"]["w_down"][e], dense_ffn["w_down"])
      # A fresh, small, zero-mean router: not a copy of anything, not zero.
      kernel = np.asarray(ffn["router"]["kernel"])
      assert 0.01 < kernel.std() < 0.03 and abs(kernel.mean()) < 0.01
    else:
      np.testing.assert_array_equal(ffn["w_up"], params["blocks"][layer]["ffn"]["w_up"])
  np.testing.assert_array_equal(moe_params["embed"]["embedding"], params["embed"]["embedding"])


def test_noise_and_unnormalised_top_k_change_the_function():
  dense_config, moe_config = configs()
  params = dense_params(dense_config)
  expected = logits(dense_config, params, TOKENS)
  noisy = upcycle.upcycle_params(params, dense_config, moe_config, noise_std=0.05,
                                 rng=jax.random.key(1))
  assert rel_err(logits(moe_config, noisy, TOKENS), expected) > 1e-3
  experts = noisy["blocks"][0]["ffn"]["experts"]["w_gate_up"]
  assert not np.allclose(experts[0], experts[1])  # each expert gets its own noise
  # Relative noise of std 0.05: the copies stay within a few percent of the dense weights.
  dense_w = np.asarray(params["blocks"][0]["ffn"]["w_up"])
  assert 0.03 < rel_err(np.asarray(experts[0])[:, 1::2], dense_w) < 0.07
  again = upcycle.upcycle_params(params, dense_config, moe_config, noise_std=0.05,
                                 rng=jax.random.key(1))
  np.testing.assert_array_equal(again["blocks"][0]["ffn"]["experts"]["w_gate_up"], experts)
  # Raw (unnormalised) top-2 probabilities sum to < 1, so the output is scaled down.
  _, raw_config = configs(normalize=False)
  raw = upcycle.upcycle_params(params, dense_config, raw_config, rng=jax.random.key(1))
  assert rel_err(logits(raw_config, raw, TOKENS), expected) > 1e-3


@pytest.mark.parametrize("change, match", [
    (dict(expert_hidden_dim=32), "expert_hidden_dim=32 must equal the dense model.mlp_dim=64"),
])
def test_mismatched_expert_hidden_dim_raises(change, match):
  dense_config, moe_config = configs(**change)
  with pytest.raises(ValueError, match=match):
    upcycle.upcycle_params(dense_params(dense_config), dense_config, moe_config,
                           rng=jax.random.key(0))


def test_other_incompatibilities_are_listed():
  dense_config, moe_config = configs()
  moe_config.model.d_model = 48
  moe_config.model.moe.num_shared_experts = 1
  with pytest.raises(ValueError) as info:
    upcycle.check_compatible(dense_config, moe_config)
  message = str(info.value)
  assert "model.d_model" in message and "num_shared_experts=1" in message
  with pytest.raises(ValueError, match="must be dense"):
    upcycle.check_compatible(moe_config, moe_config)


def test_learned_noise_router_upcycles_with_zero_noise_kernel():
  """router_noise="learned" adds W_noise; upcycling starts it at 0, as a fresh router would."""
  dense_config, moe_config = configs(num_layers=1)
  moe_config.model.moe.router_noise = "learned"
  params = dense_params(dense_config)
  moe_params = upcycle.upcycle_params(params, dense_config, moe_config, rng=jax.random.key(1))
  assert jax.tree.structure(moe_params) == jax.tree.structure(
      upcycle.abstract_params(moe_config.model))
  np.testing.assert_array_equal(moe_params["blocks"][0]["ffn"]["router"]["noise_kernel"], 0.0)


def test_upcycled_optimizer_state():
  """Expert moments copy the MLP's, router moments are zero, counts continue."""
  dense_config, moe_config = configs()
  tx, _ = train.make_optimizer(dense_config.train)
  params = dense_params(dense_config)
  grads = jax.tree.map(lambda p: jnp.full_like(p, 0.1) * jnp.sign(p), params)
  state = tx.init(params)
  for _ in range(3):
    _, state = tx.update(grads, state, params)
  moe_params = upcycle.upcycle_params(params, dense_config, moe_config, rng=jax.random.key(0))
  template = tx.init(moe_params)
  moe_state = upcycle.upcycle_opt_state(state, template, dense_config, moe_config)
  assert jax.tree.structure(moe_state) == jax.tree.structure(template)
  adam = [s for s in jax.tree.leaves(moe_state, is_leaf=lambda x: isinstance(
      x, optax.ScaleByAdamState)) if isinstance(s, optax.ScaleByAdamState)]
  dense_adam = [s for s in jax.tree.leaves(state, is_leaf=lambda x: isinstance(
      x, optax.ScaleByAdamState)) if isinstance(s, optax.ScaleByAdamState)]
  assert len(adam) == 1 and int(adam[0].count) == 3
  for moment, dense_moment in ((adam[0].mu, dense_adam[0].mu), (adam[0].nu, dense_adam[0].nu)):
    ffn = moment["blocks"][0]["ffn"]
    np.testing.assert_array_equal(np.asarray(ffn["experts"]["w_gate_up"][2])[:, 1::2],
                                  dense_moment["blocks"][0]["ffn"]["w_up"])
    np.testing.assert_array_equal(np.asarray(ffn["experts"]["w_gate_up"][2])[:, 0::2],
                                  dense_moment["blocks"][0]["ffn"]["w_gate"])
    assert np.abs(np.asarray(ffn["experts"]["w_gate_up"])).max() > 0
    np.testing.assert_array_equal(ffn["router"]["kernel"], 0.0)
  # One optimizer step on the upcycled state works and keeps the structure.
  updates, new_state = tx.update(jax.tree.map(jnp.ones_like, moe_params), moe_state, moe_params)
  assert jax.tree.structure(new_state) == jax.tree.structure(template)
  assert all(np.all(np.isfinite(np.asarray(u))) for u in jax.tree.leaves(updates))
