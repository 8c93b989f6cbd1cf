"""Kernel-mixture convolutions: a bank of ``K`` expert kernels mixed per sample by input-dependent attention.

* :class:`CondConv2d` -- CondConv (Yang et al., NeurIPS 2019): routing = global average pool -> linear ->
  **sigmoid** (independent weights, not a convex combination).
* :class:`DynamicConv2d` -- Dynamic Convolution / DY-CNN (Chen et al., CVPR 2020): attention = pool -> FC ->
  ReLU -> FC -> **softmax with temperature**, ``K = 4``, the temperature annealed from 30 to 1 over the first
  epochs (:func:`temperature_schedule`, :func:`set_temperature`).
* :class:`ODConv2d` -- Omni-Dimensional Dynamic Convolution (Li et al., ICLR 2022): four attentions (spatial
  ``k*k``, input channel, output channel, kernel) multiplied into the kernel.
* :class:`DyNetConv2d` -- DyNet (Zhang et al., 2020): coefficients (pool -> FC -> ReLU -> FC -> sigmoid) per
  fixed kernel and output channel, fused like CondConv's experts.

All four are :class:`KernelMixtureConv2d` with the paper's attention module; every one computes, for sample
``b``, ``y[b] = conv2d(x[b], sum_k a[b, k] * W_k) + sum_k a[b, k] * bias_k`` (ODConv also scales the input
and output channels and the taps) with :func:`dynconv.sample_conv2d`, in the formulation its ``formulation``
argument names.

* :mod:`~dynconv.nn.mixture.kernel_mixture`: the layer (parameters, formulations, conversion from ``nn.Conv2d``);
* :mod:`~dynconv.nn.mixture.attention`: the attention modules;
* :mod:`~dynconv.nn.mixture.formulation`: the formulations and the rule ``"auto"`` follows;
* :mod:`~dynconv.nn.mixture.layers`: the four layers of the papers and the temperature schedule.
"""

from dynconv.nn.mixture.attention import (
    CondConvRouting,
    DyNetCoefficients,
    MixtureAttention,
    OmniAttention,
    SoftmaxAttention,
)
from dynconv.nn.mixture.formulation import (
    CHUNK_BYTES,
    CHUNK_SAMPLES,
    EXPERTS_RATIO,
    EXPERTS_RATIO_DEFAULT,
    FORMULATIONS,
    choose_formulation,
    chunk_size,
)
from dynconv.nn.mixture.kernel_mixture import KernelMixtureConv2d
from dynconv.nn.mixture.layers import (
    CondConv2d,
    DynamicConv2d,
    DyNetConv2d,
    ODConv2d,
    set_temperature,
    temperature_schedule,
)

__all__ = [
    "CHUNK_BYTES",
    "CHUNK_SAMPLES",
    "EXPERTS_RATIO",
    "EXPERTS_RATIO_DEFAULT",
    "FORMULATIONS",
    "CondConv2d",
    "CondConvRouting",
    "DyNetCoefficients",
    "DyNetConv2d",
    "DynamicConv2d",
    "KernelMixtureConv2d",
    "MixtureAttention",
    "ODConv2d",
    "OmniAttention",
    "SoftmaxAttention",
    "choose_formulation",
    "chunk_size",
    "set_temperature",
    "temperature_schedule",
]
