"""Public grouped matmul entry points, backend dispatch and the one custom VJP.

Every backend provides `gmm(lhs, rhs, group_sizes, *, out_dtype, tiling,
transpose_rhs)` and `tgmm(lhs, grad, group_sizes, *, out_dtype, tiling)`
(the Pallas backends also take `interpret`);
the VJP below turns any such pair into a differentiable `gmm`:
  d_lhs = gmm(grad, rhs^T)     (rhs^T contracted in place, never materialized)
  d_rhs = tgmm(lhs, grad)
so the backward pass costs what the forward costs on every backend.

The backward passes run in the forward's compute dtype: the cotangent (float32 when the forward
asked for a float32 result) is cast to `result_type(lhs, rhs)` before both backward products, so
with bf16 operands all three grouped matmuls take bf16 operands and accumulate in float32, and no
float32 copy of the [G, K, N] weights is ever made (as in Megablox and MaxText's bf16 training).
"""

import functools

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.gmm import blocked
from pallas_kernels.gmm import gpu
from pallas_kernels.gmm import metadata
from pallas_kernels.gmm import reference
from pallas_kernels.gmm import tpu
from pallas_kernels.gmm import xla

BACKENDS = ("auto", "blocked", "xla", "reference", "gpu", "tpu")
_IMPLEMENTATIONS = {"blocked": blocked, "xla": xla, "reference": reference, "gpu": gpu,
                    "tpu": tpu}
# Pallas backends also take `interpret=`.
_PALLAS_BACKENDS = ("tpu", "gpu")


# What each backend has been checked on, per platform: the one table `auto` reads. A backend is
# "verified" on a platform once its values and both gradients matched the reference on that
# platform's hardware (not in Pallas interpret mode); record the check (command, date) here when
# flipping an entry. `auto` picks the first verified backend of the platform's list.
VERIFICATION = {
    "cpu": (("blocked", "verified: tests/test_gmm.py on XLA:CPU (CI)"),
            ("xla", "verified: tests/test_gmm.py on XLA:CPU (CI); ragged_dot runs dense there"),
            ("reference", "verified: the plain jnp reference")),
    "gpu": (("xla", "verified: jax.lax.ragged_dot, XLA's own grouped matmul"),
            ("gpu", "NOT verified: the Pallas Triton kernels ran only in interpret mode")),
    "tpu": (("xla", "verified: jax.lax.ragged_dot, XLA's own grouped matmul"),
            ("tpu", "NOT verified: the Pallas Mosaic kernels ran only in interpret mode")),
}
_LOGGED_AUTO: set[str] = set()


def verified_backends(platform: str) -> list[str]:
  """The backends VERIFICATION marks verified on `platform` ("cpu", "gpu", "tpu", ...)."""
  return [name for name, status in VERIFICATION.get(platform, ())
          if status.startswith("verified")]


def resolve_backend(backend: str) -> str:
  """Maps a `backend=` value to the implementation that will run.

  "auto" picks, for `jax.default_backend()`, the first backend `VERIFICATION` marks verified
  there: "blocked" on CPU (where `ragged_dot` costs G x the FLOPs), XLA's `ragged_dot` on GPU and
  TPU until the Pallas kernels have been checked on that hardware ("gpu" / "tpu" select them
  explicitly), "xla" on any other platform. The choice is logged once per platform.

  Raises:
    ValueError: for an unknown name.
  """
  if backend not in BACKENDS:
    raise ValueError(f"backend must be one of {BACKENDS}; got {backend!r}.")
  if backend == "auto":
    platform = jax.default_backend()
    chosen = (verified_backends(platform) or ["xla"])[0]
    if platform not in _LOGGED_AUTO:
      _LOGGED_AUTO.add(platform)
      logging.info("gmm backend 'auto' on %s: %r (verified there; %s).", platform, chosen,
                   "; ".join(f"{n}: {s}" for n, s in VERIFICATION.get(platform, ())) or "no table")
    return chosen
  return backend


def _require(ok: bool, message: str) -> None:
  if not ok:
    raise ValueError(message)


def _check_float(name: str, x: jax.Array) -> None:
  _require(jnp.issubdtype(x.dtype, jnp.floating),
           f"{name} must be a floating-point array; got dtype {x.dtype}.")


def _check_operands(lhs: jax.Array, other: jax.Array, name: str, dims: str, shared: str) -> None:
  """Checks `lhs` [m, k] and the other operand: their ranks, the shared dimension, float dtypes.

  Args:
    lhs: the [m, k] operand.
    other: the other operand, laid out as `dims`.
    name: the other operand's argument name ("rhs" or "grad").
    dims: the other operand's dimension letters, e.g. "gkn" for [g, k, n].
    shared: the dimension letter both operands have ("k" or "m").
  """
  layout = f"[{', '.join(dims)}]"
  _require(lhs.ndim == 2, f"lhs must be 2-D [m, k]; got shape {lhs.shape}.")
  _require(other.ndim == len(dims),
           f"{name} must be {len(dims)}-D {layout}; got shape {other.shape}.")
  _require(lhs.shape["mk".index(shared)] == other.shape[dims.index(shared)],
           f"lhs [m, k] and {name} {layout} disagree on {shared}: lhs {lhs.shape}, "
           f"{name} {other.shape}.")
  _check_float("lhs", lhs)
  _check_float(name, other)


def _check_group_sizes(group_sizes: jax.Array, num_groups: int, who: str) -> None:
  _require(group_sizes.ndim == 1 and jnp.issubdtype(group_sizes.dtype, jnp.integer),
           "group_sizes must be a 1-D integer array; got shape "
           f"{group_sizes.shape} and dtype {group_sizes.dtype}.")
  _require(group_sizes.shape[0] == num_groups,
           f"group_sizes has {group_sizes.shape[0]} entries but {who} has {num_groups} groups.")


def _out_dtype(preferred_element_type, *operands) -> np.dtype:
  if preferred_element_type is None:
    return jnp.result_type(*operands)
  dtype = jnp.dtype(preferred_element_type)
  _require(jnp.issubdtype(dtype, jnp.floating),
           f"preferred_element_type must be a floating-point dtype; got {dtype}.")
  return dtype


def static_tiling(tiling, backend: str):
  """Validates `tiling` for the backend and makes it hashable (it is static)."""
  if backend == "blocked":
    return metadata.normalize_row_tiles(tiling)
  if backend == "gpu":
    return gpu.normalize_tiling(tiling)
  if backend == "tpu":
    return tpu.normalize_tiling(tiling)
  return None  # "xla" and "reference" take no tiling; "auto" may land on either.


def _interpret_kwargs(backend: str, interpret: bool) -> dict[str, bool]:
  return {"interpret": interpret} if backend in _PALLAS_BACKENDS else {}


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6))
def _gmm(lhs, rhs, group_sizes, out_dtype, tiling, backend, interpret):
  return _IMPLEMENTATIONS[backend].gmm(lhs, rhs, group_sizes, out_dtype=out_dtype, tiling=tiling,
                                       **_interpret_kwargs(backend, interpret))


def _gmm_fwd(lhs, rhs, group_sizes, out_dtype, tiling, backend, interpret):
  out = _gmm(lhs, rhs, group_sizes, out_dtype, tiling, backend, interpret)
  return out, (lhs, rhs, group_sizes)


def _gmm_bwd(out_dtype, tiling, backend, interpret, residuals, grad):
  del out_dtype
  lhs, rhs, group_sizes = residuals
  impl = _IMPLEMENTATIONS[backend]
  # The compute dtype, not float32: promoting the f32 cotangent with bf16 operands would run both
  # backward products in f32 on an f32 copy of the weights. Accumulation stays f32 in every backend.
  grad = grad.astype(jnp.result_type(lhs, rhs))
  kwargs = _interpret_kwargs(backend, interpret)
  d_lhs = impl.gmm(grad, rhs, group_sizes, out_dtype=lhs.dtype, tiling=tiling, transpose_rhs=True,
                   **kwargs)
  d_rhs = impl.tgmm(lhs, grad, group_sizes, out_dtype=rhs.dtype, tiling=tiling, **kwargs)
  return d_lhs, d_rhs, None


_gmm.defvjp(_gmm_fwd, _gmm_bwd)


def gmm(lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array, *, preferred_element_type=None,
        tiling=None, backend: str = "auto", interpret: bool = False) -> jax.Array:
  """Grouped matmul: rows of group i times rhs[i], like `jax.lax.ragged_dot`.

  Rows are sorted by group: group i owns the `group_sizes[i]` rows after
  those of groups 0..i-1. Rows past `sum(group_sizes)` come out as zeros (and
  get zero gradient). Differentiable in `lhs` and `rhs` through one custom
  VJP shared by all backends; `group_sizes` may be traced.

  Args:
    lhs: [M, K] floating.
    rhs: [G, K, N] floating.
    group_sizes: [G] integer, with sum(group_sizes) <= M.
    preferred_element_type: dtype of the result (default: the promoted input
      dtype). Products are summed in float32 (or wider) regardless.
    tiling: backend-specific. "blocked": None (default row tiles
      `metadata.DEFAULT_ROW_TILES`), an int row tile, or a strictly decreasing
      tuple of row tiles. "gpu": None (defaults by pass and dtype), one
      `(tm, tk, tn)` of powers of two >= 16, or a dict from "fwd", "dlhs"
      (the d_lhs gmm) and "drhs" (the d_rhs tgmm) to `(tm, tk, tn)`; see
      `gpu.normalize_tiling`. "tpu": the same forms, any positive tiles in
      interpret mode; compiled, tk and tn multiples of 128 and tm of 8 (16
      for 16-bit data), or covering their dimension; default (128, 128, 128)
      shrunk to small dimensions; see `tpu.py`. Ignored by "xla" and
      "reference".
    backend: one of `BACKENDS`; see `resolve_backend` for what "auto" picks.
    interpret: run Pallas kernels in interpret mode (e.g. on CPU). Only the
      Pallas backends ("gpu", "tpu") use it.

  Returns:
    [M, N] in `preferred_element_type`.
  """
  backend = resolve_backend(backend)
  lhs, rhs, group_sizes = jnp.asarray(lhs), jnp.asarray(rhs), jnp.asarray(group_sizes)
  _check_operands(lhs, rhs, "rhs", "gkn", "k")
  _check_group_sizes(group_sizes, rhs.shape[0], "rhs")
  out_dtype = _out_dtype(preferred_element_type, lhs, rhs)
  tiling = static_tiling(tiling, backend)
  if lhs.shape[0] == 0 or rhs.shape[0] == 0:
    return jnp.zeros((lhs.shape[0], rhs.shape[2]), out_dtype)
  return _gmm(lhs, rhs, group_sizes.astype(jnp.int32), out_dtype, tiling, backend, interpret)


def tgmm(lhs: jax.Array, grad: jax.Array, group_sizes: jax.Array, *, preferred_element_type=None,
         tiling=None, backend: str = "auto", interpret: bool = False) -> jax.Array:
  """Weight-gradient grouped matmul: out[i] = lhs[rows of i].T @ grad[rows of i].

  The `rhs` gradient of `gmm`. Empty groups give exact zeros; rows past
  `sum(group_sizes)` are ignored. Not itself differentiable.

  Args:
    lhs: [M, K] floating, rows sorted by group.
    grad: [M, N] floating.
    group_sizes: [G] integer, with sum(group_sizes) <= M.
    preferred_element_type, tiling, backend, interpret: as in `gmm`.

  Returns:
    [G, K, N] in `preferred_element_type`.
  """
  backend = resolve_backend(backend)
  lhs, grad, group_sizes = jnp.asarray(lhs), jnp.asarray(grad), jnp.asarray(group_sizes)
  _check_operands(lhs, grad, "grad", "mn", "m")
  _require(group_sizes.ndim == 1, "group_sizes must be a 1-D integer array; got shape "
           f"{group_sizes.shape}.")
  _check_group_sizes(group_sizes, group_sizes.shape[0], "group_sizes")
  out_dtype = _out_dtype(preferred_element_type, lhs, grad)
  tiling = static_tiling(tiling, backend)
  out_shape = (group_sizes.shape[0], lhs.shape[1], grad.shape[1])
  if lhs.shape[0] == 0 or group_sizes.shape[0] == 0:
    return jnp.zeros(out_shape, out_dtype)
  return _IMPLEMENTATIONS[backend].tgmm(lhs, grad, group_sizes.astype(jnp.int32),
                                        out_dtype=out_dtype, tiling=tiling,
                                        **_interpret_kwargs(backend, interpret))
