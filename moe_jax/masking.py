"""Masked-token corruption for a bidirectional encoder (BERT, Devlin et al. 2019, Sec. 3.1).

Masked language modelling: in each sequence a fraction `rate` of the non-padding positions is
chosen; of the chosen positions 80% are replaced by a [MASK] id, 10% by a random byte and 10% are
left unchanged, and the model predicts the original token at every chosen position (and nowhere
else). Here the number chosen per sequence is exact, round(rate * n_valid) (at least one when
there is a valid position), sampled without replacement; the 80/10/10 split is drawn per chosen
position.

Everything is NumPy and a pure function of the tokens and per-row keys: a row's corruption comes
from `np.random.default_rng(key)`, so a resumed run (keys from seed, step and row) and every model
evaluated on a split (keys from the chunk index) see identical masks. This module depends on no
other part of the package; `moe_jax.data` supplies the ids.
"""
from __future__ import annotations

import numpy as np

# The 80/10/10 split of BERT Sec. 3.1 (and Appendix A.1).
MASK_FRACTION = 0.8
RANDOM_FRACTION = 0.1


def num_masked(num_valid: int, rate: float) -> int:
  """Positions chosen in a sequence of `num_valid` non-padding tokens: round half up, >= 1."""
  if num_valid <= 0:
    return 0
  return min(num_valid, max(1, int(np.floor(rate * num_valid + 0.5))))


def mask_tokens(tokens: np.ndarray, valid: np.ndarray, keys: np.ndarray, *, rate: float,
                mask_id: int, random_ids: tuple[int, int]) -> dict[str, np.ndarray]:
  """The masked-prediction batch of `tokens`: corrupted inputs, original targets, target weights.

  Args:
    tokens: int [B, S] original token ids.
    valid: bool [B, S], False at padding (never chosen, weight 0).
    keys: int [B, k] non-negative; row b is corrupted by `np.random.default_rng(keys[b])`.
    rate: fraction of each row's valid positions to choose, in (0, 1].
    mask_id: the [MASK] id.
    random_ids: [low, high) range the random replacements are drawn from (the byte ids).

  Returns:
    {"inputs": int32 [B, S] (tokens, corrupted at chosen positions), "targets": int32 [B, S] (the
    original tokens), "weights": float32 [B, S] (1 at chosen positions, 0 elsewhere)}.
  """
  tokens = np.asarray(tokens)
  valid = np.asarray(valid, bool)
  keys = np.asarray(keys)
  if tokens.ndim != 2 or valid.shape != tokens.shape or keys.ndim != 2 or len(keys) != len(tokens):
    raise ValueError(f"need tokens [B, S], valid [B, S], keys [B, k]; got {tokens.shape}, "
                     f"{valid.shape}, {keys.shape}.")
  if not 0 < rate <= 1:
    raise ValueError(f"mask rate {rate} is invalid; allowed: (0, 1].")
  inputs = tokens.astype(np.int32, copy=True)
  weights = np.zeros(tokens.shape, np.float32)
  for row in range(len(tokens)):
    rng = np.random.default_rng([int(k) for k in keys[row]])
    positions = np.flatnonzero(valid[row])
    chosen = rng.choice(positions, num_masked(len(positions), rate), replace=False)
    kind = rng.random(len(chosen))
    replacement = rng.integers(random_ids[0], random_ids[1], len(chosen))
    weights[row, chosen] = 1.0
    masked = kind < MASK_FRACTION
    randomised = (kind >= MASK_FRACTION) & (kind < MASK_FRACTION + RANDOM_FRACTION)
    inputs[row, chosen[masked]] = mask_id
    inputs[row, chosen[randomised]] = replacement[randomised]
  return {"inputs": inputs, "targets": tokens.astype(np.int32), "weights": weights}
