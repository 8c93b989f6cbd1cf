"""``nn.Module`` layers, one file per family, re-exported flat."""

from dynconv.nn.dcnv import DCNv3, DCNv4
from dynconv.nn.local_filter import DynamicLocalFilter2d, FilterGeneratingNetwork, Involution2d

__all__ = ["DCNv3", "DCNv4", "DynamicLocalFilter2d", "FilterGeneratingNetwork", "Involution2d"]
