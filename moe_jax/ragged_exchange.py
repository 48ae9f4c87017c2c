"""`ragged_all_to_all` everywhere: the XLA collective where it exists, a padded stand-in elsewhere.

`jax.lax.ragged_all_to_all` sends variable-sized slices of each device's `operand` to its peers and
writes them into each peer's `output` at offsets the sender chooses. XLA:GPU and XLA:TPU implement
it; XLA:CPU does not (compiling it fails). `ragged_all_to_all` here has exactly the primitive's
semantics and, on CPU, builds it from collectives every backend has: each device packs the slices
it sends to a destination into one fixed-size buffer of L rows, `all_to_all` moves the buffers
and the sizes/offsets, and each receiver scatters the real rows into `output`. That costs what a
padded all-to-all costs (ep * L rows per device) instead of the rows actually sent, so it is a
correctness stand-in (tests, CPU runs), not a fast path.

Receive-buffer bound: `output` [M, ...] is the receive buffer. The primitive writes
output[off : off + size] for every received slice and never checks M; offsets and sizes that run
past M are undefined behaviour there (the stand-in drops such rows). Callers must therefore size M
for the most rows any device can receive, or check the routing against M before sending (as
`expert_parallel._dropless_ragged` does). The stand-in packs at most L = min(M, S * N) rows per
destination (S slices per destination, N operand rows), which holds every well-defined call: the
slices one destination receives from one source are disjoint writes into its M rows.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

PRIMITIVE_BACKENDS = ("gpu", "tpu")


def primitive_available() -> bool:
  """Whether the default backend implements `jax.lax.ragged_all_to_all` (XLA:GPU, XLA:TPU)."""
  return jax.default_backend() in PRIMITIVE_BACKENDS


def ragged_all_to_all(operand: jax.Array, output: jax.Array, input_offsets: jax.Array,
                      send_sizes: jax.Array, output_offsets: jax.Array, recv_sizes: jax.Array, *,
                      axis_name: str, use_primitive: bool | None = None) -> jax.Array:
  """`jax.lax.ragged_all_to_all` with a stand-in where XLA lacks it; call inside `shard_map`.

  With ep = the size of `axis_name` and S = len(input_offsets) / ep slices per destination,
  slice i = operand[input_offsets[i] : input_offsets[i] + send_sizes[i]] goes to device i // S,
  which writes it at rows output_offsets[i] onwards of its `output` (offsets are in the
  receiver's buffer). recv_sizes[i] is the size of the slice this device receives as slice
  i % S of source i // S; it must equal that source's matching send size. Rows of `output` no
  slice writes keep their values.

  Args:
    operand: [N, ...] rows to send.
    output: [M, ...] receive buffer (same trailing shape and dtype as `operand`).
    input_offsets, send_sizes, output_offsets, recv_sizes: [ep * S] integer.
    axis_name: the mesh axis to exchange over.
    use_primitive: True = `jax.lax.ragged_all_to_all`, False = the stand-in, None = the primitive
      on GPU and TPU only.

  Returns:
    [M, ...]: `output` with the received slices written in.
  """
  if use_primitive is None:
    use_primitive = primitive_available()
  if use_primitive:
    # The primitive's result is typed like `output`. A fresh buffer is invariant over the mesh
    # axes, so the received rows would be mistyped (and their cotangents wrongly summed over
    # devices); adding the operand's empty sum, exactly 0, makes it vary like the operand on
    # every JAX version.
    output = output + jnp.sum(operand.reshape(-1)[:0]).astype(output.dtype)
    return jax.lax.ragged_all_to_all(operand, output, input_offsets, send_sizes, output_offsets,
                                     recv_sizes, axis_name=axis_name)
  return _stand_in(operand, output, input_offsets, send_sizes, output_offsets, recv_sizes,
                   axis_name)


def _segment_of(rows: jax.Array, sizes: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Which of consecutive segments of `sizes` [..., S] each of `rows` [L] falls in, and where.

  Returns (segment [..., L] in [0, S], S = past the end; position inside it [..., L]).
  """
  ends = jnp.cumsum(sizes, axis=-1)
  segment = jax.vmap(lambda e: jnp.searchsorted(e, rows, side="right"))(
      ends.reshape(-1, ends.shape[-1])).reshape(ends.shape[:-1] + rows.shape)
  starts = ends - sizes
  clipped = jnp.minimum(segment, sizes.shape[-1] - 1)
  return segment, rows - jnp.take_along_axis(starts, clipped, axis=-1)


def _stand_in(operand, output, input_offsets, send_sizes, output_offsets, recv_sizes, axis_name):
  """Packed per-destination buffers [ep, L, ...] through `all_to_all`, scattered into `output`."""
  ep = jax.lax.axis_size(axis_name)
  slices = input_offsets.shape[0] // ep
  rows_in, rows_out = operand.shape[0], output.shape[0]
  width = max(1, min(rows_out, slices * rows_in))  # L, see the module docstring
  row = jnp.arange(width)
  trailing = (1,) * (operand.ndim - 1)

  def by_peer(x):
    return x.reshape(ep, slices).astype(jnp.int32)

  # Sender: row r of destination j's buffer is row `pos` of its slice `seg`.
  sizes = by_peer(send_sizes)
  seg, pos = _segment_of(row, sizes)  # [ep, L]
  valid = seg < slices
  seg = jnp.minimum(seg, slices - 1)
  source = jnp.take_along_axis(by_peer(input_offsets), seg, axis=1) + pos
  source = jnp.clip(source, 0, rows_in - 1)
  send = jnp.where(valid.reshape(valid.shape + trailing), operand[source], 0)
  recv = jax.lax.all_to_all(send, axis_name, 0, 0, tiled=True)  # [ep (source), L, ...]
  # The offsets the sources chose in this device's buffer; sizes are the receiver's own.
  offsets = jax.lax.all_to_all(by_peer(output_offsets), axis_name, 0, 0, tiled=True)
  seg, pos = _segment_of(row, by_peer(recv_sizes))
  target = jnp.take_along_axis(offsets, jnp.minimum(seg, slices - 1), axis=1) + pos
  # Padding and rows past the buffer go out of bounds and are dropped; negative targets too
  # (a plain out-of-bounds scatter would wrap them around).
  target = jnp.where((seg < slices) & (target >= 0), target, rows_out)
  return output.at[target.reshape(-1)].set(
      recv.reshape((-1,) + recv.shape[2:]).astype(output.dtype), mode="drop")
