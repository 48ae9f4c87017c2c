"""Dropless MoE layer fwd+bwd against the dense FFN of equal active FLOPs, per gmm backend.

    python experiments/bench_moe_layer.py --experts=8,64 --backends=blocked,xla

Builds `moe_jax.moe.MoELayer` (token-choice top-K, dropless) and `moe_jax.moe.MLP` with hidden size
K * expert_hidden_dim, and times, in one process, the jitted forward and the forward+backward
(gradients w.r.t. the input and every parameter) of both on the same random tokens. Prints a table
of median times and the ratio MoE / dense for the forward, the forward+backward, and the backward
alone (the difference of the two); `--csv` also writes it as CSV.

The ratios differ by pass because the baseline's passes cost differently: on XLA:CPU the dense
FFN's backward takes 3-4x its forward, more than the 2x of its FLOPs, so a fwd+bwd ratio alone
flatters a layer whose backward is the cheaper part of its own cost.
"""
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app  # noqa: E402
from absl import flags  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from configs import default  # noqa: E402
from moe_jax.moe import MLP, MoELayer  # noqa: E402

_TOKENS = flags.DEFINE_integer("num_tokens", 4096, "Tokens T per call (batch 1 x T).")
_D = flags.DEFINE_integer("d", 512, "Model width D.")
_F = flags.DEFINE_integer("f", 512, "Expert hidden size F (dense FFN uses K * F).")
_EXPERTS = flags.DEFINE_list("experts", ["8", "64"], "Numbers of experts E.")
_TOP_K = flags.DEFINE_integer("top_k", 2, "Experts per token K.")
_BACKENDS = flags.DEFINE_list("backends", ["blocked", "xla"], "gmm backends to time.")
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Compute dtype.")
_REPEATS = flags.DEFINE_integer("repeats", 7, "Timed calls per measurement (median reported).")
_CSV = flags.DEFINE_string("csv", "", "Optional CSV output path.")


def _median_seconds(fn, *args) -> float:
  jax.block_until_ready(fn(*args))  # compile + warm up
  times = []
  for _ in range(_REPEATS.value):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return float(np.median(times))


def _timings(module, x, probe):
  """Median seconds of the jitted forward and forward+backward of `module` on x [1, T, D]."""
  graphdef, params = nnx.split(module)

  def forward(params, x):
    out = nnx.merge(graphdef, params)(x)
    return out[0] if isinstance(out, tuple) else out

  def loss(params, x):
    return jnp.sum(forward(params, x).astype(jnp.float32) * probe)

  fwd = jax.jit(forward)
  # value_and_grad: the loss value keeps the whole forward alive (with grad alone, XLA drops the
  # last projection's forward, since a linear loss's gradient does not need its output).
  fwd_bwd = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
  return _median_seconds(fwd, params, x), _median_seconds(fwd_bwd, params, x)


def main(argv):
  del argv
  dtype = jnp.dtype(_DTYPE.value)
  rng = np.random.default_rng(0)
  shape = (1, _TOKENS.value, _D.value)
  x = jnp.asarray(rng.normal(size=shape), dtype)
  probe = jnp.asarray(rng.normal(size=shape), jnp.float32)
  dense = MLP(_D.value, _TOP_K.value * _F.value, rngs=nnx.Rngs(0), dtype=dtype)
  dense_fwd, dense_fwd_bwd = _timings(dense, x, probe)

  dense_bwd = dense_fwd_bwd - dense_fwd
  rows = []
  print(f"JAX {jax.__version__} on {jax.devices()[0].device_kind} ({jax.default_backend()}), "
        f"T={_TOKENS.value} D={_D.value} F={_F.value} K={_TOP_K.value} dtype={_DTYPE.value}; "
        f"dense FFN hidden {_TOP_K.value * _F.value}: fwd {dense_fwd * 1e3:.1f} ms, "
        f"fwd+bwd {dense_fwd_bwd * 1e3:.1f} ms, bwd (the difference) {dense_bwd * 1e3:.1f} ms")
  print("| E | backend | fwd ms | fwd / dense | fwd+bwd ms | fwd+bwd / dense | bwd ms | "
        "bwd / dense |")
  print("|---:|---|---:|---:|---:|---:|---:|---:|")
  for num_experts in map(int, _EXPERTS.value):
    for backend in _BACKENDS.value:
      moe_config = ml_collections.ConfigDict(default.get_config().model.moe.to_dict())
      moe_config.num_experts = num_experts
      moe_config.top_k = _TOP_K.value
      moe_config.expert_hidden_dim = _F.value
      moe_config.gmm_backend = backend
      layer = MoELayer(moe_config, _D.value, rngs=nnx.Rngs(1), dtype=dtype)
      fwd, fwd_bwd = _timings(layer, x, probe)
      bwd = fwd_bwd - fwd
      rows.append((num_experts, backend, fwd, fwd / dense_fwd, fwd_bwd, fwd_bwd / dense_fwd_bwd,
                   bwd, bwd / dense_bwd))
      print(f"| {num_experts} | {backend} | {fwd * 1e3:.1f} | {fwd / dense_fwd:.2f} | "
            f"{fwd_bwd * 1e3:.1f} | {fwd_bwd / dense_fwd_bwd:.2f} | {bwd * 1e3:.1f} | "
            f"{bwd / dense_bwd:.2f} |", flush=True)
  if _CSV.value:
    with open(_CSV.value, "w") as f:
      f.write("experts,backend,fwd_s,fwd_ratio,fwd_bwd_s,fwd_bwd_ratio,bwd_s,bwd_ratio,"
              "dense_fwd_s,dense_fwd_bwd_s\n")
      for row in rows:
        f.write(",".join(map(str, row + (dense_fwd, dense_fwd_bwd))) + "\n")


if __name__ == "__main__":
  app.run(main)
