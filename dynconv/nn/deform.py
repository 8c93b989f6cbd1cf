"""Deformable convolution layers: DCNv1 (Dai et al., "Deformable Convolutional Networks", ICCV 2017) and the
modulated DCNv2 (Zhu et al., "Deformable ConvNets v2: More Deformable, Better Results", CVPR 2019).

Each layer predicts its own offsets (and, for v2, modulation) from its input with a plain convolution of
the same geometry, initialised to zero, so a freshly built layer computes exactly ``F.conv2d``; training
then learns where to look.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from dynconv._checks import as_int, layer_padding, pair
from dynconv.functional import deform_conv2d

__all__ = ["DeformConv2d", "ModulatedDeformConv2d"]


class DeformConv2d(nn.Module):
    """Deformable convolution v1: offsets predicted from the input by a zero-initialised convolution, then
    :func:`dynconv.deform_conv2d` (see it for the offset layout and the sampling convention).

    Args:
        in_channels (int): input channels ``C_in``.
        out_channels (int): output channels ``C_out``.
        kernel_size, stride, padding, dilation (int or (int, int)): as in ``nn.Conv2d``, ``padding`` also
            ``"valid"``/``"same"`` (used by both the offset predictor and the deformable convolution, so their
            output sizes agree).
        groups (int): weight groups. Default 1.
        offset_groups (int): groups of input channels that share one set of offsets. Default 1.
        bias (bool): whether the deformable convolution has a bias. Default True.
        backend (str or None): forced backend, see :mod:`dynconv.backends`.

    Shape:
        - input: ``[B, C_in, H, W]``
        - output: ``[B, C_out, H_out, W_out]`` as for ``nn.Conv2d``

    Attributes:
        weight (Tensor[C_out, C_in/groups, kh, kw]), bias (Tensor[C_out] or None): the convolution.
        conv_offset (nn.Conv2d): ``C_in -> 2*offset_groups*kh*kw`` (``3*...`` in the modulated layer),
            zero weights and bias after ``reset_parameters()``.
    """

    _mask_channels_per_tap = 0

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | Sequence[int],
        stride: int | Sequence[int] = 1,
        padding: int | Sequence[int] | str = 0,
        dilation: int | Sequence[int] = 1,
        groups: int = 1,
        offset_groups: int = 1,
        bias: bool = True,
        backend: str | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        in_channels, out_channels = as_int(in_channels, "in_channels"), as_int(out_channels, "out_channels")
        groups, offset_groups = as_int(groups, "groups"), as_int(offset_groups, "offset_groups")
        for name, value in (("in_channels", in_channels), ("out_channels", out_channels), ("groups", groups)):
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if in_channels % groups != 0 or out_channels % groups != 0:
            raise ValueError(
                f"in_channels ({in_channels}) and out_channels ({out_channels}) must be divisible by groups ({groups})"
            )
        if offset_groups < 1 or in_channels % offset_groups != 0:
            raise ValueError(f"in_channels ({in_channels}) must be divisible by offset_groups ({offset_groups})")
        factory = {"device": device, "dtype": dtype}
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size = pair(kernel_size, "kernel_size")
        self.stride = pair(stride, "stride")
        self.dilation = pair(dilation, "dilation")
        self.padding = layer_padding(padding, self.kernel_size, self.stride, self.dilation)
        self.groups, self.offset_groups = groups, offset_groups
        self.backend = backend
        kh, kw = self.kernel_size
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels // groups, kh, kw, **factory))
        self.bias = nn.Parameter(torch.empty(out_channels, **factory)) if bias else None
        per_tap = 2 + self._mask_channels_per_tap
        self.conv_offset = nn.Conv2d(
            in_channels, per_tap * offset_groups * kh * kw, self.kernel_size, self.stride, self.padding,
            self.dilation, **factory,
        )  # fmt: skip
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # nn.Conv2d's initialisation for the convolution, zeros for the offset predictor.
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            fan_in = self.weight.shape[1] * self.kernel_size[0] * self.kernel_size[1]
            nn.init.uniform_(self.bias, -1 / math.sqrt(fan_in), 1 / math.sqrt(fan_in))
        nn.init.zeros_(self.conv_offset.weight)
        nn.init.zeros_(self.conv_offset.bias)

    def _offset_and_mask(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        return self.conv_offset(x), None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        offset, mask = self._offset_and_mask(x)
        return deform_conv2d(
            x, offset, self.weight, self.bias, self.stride, self.padding, self.dilation, mask, backend=self.backend
        )

    def extra_repr(self) -> str:
        parts = [f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}"]
        for name, default in (("stride", (1, 1)), ("padding", (0, 0)), ("dilation", (1, 1))):
            if getattr(self, name) != default:
                parts.append(f"{name}={getattr(self, name)!r}")
        if self.groups != 1:
            parts.append(f"groups={self.groups}")
        if self.offset_groups != 1:
            parts.append(f"offset_groups={self.offset_groups}")
        if self.bias is None:
            parts.append("bias=False")
        return ", ".join(parts)


class ModulatedDeformConv2d(DeformConv2d):
    """Deformable convolution v2: offsets and a modulation scalar per sample, both predicted from the input
    by one zero-initialised convolution (``3*offset_groups*kh*kw`` channels: the offsets first, then the
    mask logits), as in DCNv2.

    The modulation is ``mask_scale * sigmoid(logits)``. DCNv2 uses ``mask_scale=1``, which makes a fresh
    layer half a convolution; the default ``2`` makes a fresh layer exactly ``F.conv2d`` (modulation 1 at
    zero logits), so the layer can replace a pretrained ``nn.Conv2d`` without changing its output.

    Args:
        mask_scale (float): upper bound of the modulation. Default 2.0.
        Others: as in :class:`DeformConv2d`.

    Shape:
        - input: ``[B, C_in, H, W]``
        - output: ``[B, C_out, H_out, W_out]``
    """

    _mask_channels_per_tap = 1

    def __init__(self, *args, mask_scale: float = 2.0, **kwargs) -> None:
        if not mask_scale > 0:
            raise ValueError(f"mask_scale must be > 0, got {mask_scale}")
        self.mask_scale = float(mask_scale)
        super().__init__(*args, **kwargs)

    def _offset_and_mask(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        out = self.conv_offset(x)
        n_offset = 2 * self.offset_groups * self.kernel_size[0] * self.kernel_size[1]
        return out[:, :n_offset], self.mask_scale * torch.sigmoid(out[:, n_offset:])

    def extra_repr(self) -> str:
        extra = f", mask_scale={self.mask_scale}" if self.mask_scale != 2.0 else ""
        return super().extra_repr() + extra
