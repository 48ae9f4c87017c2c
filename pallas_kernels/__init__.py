"""Grouped matmul kernels for Mixture-of-Experts layers.

`gmm` and `tgmm` are the public entry points; `BACKENDS` lists the values their
`backend=` argument accepts. Importing this package binds the name `gmm` to the
function, not to the `pallas_kernels/gmm/` sub-package of the same name: reach
the sub-package's modules with `from pallas_kernels.gmm import ops`.
"""

from pallas_kernels.gmm.ops import BACKENDS
from pallas_kernels.gmm.ops import gmm
from pallas_kernels.gmm.ops import tgmm

__all__ = ["BACKENDS", "gmm", "tgmm"]
