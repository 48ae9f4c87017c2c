"""Group offsets and the row-tile schedule of the blocked backend.

Rows of `lhs` are sorted by group: group `i` owns rows `[starts[i], ends[i])`.
The blocked backend covers each group with row tiles whose sizes come from a
short decreasing tuple such as `(512, 256, 128, 64)`: as many tiles of the
largest size as fit inside the group, then of the next size, and so on; the
smallest size is used with a ceiling, so the group's last tile may run past
its end. Tiles start at group boundaries, so one tile never mixes two groups'
weights, and every group wastes less than one smallest tile of work.

The Pallas kernels read aligned row tiles instead, which may hold rows of
several groups: `tile_group_ranges` lists the groups of each tile (GPU) and
`tile_visits` lists every (group, tile) pair in order (TPU).
`normalize_pass_tiling` parses their per-pass `(tm, tk, tn)` tiling.
"""

from collections.abc import Callable, Mapping, Sequence
from typing import TypeVar

import jax
from jax import lax
import jax.numpy as jnp

Carry = TypeVar("Carry")

# Large tiles run near dense-matmul speed on XLA:CPU (each tile dot re-packs
# its [k, n] weight, a cost that small tiles cannot amortize); the smaller
# levels only mop up each group's remainder, so little work is padding.
DEFAULT_ROW_TILES = (512, 256, 128, 64)

# The passes a Pallas backend's per-pass tiling names: the forward gmm, the
# d_lhs gmm and the d_rhs tgmm.
PASSES = ("fwd", "dlhs", "drhs")


def group_bounds(group_sizes: jax.Array, num_rows: int) -> tuple[jax.Array, jax.Array]:
  """First and one-past-last row of every group, clipped to `num_rows`.

  Args:
    group_sizes: [G] integer rows per group.
    num_rows: M, the rows of `lhs`; rows a group claims past M do not exist.

  Returns:
    `(starts, ends)`, both [G] int32.
  """
  ends = jnp.cumsum(group_sizes.astype(jnp.int32))
  starts = ends - group_sizes.astype(jnp.int32)
  return jnp.clip(starts, 0, num_rows), jnp.clip(ends, 0, num_rows)


def tile_group_ranges(group_sizes: jax.Array, num_rows: int,
                      tile_rows: int) -> tuple[jax.Array, jax.Array]:
  """The groups that own rows of each aligned row tile, for the GPU kernels.

  Tile t covers rows `[t * tile_rows, (t + 1) * tile_rows)`; the groups with
  rows there are `first[t] <= i < last[t]`, usually one or two. The range
  may also hold empty groups that sit on a boundary inside the tile (they
  own no row), and it is empty for tiles past `sum(group_sizes)`.

  Args:
    group_sizes: [G] integer rows per group.
    num_rows: M, the rows of `lhs`.
    tile_rows: rows per tile.

  Returns:
    `(first, last)`, both [cdiv(M, tile_rows)] int32.
  """
  starts, ends = group_bounds(group_sizes, num_rows)
  num_tiles = -(-num_rows // tile_rows)
  tile_starts = jnp.arange(num_tiles, dtype=jnp.int32) * tile_rows
  # Group ends and starts are sorted, so both counts are binary searches:
  # groups ending at or before the tile lie above it, groups starting at or
  # after its end lie below it.
  first = jnp.searchsorted(ends, tile_starts, side="right")
  last = jnp.searchsorted(starts, tile_starts + tile_rows, side="left")
  return first.astype(jnp.int32), last.astype(jnp.int32)


def normalize_row_tiles(tiling) -> tuple[int, ...]:
  """Validates a blocked-backend `tiling` (None, an int or decreasing ints)."""
  if tiling is None:
    return DEFAULT_ROW_TILES
  tiles = (tiling,) if isinstance(tiling, int) else tiling
  try:
    tiles = tuple(tiles)
  except TypeError:
    tiles = None
  if (not tiles or not all(isinstance(b, int) and not isinstance(b, bool) and b > 0 for b in tiles)
      or any(a <= b for a, b in zip(tiles, tiles[1:]))):
    raise ValueError(
        "tiling for the 'blocked' backend must be None, a positive int (the row tile) or a "
        f"strictly decreasing tuple of positive ints such as {DEFAULT_ROW_TILES}; got {tiling!r}.")
  return tiles


def normalize_pass_tiling(tiling, backend: str,
                          check_tiles: Callable[[object, str], tuple[int, int, int]], *,
                          none_means_default: bool = False):
  """Validates a Pallas backend's `tiling` and makes it hashable (it is static).

  Args:
    tiling: None, one `(tm, tk, tn)` for every pass, or a mapping from some
      of `PASSES` to `(tm, tk, tn)`; a tuple of `(pass, tiles)` pairs (what
      this function returns) is taken like a mapping.
    backend: the backend's name, for error messages.
    check_tiles: `check_tiles(tiles, where)` validates one `(tm, tk, tn)`
      against the backend's rules and returns it as a tuple; it raises a
      ValueError that names `f"tiling{where}"` (`where` is "" or, for one
      pass, e.g. "['fwd']").
    none_means_default: whether a pass mapped to None takes the defaults,
      like a missing one; otherwise None goes to `check_tiles`.

  Returns:
    None (all defaults), a `(tm, tk, tn)` tuple, or a tuple of
    `(pass, tiles)` pairs in `PASSES` order.

  Raises:
    ValueError: for a key outside `PASSES`, or whatever `check_tiles` rejects.
  """
  if tiling is None:
    return None
  if isinstance(tiling, Mapping) or (
      isinstance(tiling, tuple) and tiling and all(
          isinstance(p, tuple) and len(p) == 2 and isinstance(p[0], str) for p in tiling)):
    pairs = dict(tiling)
    unknown = set(pairs) - set(PASSES)
    if unknown:
      raise ValueError(f"tiling keys for the {backend!r} backend must be among {PASSES}; got "
                       f"{sorted(unknown)!r}.")
    if none_means_default:
      pairs = {p: tiles for p, tiles in pairs.items() if tiles is not None}
    per_pass = tuple((p, check_tiles(pairs[p], f"[{p!r}]")) for p in PASSES if p in pairs)
    return per_pass or None
  return check_tiles(tiling, "")


def row_tiles_for(tiles: Sequence[int], num_rows: int) -> tuple[int, ...]:
  """Caps every tile size at `num_rows` (a tile must fit inside `lhs`)."""
  return tuple(sorted({min(b, num_rows) for b in tiles}, reverse=True))


def tile_window(start: jax.Array, end: jax.Array, size: int,
                num_rows: int) -> tuple[jax.Array, jax.Array]:
  """Where to read a tile that starts at `start`, and which of its rows count.

  A tile near the bottom of `lhs` is shifted up so that it stays in bounds;
  the mask then keeps only its rows in `[start, end)`.

  Returns:
    `(row, mask)`: the in-bounds first row (int32 scalar) and a [size, 1] bool
    mask of the rows that belong to the tile's group.
  """
  row = jnp.minimum(start, num_rows - size)
  rows = row + lax.iota(jnp.int32, size)
  return row, ((rows >= start) & (rows < end))[:, None]


def for_each_row_tile(start: jax.Array, end: jax.Array, tiles: Sequence[int],
                      body: Callable[[jax.Array, int, bool, Carry], Carry], carry: Carry) -> Carry:
  """Folds `body(tile_start, tile_size, inside, carry)` over the tiles covering `[start, end)`.

  Args:
    start: int32 scalar, the group's first row.
    end: int32 scalar, one past the group's last row.
    tiles: decreasing static tile sizes; see the module docstring.
    body: traced once per tile size. `tile_size` is a Python int and
      `inside` a Python bool: True when every tile of this size lies inside
      the group (all levels but the last), so the body may skip masking.
    carry: the loop state.

  Returns:
    The final carry. An empty group runs no tile.
  """
  offset = start
  for level, size in enumerate(tiles):
    remaining = end - offset
    is_last = level == len(tiles) - 1
    count = (remaining + size - 1) // size if is_last else remaining // size
    step = lambda j, c, size=size, offset=offset, inside=not is_last: body(
        offset + j * size, size, inside, c)
    carry = lax.fori_loop(0, count, step, carry)
    offset = offset + count * size
  return carry


def tile_visits(group_sizes: jax.Array, num_rows: int, tm: int, *, visit_empty_groups: bool = False,
                visit_tail: bool = False) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
  """The (group, row tile) pairs a grid-over-visits kernel steps through, in order.

  Rows are cut into aligned tiles `[t * tm, (t + 1) * tm)`. A "visit" is one
  group working on one tile; a tile that holds rows of several groups is
  visited once per group. Visits are listed group by group, so each group's
  visits are consecutive and the tile index never decreases: an output block
  indexed by the group (tgmm) or by the tile (gmm) is revisited only on
  consecutive grid steps, which is what lets a Pallas TPU kernel keep it in
  VMEM across them. After the design of the megablox kernels
  (`jax.experimental.pallas.ops.tpu.megablox`).

  The list has the static length V = cdiv(num_rows, tm) + G - 1, an upper
  bound on the number of visits: each group spans the tiles from its first to
  its last row, and consecutive groups share at most one tile. Entries from
  `num_visits` on are inactive copies of the last active one, so a kernel
  that skips them leaves every block index unchanged (no extra DMA).

  Args:
    group_sizes: [G] integer rows per group; rows a group claims past
      `num_rows` are dropped.
    num_rows: M, the rows of `lhs` (need not be a multiple of `tm`).
    tm: the row tile.
    visit_empty_groups: give each empty group one visit (on the tile where
      it would start) so that a tgmm kernel still writes its zeros.
    visit_tail: give each tile past the last group's last row one visit so
      that a gmm kernel zeroes it. These visits carry group G - 1, whose rows
      do not meet the tile. At most one of the two flags may be set (with
      both, V would not bound the visits when every group is empty).

  Returns:
    `(group_ids, m_tile_ids, group_offsets, num_visits)`: group and tile of
    every visit ([V] int32 each), the row where each group starts plus the
    end of the last one ([G + 1] int32, clipped to `num_rows`; group i owns
    rows `[group_offsets[i], group_offsets[i + 1])`), and the number of
    active visits (int32 scalar). The rows of visit v are the intersection of
    its group's rows with its tile; they are empty for the visits the flags
    add.
  """
  if visit_empty_groups and visit_tail:
    raise ValueError("tile_visits takes visit_empty_groups or visit_tail, not both.")
  num_groups = group_sizes.shape[0]
  num_tiles = -(-num_rows // tm)
  starts, ends = group_bounds(group_sizes, num_rows)
  group_offsets = jnp.concatenate([starts, ends[-1:]])
  first_tile = jnp.minimum(starts // tm, num_tiles - 1)
  last_tile = (ends - 1) // tm
  counts = jnp.where(ends > starts, last_tile - first_tile + 1, int(visit_empty_groups))
  covered = (ends[-1] + tm - 1) // tm
  tail = (num_tiles - covered) if visit_tail else jnp.zeros((), jnp.int32)

  # One entry per group plus one for the tail; entry e owns visits
  # [visit_ends[e] - counts[e], visit_ends[e]).
  entry_counts = jnp.concatenate([counts, tail[None]])
  entry_first_tile = jnp.concatenate([first_tile, covered[None]])
  entry_group = jnp.concatenate([jnp.arange(num_groups, dtype=jnp.int32),
                                 jnp.full((1,), num_groups - 1, jnp.int32)])
  visit_ends = jnp.cumsum(entry_counts)
  num_visits = visit_ends[-1]

  visit = jnp.arange(num_tiles + num_groups - 1, dtype=jnp.int32)
  visit = jnp.clip(visit, 0, jnp.maximum(num_visits - 1, 0))
  entry = jnp.minimum(jnp.searchsorted(visit_ends, visit, side="right"), num_groups)
  first_visit = visit_ends[entry] - entry_counts[entry]
  m_tile_ids = entry_first_tile[entry] + visit - first_visit
  return entry_group[entry], m_tile_ids.astype(jnp.int32), group_offsets, num_visits
