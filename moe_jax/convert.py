"""Hugging Face checkpoints to training workdirs and back.

    python -m moe_jax.convert --from_hf=/path/to/Mixtral --workdir=/ckpt/mixtral [--dtype=bfloat16]
    python -m moe_jax.convert --to_hf=/out/mixtral --workdir=/ckpt/mixtral [--model_type=mixtral]

`--from_hf` writes WORKDIR/config.json (configs/default.py with the imported `model` and an `hf`
section) and an orbax checkpoint of the parameters at step 0, which `moe_jax.sample`,
`experiments/routing_stats.py` and fine-tuning read like any training workdir; the tokenizer files
go to WORKDIR/tokenizer/. `--to_hf` writes the latest checkpoint of WORKDIR as config.json +
safetensors in the family's hub layout (`--model_type` for a model trained here from scratch).
"""
from __future__ import annotations

import os
import time

import jax
from absl import app, flags, logging

from moe_jax import checkpoint, sample, train
from moe_jax.hf import api, tokenizer

TOKENIZER_DIR = "tokenizer"


# Bytes of parameters in flight to disk at once while saving, beyond the largest parameter.
WRITE_WINDOW_BYTES = 64 * 2 ** 20


def write_limit_bytes(params) -> int:
  """The save's write window: the largest parameter (orbax refuses a smaller window) plus
  WRITE_WINDOW_BYTES."""
  largest = max(x.size * x.dtype.itemsize for x in jax.tree.leaves(params))
  return largest + WRITE_WINDOW_BYTES


def from_hf(hf_path: str, workdir: str, *, dtype: str | None = None) -> str:
  """Imports `hf_path` into a new training workdir; returns the workdir."""
  if os.path.exists(os.path.join(workdir, "checkpoints")):
    raise ValueError(f"{workdir} already holds checkpoints; convert into a new workdir.")
  start = time.perf_counter()
  mesh = sample.single_device_mesh()
  config = api.config_from_hub(api.read_hub_config(hf_path), dtype=dtype)
  params = api.load_params(hf_path, config, mesh)
  os.makedirs(workdir, exist_ok=True)
  train.write_config(config, workdir)
  ckpt = checkpoint.Checkpointer(workdir, keep=config.train.keep_checkpoints,
                                 write_limit_bytes=write_limit_bytes(params))
  try:
    ckpt.save(0, {"params": params})
  finally:
    ckpt.close()
  copied = tokenizer.copy_tokenizer_files(hf_path, os.path.join(workdir, TOKENIZER_DIR))
  logging.info("Converted %s (%s) into %s in %.1f s; tokenizer files: %s", hf_path,
               config.hf.model_type, workdir, time.perf_counter() - start, copied or "none")
  return workdir


def to_hf(workdir: str, out_dir: str, *, model_type: str | None = None) -> list[str]:
  """Exports the latest checkpoint of `workdir` to `out_dir`; returns the safetensors files."""
  from flax import nnx  # pylint: disable=g-import-not-at-top

  loaded = sample.load_params(workdir)
  model = nnx.merge(loaded.graphdef, loaded.params, loaded.router_state)
  files = api.save_pretrained(model, loaded.config, out_dir, model_type=model_type)
  tokenizer.copy_tokenizer_files(os.path.join(workdir, TOKENIZER_DIR), out_dir)
  logging.info("Exported step %d of %s to %s: %s", loaded.step, workdir, out_dir, files)
  return files


def _define_flags():
  flags.DEFINE_string("from_hf", None, "Hugging Face checkpoint directory to import.")
  flags.DEFINE_string("to_hf", None, "Directory to export the workdir's latest checkpoint to.")
  flags.DEFINE_string("workdir", None, "Training workdir (written by --from_hf, read by --to_hf).")
  flags.DEFINE_string("dtype", None, "--from_hf: parameter dtype (default: the checkpoint's).")
  flags.DEFINE_string("model_type", None, "--to_hf: the family to write (default: the source's).")
  flags.mark_flags_as_required(["workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  f = flags.FLAGS
  if bool(f.from_hf) == bool(f.to_hf):
    raise app.UsageError("Give exactly one of --from_hf=DIR or --to_hf=DIR.")
  try:
    if f.from_hf:
      from_hf(f.from_hf, f.workdir, dtype=f.dtype)
    else:
      to_hf(f.workdir, f.to_hf, model_type=f.model_type)
  except (ValueError, FileNotFoundError) as e:
    raise app.UsageError(str(e)) from None


if __name__ == "__main__":
  _define_flags()
  app.run(main)
