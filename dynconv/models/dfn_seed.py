"""The DFN "seed" variant for RGB video (Jia, De Brabandere, Tuytelaars and Van Gool, "Dynamic Filter
Networks", NeurIPS 2016; the model used on KITTI-like frame folders).

A feed-forward filter-generating encoder-decoder reads the last ``num_input`` frames stacked on channels and
produces one ``k x k`` filter per pixel **and per colour channel** (softmax over each channel's taps). The
filters are applied to the latest frame with :func:`dynconv.local_filter2d` (one filter group per channel),
and a few refinement convolutions add a residual correction (initialised to zero, so a fresh model is pure
dynamic filtering). Future frames are predicted one at a time, each prediction becoming the latest frame.

It has the ``step(frame, hidden)`` interface of :class:`dynconv.models.dfn_video.DFNVideoPredictor`, so
:func:`dynconv.models.dfn_video.rollout` and the video-prediction recipe drive it unchanged: ``hidden`` holds
the ``num_input - 1`` previous frames (at the first step the first frame stands in for them).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dynconv.functional import local_filter2d
from dynconv.models.dfn_video import SLOPE, init_he_uniform

__all__ = ["DFNSeedPredictor"]


class DFNSeedPredictor(nn.Module):
    """Filter-generating encoder-decoder + per-channel dynamic local filtering + refinement.

    Args:
        channels: channels of a frame (3 for RGB).
        num_input: frames the filter generator reads (the latest and ``num_input - 1`` before it).
        kernel_size: size of the generated filters (odd).
        width: channels of the first encoder stage (doubled at each of the two stride-2 stages).
        refine: number of 3x3 refinement convolutions (0: none).

    Shape:
        ``step(frame [B, C, H, W], hidden or None) -> (next_frame [B, C, H, W], hidden, filters [B, C*k*k, H, W])``
        with ``H`` and ``W`` multiples of 4; ``filters[:, c*k*k:(c+1)*k*k]`` are channel ``c``'s convex filters.
    """

    def __init__(
        self, channels: int = 3, num_input: int = 2, kernel_size: int = 9, width: int = 32, refine: int = 2
    ) -> None:
        super().__init__()
        for name, value, low in (("channels", channels, 1), ("num_input", num_input, 1), ("width", width, 1)):
            if not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
        if not isinstance(kernel_size, int) or kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be a positive odd integer, got {kernel_size!r}")
        if not isinstance(refine, int) or refine < 0:
            raise ValueError(f"refine must be an integer >= 0, got {refine!r}")
        self.channels, self.num_input, self.kernel_size = channels, num_input, kernel_size
        self.width, self.num_refine = width, refine
        c = width
        self.encoder = nn.ModuleList(
            [
                nn.Conv2d(channels * num_input, c, 3, padding=1),
                nn.Conv2d(c, 2 * c, 3, stride=2, padding=1),
                nn.Conv2d(2 * c, 4 * c, 3, stride=2, padding=1),
                nn.Conv2d(4 * c, 4 * c, 3, padding=1),
            ]
        )
        self.decoder = nn.ModuleList([nn.Conv2d(4 * c, 2 * c, 3, padding=1), nn.Conv2d(2 * c, c, 3, padding=1)])
        self.to_filters = nn.Conv2d(c, channels * kernel_size * kernel_size, 1)
        self.refine = nn.ModuleList(
            nn.Conv2d(2 * channels if i == 0 else c, c if i < refine - 1 else channels, 3, padding=1)
            for i in range(refine)
        )
        self.reset_parameters()

    def reset_parameters(self) -> None:
        init_he_uniform(self, SLOPE)
        if self.num_refine:  # the residual correction starts at zero: a fresh model is pure dynamic filtering
            nn.init.zeros_(self.refine[-1].weight)

    def step(self, frame: torch.Tensor, hidden: torch.Tensor | None):
        if frame.dim() != 4 or frame.shape[1] != self.channels:
            raise ValueError(f"frame must be [B, {self.channels}, H, W], got shape {tuple(frame.shape)}")
        B, C, H, W = frame.shape
        if H % 4 or W % 4:
            raise ValueError(f"frame height and width must be multiples of 4, got {H}x{W}")
        if hidden is None:
            hidden = frame[:, None].expand(B, self.num_input - 1, C, H, W)
        window = torch.cat([hidden, frame[:, None]], 1)  # [B, num_input, C, H, W], oldest first
        act = lambda t: F.leaky_relu(t, SLOPE)  # noqa: E731
        h = window.flatten(1, 2)
        for conv in self.encoder:
            h = act(conv(h))
        for conv in self.decoder:
            h = act(conv(F.interpolate(h, scale_factor=2, mode="nearest")))
        K = self.kernel_size * self.kernel_size
        filters = self.to_filters(h).unflatten(1, (C, K)).softmax(2)  # [B, C, K, H, W]
        out = local_filter2d(frame, filters, self.kernel_size)  # channel c uses filter group c
        if self.num_refine:
            r = torch.cat([out, frame], 1)
            for i, conv in enumerate(self.refine):
                r = conv(r)
                if i < self.num_refine - 1:
                    r = act(r)
            out = (out + r).clamp(0, 1)
        return out, window[:, 1:], filters.flatten(1, 2)

    def extra_repr(self) -> str:
        return (
            f"channels={self.channels}, num_input={self.num_input}, kernel_size={self.kernel_size}, "
            f"width={self.width}, refine={self.num_refine}"
        )
