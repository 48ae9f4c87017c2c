"""Group offsets and the row-tile schedule of the blocked backend.

Rows of `lhs` are sorted by group: group `i` owns rows `[starts[i], ends[i])`.
The blocked backend cuts each group into row tiles that start at the group's
first row, so one tile never mixes two groups' weights. Tile sizes come from a
short decreasing tuple such as `DEFAULT_ROW_TILES`; the two passes use it
differently because their per-tile costs differ:

- gmm (`for_each_row_tile`): the group's rows, rounded up to a multiple of
  the smallest size, are covered greedily, largest size first: e.g. 140 rows
  with sizes (..., 128, 64, 32, 16) become one tile of 128 and one of 16.
- tgmm (`split_group` + `tail_tile_sizes`): tiles of the largest size while
  more rows remain than it holds, then exactly one tile, of the smallest size
  in a finer ladder (`tail_tile_sizes`) that holds the rest: 140 rows become
  one tile of 160. Every tgmm tile writes a whole [K, N] product, so fewer,
  slightly larger tiles win there.

Either way only the group's last tile runs past its end, by less than one
smallest size (gmm) or about a quarter of the tile (tgmm), and it is masked.

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
# levels only mop up each group's remainder. Going down to 16 rows (from 64),
# with `for_each_row_tile`'s schedule, cut the padded rows of a 64-expert
# layer with ~128 rows per group from ~23% to ~6%, and gmm's time there by
# ~10% on 2 CPU cores (experiments/bench_gmm_cpu.py).
DEFAULT_ROW_TILES = (512, 256, 128, 64, 32, 16)

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
  """The tile sizes used on `num_rows` rows: those below `num_rows`, else `num_rows` alone.

  A tile must fit inside `lhs`. A tile of all `num_rows` rows is avoided when
  smaller sizes exist: its window of `lhs` does not depend on the loop
  index, so XLA hoists its dot out of the tile loop and computes it for every
  group, even where the loop runs zero times (3x slower at 8 groups of ~16
  rows when `num_rows` was 128).
  """
  smaller = tuple(b for b in tiles if b < num_rows)
  return smaller or (num_rows,)


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
                      body: Callable[[jax.Array, int, Carry], Carry], carry: Carry) -> Carry:
  """Folds `body(tile_start, tile_size, carry)` over gmm's tiles covering `[start, end)`.

  The rows are rounded up to a multiple of the smallest size, then covered
  greedily, largest size first (see the module docstring). Compared with a
  ceiling on the smallest size only, this needs fewer tiles for the same
  padding: 120 rows with sizes (128, 64) take one tile of 128, not two of 64.

  Args:
    start: int32 scalar, the group's first row.
    end: int32 scalar, one past the group's last row.
    tiles: decreasing static tile sizes.
    body: traced once per tile size, with `tile_size` a Python int. Only the
      last tile may run past `end`, but which one that is depends on the
      data, so the body must mask every tile to `[tile_start, end)`.
    carry: the loop state.

  Returns:
    The final carry. An empty group runs no tile.
  """
  smallest = tiles[-1]
  span = (end - start + smallest - 1) // smallest * smallest
  offset = start
  for level, size in enumerate(tiles):
    # A ceiling on the last level still covers the rows when the larger
    # sizes are not multiples of the smallest (e.g. a tiling of (24, 16)).
    count = (span + size - 1) // size if level == len(tiles) - 1 else span // size
    span = span - count * size
    step = lambda j, c, size=size, offset=offset: body(offset + j * size, size, c)
    carry = lax.fori_loop(0, count, step, carry)
    offset = offset + count * size
  return carry


def tail_tile_sizes(tiles: Sequence[int]) -> tuple[int, ...]:
  """The increasing sizes tgmm may pick its one last tile of a group from.

  From the smallest to the largest of `tiles`, in steps of a quarter of the
  current power of two (never below the smallest size): with the default
  tiles 16, 32, 48, 64, 80, ..., 128, 160, ..., 256, 320, ..., 512. A tile of
  the first size that holds the rest pads by less than a quarter of its rows
  (or less than the smallest size); the default tiles give 16 sizes, one
  `lax.switch` branch each.
  """
  smallest, largest = tiles[-1], tiles[0]
  sizes, size = [], smallest
  while size < largest:
    sizes.append(size)
    size += max(smallest, (1 << (size.bit_length() - 1)) // 4)
  sizes.append(largest)
  return tuple(sizes)


def split_group(start: jax.Array, end: jax.Array, largest: int,
                tail_sizes: Sequence[int]) -> tuple[jax.Array, jax.Array, jax.Array]:
  """tgmm's schedule for `[start, end)`: full tiles of `largest`, then one tail tile.

  Args:
    start: int32 scalar, the group's first row.
    end: int32 scalar, one past the group's last row.
    largest: the size of the full tiles; also `tail_sizes[-1]`.
    tail_sizes: increasing static sizes for the tail tile (`tail_tile_sizes`).

  Returns:
    `(num_full, tail_start, tail_index)`: full tiles start at
    `start + j * largest` for `j < num_full`, all inside the group; the tail
    holds the remaining 1 to `largest` rows from `tail_start` on, in a tile of
    size `tail_sizes[tail_index - 1]`; `tail_index` is 0 for an empty group.
  """
  rows = end - start
  num_full = jnp.maximum(rows - 1, 0) // largest
  tail_start = start + num_full * largest
  tail_rows = end - tail_start
  fits = jnp.searchsorted(jnp.asarray(tail_sizes, jnp.int32), tail_rows, side="left")
  tail_index = jnp.where(tail_rows > 0, fits + 1, 0).astype(jnp.int32)
  return num_full, tail_start, tail_index


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
