r"""Grouped matmul throughput: our gmm backends beside a dense matmul, ragged_dot and peers.

For each MoE shape and group-size distribution this times, in one process and
in interleaved rounds (machine noise hits every candidate alike):

  dense                 [M, K] @ [K, N], the same FLOPs with no grouping: the ceiling;
  jax.lax.ragged_dot    JAX's own grouped matmul;
  tokamax.ragged_dot    when `tokamax` is importable (optional peer, `pip install .[bench]`);
  torch._grouped_mm     on a CUDA GPU when torch is importable (the PyTorch peer, bf16 only);
  gmm[B]                `pallas_kernels.gmm(..., backend=B)` for B in --backends;

forward, forward+backward (d lhs and d rhs), and with --include_tgmm the
weight-gradient grouped matmul alone (`tgmm`; the issue's target is tgmm within
80% of gmm's forward TFLOP/s, column `vs fwd`). A top-K MoE layer with T tokens
sends M = T * K rows through E experts; one expert projection is the grouped
matmul [M, K=d] x [E, d, N=f]. FLOPs: forward 2 * M * d * f, forward+backward
3x that, tgmm 2 * M * d * f. TFLOP/s and the ratio to the dense matmul of the
same run are printed as a table and written as CSV (--csv).

  # GPU (bf16, every preset at its own token count):
  python experiments/bench_gmm.py --include_tgmm --csv=/tmp/gmm.csv
  # CPU smoke test (on CPU the defaults are float32, d and f / 16, T = 128):
  python experiments/bench_gmm.py --num_tokens=64 --repeats=3
  # The CPU target shape at full size, blocked backend only:
  python experiments/bench_gmm.py --shapes=moe_cpu --scale=1 --num_tokens=4096 \
      --backends=blocked --peers= --include_tgmm

Tiling (--tiling) goes to every timed gmm backend that takes one ("blocked",
"gpu", "tpu"; "xla" and "reference" have none), for gmm and tgmm alike:
  --tiling=128,128,64                          one (tm, tk, tn) for every pass (gpu, tpu);
  --tiling='fwd:128,128,64;drhs:64,128,128'    per pass, others at their defaults (gpu, tpu);
  --tiling=256  or  --tiling=512,128,32        the row tile(s), decreasing (blocked).
The kernel's own validation runs on it before anything is timed; a tile that is
only wrong for a shape (e.g. not a multiple of 128 for compiled TPU) shows up as
that candidate's failure note.

Shapes (--shapes; --num_tokens overrides T, --scale divides d and f):
  mixtral             d 4096, f 14336, E 8, top-2, T 8192 (Mixtral 8x7B experts).
  deepseek_v2         d 2048, f 1408, E 64, top-6, T 8192 (DeepSeek-V2-Lite experts).
  deepseek_v3_scaled  d 3584, f 1024, E 256, top-8, T 8192: DeepSeek-V3's experts
                      (E 256, top-8, d 7168, f 2048) with d and f halved. At full
                      size one projection's weight has E * d * f = 3.8e9 elements,
                      past the 2^31 that 32-bit offsets g * d * f in a GPU kernel
                      can reach (an overflow is an illegal memory access that ends
                      the whole run; not checked for our Triton kernels), and takes
                      7.5 GB per copy. Halved: 0.94e9 elements, 1.9 GB in bf16;
                      M 65536 rows, 256 per expert on average. At peak the inputs
                      (2.5 GB, which torch reads through DLPack), two JAX
                      forward+backward outputs in flight (2 x 2.5 GB) and the torch
                      peer's take about 10 GB, well inside a ~40 GB budget.
  moe_cpu             d 512, f 512, E 64, top-2, T 4096: the CPU target of
                      experiments/bench_moe_layer.py (use --scale=1 on CPU).

Group sizes (--skew): "balanced" routes every token to top_k distinct experts
drawn uniformly; "skewed" draws them from a Zipf law over the experts
(p_i ~ 1 / i^--zipf_exponent, experts shuffled, fixed --seed), sampled without
replacement per token (Gumbel top-k), so each group holds at most T rows and
the sizes sum to T * top_k.

XLA:CPU and, today, XLA:GPU expand ragged_dot (so also backend "xla" and
"reference") into a dense product per group: G x the FLOPs and an [M, G * N]
intermediate. Those candidates are skipped, with a note, where that intermediate
would pass --ragged_dot_max_gib (not on TPU, where ragged_dot is native).
"""

import csv
import dataclasses
import datetime
import functools
import os
import platform
import sys
import time
from collections.abc import Callable, Sequence

# JAX would otherwise take 75% of the GPU up front and leave the torch peer none.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
# Runs from a checkout without installing the package.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app  # noqa: E402
from absl import flags  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import pallas_kernels  # noqa: E402
from pallas_kernels.gmm import gpu  # noqa: E402
from pallas_kernels.gmm import metadata  # noqa: E402
from pallas_kernels.gmm import ops  # noqa: E402
from pallas_kernels.gmm import tpu  # noqa: E402


@dataclasses.dataclass(frozen=True)
class Shape:
  """One expert projection of an MoE layer: [T * top_k, d] x [experts, d, f]."""
  name: str
  d: int
  f: int
  experts: int
  top_k: int
  num_tokens: int


PRESETS = {
    "mixtral": Shape("mixtral", d=4096, f=14336, experts=8, top_k=2, num_tokens=8192),
    "deepseek_v2": Shape("deepseek_v2", d=2048, f=1408, experts=64, top_k=6, num_tokens=8192),
    # DeepSeek-V3's d 7168 and f 2048 halved; see the module docstring.
    "deepseek_v3_scaled": Shape("deepseek_v3_scaled", d=3584, f=1024, experts=256, top_k=8,
                                num_tokens=8192),
    "moe_cpu": Shape("moe_cpu", d=512, f=512, experts=64, top_k=2, num_tokens=4096),
}
SKEWS = ("balanced", "skewed")
PEERS = ("ragged_dot", "tokamax", "torch")
OPS = ("fwd", "fwd+bwd", "tgmm")
CSV_COLUMNS = ("shape", "skew", "dtype", "device", "num_tokens", "top_k", "experts", "m", "k", "n",
               "op", "impl", "ms", "tflops_per_s", "flops", "vs_dense", "vs_fwd", "tiling")
# The backends that take `tiling=`, with the normalizer each runs on it.
TILING_NORMALIZERS = {"blocked": metadata.normalize_row_tiles, "gpu": gpu.normalize_tiling,
                      "tpu": tpu.normalize_tiling}
# CPU defaults, small enough for a smoke test of every preset in a few minutes (ragged_dot
# costs E x the FLOPs there). On CPU dispatch is cheap next to the work: one call per sample.
CPU_DEFAULT_SCALE = 16
CPU_DEFAULT_NUM_TOKENS = 128
CPU_DEFAULT_CALLS_PER_SAMPLE = 1
ACCELERATOR_CALLS_PER_SAMPLE = 5

_SHAPES = flags.DEFINE_list("shapes", ["mixtral", "deepseek_v2", "deepseek_v3_scaled"],
                            f"Presets to time, from {sorted(PRESETS)}.")
_NUM_TOKENS = flags.DEFINE_integer(
    "num_tokens", None, "T, tokens per call, for every shape (default: the preset's T; "
    f"{CPU_DEFAULT_NUM_TOKENS} on CPU).")
_SCALE = flags.DEFINE_integer(
    "scale", None, "Divide d and f by this (rounded up to a multiple of 8); default 1, "
    f"{CPU_DEFAULT_SCALE} on CPU.")
_DTYPE = flags.DEFINE_enum("dtype", None, ["bfloat16", "float32"],
                           "Input dtype (default: bfloat16 on accelerators, float32 on CPU).")
_SKEW = flags.DEFINE_list("skew", list(SKEWS), f"Group-size distributions, from {SKEWS}.")
_ZIPF = flags.DEFINE_float("zipf_exponent", 1.2, "Exponent of the 'skewed' Zipf law.")
_BACKENDS = flags.DEFINE_list(
    "backends", ["auto", "xla"],
    f"pallas_kernels.gmm backends to time, from {ops.BACKENDS}; 'auto' resolves to the "
    "platform's default ('gpu' on GPU, 'blocked' on CPU) and duplicates are dropped.")
_PEERS = flags.DEFINE_list(
    "peers", list(PEERS), f"Peers to time beside the dense matmul (always timed), from {PEERS}; "
    "tokamax and torch only where available.")
_REPEATS = flags.DEFINE_integer("repeats", 10, "Timed runs per candidate (median reported).")
_WARMUP = flags.DEFINE_integer("warmup", 2, "Untimed runs per candidate after compiling.")
_CALLS = flags.DEFINE_integer(
    "calls_per_sample", None, "Back-to-back calls per timed sample, so that the host's dispatch "
    "overlaps the device's work as in a training step, JAX and torch alike (default "
    f"{ACCELERATOR_CALLS_PER_SAMPLE}; {CPU_DEFAULT_CALLS_PER_SAMPLE} on CPU).")
_INCLUDE_TGMM = flags.DEFINE_bool("include_tgmm", False, "Also time tgmm (the d rhs) alone.")
_TILING = flags.DEFINE_string(
    "tiling", "", "Tiling for the backends that take one (blocked, gpu, tpu): 'tm,tk,tn', "
    "'fwd:tm,tk,tn;dlhs:tm,tk,tn;drhs:tm,tk,tn' (any subset of the passes) or, for blocked, "
    "decreasing row tiles 'r1[,r2...]'. Empty: each backend's defaults.")
_CSV = flags.DEFINE_string("csv", "", "Write the rows here as CSV.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed for group sizes and inputs.")
_RAGGED_DOT_MAX_GIB = flags.DEFINE_float(
    "ragged_dot_max_gib", 16.0,
    "Skip ragged_dot-based candidates off TPU when their expanded [M, G * N] product would "
    "exceed this many GiB; negative: never skip.")


def flops(op: str, m: int, k: int, n: int) -> int:
  """FLOPs of one call: forward 2*m*k*n, forward+backward 3x (d lhs and d rhs), tgmm 2*m*k*n."""
  if op not in OPS:
    raise ValueError(f"op must be one of {OPS}; got {op!r}.")
  return (3 if op == "fwd+bwd" else 1) * 2 * m * k * n


def parse_tiling(text: str):
  """The `tiling=` value a `--tiling` string spells, before any backend's own validation.

  Args:
    text: "" (defaults), comma-separated ints ("128,128,64": one `(tm, tk, tn)`
      for the Pallas backends; "256" or "512,128": the blocked backend's row
      tiles), or ";"-separated `pass:tm,tk,tn` items with passes from
      `metadata.PASSES` ("fwd:128,128,64;drhs:64,128,128").

  Returns:
    None, an int (one number), a tuple of ints, or a dict from pass to `(tm, tk, tn)`.

  Raises:
    ValueError: naming --tiling, for text of none of these forms.
  """
  def ints(part: str, what: str) -> tuple[int, ...]:
    try:
      values = tuple(int(v) for v in part.split(","))
    except ValueError:
      values = ()
    if not values or any(v <= 0 for v in values):
      raise ValueError(f"--tiling: {what} must be comma-separated positive ints; got {part!r}.")
    return values

  text = "".join(text.split())
  if not text:
    return None
  if ":" not in text:
    values = ints(text, "the tiling")
    return values[0] if len(values) == 1 else values
  per_pass = {}
  for item in filter(None, text.split(";")):
    name, sep, tiles = item.partition(":")
    if not sep or name not in metadata.PASSES:
      raise ValueError(f"--tiling: each ';'-separated item must be 'pass:tm,tk,tn' with pass in "
                       f"{metadata.PASSES}; got {item!r}.")
    if name in per_pass:
      raise ValueError(f"--tiling: pass {name!r} is given twice.")
    values = ints(tiles, f"the tiles of {name!r}")
    if len(values) != 3:
      raise ValueError(f"--tiling: pass {name!r} needs three tiles (tm, tk, tn); got {tiles!r}.")
    per_pass[name] = values
  return per_pass


def check_tiling(tiling, backends: Sequence[str]) -> list[str]:
  """Runs each backend's own tiling validation; returns the backends the tiling goes to.

  Raises:
    ValueError: when a backend rejects it (the kernel's message, naming the
      backend), or when a tiling is given but no backend takes one.
  """
  tiled = [b for b in backends if b in TILING_NORMALIZERS]
  if tiling is None:
    return tiled
  if not tiled:
    raise ValueError(f"--tiling {tiling!r} given, but none of the backends {list(backends)} takes "
                     f"a tiling (only {sorted(TILING_NORMALIZERS)} do; 'auto' resolves per "
                     "platform).")
  for backend in tiled:
    try:
      TILING_NORMALIZERS[backend](tiling)
    except ValueError as e:
      raise ValueError(f"--tiling for backend {backend!r}: {e} (time backends that need "
                       "different tilings in separate runs)") from e
  return tiled


def gmm_candidates(backends: Sequence[str], tiling=None) -> tuple[dict, dict]:
  """The timed gmm and tgmm callables, `{f"gmm[{b}]": fn(lhs, rhs_or_grad, group_sizes)}` each.

  `tiling` goes to the backends in `TILING_NORMALIZERS` only.
  """
  matmuls, tgmms = {}, {}
  for backend in backends:
    kwargs = dict(backend=backend)
    if backend in TILING_NORMALIZERS:
      kwargs["tiling"] = tiling
    matmuls[f"gmm[{backend}]"] = lambda a, b, s, kw=kwargs: pallas_kernels.gmm(a, b, s, **kw)
    tgmms[f"gmm[{backend}]"] = lambda a, g, s, kw=kwargs: pallas_kernels.tgmm(a, g, s, **kw)
  return matmuls, tgmms


def scaled(shape: Shape, scale: int) -> Shape:
  """`shape` with d and f divided by `scale`, rounded up to a multiple of 8 (at least 8)."""
  if scale < 1:
    raise ValueError(f"scale must be a positive integer; got {scale}.")
  if scale == 1:
    return shape

  def shrink(dim):
    return max(8, (-(-dim // scale) + 7) // 8 * 8)
  return dataclasses.replace(shape, d=shrink(shape.d), f=shrink(shape.f))


def group_sizes(num_tokens: int, experts: int, top_k: int, skew: str, seed: int,
                zipf_exponent: float = 1.2) -> np.ndarray:
  """Rows per expert when each of T tokens picks top_k distinct experts: [E] int32, sum T * top_k.

  "balanced": experts drawn uniformly; "skewed": drawn with probability
  proportional to 1 / rank^zipf_exponent, ranks shuffled. Picks are sampled
  without replacement per token with the Gumbel top-k trick.
  """
  if skew not in SKEWS:
    raise ValueError(f"skew must be one of {SKEWS}; got {skew!r}.")
  if not 1 <= top_k <= experts:
    raise ValueError(f"top_k must be in [1, experts={experts}]; got {top_k}.")
  rng = np.random.default_rng(seed)
  if skew == "balanced":
    log_p = np.zeros(experts)
  else:
    log_p = -zipf_exponent * np.log(rng.permutation(experts) + 1.0)
  scores = log_p + rng.gumbel(size=(num_tokens, experts))
  picks = np.argpartition(-scores, top_k - 1, axis=1)[:, :top_k]
  return np.bincount(picks.ravel(), minlength=experts).astype(np.int32)


def _median_times(timers: dict[str, Callable[[], float]], repeats: int, warmup: int,
                  log: Callable[[str], None]) -> dict[str, float]:
  """Median seconds per candidate, one run of each per round; a failing candidate is dropped."""
  ok = {}
  for name, run in timers.items():
    try:
      for _ in range(1 + warmup):  # The first run compiles.
        run()
      ok[name] = run
    except Exception as e:  # noqa: BLE001 (a peer's failure must not stop the others)
      log(f"# note: {name} failed and is left out: {type(e).__name__}: "
          f"{(str(e).splitlines() or [''])[0]}")
  times = {name: [] for name in ok}
  for _ in range(repeats):
    for name, run in ok.items():
      times[name].append(run())
  return {name: float(np.median(t)) for name, t in times.items()}


def _jax_timer(fn, args, calls: int) -> Callable[[], float]:
  """Seconds per call of jit(fn)(*args), over `calls` calls dispatched back to back."""
  fn = jax.jit(fn)

  def run():
    start = time.perf_counter()
    for _ in range(calls):
      out = fn(*args)
    jax.block_until_ready(out)
    return (time.perf_counter() - start) / calls
  return run


def _fwd_bwd(matmul):
  """(out, d lhs, d rhs) of `matmul(lhs, rhs, *rest)` for the cotangent `ct`.

  The forward output is returned too: with only the gradients, XLA would drop
  the forward pass (gmm's backward needs only its inputs).
  """
  def fn(lhs, rhs, *rest_and_ct):
    *rest, ct = rest_and_ct
    out, pullback = jax.vjp(lambda a, b: matmul(a, b, *rest), lhs, rhs)
    return (out, *pullback(ct.astype(out.dtype)))
  return fn


class _Torch:
  """The torch._grouped_mm peer on CUDA, or None with the reason it cannot run."""

  def __init__(self, dtype):
    self.torch, self.grouped_mm, self.reason = None, None, ""
    try:
      import torch  # pylint: disable=g-import-not-at-top
    except ImportError:
      self.reason = "torch is not installed"
      return
    if not torch.cuda.is_available():
      self.reason = "torch sees no CUDA device"
    elif jnp.dtype(dtype) != jnp.bfloat16:
      self.reason = "torch._grouped_mm is timed in bfloat16 only (its fast path)"
    else:
      # Newer torch also exposes the op as torch.nn.functional.grouped_mm.
      self.grouped_mm = (getattr(torch, "_grouped_mm", None)
                         or getattr(torch.nn.functional, "grouped_mm", None))
      if self.grouped_mm is None:
        self.reason = f"torch {torch.__version__} has no torch._grouped_mm"
      else:
        self.torch = torch

  def tensor(self, x: jax.Array):
    """A CUDA tensor with x's values: shared through DLPack when possible, else copied."""
    torch = self.torch
    try:
      return torch.from_dlpack(x).to("cuda")
    except Exception:  # noqa: BLE001 (e.g. JAX on another device): fall back to a copy
      return torch.from_numpy(np.asarray(x.astype(jnp.float32))).to("cuda", torch.bfloat16)

  def timer(self, fn, calls: int) -> Callable[[], float]:
    """Seconds per call of fn(), over `calls` calls between two CUDA events."""
    torch = self.torch
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)

    def run():
      torch.cuda.synchronize()
      start.record()
      for _ in range(calls):
        fn()
      end.record()
      torch.cuda.synchronize()
      return start.elapsed_time(end) / 1e3 / calls
    return run

  def timers(self, x, w, ct, sizes, calls: int) -> dict[str, Callable[[], float]]:
    """{op: timer} for torch._grouped_mm forward, forward+backward and the weight gradient."""
    torch = self.torch
    x_t, w_t, ct_t = self.tensor(x), self.tensor(w), self.tensor(ct)
    # offs[i] is the end row of group i, int32 on the GPU.
    offs = torch.cumsum(torch.as_tensor(np.asarray(sizes), device="cuda"), 0).to(torch.int32)
    x_g, w_g = x_t.detach().requires_grad_(), w_t.detach().requires_grad_()
    grouped_mm = self.grouped_mm

    def fwd_bwd():
      out = grouped_mm(x_g, w_g, offs=offs)
      return torch.autograd.grad(out, (x_g, w_g), grad_outputs=ct_t)

    return {
        "fwd": self.timer(lambda: grouped_mm(x_t, w_t, offs=offs), calls),
        "fwd+bwd": self.timer(fwd_bwd, calls),
        # Ragged contraction: [K, M] x [M, N] -> [G, K, N], as torch's own backward calls it.
        "tgmm": self.timer(lambda: grouped_mm(x_t.t(), ct_t, offs=offs), calls),
    }


def _tokamax():
  try:
    import tokamax  # pylint: disable=g-import-not-at-top
  except ImportError:
    return None
  return tokamax


def _expanded_gib(m: int, experts: int, n: int, dtype) -> float:
  return m * experts * n * jnp.dtype(dtype).itemsize / 2**30


def _resolve_backends(backends: Sequence[str]) -> list[str]:
  resolved = []
  for backend in backends:
    name = ops.resolve_backend(backend)
    if name not in resolved:
      resolved.append(name)
  return resolved


def run_benchmark(shape_names: Sequence[str | Shape], *, num_tokens: int | None = None, dtype=None,
                  skews: Sequence[str] = SKEWS, backends: Sequence[str] = ("auto", "xla"),
                  peers: Sequence[str] = PEERS,
                  repeats: int = 10, warmup: int = 2, calls_per_sample: int | None = None,
                  include_tgmm: bool = False,
                  scale: int | None = None, csv_path: str = "", seed: int = 0,
                  zipf_exponent: float = 1.2, ragged_dot_max_gib: float = 16.0, tiling=None,
                  log: Callable[[str], None] = functools.partial(print, flush=True)
                  ) -> list[dict]:
  """Times every candidate on every (shape, skew, op); prints a table; returns the rows.

  Args:
    shape_names: keys of `PRESETS`, or `Shape`s (e.g. from experiments/device_check.py).
    num_tokens: T for every shape (None: the preset's, or `CPU_DEFAULT_NUM_TOKENS` on CPU).
    dtype: input dtype (None: bfloat16 on accelerators, float32 on CPU).
    skews: group-size distributions, from `SKEWS`.
    backends: `pallas_kernels.gmm` backends; "auto" is resolved, duplicates dropped.
    peers: from `PEERS`; tokamax and torch are left out, with a note, where unavailable.
    repeats: timed rounds; the median is reported.
    warmup: untimed runs per candidate after the compiling one.
    calls_per_sample: back-to-back calls per timed sample; time per call is reported (None:
      `ACCELERATOR_CALLS_PER_SAMPLE`, or `CPU_DEFAULT_CALLS_PER_SAMPLE` on CPU).
    include_tgmm: also time the weight-gradient grouped matmul alone.
    scale: divide d and f by this (None: 1, or `CPU_DEFAULT_SCALE` on CPU).
    csv_path: write the rows here as CSV with `CSV_COLUMNS` when non-empty.
    seed: seed for group sizes and inputs.
    zipf_exponent: the exponent of the "skewed" distribution.
    ragged_dot_max_gib: see the module docstring; negative never skips.
    tiling: `tiling=` for the backends that take one (see `parse_tiling`), checked by each
      backend's own validation before anything is timed; None: their defaults.
    log: where the table and notes go.

  Returns:
    One dict per row with the keys `CSV_COLUMNS` (`vs_fwd` is None except on
    tgmm rows with a forward row of the same implementation; `tiling` is the
    tiling's repr on the rows of the backends it went to, else "").
  """
  on_cpu = jax.default_backend() == "cpu"
  dtype = jnp.dtype(dtype or ("float32" if on_cpu else "bfloat16"))
  scale = scale or (CPU_DEFAULT_SCALE if on_cpu else 1)
  calls_per_sample = calls_per_sample or (CPU_DEFAULT_CALLS_PER_SAMPLE if on_cpu
                                          else ACCELERATOR_CALLS_PER_SAMPLE)
  unknown = [s for s in shape_names if not isinstance(s, Shape) and s not in PRESETS]
  if unknown:
    raise ValueError(f"unknown shapes {unknown}; choose from {sorted(PRESETS)}.")
  backends = _resolve_backends(backends)
  unknown = [p for p in peers if p not in PEERS]
  if unknown:
    raise ValueError(f"unknown peers {unknown}; choose from {PEERS}.")
  tiled = check_tiling(tiling, backends)
  tiling_text = "" if tiling is None else repr(tiling)
  op_names = OPS if include_tgmm else OPS[:2]
  device = jax.devices()[0].device_kind
  torch_peer = _Torch(dtype) if "torch" in peers else None
  tokamax = _tokamax() if "tokamax" in peers else None

  log(f"# gmm throughput: {datetime.date.today()}, JAX {jax.__version__}, {device} "
      f"({jax.default_backend()}), {platform.machine()}, {os.cpu_count()} CPUs"
      + (f", torch {torch_peer.torch.__version__}" if torch_peer and torch_peer.torch else ""))
  log("# command: python " + " ".join(sys.argv))
  if tiling is not None:
    log(f"# tiling {tiling_text} for {', '.join(f'gmm[{b}]' for b in tiled)}; others at defaults")
  log(f"# dtype {dtype.name}, d and f divided by {scale}; time per call: median of {repeats} "
      f"samples of {calls_per_sample} back-to-back calls; TFLOP/s and "
      "ratio to the dense matmul of equal FLOPs in the same run; vs fwd: tgmm / forward TFLOP/s")
  if torch_peer and not torch_peer.torch:
    log(f"# note: torch._grouped_mm left out: {torch_peer.reason}.")
  if "tokamax" in peers and tokamax is None:
    log("# note: tokamax.ragged_dot left out: tokamax is not installed (pip install .[bench]).")

  rows = []
  key = jax.random.key(seed)
  for shape in shape_names:
    shape = scaled(shape if isinstance(shape, Shape) else PRESETS[shape], scale)
    shape_name = shape.name
    t = num_tokens or (min(shape.num_tokens, CPU_DEFAULT_NUM_TOKENS) if on_cpu
                       else shape.num_tokens)
    m, k, n, e = t * shape.top_k, shape.d, shape.f, shape.experts
    key, kx, kw, kd, kc = jax.random.split(key, 5)
    # Inputs are drawn on the device, the weight one expert at a time.
    x = jax.random.normal(kx, (m, k), dtype)
    w = jax.vmap(lambda key: jax.random.normal(key, (k, n), dtype))(jax.random.split(kw, e))
    w_dense = jax.random.normal(kd, (k, n), dtype)
    ct = jax.random.normal(kc, (m, n), dtype)
    expanded = _expanded_gib(m, e, n, dtype)
    skip_expanded = (jax.default_backend() != "tpu" and 0 <= ragged_dot_max_gib < expanded)
    if skip_expanded:
      log(f"# note: {shape_name}: ragged_dot, gmm[xla] and gmm[reference] left out: their "
          f"expanded [M, G*N] product would take {expanded:.1f} GiB > --ragged_dot_max_gib.")

    matmuls = tgmms = timers = torch_timers = None
    for skew in skews:
      sizes_np = group_sizes(t, e, shape.top_k, skew, seed, zipf_exponent)
      sizes = jnp.asarray(sizes_np)
      log(f"\n## {shape_name} {skew}: T={t} top_k={shape.top_k} M={m} d={k} f={n} E={e}; rows "
          f"per expert min {sizes_np.min()} median {int(np.median(sizes_np))} max "
          f"{sizes_np.max()}, {int((sizes_np == 0).sum())} empty\n")
      log("| op | impl | ms | TFLOP/s | vs dense | vs fwd |")
      log("|---|---|---:|---:|---:|---:|")

      # Every matmul takes (lhs, rhs, group_sizes); dense ignores the sizes.
      matmuls = {"dense": (lambda a, b, s: a @ b, w_dense)}
      if "ragged_dot" in peers and not skip_expanded:
        matmuls["jax.lax.ragged_dot"] = (lambda a, b, s: jax.lax.ragged_dot(a, b, s), w)
      if tokamax is not None:
        matmuls["tokamax.ragged_dot"] = (lambda a, b, s: tokamax.ragged_dot(a, b, s), w)
      gmm_fns, tgmm_fns = gmm_candidates(
          [b for b in backends if not (skip_expanded and b in ("xla", "reference"))], tiling)
      matmuls.update({name: (fn, w) for name, fn in gmm_fns.items()})
      tgmms = {"dense": lambda a, g, s: a.T @ g, **tgmm_fns}
      torch_timers = {}
      if torch_peer and torch_peer.torch:
        try:
          torch_timers = torch_peer.timers(x, w, ct, sizes_np, calls_per_sample)
        except Exception as e:  # noqa: BLE001 (the peer's failure must not stop the others)
          log(f"# note: torch._grouped_mm left out: {type(e).__name__}: {e}")

      results = {}
      for op in op_names:
        if op == "fwd":
          timers = {name: _jax_timer(fn, (x, rhs, sizes), calls_per_sample)
                    for name, (fn, rhs) in matmuls.items()}
        elif op == "fwd+bwd":
          timers = {name: _jax_timer(_fwd_bwd(fn), (x, rhs, sizes, ct), calls_per_sample)
                    for name, (fn, rhs) in matmuls.items()}
        else:
          timers = {name: _jax_timer(fn, (x, ct, sizes), calls_per_sample)
                    for name, fn in tgmms.items()}
        if op in torch_timers:
          timers["torch._grouped_mm"] = torch_timers[op]
        seconds = _median_times(timers, repeats, warmup, log)
        op_flops = flops(op, m, k, n)
        for impl, sec in seconds.items():
          results[op, impl] = sec
          fwd_sec = results.get(("fwd", impl)) if op == "tgmm" else None
          row = dict(shape=shape_name, skew=skew, dtype=dtype.name, device=device, num_tokens=t,
                     top_k=shape.top_k, experts=e, m=m, k=k, n=n, op=op, impl=impl,
                     ms=sec * 1e3, tflops_per_s=op_flops / sec / 1e12, flops=op_flops,
                     vs_dense=seconds["dense"] / sec if "dense" in seconds else None,
                     vs_fwd=fwd_sec / sec if fwd_sec else None,
                     tiling=tiling_text if impl in {f"gmm[{b}]" for b in tiled} else "")
          rows.append(row)
          fmt = lambda v: "" if v is None else f"{v:.2f}"
          log(f"| {op} | {impl} | {row['ms']:.3f} | {row['tflops_per_s']:.3g} | "
              f"{fmt(row['vs_dense'])} | {fmt(row['vs_fwd'])} |")
    # Free this shape's device memory before the next one's inputs are drawn.
    del x, w, w_dense, ct, matmuls, tgmms, timers, torch_timers
    if torch_peer and torch_peer.torch:
      torch_peer.torch.cuda.empty_cache()

  if csv_path:
    with open(csv_path, "w", newline="") as f:
      writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
      writer.writeheader()
      writer.writerows(rows)
    log(f"\n# wrote {len(rows)} rows to {csv_path}")
  return rows


def main(argv):
  del argv
  try:
    tiling = parse_tiling(_TILING.value)
    check_tiling(tiling, _resolve_backends(_BACKENDS.value))
  except ValueError as e:
    raise app.UsageError(str(e)) from e
  run_benchmark(_SHAPES.value, num_tokens=_NUM_TOKENS.value, dtype=_DTYPE.value, skews=_SKEW.value,
                backends=_BACKENDS.value, peers=_PEERS.value, repeats=_REPEATS.value,
                warmup=_WARMUP.value, calls_per_sample=_CALLS.value,
                include_tgmm=_INCLUDE_TGMM.value, scale=_SCALE.value, csv_path=_CSV.value,
                seed=_SEED.value, zipf_exponent=_ZIPF.value,
                ragged_dot_max_gib=_RAGGED_DOT_MAX_GIB.value, tiling=tiling)


if __name__ == "__main__":
  app.run(main)
