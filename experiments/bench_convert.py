"""Conversion time and peak host memory of importing a >= 1 GB Hugging Face checkpoint.

    python experiments/bench_convert.py --checkpoint=/tmp/bench_mixtral_1gb [--make] [--dtype=bfloat16]

`--make` first writes a random Mixtral-shaped bf16 checkpoint of about 1.1 GB (no torch: the hub
names and shapes come from our own tensor specs of the config below, sharded at 512 MB with the
index). Each measurement runs in a fresh subprocess, so its peak resident set (ru_maxrss) is its
own: the baseline is the resident set after importing JAX, Flax and moe_jax and starting the
backend (VmRSS); the load's extra memory is (peak - baseline), reported as a multiple of the loaded parameters' bytes. `from_pretrained`
alone, and `moe_jax.convert.from_hf` (which also writes the orbax checkpoint), are measured.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

from absl import app, flags

_CHECKPOINT = flags.DEFINE_string("checkpoint", "/tmp/bench_mixtral_1gb", "Checkpoint directory.")
_MAKE = flags.DEFINE_bool("make", False, "Write the random checkpoint first.")
_DTYPE = flags.DEFINE_string("dtype", None, "Parameter dtype of the load (default: the file's).")

HUB_CONFIG = {
    "model_type": "mixtral", "architectures": ["MixtralForCausalLM"], "vocab_size": 32000,
    "hidden_size": 1024, "intermediate_size": 2048, "num_hidden_layers": 9,
    "num_attention_heads": 16, "num_key_value_heads": 4, "head_dim": 64,
    "num_local_experts": 8, "num_experts_per_tok": 2, "max_position_embeddings": 4096,
    "rms_norm_eps": 1e-5, "rope_parameters": {"rope_type": "default", "rope_theta": 1e6},
    "tie_word_embeddings": False, "hidden_act": "silu", "dtype": "bfloat16",
}

_MEASURE = r"""
import json, resource, sys, time
import jax
from moe_jax import convert, sample
from moe_jax.hf import api
def peak_mib():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
def current_mib():
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) for l in f if l.startswith("VmRSS:")) / 1024
what, path, dtype, workdir = sys.argv[1], sys.argv[2], sys.argv[3] or None, sys.argv[4]
sample.single_device_mesh()  # backend initialised before the baseline
baseline = current_mib()
start = time.perf_counter()
if what == "from_pretrained":
    model, config = api.from_pretrained(path, dtype=dtype)
    from flax import nnx
    leaves = jax.tree.leaves(nnx.state(model, nnx.Param))
else:
    convert.from_hf(path, workdir, dtype=dtype)
    config = api.config_from_hub(api.read_hub_config(path), dtype=dtype)
    leaves = None
seconds = time.perf_counter() - start
param_bytes = (sum(x.size * x.dtype.itemsize for x in leaves) if leaves is not None else None)
print(json.dumps({"what": what, "seconds": seconds, "baseline_mib": baseline,
                  "peak_mib": peak_mib(), "param_bytes": param_bytes}))
"""


def make_checkpoint(directory: str) -> int:
  """Writes the random checkpoint; returns its tensor bytes."""
  import ml_dtypes  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top

  from moe_jax.hf import api, safetensors_io  # pylint: disable=g-import-not-at-top

  config = api.config_from_hub(HUB_CONFIG)
  rng = np.random.default_rng(0)
  total = 0

  def tensors():
    nonlocal total
    for spec in api.model_specs(config):
      for name, shape in zip(spec.sources, spec.hub_shapes):
        array = (rng.standard_normal(shape, np.float32) * 0.02).astype(ml_dtypes.bfloat16)
        total += array.nbytes
        yield name, array

  safetensors_io.write_checkpoint(tensors(), directory, max_shard_bytes=512 * 2 ** 20)
  with open(os.path.join(directory, "config.json"), "w") as f:
    json.dump(HUB_CONFIG, f, indent=2)
  return total


def measure(what: str, path: str, dtype: str | None, workdir: str) -> dict:
  out = subprocess.run([sys.executable, "-c", _MEASURE, what, path, dtype or "", workdir],
                       check=True, capture_output=True, text=True)
  return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv):
  del argv
  path = _CHECKPOINT.value
  if _MAKE.value:
    print(f"wrote {make_checkpoint(path) / 2 ** 30:.2f} GiB of tensors to {path}")
  files = [f for f in os.listdir(path) if f.endswith(".safetensors")]
  file_bytes = sum(os.path.getsize(os.path.join(path, f)) for f in files)
  print(f"checkpoint: {path}, {len(files)} files, {file_bytes / 2 ** 30:.2f} GiB")
  load = measure("from_pretrained", path, _DTYPE.value, "")
  workdir = path.rstrip("/") + "_workdir"
  subprocess.run(["rm", "-rf", workdir], check=True)
  conv = measure("convert", path, _DTYPE.value, workdir)
  param_bytes = load["param_bytes"]
  for result in (load, conv):
    extra = (result["peak_mib"] - result["baseline_mib"]) * 2 ** 20
    print(f"{result['what']:16s} {result['seconds']:7.1f} s  baseline {result['baseline_mib']:7.0f}"
          f" MiB  peak {result['peak_mib']:7.0f} MiB  extra {extra / 2 ** 20:7.0f} MiB = "
          f"{extra / param_bytes:.2f} x the parameters ({param_bytes / 2 ** 20:.0f} MiB)")


if __name__ == "__main__":
  app.run(main)
