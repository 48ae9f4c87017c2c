"""Orbax checkpointing of the training state, and preemption (SIGTERM/SIGINT) handling.

The state is a plain pytree (dicts of arrays, optax state) saved with its shardings. Restoring takes an
abstract target whose `sharding`s may differ from the saved ones: orbax reshards on load, so a run may
resume on another mesh.
"""
from __future__ import annotations

import os
import signal
import threading
from typing import Any

import jax
import orbax.checkpoint as ocp
from absl import logging


def abstract_like(state: Any) -> Any:
  """ShapeDtypeStructs (with shardings) of `state`: the restore target."""
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)


class Checkpointer:
  """Saves and restores the training state under `<workdir>/checkpoints/<step>`."""

  def __init__(self, workdir: str, *, keep: int, write_limit_bytes: int | None = None):
    """`write_limit_bytes`: at most this many bytes of the state in flight to disk at once (it
    must cover the largest array). Orbax otherwise copies the whole state into write buffers
    before writing; with a limit a save holds only that much extra host memory (the converter's
    setting, `moe_jax.convert`). Default: orbax's."""
    self.directory = os.path.join(os.path.abspath(workdir), "checkpoints")
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True)
    registry = None
    if write_limit_bytes is not None:
      handler = ocp.StandardCheckpointHandler(save_concurrent_gb=write_limit_bytes / 1e9)
      registry = ocp.handlers.DefaultCheckpointHandlerRegistry()
      registry.add("default", ocp.args.StandardSave, handler)
      registry.add("default", ocp.args.StandardRestore, handler)
    self.manager = ocp.CheckpointManager(self.directory, options=options,
                                         handler_registry=registry)
    self.write_limit_bytes = write_limit_bytes

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self.manager.all_steps())

  def save(self, step: int, state: Any) -> None:
    """Saves asynchronously; call `wait` before reading the files or exiting."""
    if self.write_limit_bytes is not None:
      largest = max(x.size * x.dtype.itemsize for x in jax.tree.leaves(state))
      if largest >= self.write_limit_bytes:  # orbax would fail later, in its writer thread
        raise ValueError(f"write_limit_bytes={self.write_limit_bytes} must exceed the largest "
                         f"array of the state ({largest} bytes).")
    self.manager.save(step, args=ocp.args.StandardSave(state), force=True)

  def restore(self, step: int, target: Any) -> Any:
    """Restores step `step` onto `target` (a pytree of arrays or ShapeDtypeStructs)."""
    return self.manager.restore(step, args=ocp.args.StandardRestore(abstract_like(target)))

  def restore_params(self, step: int, params: Any, router_state: Any = None) -> dict:
    """Only {"params"[, "router_state"]} of step `step`, onto abstract targets (ShapeDtypeStructs
    with shardings); the optimizer state stays on disk."""
    item = {"params": params}
    if router_state:
      item["router_state"] = router_state
    return self.manager.restore(step, args=ocp.args.PyTreeRestore(
        item=item, restore_args=ocp.checkpoint_utils.construct_restore_args(item),
        partial_restore=True))

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


class PreemptionGuard:
  """Turns SIGTERM/SIGINT into a flag that the training loop polls between steps.

  The loop then saves a checkpoint and returns normally. A second signal of the same kind while the
  flag is set falls back to the default behaviour (a user pressing Ctrl-C twice really wants out).
  Outside the main thread (where Python cannot install handlers) the guard is inert.
  """

  SIGNALS = (signal.SIGTERM, signal.SIGINT)

  def __init__(self):
    self.received: int | None = None
    self._previous = {}

  def __enter__(self) -> "PreemptionGuard":
    if threading.current_thread() is threading.main_thread():
      for sig in self.SIGNALS:
        self._previous[sig] = signal.signal(sig, self._handle)
    return self

  def __exit__(self, *exc) -> None:
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)
    self._previous = {}

  def _handle(self, signum, frame) -> None:
    if self.received is not None:
      signal.signal(signum, signal.SIG_DFL)
      os.kill(os.getpid(), signum)
      return
    self.received = signum
    logging.warning("Received %s: will save a checkpoint and stop after this step.",
                    signal.Signals(signum).name)

  @property
  def stop_requested(self) -> bool:
    return self.received is not None
