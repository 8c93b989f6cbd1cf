"""Position-specific dynamic filtering layers (Dynamic Filter Networks, Jia et al., NeurIPS 2016)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from dynconv._checks import as_int, layer_padding, pair
from dynconv.functional import local_filter2d

__all__ = ["DynamicLocalFilter2d", "FilterGeneratingNetwork", "Involution2d"]

_NORMALIZE = (None, "softmax")


class DynamicLocalFilter2d(nn.Module):
    """DFN's *dynamic local filtering layer*: applies given per-pixel filters with :func:`dynconv.local_filter2d`.

    The layer has no parameters; the filters come from a filter-generating network (for example
    :class:`FilterGeneratingNetwork`). With ``normalize="softmax"`` the raw filters are turned into
    convex weights over the ``kh*kw`` taps first, as DFN's video prediction model does, so each output
    pixel is a weighted average of its neighbourhood (the filters then show the motion).

    Args:
        kernel_size, stride, padding, dilation: as in :func:`dynconv.local_filter2d` (``padding=None``
            keeps the size for odd kernels and stride 1).
        normalize (str or None): ``"softmax"`` over the taps, or ``None`` to use the filters as given.
        backend (str or None): forced backend, see :mod:`dynconv.backends`.

    Shape:
        - x: ``[B, C, H, W]``
        - filters: ``[B, G, kh*kw, H_out, W_out]`` or ``[B, G*kh*kw, H_out, W_out]``
        - output: ``[B, C, H_out, W_out]``
    """

    def __init__(
        self,
        kernel_size: int | Sequence[int],
        stride: int | Sequence[int] = 1,
        padding: int | Sequence[int] | str | None = None,
        dilation: int | Sequence[int] = 1,
        normalize: str | None = None,
        backend: str | None = None,
    ) -> None:
        super().__init__()
        if normalize not in _NORMALIZE:
            raise ValueError(f"normalize must be one of {_NORMALIZE}, got {normalize!r}")
        self.kernel_size = pair(kernel_size, "kernel_size")
        self.stride = pair(stride, "stride")
        self.dilation = pair(dilation, "dilation")
        self.padding = None if padding is None else layer_padding(padding, self.kernel_size, self.stride, self.dilation)
        self.normalize = normalize
        self.backend = backend

    def forward(self, x: torch.Tensor, filters: torch.Tensor) -> torch.Tensor:
        if self.normalize == "softmax":
            K = self.kernel_size[0] * self.kernel_size[1]
            tap_dim = 2 if filters.dim() == 5 else None
            if tap_dim is None:  # [B, G*K, H, W]: softmax within each group's K taps
                filters = filters.unflatten(1, (-1, K)).softmax(2)
            else:
                filters = filters.softmax(tap_dim)
        return local_filter2d(
            x, filters, self.kernel_size, self.stride, self.padding, self.dilation, backend=self.backend
        )

    def extra_repr(self) -> str:
        parts = [f"kernel_size={self.kernel_size}"]
        if self.stride != (1, 1):
            parts.append(f"stride={self.stride}")
        if self.padding is not None:
            parts.append(f"padding={self.padding!r}")
        if self.dilation != (1, 1):
            parts.append(f"dilation={self.dilation}")
        if self.normalize is not None:
            parts.append(f"normalize={self.normalize!r}")
        return ", ".join(parts)


class FilterGeneratingNetwork(nn.Module):
    """DFN's *filter-generating network* as a building block: a small convolutional network that maps a
    conditioning input to per-pixel filters of the shape :class:`DynamicLocalFilter2d` expects.

    ``len(hidden_channels)`` 3x3 convolutions with LeakyReLU (He-uniform initialisation, as DFN), the
    first with stride ``stride`` so the filters can match a strided filtering layer, then a 1x1
    convolution to ``groups * kh * kw`` channels.

    Args:
        in_channels (int): channels of the conditioning input.
        kernel_size (int or (int, int)): size of the generated filters.
        groups (int): filter groups ``G`` (channels of the filtered input share a group's filter).
        hidden_channels (sequence of int): widths of the hidden 3x3 convolutions.
        stride (int): stride of the first convolution.
        identity_init (bool): start with every generated filter equal to the identity (zero weights, a
            one-hot bias on the centre tap), so a fresh :class:`DynamicLocalFilter2d` with
            ``normalize=None`` passes its input through unchanged. Default False (DFN's He-uniform
            initialisation of every layer).

    Shape:
        - cond: ``[B, in_channels, H, W]``
        - output: ``[B, groups, kh*kw, ceil(H / stride), ceil(W / stride)]``
    """

    def __init__(
        self,
        in_channels: int,
        kernel_size: int | Sequence[int],
        groups: int = 1,
        hidden_channels: Sequence[int] = (64, 64),
        stride: int = 1,
        identity_init: bool = False,
        negative_slope: float = 0.01,
    ) -> None:
        super().__init__()
        in_channels, groups, stride = (
            as_int(in_channels, "in_channels", minimum=1),
            as_int(groups, "groups", minimum=1),
            as_int(stride, "stride", minimum=1),
        )
        if not isinstance(hidden_channels, Sequence) or isinstance(hidden_channels, str):
            raise TypeError(f"hidden_channels must be a sequence of ints, got {hidden_channels!r}")
        hidden_channels = tuple(as_int(c, "hidden_channels", minimum=1) for c in hidden_channels)
        self.kernel_size = pair(kernel_size, "kernel_size")
        self.groups = groups
        self.identity_init = identity_init
        self.negative_slope = negative_slope
        layers: list[nn.Module] = []
        c = in_channels
        for n, width in enumerate(hidden_channels):
            layers += [nn.Conv2d(c, width, 3, stride=stride if n == 0 else 1, padding=1), nn.LeakyReLU(negative_slope)]
            c = width
        self.body = nn.Sequential(*layers)
        self.head = nn.Conv2d(
            c, groups * self.kernel_size[0] * self.kernel_size[1], 1, stride=stride if not hidden_channels else 1
        )
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_uniform_(m.weight, a=self.negative_slope, nonlinearity="leaky_relu")
                nn.init.zeros_(m.bias)
        if self.identity_init:
            kh, kw = self.kernel_size
            K = kh * kw
            nn.init.zeros_(self.head.weight)
            with torch.no_grad():
                bias = torch.zeros(self.groups, K)
                bias[:, (kh // 2) * kw + kw // 2] = 1.0
                self.head.bias.copy_(bias.flatten())

    def forward(self, cond: torch.Tensor) -> torch.Tensor:
        out = self.head(self.body(cond))
        return out.unflatten(1, (self.groups, self.kernel_size[0] * self.kernel_size[1]))

    def extra_repr(self) -> str:
        return f"kernel_size={self.kernel_size}, groups={self.groups}"


class Involution2d(nn.Module):
    """Involution (Li et al., "Involution: Inverting the Inherence of Convolution for Visual Recognition",
    CVPR 2021): a ``k x k`` filter generated at every pixel from that pixel's own feature vector and shared
    by the channels of a group, applied with :func:`dynconv.local_filter2d`.

    Kernel generation as in the paper: (average pool by ``stride`` when ``stride > 1``) -> 1x1 conv
    ``C -> C / reduction_ratio`` -> BatchNorm -> ReLU -> 1x1 conv to ``G * k * k`` with
    ``G = C / group_channels``.

    Args:
        channels (int): input and output channels ``C``.
        kernel_size (int): ``k``. Default 7 (the paper's choice in RedNet).
        stride (int): output stride. Default 1.
        group_channels (int): channels sharing one filter. Default 16.
        reduction_ratio (int): channel reduction of the kernel-generating bottleneck. Default 4.
        backend (str or None): forced backend for the filtering, see :mod:`dynconv.backends`.

    Shape:
        - x: ``[B, C, H, W]``
        - output: ``[B, C, ceil(H / stride), ceil(W / stride)]`` (for odd ``k``)
    """

    def __init__(
        self,
        channels: int,
        kernel_size: int = 7,
        stride: int = 1,
        group_channels: int = 16,
        reduction_ratio: int = 4,
        backend: str | None = None,
    ) -> None:
        super().__init__()
        channels, kernel_size, stride = (
            as_int(channels, "channels", minimum=1),
            as_int(kernel_size, "kernel_size", minimum=1),
            as_int(stride, "stride", minimum=1),
        )
        group_channels, reduction_ratio = (
            as_int(group_channels, "group_channels", minimum=1),
            as_int(reduction_ratio, "reduction_ratio", minimum=1),
        )
        if channels % group_channels != 0:
            raise ValueError(f"channels ({channels}) must be a positive multiple of group_channels ({group_channels})")
        self.channels, self.kernel_size, self.stride = channels, kernel_size, stride
        self.group_channels, self.reduction_ratio = group_channels, reduction_ratio
        self.groups = channels // group_channels
        hidden = max(1, channels // reduction_ratio)
        # ceil_mode so odd sizes give the output size of the strided filtering (the paper assumes even sizes)
        self.pool = nn.AvgPool2d(stride, stride, ceil_mode=True) if stride > 1 else nn.Identity()
        self.reduce = nn.Sequential(nn.Conv2d(channels, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU())
        self.span = nn.Conv2d(hidden, self.groups * kernel_size * kernel_size, 1)
        self.backend = backend

    def reset_parameters(self) -> None:
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.BatchNorm2d)):
                m.reset_parameters()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        filters = self.span(self.reduce(self.pool(x)))
        return local_filter2d(
            x, filters, self.kernel_size, self.stride, (self.kernel_size - 1) // 2, backend=self.backend
        )

    def extra_repr(self) -> str:
        s = f"{self.channels}, kernel_size={self.kernel_size}, group_channels={self.group_channels}"
        if self.stride != 1:
            s += f", stride={self.stride}"
        if self.reduction_ratio != 4:
            s += f", reduction_ratio={self.reduction_ratio}"
        return s
