"""dynconv: dynamic (content-adaptive) convolution for PyTorch.

Ops live in :mod:`dynconv.functional` and are re-exported here; layers live in :mod:`dynconv.nn`.
"""

from dynconv import ops  # noqa: F401  (registers the dynconv:: custom ops)
from dynconv.backends import BackendError, choose_backend
from dynconv.functional import deform_conv2d, local_filter2d, warp
from dynconv.nn import DeformConv2d, DynamicLocalFilter2d, FilterGeneratingNetwork, ModulatedDeformConv2d

__version__ = "0.1.0"

__all__ = [
    "BackendError",
    "DeformConv2d",
    "DynamicLocalFilter2d",
    "FilterGeneratingNetwork",
    "ModulatedDeformConv2d",
    "choose_backend",
    "deform_conv2d",
    "local_filter2d",
    "warp",
]
