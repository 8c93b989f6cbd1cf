"""dynconv: dynamic (content-adaptive) convolution for PyTorch.

Ops live in :mod:`dynconv.functional` and are re-exported here; layers live in :mod:`dynconv.nn`.
"""

from dynconv import ops  # noqa: F401  (registers the dynconv:: custom ops)
from dynconv.backends import BackendError, choose_backend
from dynconv.functional import dcnv3, dcnv4, local_filter2d
from dynconv.nn import DCNv3, DCNv4, DynamicLocalFilter2d, FilterGeneratingNetwork, Involution2d

__version__ = "0.1.0"

__all__ = [
    "BackendError",
    "DCNv3",
    "DCNv4",
    "DynamicLocalFilter2d",
    "FilterGeneratingNetwork",
    "Involution2d",
    "choose_backend",
    "dcnv3",
    "dcnv4",
    "local_filter2d",
]
