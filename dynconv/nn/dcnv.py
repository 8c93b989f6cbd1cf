"""Deformable convolution layers of the DCNv3/DCNv4 kind: InternImage's DCNv3 (Wang et al., "InternImage:
Exploring Large-Scale Vision Foundation Models with Deformable Convolutions", CVPR 2023) and DCNv4 (Xiong et
al., "Efficient Deformable ConvNets: Rethinking Dynamic and Sparse Operator for Vision Applications",
CVPR 2024). Both are channels-last token mixers: ``[B, H, W, C] -> [B, H_out, W_out, C]``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dynconv._checks import as_int, conv_out_size, pair
from dynconv.functional import dcnv3, dcnv4

__all__ = ["DCNv3", "DCNv4"]


def _check_channels(channels: int, group: int) -> tuple[int, int]:
    """``channels`` and ``group`` as Python ints (numpy integers are accepted, as by ``nn.Conv2d``)."""
    channels, group = as_int(channels, "channels"), as_int(group, "group")
    if channels < 1:
        raise ValueError(f"channels must be a positive int, got {channels!r}")
    if group < 1 or channels % group != 0:
        raise ValueError(f"group must be a positive int dividing channels ({channels}), got {group!r}")
    return channels, group


class _DCNBase(nn.Module):
    def _setup(self, channels, kernel_size, stride, pad, dilation, group, offset_scale, dw_kernel_size, remove_center,
               backend):  # fmt: skip
        """The checked arguments the DCNv3 and DCNv4 layers share, as attributes."""
        channels, group = _check_channels(channels, group)
        self.channels, self.group, self.offset_scale, self.backend = channels, group, float(offset_scale), backend
        self._geometry(kernel_size, stride, pad, dilation, dw_kernel_size, remove_center)

    def _geometry(self, kernel_size, stride, pad, dilation, dw_kernel_size, remove_center):
        self.kernel_size = pair(kernel_size, "kernel_size")
        self.stride = pair(stride, "stride")
        self.pad = pair(pad, "pad", minimum=0)
        self.dilation = pair(dilation, "dilation")
        self.dw_kernel_size = self.kernel_size if dw_kernel_size is None else pair(dw_kernel_size, "dw_kernel_size")
        if not isinstance(remove_center, bool):
            raise TypeError(f"remove_center must be a bool, got {remove_center!r}")
        self.remove_center = remove_center
        self.points = self.kernel_size[0] * self.kernel_size[1] - int(remove_center)

    def _check_input(self, input: torch.Tensor) -> None:
        if input.dim() != 4 or input.shape[3] != self.channels:
            raise ValueError(f"input must have shape [B, H, W, {self.channels}], got {list(input.shape)}")
        self._check_offset_size(input.shape[1], input.shape[2])

    def _core_args(self) -> tuple:
        """The positional arguments of :func:`dcnv3` / :func:`dcnv4` after the tensors."""
        return (
            self.kernel_size, self.stride, self.pad, self.dilation, self.group, self.offset_scale, self.remove_center
        )  # fmt: skip

    def _check_offset_size(self, H: int, W: int) -> None:
        """The predictor runs the depth-wise conv at the layer's stride with "same" padding; its output grid
        must be the op's output grid (it is for the usual odd kernel with ``pad = (k - 1) // 2 * dilation``)."""
        out = tuple(
            conv_out_size(n, self.kernel_size[i], self.stride[i], self.pad[i], self.dilation[i])
            for i, n in enumerate((H, W))
        )
        pred = tuple(
            conv_out_size(n, self.dw_kernel_size[i], self.stride[i], (self.dw_kernel_size[i] - 1) // 2, 1)
            for i, n in enumerate((H, W))
        )
        if out != pred:
            raise ValueError(
                f"{type(self).__name__}: for input size {(H, W)} the op's output is {out} but the offset predictor "
                f"(depth-wise kernel {self.dw_kernel_size}, stride {self.stride}) gives {pred}; use an odd "
                f"kernel_size with pad = (kernel_size - 1) // 2 * dilation"
            )

    def _dw_conv(self, channels: int) -> nn.Conv2d:
        kh, kw = self.dw_kernel_size
        return nn.Conv2d(
            channels, channels, (kh, kw), stride=self.stride, padding=((kh - 1) // 2, (kw - 1) // 2), groups=channels
        )

    def extra_repr(self) -> str:
        return (
            f"channels={self.channels}, kernel_size={self.kernel_size}, stride={self.stride}, pad={self.pad}, "
            f"dilation={self.dilation}, group={self.group}, offset_scale={self.offset_scale}, "
            f"remove_center={self.remove_center}"
        )


class DCNv3(_DCNBase):
    """InternImage's DCNv3 operator as a layer (Wang et al., CVPR 2023).

    ``input_proj`` (linear), then the DCNv3 core (:func:`dynconv.dcnv3`) with offsets and modulation predicted
    from the *input* by a depth-wise conv + LayerNorm + GELU followed by two linear layers; the modulation is
    softmax-normalised over the ``P`` sampling points of each group; then ``output_proj``. The offset and mask
    predictors start at zero (as the official code), so a fresh layer samples the plain kernel grid with
    uniform weights ``1/P``: ``output_proj(depthwise_box_filter(input_proj(x)))``.

    Args:
        channels (int): ``C``.
        kernel_size, stride, pad, dilation: the sampling window (``pad`` as ``F.conv2d``'s padding). The
            predictor runs at the same stride, so keep ``pad = (kernel_size - 1) // 2 * dilation``.
        group (int): number of offset groups; ``C`` divisible by it.
        offset_scale (float): scale of the offsets. Default 1.
        dw_kernel_size (int or None): kernel of the predictor's depth-wise conv; ``None`` means ``kernel_size``.
        remove_center (bool): drop the centre sampling point. Default False.
        backend (str or None): forced backend of the core op.

    Shape:
        - input: ``[B, H, W, C]``
        - output: ``[B, H_out, W_out, C]``
    """

    def __init__(
        self,
        channels: int = 64,
        kernel_size: int = 3,
        stride: int = 1,
        pad: int = 1,
        dilation: int = 1,
        group: int = 4,
        offset_scale: float = 1.0,
        dw_kernel_size: int | None = None,
        remove_center: bool = False,
        backend: str | None = None,
    ) -> None:
        super().__init__()
        self._setup(
            channels, kernel_size, stride, pad, dilation, group, offset_scale, dw_kernel_size, remove_center, backend
        )
        channels, group = self.channels, self.group
        self.dw_conv = self._dw_conv(channels)
        self.norm = nn.LayerNorm(channels, eps=1e-6)
        self.offset = nn.Linear(channels, group * self.points * 2)
        self.mask = nn.Linear(channels, group * self.points)
        self.input_proj = nn.Linear(channels, channels)
        self.output_proj = nn.Linear(channels, channels)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for layer in (self.offset, self.mask):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)
        for layer in (self.input_proj, self.output_proj):
            nn.init.xavier_uniform_(layer.weight)
            nn.init.zeros_(layer.bias)
        self.dw_conv.reset_parameters()
        self.norm.reset_parameters()

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        self._check_input(input)
        x = self.input_proj(input)
        feat = self.dw_conv(input.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        feat = F.gelu(self.norm(feat))
        offset = self.offset(feat)
        mask = self.mask(feat)
        mask = F.softmax(mask.unflatten(-1, (self.group, self.points)), dim=-1).flatten(-2)
        x = dcnv3(x, offset, mask, *self._core_args(), backend=self.backend)
        return self.output_proj(x)


class DCNv4(_DCNBase):
    """The DCNv4 operator as a layer (Xiong et al., CVPR 2024).

    ``value_proj`` (linear), then the DCNv4 core (:func:`dynconv.dcnv4`) with offsets and modulation predicted
    by **one** linear layer ``offset_mask`` (of the input, or of a depth-wise conv of it when
    ``dw_kernel_size`` is given), **without softmax**; then ``output_proj``. ``offset_mask`` has
    ``ceil(3 * group * P / 8) * 8`` outputs (the official layout: per group ``2P`` offsets then ``P``
    modulation scalars, padded to a multiple of 8) and starts at zero as the official code, so a fresh layer's
    modulation is zero and its output is ``output_proj``'s bias: the layer learns its aggregation weights.

    Args:
        channels, kernel_size, stride, pad, dilation, group, offset_scale, remove_center, backend: as
            :class:`DCNv3`.
        dw_kernel_size (int or None): a depth-wise conv on the predictor's input; ``None`` (default, as the
            official module) predicts from the input directly.
        output_bias (bool): bias in ``output_proj``. Default True.
        without_pointwise (bool): leave out ``value_proj`` and ``output_proj``. Default False.

    Shape:
        - input: ``[B, H, W, C]``
        - output: ``[B, H_out, W_out, C]``
    """

    def __init__(
        self,
        channels: int = 64,
        kernel_size: int = 3,
        stride: int = 1,
        pad: int = 1,
        dilation: int = 1,
        group: int = 4,
        offset_scale: float = 1.0,
        dw_kernel_size: int | None = None,
        remove_center: bool = False,
        output_bias: bool = True,
        without_pointwise: bool = False,
        backend: str | None = None,
    ) -> None:
        super().__init__()
        self._setup(
            channels, kernel_size, stride, pad, dilation, group, offset_scale, dw_kernel_size, remove_center, backend
        )
        channels, group = self.channels, self.group
        self.use_dw = dw_kernel_size is not None
        if not self.use_dw:
            self.dw_kernel_size = (1, 1)  # the predictor is pointwise: it runs at the layer's stride
        self.offset_mask_dw = self._dw_conv(channels) if self.use_dw else None
        self.offset_mask = nn.Linear(channels, -(-3 * group * self.points // 8) * 8)
        self.without_pointwise = without_pointwise
        if not without_pointwise:
            self.value_proj = nn.Linear(channels, channels)
            self.output_proj = nn.Linear(channels, channels, bias=output_bias)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.zeros_(self.offset_mask.weight)
        nn.init.zeros_(self.offset_mask.bias)
        if not self.without_pointwise:
            nn.init.xavier_uniform_(self.value_proj.weight)
            nn.init.zeros_(self.value_proj.bias)
            nn.init.xavier_uniform_(self.output_proj.weight)
            if self.output_proj.bias is not None:
                nn.init.zeros_(self.output_proj.bias)
        if self.offset_mask_dw is not None:
            self.offset_mask_dw.reset_parameters()

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        self._check_input(input)
        x = input if self.without_pointwise else self.value_proj(input)
        if self.use_dw:
            feat = self.offset_mask_dw(input.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        else:
            feat = input[:, :: self.stride[0], :: self.stride[1]]
        offset_mask = self.offset_mask(feat)
        x = dcnv4(x, offset_mask, *self._core_args(), backend=self.backend)
        return x if self.without_pointwise else self.output_proj(x)
