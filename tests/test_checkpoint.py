"""`checkpoint.Checkpointer`'s bounded write window (the converter's memory setting)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moe_jax import checkpoint


def random_state():
  rng = np.random.default_rng(0)
  return {"params": {"a": jnp.asarray(rng.standard_normal((33, 65), np.float32)),
                     "b": {"c": jnp.asarray(rng.standard_normal((7, 3, 5), np.float32))}},
          "step": jnp.asarray(3, jnp.int32)}


def test_limited_write_window_round_trips(tmp_path):
  """A window smaller than the state (larger than its largest array) writes a checkpoint that an
  ordinary Checkpointer restores exactly."""
  state = random_state()
  largest = max(x.nbytes for x in jax.tree.leaves(state))
  total = sum(x.nbytes for x in jax.tree.leaves(state))
  limit = largest + 16
  assert limit < total
  ckpt = checkpoint.Checkpointer(str(tmp_path), keep=1, write_limit_bytes=limit)
  ckpt.save(0, state)
  ckpt.close()
  reader = checkpoint.Checkpointer(str(tmp_path), keep=1)
  restored = reader.restore(0, state)
  reader.close()
  for got, want in zip(jax.tree.leaves(restored), jax.tree.leaves(state)):
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_window_below_largest_array_is_refused(tmp_path):
  state = random_state()
  largest = max(x.nbytes for x in jax.tree.leaves(state))
  ckpt = checkpoint.Checkpointer(str(tmp_path), keep=1, write_limit_bytes=largest // 2)
  with pytest.raises(ValueError, match="write_limit_bytes"):
    ckpt.save(0, state)
  ckpt.close()
