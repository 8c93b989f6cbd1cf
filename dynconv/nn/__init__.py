"""``nn.Module`` layers, one file per family, re-exported flat."""

from dynconv.nn.deform import DeformConv2d, ModulatedDeformConv2d
from dynconv.nn.local_filter import DynamicLocalFilter2d, FilterGeneratingNetwork

__all__ = ["DeformConv2d", "DynamicLocalFilter2d", "ModulatedDeformConv2d", "FilterGeneratingNetwork"]
