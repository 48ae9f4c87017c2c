"""Training-step time with expert parallelism against pure data parallelism, on one host's devices.

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python experiments/bench_expert_parallel.py

Times the jitted train step of one config (default: configs/default.py, dropless) on several meshes of
the same devices, in one process, and prints median step times with the ratio to the data-parallel
mesh. On emulated CPU devices all "devices" share the host's cores, so this measures the overhead of
the exchange and of the layout, not a speed-up. On CPU "ragged_all_to_all" runs its padded stand-in
(`moe_jax/ragged_exchange.py`), so its row shows the cost of the count exchange and the extra local
sort, not the bytes the real collective saves; it is dropless only and left out with a capacity
factor.
"""
import functools
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app  # noqa: E402
from absl import flags  # noqa: E402
import jax  # noqa: E402
import numpy as np  # noqa: E402

from configs import default  # noqa: E402
from moe_jax import data, sharding, train  # noqa: E402

_MESHES = flags.DEFINE_list("meshes", ["data=8", "data=2/expert=4", "expert=8"],
                            "Meshes to time; axes joined by '/'. The first is the baseline.")
_EXCHANGES = flags.DEFINE_list("exchanges", ["all_to_all", "allgather", "ragged_all_to_all"],
                               "EP exchanges to time.")
_CAPACITY = flags.DEFINE_float("capacity_factor", None, "None = dropless.")
_STEPS = flags.DEFINE_integer("steps", 10, "Timed steps per mesh (median reported).")


def _config(mesh_text: str, exchange: str):
  config = default.get_config()
  config.model.moe.capacity_factor = _CAPACITY.value
  config.model.moe.ep_exchange = exchange
  for axis in sharding.MESH_AXES:
    config.mesh[axis] = 1
  for item in mesh_text.split("/"):
    axis, size = item.split("=")
    config.mesh[axis] = int(size)
  return config


def step_seconds(config) -> float:
  """Median wall time of the jitted training step of `config` on its mesh."""
  mesh = sharding.make_mesh(config.mesh)
  graphdef, params, param_shardings = train.build_model(config, mesh)
  dataset = data.load_dataset(config.data, "train")
  with jax.set_mesh(mesh):
    tx, _ = train.make_optimizer(config.train)
    opt_state = jax.jit(tx.init, out_shardings=train.optimizer_shardings(
        tx, params, param_shardings, mesh))(params)
    step0 = jax.device_put(np.zeros((), np.int32), sharding.replicated(mesh))
    state = {"step": step0, "params": params, "opt_state": opt_state}
    batch_sharding = sharding.batch_sharding(mesh)
    step_fn = jax.jit(functools.partial(train.train_step, graphdef=graphdef, tx=tx),
                      donate_argnums=0)
    times = []
    for step in range(_STEPS.value + 2):
      batch = jax.device_put(dataset.train_batch(step, config.data.batch_size, 0), batch_sharding)
      start = time.perf_counter()
      state, metrics = step_fn(state, batch)
      jax.block_until_ready(metrics)
      if step >= 2:  # the first steps compile
        times.append(time.perf_counter() - start)
  return float(np.median(times))


def main(argv):
  del argv
  print(f"JAX {jax.__version__}, {jax.device_count()} x {jax.devices()[0].device_kind}; "
        f"capacity_factor={_CAPACITY.value}")
  print("| mesh | exchange | step ms | / baseline |")
  print("|---|---|---:|---:|")
  baseline = None
  for mesh_text in _MESHES.value:
    exchanges = _EXCHANGES.value if "expert" in mesh_text else ["-"]
    if _CAPACITY.value is not None:  # capacity buffers are fixed-size: no ragged exchange
      exchanges = [e for e in exchanges if e != "ragged_all_to_all"]
    for exchange in exchanges:
      seconds = step_seconds(_config(mesh_text, exchange if exchange != "-" else "all_to_all"))
      baseline = baseline or seconds
      print(f"| {mesh_text} | {exchange} | {seconds * 1e3:.1f} | {seconds / baseline:.2f} |",
            flush=True)


if __name__ == "__main__":
  app.run(main)
