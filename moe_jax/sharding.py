"""Device mesh from `config.mesh`, the logical-axis rules table, and shardings derived from them."""
from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "expert", "tensor")

# Logical parameter/activation axis -> mesh axis (or axes). The one table for the whole codebase.
LOGICAL_AXIS_RULES: dict[str, str | tuple[str, ...] | None] = {
    "batch": ("data", "fsdp", "expert"),
    "vocab": "tensor",
    "embed": "fsdp",
    "mlp": "tensor",
    "heads": "tensor",
    "kv": None,
    "expert": "expert",
}

# Axes the global batch is split over: every device holds a distinct slice of the batch. Expert-
# parallel devices also take batch shards (the all-to-all exchanges their tokens).
BATCH_AXES = ("data", "fsdp", "expert")


def resolve_mesh_shape(mesh_config, num_devices: int) -> dict[str, int]:
  """Axis sizes from `config.mesh`, with one -1 taking the remaining devices.

  Raises ValueError naming the field when a size is not a positive integer or -1, when more than one
  axis is -1, or when the mesh needs more devices than there are.
  """
  sizes = {axis: int(mesh_config.get(axis, 1)) for axis in MESH_AXES}
  unknown = [axis for axis in mesh_config.keys() if axis not in MESH_AXES]
  if unknown:
    raise ValueError(f"config.mesh has unknown axes {unknown}; allowed: {MESH_AXES}.")
  for axis, size in sizes.items():
    if size == 0 or size < -1:
      raise ValueError(f"config.mesh.{axis}={size} is invalid; allowed: a positive integer or -1 "
                       "(all remaining devices).")
  free = [axis for axis, size in sizes.items() if size == -1]
  if len(free) > 1:
    raise ValueError(f"config.mesh: only one axis may be -1, got {free}.")
  fixed = math.prod(size for size in sizes.values() if size != -1)
  if fixed > num_devices or (free and num_devices % fixed):
    raise ValueError(f"config.mesh={sizes} needs {fixed} devices (times the -1 axis) but "
                     f"{num_devices} are available.")
  if free:
    sizes[free[0]] = num_devices // fixed
  return sizes


def make_mesh(mesh_config, devices: Sequence[jax.Device] | None = None) -> Mesh:
  """Builds the `Mesh` with axes (data, fsdp, expert, tensor) from `config.mesh`.

  Uses the first prod(sizes) devices in `jax.devices()` order; the innermost axes (expert, tensor)
  vary fastest, so they stay within a host when the mesh spans several.
  """
  devices = list(jax.devices() if devices is None else devices)
  sizes = resolve_mesh_shape(mesh_config, len(devices))
  shape = tuple(sizes[axis] for axis in MESH_AXES)
  device_array = np.asarray(devices[:math.prod(shape)], dtype=object).reshape(shape)
  # Auto axes: jit/GSPMD propagates shardings from the annotated inputs and outputs.
  return Mesh(device_array, MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES))


def logical_to_spec(logical_axes: Sequence[str | None] | None, shape: Sequence[int] | None = None,
                    mesh: Mesh | None = None) -> P:
  """Maps logical axis names (e.g. ("expert", "embed", "mlp")) to a mesh PartitionSpec.

  With `shape` and `mesh`, a dimension that the mesh axes would not split evenly (a 259-entry byte
  vocabulary over tensor=2, say) stays unsharded instead of failing.
  """
  if logical_axes is None:
    return P()
  mesh_axes = []
  used = set()
  for dim, name in enumerate(logical_axes):
    target = LOGICAL_AXIS_RULES.get(name) if name is not None else None
    targets = (target,) if isinstance(target, str) else tuple(target or ())
    # A mesh axis may shard only one dimension of an array.
    targets = tuple(t for t in targets if t not in used)
    if shape is not None and mesh is not None:
      targets = tuple(t for t in targets if t in mesh.shape)
      if shape[dim] % math.prod(mesh.shape[t] for t in targets):
        targets = ()
    used.update(targets)
    mesh_axes.append(targets[0] if len(targets) == 1 else (targets or None))
  return P(*mesh_axes)


def logical(initializer, names: tuple[str | None, ...]):
  """Wraps a Flax initializer to tag its parameter with logical axis `names`.

  Eager sharding is off: shardings are derived from the names by `state_shardings` and applied by
  `jax.jit`, so modules build the same way with or without a mesh.
  """
  import flax.nnx as nnx  # local: keeps this module importable in non-Flax tools
  return nnx.with_partitioning(initializer, names, eager_sharding=False)


def state_shardings(mesh: Mesh, state) -> object:
  """NamedShardings for an abstract `nnx.State`, as a pure dict, from the logical axis names."""
  import flax.nnx as nnx

  specs = nnx.to_pure_dict(nnx.get_partition_spec(state))
  shapes = nnx.to_pure_dict(state)
  return jax.tree.map(
      lambda spec, leaf: NamedSharding(mesh, logical_to_spec(tuple(spec), leaf.shape, mesh)),
      specs, shapes, is_leaf=lambda x: isinstance(x, P))


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Sharding of a [B, ...] batch: the batch axis split over every batch-carrying mesh axis."""
  return NamedSharding(mesh, P(BATCH_AXES))


def batch_shards(mesh: Mesh) -> int:
  """Number of ways the batch axis is split (the global batch must be divisible by it)."""
  return math.prod(mesh.shape[axis] for axis in BATCH_AXES)


def process_batch_rows(batch_sharding: NamedSharding, global_batch: int) -> slice:
  """The contiguous rows of a [B, ...] global batch that this process's devices hold.

  Raises ValueError when they are not contiguous (a mesh whose batch axes interleave processes).
  """
  indices = batch_sharding.addressable_devices_indices_map((global_batch,)).values()
  spans = {(index[0].start or 0, global_batch if index[0].stop is None else index[0].stop)
           for index in indices}
  start, stop = min(s for s, _ in spans), max(e for _, e in spans)
  covered = sum(e - s for s, e in spans)
  if covered != stop - start:
    raise ValueError(f"This process's batch shards {sorted(spans)} are not contiguous; order the "
                     "mesh so that each process holds a contiguous block of the batch axes.")
  return slice(start, stop)


def visualize(array, *, title: str = "") -> None:
  """Prints which devices hold which block of `array` (for notebooks).

  `jax.debug` draws 1-D and 2-D layouts; a higher-rank array is drawn through its first two axes
  (e.g. [expert, embed] of an expert weight), which is where the interesting sharding lives.
  """
  if title:
    print(title)
  if array.ndim <= 2:
    jax.debug.visualize_array_sharding(array)
    return
  spec = tuple(array.sharding.spec) + (None, None)
  jax.debug.visualize_sharding(array.shape[:2], NamedSharding(array.sharding.mesh, P(*spec[:2])))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())
