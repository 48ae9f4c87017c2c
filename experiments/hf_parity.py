"""Max |logit difference| of our import vs transformers' eager float32, per family, on the tests'
tiny random checkpoints (tests/hf_testing.py builds them; needs torch and transformers).

    python experiments/hf_parity.py [FAMILY ...]     # default: every family of the tests
"""
import os
import sys
import tempfile

import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "tests"))
import hf_testing  # noqa: E402  pylint: disable=g-import-not-at-top

from moe_jax import hf  # noqa: E402

if __name__ == "__main__":
  tokens = hf_testing.make_tokens(0)
  with tempfile.TemporaryDirectory() as root:
    for family in sys.argv[1:] or hf_testing.FAMILIES:
      directory = hf_testing.build_tiny(family, os.path.join(root, family))
      reference = hf_testing.reference_logits(directory, tokens)
      model, _ = hf.from_pretrained(directory, dtype="float32")
      ours = np.asarray(model(jnp.asarray(tokens))[0])
      print(f"{family:12s} max |diff| {np.max(np.abs(ours - reference)):.1e}  "
            f"reference std {reference.std():.2f}  max |logit| {np.max(np.abs(reference)):.2f}")
