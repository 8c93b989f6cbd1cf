"""The four kernel-mixture layers of the papers: :class:`KernelMixtureConv2d` with the paper's attention.

Each takes the ``nn.Conv2d`` arguments, ``num_experts``, its attention's arguments and ``formulation``
(:mod:`dynconv.nn.mixture.formulation`); ``attention(x)`` returns the coefficients the paper describes.
"""

from __future__ import annotations

from functools import partial

import torch
from torch import nn

from dynconv.nn.mixture.attention import CondConvRouting, DyNetCoefficients, OmniAttention, SoftmaxAttention
from dynconv.nn.mixture.kernel_mixture import Device, DType, IntOrPair, KernelMixtureConv2d, Padding

__all__ = ["CondConv2d", "DyNetConv2d", "DynamicConv2d", "ODConv2d", "set_temperature", "temperature_schedule"]


class CondConv2d(KernelMixtureConv2d):
    """CondConv (Yang et al., "CondConv: Conditionally Parameterized Convolutions for Efficient Inference",
    NeurIPS 2019): ``K`` experts, routing ``r = sigmoid(W_r GAP(x) + b_r)`` (:class:`CondConvRouting`).

    The routing weights are independent sigmoids (the paper's choice: a sample may use several experts at
    full strength), not a softmax.

    Args:
        num_experts (int): ``K``. Default 8 (the paper's CondConv-EfficientNet setting).

    Shape:
        - x: ``[B, C_in, H, W]``; output: ``[B, C_out, H_out, W_out]`` (``F.conv2d``'s size).
        - ``attention(x)``: ``[B, K]`` routing weights in ``(0, 1)``.
    """

    def __init__(
        self, in_channels: int, out_channels: int, kernel_size: IntOrPair, stride: IntOrPair = 1, padding: Padding = 0,
        dilation: IntOrPair = 1, groups: int = 1, bias: bool = True, num_experts: int = 8, formulation: str = "auto",
        device: Device = None, dtype: DType = None,
    ) -> None:  # fmt: skip
        attention = partial(CondConvRouting, in_channels, num_experts)
        super().__init__(
            in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias, num_experts, formulation,
            attention=attention, device=device, dtype=dtype,
        )  # fmt: skip


class DynamicConv2d(KernelMixtureConv2d):
    """Dynamic Convolution / DY-CNN (Chen et al., "Dynamic Convolution: Attention over Convolution Kernels",
    CVPR 2020): ``K`` kernels aggregated with ``softmax(FC2(ReLU(FC1(GAP(x)))) / temperature)``
    (:class:`SoftmaxAttention`).

    The attention is a convex combination, squeezed by ``reduction`` in the hidden layer as in the paper (C/4).
    The paper trains with a large temperature at first (near-uniform attention, so every kernel is trained) and
    anneals it linearly from 30 to 1 over the first 10 epochs: call
    ``set_temperature(model, temperature_schedule(epoch))`` each epoch. The temperature is a buffer, so it is
    saved with the model.

    Args:
        num_experts (int): ``K``. Default 4 (the paper's default).
        reduction (int): hidden width of the attention is ``max(in_channels // reduction, min_hidden)``.
            Default 4.
        min_hidden (int): lower bound of the hidden width (for the 3-channel stem). Default 4.
        temperature (float): initial softmax temperature. Default 30 (the start of the paper's schedule).

    Shape:
        - x: ``[B, C_in, H, W]``; output: ``[B, C_out, H_out, W_out]``.
        - ``attention(x)``: ``[B, K]``, rows summing to 1.
    """

    def __init__(
        self, in_channels: int, out_channels: int, kernel_size: IntOrPair, stride: IntOrPair = 1, padding: Padding = 0,
        dilation: IntOrPair = 1, groups: int = 1, bias: bool = True, num_experts: int = 4, reduction: int = 4,
        min_hidden: int = 4, temperature: float = 30.0, formulation: str = "auto", device: Device = None,
        dtype: DType = None,
    ) -> None:  # fmt: skip
        attention = partial(SoftmaxAttention, in_channels, num_experts, reduction, min_hidden, temperature)
        super().__init__(
            in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias, num_experts, formulation,
            attention=attention, device=device, dtype=dtype,
        )  # fmt: skip


class DyNetConv2d(KernelMixtureConv2d):
    """DyNet (Zhang et al., "DyNet: Dynamic Convolution for Accelerating Convolutional Neural Networks", 2020):
    fixed kernels fused with predicted coefficients (:class:`DyNetCoefficients`).

    The coefficient prediction module is ``sigmoid(FC2(ReLU(FC1(GAP(x)))))`` with one coefficient per
    fixed kernel and output channel (``per_channel=True``), or per fixed kernel (``per_channel=False``; then
    this is CondConv's routing with a hidden layer). The dynamic generation module is the coefficient-weighted
    sum of the fixed kernels, the same computation as CondConv, and runs through the same formulations.
    (DyNet's code is not public, and the per-output-channel granularity is our reading of the paper that was
    not re-checked against its text when this was written: ``per_channel=False`` gives the per-kernel variant.)

    Args:
        num_experts (int): number of fixed kernels. Default 4.
        per_channel (bool): one coefficient per (kernel, output channel). Default True.
        reduction, min_hidden (int): hidden width ``max(in_channels // reduction, min_hidden)``. Defaults 4, 4.

    Shape:
        - x: ``[B, C_in, H, W]``; output: ``[B, C_out, H_out, W_out]``.
        - ``attention(x)``: ``[B, K, C_out]`` (or ``[B, K]`` with ``per_channel=False``) in ``(0, 1)``.
    """

    def __init__(
        self, in_channels: int, out_channels: int, kernel_size: IntOrPair, stride: IntOrPair = 1, padding: Padding = 0,
        dilation: IntOrPair = 1, groups: int = 1, bias: bool = True, num_experts: int = 4, per_channel: bool = True,
        reduction: int = 4, min_hidden: int = 4, formulation: str = "auto", device: Device = None, dtype: DType = None,
    ) -> None:  # fmt: skip
        attention = partial(
            DyNetCoefficients, in_channels, out_channels, num_experts, per_channel, reduction, min_hidden
        )
        super().__init__(
            in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias, num_experts, formulation,
            attention=attention, device=device, dtype=dtype,
        )  # fmt: skip


class ODConv2d(KernelMixtureConv2d):
    """Omni-Dimensional Dynamic Convolution (Li, Zhou and Yao, ICLR 2022): four attentions (spatial ``k*k``,
    input channel, output channel, kernel) multiplied into the kernel (:class:`OmniAttention`).

    The kernel of sample ``b`` is

        ``W[b] = sum_k a_w[b,k] * a_f[b,:,None,None,None] * a_c[b,None,:,None,None] * a_s[b,None,None,:] * W_k``

    Each channel attention is multiplied into whichever is smaller, the per-sample kernel (``P`` weights) or
    the activation it scales (``C_in*H*W`` of the input, ``C_out*H_out*W_out`` of the output; the official
    code always scales the activations): the product is the same, and on early layers of large maps the
    kernel is the cheaper one. Heads are omitted as in the official code: the spatial one for 1x1 kernels, the
    output-channel one for depthwise layers, the kernel one for ``K = 1``. The bias (one per layer, not
    mixed) is added after the output-channel attention.

    Args:
        num_experts (int): ``K``. Default 4 (the paper's ODConv 4x; use 1 for ODConv 1x).
        reduction (float): trunk width ratio. Default 1/16.
        min_channels (int): minimum trunk width. Default 16.
        temperature (float): attention temperature. Default 1.
        formulation (str): as for the other mixtures, with the same ``"auto"`` rule. In the ``"experts"``
            formulation the spatial attention scales the taps of the input's im2col columns, and the ``K``
            experts run as one matmul over them.

    Shape:
        - x: ``[B, C_in, H, W]``; output: ``[B, C_out, H_out, W_out]``.
        - ``attention(x)``: a dict with ``"spatial" [B, kh*kw]``, ``"in_channel" [B, C_in]``,
          ``"out_channel" [B, C_out]``, ``"kernel" [B, K]`` (absent heads are omitted).
    """

    def __init__(
        self, in_channels: int, out_channels: int, kernel_size: IntOrPair, stride: IntOrPair = 1, padding: Padding = 0,
        dilation: IntOrPair = 1, groups: int = 1, bias: bool = True, num_experts: int = 4, reduction: float = 0.0625,
        min_channels: int = 16, temperature: float = 1.0, formulation: str = "auto", device: Device = None,
        dtype: DType = None,
    ) -> None:  # fmt: skip
        attention = partial(
            OmniAttention,
            in_channels,
            out_channels,
            kernel_size,
            groups,
            num_experts,
            reduction,
            min_channels,
            temperature,
        )
        super().__init__(
            in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias, num_experts, formulation,
            attention=attention, device=device, dtype=dtype,
        )  # fmt: skip


def temperature_schedule(epoch: float, anneal_epochs: float = 10, start: float = 30.0, end: float = 1.0) -> float:
    """DY-CNN's temperature: linear from ``start`` at epoch 0 to ``end`` at ``anneal_epochs``, then ``end``.

    Args:
        epoch (float): the current (possibly fractional) epoch.
        anneal_epochs (float): length of the annealing. Default 10 (the paper).
        start, end (float): temperatures. Defaults 30 and 1 (the paper).
    """
    if anneal_epochs <= 0:
        raise ValueError(f"anneal_epochs must be > 0, got {anneal_epochs!r}")
    progress = min(max(epoch / anneal_epochs, 0.0), 1.0)
    return start + (end - start) * progress


def set_temperature(model: nn.Module, temperature: float) -> int:
    """Set the attention temperature of every mixture layer in ``model`` whose attention has one
    (:class:`DynamicConv2d`, :class:`ODConv2d`).

    Returns:
        int: how many layers were updated.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature!r}")
    count = 0
    for m in model.modules():
        if isinstance(m, KernelMixtureConv2d) and isinstance(getattr(m.attention, "temperature", None), torch.Tensor):
            m.attention.temperature.fill_(float(temperature))
            count += 1
    return count
