"""``nn.Module`` layers, one file per family, re-exported flat."""

from dynconv.nn.local_filter import DynamicLocalFilter2d, FilterGeneratingNetwork, Involution2d

__all__ = ["DynamicLocalFilter2d", "FilterGeneratingNetwork", "Involution2d"]
