"""Peak memory and step time of one training step vs `train.grad_accum_steps` at a fixed global batch.

XLA's compiled memory analysis gives the step's temporary buffers (activations saved for the
backward pass, the float32 gradient accumulator, workspace) without running it; the step is then
timed. With k micro-batches the saved activations are those of B/k sequences, so the temporary
memory should fall with k while the global batch, and so the update, stays the same.

    python experiments/bench_grad_accum.py --config=configs/default.py --steps=1,2,4
"""
from __future__ import annotations

import functools
import time

import jax
from absl import app, flags
from ml_collections import config_flags

from moe_jax import data, grad_accum, sharding, train

_CONFIG = config_flags.DEFINE_config_file("config", "configs/default.py", "Experiment config.")
_STEPS = flags.DEFINE_list("steps", ["1", "2", "4"], "grad_accum_steps values to compare.")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Timed steps per setting (after one warm-up).")


def measure(config, accum_steps: int, repeats: int) -> dict:
  """{"temp_mib", "argument_mib", "step_s"} of one jitted train step with `accum_steps`."""
  mesh = sharding.make_mesh(config.mesh)
  tx, _ = train.make_optimizer(config.train)
  graphdef, state = train.fresh_state(config, mesh, tx)
  batch = data.load_dataset(config.data, "train").train_batch(0, config.data.batch_size,
                                                             config.seed)
  batch = jax.device_put(batch, sharding.batch_sharding(mesh))
  step = jax.jit(functools.partial(train.train_step, graphdef=graphdef, tx=tx, seed=config.seed,
                                   grad_accum_steps=accum_steps,
                                   global_balance=grad_accum.needs_global_load(config.model)))
  with jax.set_mesh(mesh):
    compiled = step.lower(state, batch).compile()
    memory = compiled.memory_analysis()
    jax.block_until_ready(compiled(state, batch))
    start = time.perf_counter()
    for _ in range(repeats):
      jax.block_until_ready(compiled(state, batch))
    step_s = (time.perf_counter() - start) / repeats
  mib = 2.0 ** -20
  return {"temp_mib": memory.temp_size_in_bytes * mib,
          "argument_mib": memory.argument_size_in_bytes * mib, "step_s": step_s}


def main(argv):
  del argv
  config = _CONFIG.value
  rows = []
  for value in _STEPS.value:
    k = int(value)
    config.train.grad_accum_steps = k
    rows.append((k, measure(config, k, _REPEATS.value)))
  base = rows[0][1]
  print(f"global batch {config.data.batch_size} x {config.data.seq_len} tokens, "
        f"jax {jax.__version__}, {jax.devices()[0].device_kind}")
  print("| grad_accum_steps | micro-batch | temp memory (MiB) | vs first | arguments (MiB) "
        "| step time (s) | vs first |")
  print("|---|---|---|---|---|---|---|")
  for k, r in rows:
    print(f"| {k} | {config.data.batch_size // k} | {r['temp_mib']:.1f} | "
          f"{r['temp_mib'] / base['temp_mib']:.2f} | {r['argument_mib']:.1f} | {r['step_s']:.3f} | "
          f"{r['step_s'] / base['step_s']:.2f} |")


if __name__ == "__main__":
  app.run(main)
