"""dynconv: dynamic (content-adaptive) convolution for PyTorch.

Ops live in :mod:`dynconv.functional` and are re-exported here; layers live in :mod:`dynconv.nn`; ONNX export of
models that use them in :mod:`dynconv.onnx`.
"""

from dynconv import onnx, ops  # noqa: F401  (ops registers the dynconv:: custom ops)
from dynconv.backends import BackendError, choose_backend
from dynconv.functional import dcnv3, dcnv4, deform_conv2d, local_filter2d, sample_conv2d, warp
from dynconv.nn import (
    CondConv2d,
    DCNv3,
    DCNv4,
    DeformConv2d,
    DynamicConv2d,
    DynamicDilatedFilter,
    DynamicFilterLayer,
    DynamicLocalFilter2d,
    DynamicMaskHead,
    DynamicMultiScaleFilter,
    DyNetConv2d,
    FilterGeneratingNetwork,
    Involution2d,
    ModulatedDeformConv2d,
    ODConv2d,
    convert,
    set_temperature,
    skip_stem_and_pointwise,
    temperature_schedule,
)

__version__ = "0.1.0"

__all__ = [
    "DCNv3",
    "DCNv4",
    "BackendError",
    "CondConv2d",
    "DeformConv2d",
    "DyNetConv2d",
    "DynamicConv2d",
    "DynamicDilatedFilter",
    "DynamicFilterLayer",
    "DynamicLocalFilter2d",
    "DynamicMaskHead",
    "DynamicMultiScaleFilter",
    "FilterGeneratingNetwork",
    "Involution2d",
    "ModulatedDeformConv2d",
    "ODConv2d",
    "choose_backend",
    "convert",
    "dcnv3",
    "dcnv4",
    "deform_conv2d",
    "local_filter2d",
    "sample_conv2d",
    "set_temperature",
    "skip_stem_and_pointwise",
    "temperature_schedule",
    "warp",
]
