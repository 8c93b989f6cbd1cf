"""Sample-specific dynamic convolution layers built on :func:`dynconv.sample_conv2d` (and, for HDFNet, on
:func:`dynconv.local_filter2d`). The kernel mixtures (``DynamicConv2d`` and the others) are in
:mod:`dynconv.nn.mixture`.

* :class:`DynamicFilterLayer` -- the *dynamic convolution layer* of Dynamic Filter Networks (Jia et al.,
  NeurIPS 2016): a filter-generating network maps a conditioning input to one kernel per sample.
* :class:`DynamicMaskHead` -- CondInst's dynamic mask head (Tian, Shen and Chen, "Conditional Convolutions
  for Instance Segmentation", ECCV 2020): a flat parameter vector per instance becomes the weights and biases
  of a small chain of convolutions (3 layers, 8 channels, 169 parameters by default), applied to all
  instances at once.
* :class:`DynamicMultiScaleFilter` -- DMNet's dynamic convolutional modules (He, Deng and Qiao, "Dynamic
  Multi-scale Filters for Semantic Segmentation", ICCV 2019): per-sample depthwise ``k x k`` filters pooled
  from the input itself, one branch per filter size.
* :class:`DynamicDilatedFilter` -- HDFNet's dynamic dilated pyramid module (Pang et al., "Hierarchical
  Dynamic Filtering Network for RGB-D Salient Object Detection", ECCV 2020): per-pixel, per-channel
  (depthwise) 3x3 filters generated from a guidance input and applied at several dilation rates.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from dynconv._checks import as_int, layer_padding, pair
from dynconv.functional import local_filter2d, sample_conv2d

__all__ = ["DynamicDilatedFilter", "DynamicFilterLayer", "DynamicMaskHead", "DynamicMultiScaleFilter"]


def _conv_bn_relu(cin: int, cout: int, k: int, padding: int = 0, dilation: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, k, padding=padding, dilation=dilation, bias=False), nn.BatchNorm2d(cout), nn.ReLU()
    )


class DynamicFilterLayer(nn.Module):
    """DFN's dynamic convolution layer: ``y[b] = conv2d(x[b], W(cond[b]), bias(cond[b]))``.

    The filter-generating network is a 3x3 convolution with LeakyReLU on the conditioning input, global
    average pooling and a linear layer to the ``C_out * C_in/groups * kh * kw`` (+ ``C_out``) parameters. The
    linear layer starts with zero weights and a bias equal to an ``nn.Conv2d``-initialised kernel, so a fresh
    layer is the static convolution with that kernel, and the filters become input dependent as it trains.

    Args:
        in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias: as ``nn.Conv2d``.
        cond_channels (int or None): channels of the conditioning input; None means ``in_channels`` (the layer
            conditions on ``x`` itself). Default None.
        hidden_channels (int): width of the filter-generating network. Default 64.

    Shape:
        - x: ``[B, C_in, H, W]``; cond: ``[B, cond_channels, H', W']`` (any size) or None.
        - output: ``[B, C_out, H_out, W_out]``; ``generate(cond)``: ``([B, C_out, C_in/groups, kh, kw],
          [B, C_out] or None)``.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | Sequence[int],
        stride: int | Sequence[int] = 1,
        padding: int | Sequence[int] | str = 0,
        dilation: int | Sequence[int] = 1,
        groups: int = 1,
        bias: bool = True,
        cond_channels: int | None = None,
        hidden_channels: int = 64,
        negative_slope: float = 0.01,
    ) -> None:
        super().__init__()
        in_channels, out_channels, groups = (
            as_int(v, n, minimum=1)
            for v, n in ((in_channels, "in_channels"), (out_channels, "out_channels"), (groups, "groups"))
        )
        cond_channels = None if cond_channels is None else as_int(cond_channels, "cond_channels", minimum=1)
        hidden_channels = as_int(hidden_channels, "hidden_channels", minimum=1)
        if in_channels % groups or out_channels % groups:
            raise ValueError(
                f"in_channels ({in_channels}) and out_channels ({out_channels}) must be divisible by groups ({groups})"
            )
        self.in_channels, self.out_channels, self.groups = in_channels, out_channels, groups
        self.kernel_size = pair(kernel_size, "kernel_size")
        self.stride = pair(stride, "stride")
        self.dilation = pair(dilation, "dilation")
        self.padding = layer_padding(padding, self.kernel_size, self.stride, self.dilation)
        self.cond_channels = in_channels if cond_channels is None else cond_channels
        self.negative_slope = negative_slope
        self.has_bias = bias
        kh, kw = self.kernel_size
        self.weight_numel = out_channels * (in_channels // groups) * kh * kw
        self.body = nn.Sequential(
            nn.Conv2d(self.cond_channels, hidden_channels, 3, padding=1), nn.LeakyReLU(negative_slope)
        )
        self.head = nn.Linear(hidden_channels, self.weight_numel + (out_channels if bias else 0))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        conv = self.body[0]
        nn.init.kaiming_uniform_(conv.weight, a=self.negative_slope, nonlinearity="leaky_relu")
        nn.init.zeros_(conv.bias)
        nn.init.zeros_(self.head.weight)
        kh, kw = self.kernel_size
        static = torch.empty(self.out_channels, self.in_channels // self.groups, kh, kw)
        nn.init.kaiming_uniform_(static, a=math.sqrt(5))  # nn.Conv2d's initialisation
        with torch.no_grad():
            self.head.bias[: self.weight_numel] = static.flatten()
            if self.has_bias:
                bound = 1 / math.sqrt(static[0].numel())
                self.head.bias[self.weight_numel :].uniform_(-bound, bound)

    def generate(self, cond: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The per-sample kernels and biases generated from ``cond`` (shapes in the class docstring)."""
        if cond.dim() != 4 or cond.shape[1] != self.cond_channels:
            raise ValueError(f"cond must have shape [B, {self.cond_channels}, H, W], got {tuple(cond.shape)}")
        params = self.head(self.body(cond).mean((2, 3)))
        B = params.shape[0]
        kh, kw = self.kernel_size
        weight = params[:, : self.weight_numel].reshape(B, self.out_channels, self.in_channels // self.groups, kh, kw)
        bias = params[:, self.weight_numel :] if self.has_bias else None
        return weight, bias

    def forward(self, x: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        weight, bias = self.generate(x if cond is None else cond)
        if weight.shape[0] != x.shape[0]:
            raise ValueError(f"cond has batch size {weight.shape[0]} but x has {x.shape[0]}")
        return sample_conv2d(x, weight, bias, self.stride, self.padding, self.dilation, self.groups)

    def extra_repr(self) -> str:
        s = f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}"
        if self.stride != (1, 1):
            s += f", stride={self.stride}"
        if self.padding != (0, 0):
            s += f", padding={self.padding!r}"
        if self.dilation != (1, 1):
            s += f", dilation={self.dilation}"
        if self.groups != 1:
            s += f", groups={self.groups}"
        if not self.has_bias:
            s += ", bias=False"
        if self.cond_channels != self.in_channels:
            s += f", cond_channels={self.cond_channels}"
        return s


class DynamicMaskHead(nn.Module):
    """CondInst's dynamic mask head: a chain of convolutions whose weights are a flat vector per instance.

    With the defaults (``in_channels=10``: 8 mask-branch channels + 2 relative coordinates, ``channels=8``,
    ``num_layers=3``, 1x1 kernels, 1 output) each instance needs ``(10*8 + 8) + (8*8 + 8) + (8*1 + 1) = 169``
    parameters, the paper's count. Layer ``l`` runs for all instances in one grouped convolution
    (:func:`dynconv.sample_conv2d`); ReLU between layers, none after the last (the output is mask logits).
    The module has no parameters of its own: the controller of the detector predicts ``params``.

    Args:
        in_channels (int): per-instance input channels. Default 10.
        channels (int): hidden width. Default 8.
        num_layers (int): number of convolutions. Default 3.
        kernel_size (int): odd kernel size (padding keeps the size). Default 1.
        out_channels (int): output channels. Default 1.

    Shape:
        - features: ``[N, in_channels, H, W]`` (one row per instance).
        - params: ``[N, num_params]``, laid out as CondInst: all weights (layer by layer, each
          ``[C_out, C_in, k, k]`` flattened), then all biases.
        - output: ``[N, out_channels, H, W]``.
    """

    def __init__(
        self, in_channels: int = 10, channels: int = 8, num_layers: int = 3, kernel_size: int = 1, out_channels: int = 1
    ) -> None:
        super().__init__()
        in_channels, channels, out_channels = (
            as_int(in_channels, "in_channels", minimum=1),
            as_int(channels, "channels", minimum=1),
            as_int(out_channels, "out_channels", minimum=1),
        )
        num_layers, kernel_size = as_int(num_layers, "num_layers"), as_int(kernel_size, "kernel_size")
        if num_layers < 1:
            raise ValueError(f"num_layers must be >= 1, got {num_layers}")
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be a positive odd int, got {kernel_size}")
        self.in_channels, self.channels, self.num_layers = in_channels, channels, num_layers
        self.kernel_size, self.out_channels = kernel_size, out_channels
        widths = [in_channels] + [channels] * (num_layers - 1) + [out_channels]
        self.layer_shapes = [(widths[i + 1], widths[i]) for i in range(num_layers)]  # (C_out, C_in)
        k2 = kernel_size * kernel_size
        self.weight_nums = [co * ci * k2 for co, ci in self.layer_shapes]
        self.bias_nums = [co for co, _ in self.layer_shapes]

    @property
    def num_params(self) -> int:
        """Parameters per instance (169 with the defaults)."""
        return sum(self.weight_nums) + sum(self.bias_nums)

    def parse_dynamic_params(self, params: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Split ``params [N, num_params]`` into per-layer weights ``[N, C_out, C_in, k, k]`` and biases
        ``[N, C_out]``."""
        if not isinstance(params, torch.Tensor) or params.dim() != 2 or params.shape[1] != self.num_params:
            got = tuple(params.shape) if isinstance(params, torch.Tensor) else type(params).__name__
            raise ValueError(f"params must have shape [N, {self.num_params}], got {got}")
        N, k = params.shape[0], self.kernel_size
        pieces = torch.split(params, self.weight_nums + self.bias_nums, dim=1)
        weights = [w.reshape(N, co, ci, k, k) for w, (co, ci) in zip(pieces[: self.num_layers], self.layer_shapes)]
        biases = list(pieces[self.num_layers :])
        return weights, biases

    def forward(self, features: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
        if features.dim() != 4 or features.shape[1] != self.in_channels:
            raise ValueError(f"features must have shape [N, {self.in_channels}, H, W], got {tuple(features.shape)}")
        weights, biases = self.parse_dynamic_params(params)
        if params.shape[0] != features.shape[0]:
            raise ValueError(f"params has {params.shape[0]} instances but features has {features.shape[0]}")
        x = features
        for i, (w, b) in enumerate(zip(weights, biases)):
            x = sample_conv2d(x, w, b, padding=self.kernel_size // 2)
            if i < self.num_layers - 1:
                x = F.relu(x)
        return x

    @staticmethod
    def relative_coordinates(
        centers: torch.Tensor, height: int, width: int, stride: int = 8, size_of_interest: float = 64.0
    ) -> torch.Tensor:
        """CondInst's relative coordinate maps: ``(center - location) / size_of_interest`` at every location.

        Args:
            centers (Tensor[N, 2]): instance locations ``(x, y)`` in input pixels.
            height, width (int): size of the mask feature map; location ``(i, j)`` is pixel
                ``(j * stride + stride // 2, i * stride + stride // 2)``.

        Returns:
            Tensor[N, 2, height, width]
        """
        ys = torch.arange(height, device=centers.device, dtype=centers.dtype) * stride + stride // 2
        xs = torch.arange(width, device=centers.device, dtype=centers.dtype) * stride + stride // 2
        dx = centers[:, 0, None, None] - xs[None, None, :].expand(1, height, width)
        dy = centers[:, 1, None, None] - ys[None, :, None].expand(1, height, width)
        return torch.stack([dx, dy], 1) / size_of_interest

    def extra_repr(self) -> str:
        return (
            f"in_channels={self.in_channels}, channels={self.channels}, num_layers={self.num_layers}, "
            f"kernel_size={self.kernel_size}, out_channels={self.out_channels}, num_params={self.num_params}"
        )


class DynamicMultiScaleFilter(nn.Module):
    """DMNet's dynamic convolutional modules (DCMs), one per filter size, outputs concatenated.

    Each DCM reduces the input with a 1x1 conv + BN + ReLU to ``out_channels``, generates a ``k x k``
    depthwise filter per sample and channel from ``adaptive_avg_pool(x, k)`` with a 1x1 convolution, applies
    it with :func:`dynconv.sample_conv2d` (``groups = out_channels``; even ``k`` is padded one more on the
    top/left, as DMNet), then BN + ReLU (and an optional 1x1 fusion conv + BN + ReLU).

    Args:
        in_channels (int): input channels.
        out_channels (int): channels of each branch.
        kernel_sizes (sequence of int): filter sizes, one branch each. Default (1, 3, 5, 7) (the paper).
        fusion (bool): the 1x1 fusion convolution after each branch. Default False.

    Shape:
        - x: ``[B, in_channels, H, W]``; output: ``[B, len(kernel_sizes) * out_channels, H, W]``.
    """

    def __init__(
        self, in_channels: int, out_channels: int, kernel_sizes: Sequence[int] = (1, 3, 5, 7), fusion: bool = False
    ) -> None:
        super().__init__()
        in_channels, out_channels = (
            as_int(in_channels, "in_channels", minimum=1),
            as_int(out_channels, "out_channels", minimum=1),
        )
        kernel_sizes = tuple(as_int(k, "kernel_sizes") for k in kernel_sizes)
        if not kernel_sizes or any(k < 1 for k in kernel_sizes):
            raise ValueError(f"kernel_sizes must be a non-empty sequence of positive ints, got {kernel_sizes!r}")
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_sizes = tuple(int(k) for k in kernel_sizes)
        self.fusion = fusion
        self.filter_generators = nn.ModuleList(nn.Conv2d(in_channels, out_channels, 1) for _ in self.kernel_sizes)
        self.reducers = nn.ModuleList(_conv_bn_relu(in_channels, out_channels, 1) for _ in self.kernel_sizes)
        self.post = nn.ModuleList(nn.Sequential(nn.BatchNorm2d(out_channels), nn.ReLU()) for _ in self.kernel_sizes)
        self.fusions = nn.ModuleList(
            _conv_bn_relu(out_channels, out_channels, 1) if fusion else nn.Identity() for _ in self.kernel_sizes
        )

    def reset_parameters(self) -> None:
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.BatchNorm2d)):
                m.reset_parameters()

    def generate(self, x: torch.Tensor, branch: int) -> torch.Tensor:
        """The depthwise filters of branch ``branch``: Tensor[B, out_channels, 1, k, k]."""
        k = self.kernel_sizes[branch]
        return self.filter_generators[branch](F.adaptive_avg_pool2d(x, k)).unsqueeze(2)

    @staticmethod
    def apply_filters(x: torch.Tensor, filters: torch.Tensor) -> torch.Tensor:
        """Depthwise per-sample filtering keeping the size: ``x [B, C, H, W]``, ``filters [B, C, 1, k, k]``."""
        k = filters.shape[-1]
        before, after = k // 2, (k - 1) // 2  # even k: one more on the top/left, as DMNet pads
        if before != after:
            x = F.pad(x, (before, after, before, after))
            pad = 0
        else:
            pad = before
        return sample_conv2d(x, filters, None, padding=pad, groups=x.shape[1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"x must have shape [B, {self.in_channels}, H, W], got {tuple(x.shape)}")
        outs = []
        for i in range(len(self.kernel_sizes)):
            y = self.apply_filters(self.reducers[i](x), self.generate(x, i))
            outs.append(self.fusions[i](self.post[i](y)))
        return torch.cat(outs, 1)

    def extra_repr(self) -> str:
        return f"{self.in_channels}, {self.out_channels}, kernel_sizes={self.kernel_sizes}, fusion={self.fusion}"


class DynamicDilatedFilter(nn.Module):
    """HDFNet's dynamic dilated pyramid module: depthwise per-pixel filters at several dilation rates.

    The input is reduced to ``mid = in_channels // reduction`` channels (1x1 conv + BN + ReLU). For each
    dilation rate a kernel generation unit (3x3 conv + BN + ReLU, then a 1x1 conv) turns the guidance into a
    ``k x k`` filter per pixel and channel, ``[B, mid, k*k, H, W]``, applied with
    :func:`dynconv.local_filter2d` (``G = mid``: depthwise) at that dilation, keeping the size. The reduced
    input and the filtered maps are concatenated and fused by a 3x3 conv + BN + ReLU.

    Args:
        in_channels (int): channels of the input.
        out_channels (int): channels of the output.
        guide_channels (int or None): channels of the guidance (HDFNet: the fused RGB-D features); None
            means ``in_channels`` (guided by the input itself).
        kernel_size (int): filter size. Default 3.
        dilations (sequence of int): dilation rates. Default (1, 3, 5) (the paper).
        reduction (int): channel reduction of the input. Default 4.
        backend (str or None): forced backend of :func:`dynconv.local_filter2d`.

    Shape:
        - x: ``[B, in_channels, H, W]``; guide: ``[B, guide_channels, H, W]`` or None.
        - output: ``[B, out_channels, H, W]``.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        guide_channels: int | None = None,
        kernel_size: int = 3,
        dilations: Sequence[int] = (1, 3, 5),
        reduction: int = 4,
        backend: str | None = None,
    ) -> None:
        super().__init__()
        in_channels, out_channels = (
            as_int(in_channels, "in_channels", minimum=1),
            as_int(out_channels, "out_channels", minimum=1),
        )
        guide_channels = None if guide_channels is None else as_int(guide_channels, "guide_channels", minimum=1)
        kernel_size, reduction = as_int(kernel_size, "kernel_size"), as_int(reduction, "reduction", minimum=1)
        dilations = tuple(as_int(d, "dilations") for d in dilations)
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be a positive odd int, got {kernel_size}")
        if not dilations or any(d < 1 for d in dilations):
            raise ValueError(f"dilations must be a non-empty sequence of positive ints, got {dilations!r}")
        self.in_channels, self.out_channels = in_channels, out_channels
        self.guide_channels = in_channels if guide_channels is None else guide_channels
        self.kernel_size, self.dilations, self.backend = kernel_size, tuple(dilations), backend
        mid = max(in_channels // reduction, 1)
        self.mid_channels = mid
        self.reduce = _conv_bn_relu(in_channels, mid, 1)
        g = self.guide_channels
        self.kernel_generators = nn.ModuleList(
            nn.Sequential(_conv_bn_relu(g, g, 3, padding=1), nn.Conv2d(g, mid * kernel_size**2, 1))
            for _ in self.dilations
        )
        self.fuse = _conv_bn_relu(mid * (1 + len(self.dilations)), out_channels, 3, padding=1)

    def reset_parameters(self) -> None:
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.BatchNorm2d)):
                m.reset_parameters()

    def generate(self, guide: torch.Tensor, branch: int) -> torch.Tensor:
        """The per-pixel depthwise filters of branch ``branch``: Tensor[B, mid_channels, k*k, H, W]."""
        return self.kernel_generators[branch](guide).unflatten(1, (self.mid_channels, self.kernel_size**2))

    def forward(self, x: torch.Tensor, guide: torch.Tensor | None = None) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"x must have shape [B, {self.in_channels}, H, W], got {tuple(x.shape)}")
        guide = x if guide is None else guide
        if guide.dim() != 4 or guide.shape[1] != self.guide_channels or guide.shape[-2:] != x.shape[-2:]:
            raise ValueError(
                f"guide must have shape [B, {self.guide_channels}, {x.shape[2]}, {x.shape[3]}], "
                f"got {tuple(guide.shape)}"
            )
        reduced = self.reduce(x)
        outs = [reduced]
        for i, d in enumerate(self.dilations):
            outs.append(
                local_filter2d(reduced, self.generate(guide, i), self.kernel_size, dilation=d, backend=self.backend)
            )
        return self.fuse(torch.cat(outs, 1))

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, guide_channels={self.guide_channels}, "
            f"kernel_size={self.kernel_size}, dilations={self.dilations}, mid_channels={self.mid_channels}"
        )
