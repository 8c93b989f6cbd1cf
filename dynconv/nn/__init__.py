"""``nn.Module`` layers, one file per family, re-exported flat."""

from dynconv.nn.convert import convert, skip_stem_and_pointwise
from dynconv.nn.dcnv import DCNv3, DCNv4
from dynconv.nn.deform import DeformConv2d, ModulatedDeformConv2d
from dynconv.nn.local_filter import DynamicLocalFilter2d, FilterGeneratingNetwork, Involution2d
from dynconv.nn.mixture import (
    CondConv2d,
    DynamicConv2d,
    DyNetConv2d,
    KernelMixtureConv2d,
    ODConv2d,
    set_temperature,
    temperature_schedule,
)
from dynconv.nn.sample_conv import DynamicDilatedFilter, DynamicFilterLayer, DynamicMaskHead, DynamicMultiScaleFilter

__all__ = [
    "DCNv3",
    "DCNv4",
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
    "KernelMixtureConv2d",
    "ModulatedDeformConv2d",
    "ODConv2d",
    "convert",
    "set_temperature",
    "skip_stem_and_pointwise",
    "temperature_schedule",
]
