r"""Times grouped matmul backends against the dense matmul of equal FLOPs, on CPU.

A dropless top-K MoE FFN with T tokens sends M = T * K rows through the
experts, so its grouped matmul [M, D] x [E, D, F] does the FLOPs of one dense
[M, D] @ [D, F]. This prints, for each expert count, forward and
forward+backward times of that dense matmul and of `pallas_kernels.gmm` per
backend, with ratios to the dense matmul measured in the same run (candidates
are timed in interleaved rounds, so machine noise hits them alike).

  python experiments/bench_gmm_cpu.py --experts=8,64 --repeats=10
"""

import datetime
import os
import platform
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Runs from a checkout without installing the package.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app  # noqa: E402
from absl import flags  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import pallas_kernels  # noqa: E402

_NUM_TOKENS = flags.DEFINE_integer("num_tokens", 4096, "T: tokens routed.")
_D = flags.DEFINE_integer("d", 512, "D: input features of the matmul.")
_F = flags.DEFINE_integer("f", 512, "F: output features of the matmul.")
_EXPERTS = flags.DEFINE_list("experts", ["8", "64"], "E values to time.")
_TOP_K = flags.DEFINE_integer("top_k", 2, "K: experts per token; rows M = T * K.")
_REPEATS = flags.DEFINE_integer("repeats", 10, "Timed runs per candidate (median reported).")
_WARMUP = flags.DEFINE_integer("warmup", 2, "Untimed runs per candidate after compiling.")
_BACKENDS = flags.DEFINE_list("backends", ["blocked", "xla", "reference"], "gmm backends to time.")
_REFERENCE_MAX_EXPERTS = flags.DEFINE_integer(
    "reference_max_experts", 8, "Skip the reference backend (E x the FLOPs) above this E.")
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Input dtype.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed for inputs and group sizes.")


def _balanced_group_sizes(rng, num_rows, num_experts):
  """Rows per expert when every row picks an expert uniformly at random."""
  return rng.multinomial(num_rows, np.full(num_experts, 1.0 / num_experts)).astype(np.int32)


def _loss_grad(matmul):
  """matmul(lhs, rhs) and d/d(lhs, rhs) of sum(matmul(lhs, rhs) * ct): a forward plus a backward.

  The forward output is returned too: the gradients alone do not need it (a
  linear loss), so XLA would drop the forward pass and time the backward only.
  """
  def fn(lhs, rhs, ct):
    loss = lambda a, b: jnp.sum(matmul(a, b).astype(jnp.float32) * ct)
    return matmul(lhs, rhs), jax.grad(loss, (0, 1))(lhs, rhs)
  return fn


def _time_interleaved(candidates, repeats, warmup):
  """Median seconds per candidate; {name: (jitted fn, args)}, one run of each per round."""
  for fn, args in candidates.values():
    for _ in range(1 + warmup):
      jax.block_until_ready(fn(*args))
  times = {name: [] for name in candidates}
  for _ in range(repeats):
    for name, (fn, args) in candidates.items():
      start = time.perf_counter()
      jax.block_until_ready(fn(*args))
      times[name].append(time.perf_counter() - start)
  return {name: float(np.median(t)) for name, t in times.items()}


def main(argv):
  del argv
  dtype = jnp.dtype(_DTYPE.value)
  t, d, f, k = _NUM_TOKENS.value, _D.value, _F.value, _TOP_K.value
  m = t * k
  rng = np.random.default_rng(_SEED.value)
  x = jnp.asarray(rng.standard_normal((m, d), dtype=np.float32), dtype)
  ct = jnp.asarray(rng.standard_normal((m, f), dtype=np.float32))
  w_dense = jnp.asarray(rng.standard_normal((d, f), dtype=np.float32), dtype)
  dense = lambda a, b: jnp.dot(a, b, preferred_element_type=jnp.float32)

  print(f"# gmm on CPU: {datetime.date.today()}, JAX {jax.__version__}, "
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
        f"device {jax.devices()[0].device_kind}")
  print("# command: python " + " ".join(sys.argv))
  print(f"# T={t} K={k} M={m} D={d} F={f} dtype={dtype.name}, median of {_REPEATS.value} runs, "
        "ratios to the dense [M, D] @ [D, F] of the same run")
  print()
  print("| E | matmul | fwd ms | fwd / dense | fwd+bwd ms | fwd+bwd / dense |")
  print("|---:|---|---:|---:|---:|---:|")
  for num_experts in [int(e) for e in _EXPERTS.value]:
    sizes = jnp.asarray(_balanced_group_sizes(rng, m, num_experts))
    w = jnp.asarray(rng.standard_normal((num_experts, d, f), dtype=np.float32), dtype)
    candidates = {"dense": (dense, (x, w_dense))}
    for backend in _BACKENDS.value:
      if backend == "reference" and num_experts > _REFERENCE_MAX_EXPERTS.value:
        continue
      candidates[f"gmm {backend}"] = (
          lambda a, b, backend=backend: pallas_kernels.gmm(
              a, b, sizes, preferred_element_type=jnp.float32, backend=backend), (x, w))
    fwd = _time_interleaved({n: (jax.jit(fn), args) for n, (fn, args) in candidates.items()},
                            _REPEATS.value, _WARMUP.value)
    fwd_bwd = _time_interleaved(
        {n: (jax.jit(_loss_grad(fn)), (*args, ct)) for n, (fn, args) in candidates.items()},
        _REPEATS.value, _WARMUP.value)
    for name in candidates:
      print(f"| {num_experts} | {name} | {fwd[name] * 1e3:.1f} | {fwd[name] / fwd['dense']:.2f} | "
            f"{fwd_bwd[name] * 1e3:.1f} | {fwd_bwd[name] / fwd_bwd['dense']:.2f} |", flush=True)


if __name__ == "__main__":
  app.run(main)
