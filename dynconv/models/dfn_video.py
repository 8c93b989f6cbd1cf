"""Video prediction models of Dynamic Filter Networks (De Brabandere, Jia et al., NIPS 2016), Moving MNIST setup.

:class:`DFNVideoPredictor` is recurrent: it reads one frame per step and, after the observed frames, feeds its
own predictions back. Its filter-generating network maps the current frame and a recurrent hidden state to one
9x9 filter per pixel (softmax over the 81 taps), and the next frame is the current one filtered with them by
:func:`dynconv.local_filter2d`, so the filters show the motion. With ``predict="pixels"`` the same network
predicts the next frame directly (sigmoid), which is the paper's baseline.

Architecture (the paper's Moving MNIST model): encoder 3x3 convolutions with 32, 32 (stride 2), 64, 64
channels; middle: a 3x3 convolution to 128 channels, added to the hidden state (128 channels at 32x32) passed
through two 3x3 128-channel convolutions, the sum being the new hidden state; decoder 3x3 convolutions 64, 64,
x2 nearest upsampling, 64, 64; then 1x1 convolutions to 128 and to 81 outputs (1 for pixels). LeakyReLU
everywhere (slope 0.2), He-uniform initialisation.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dynconv.functional import local_filter2d

__all__ = ["ConvLSTMPredictor", "CopyLastFrame", "DFNVideoPredictor", "rollout"]

SLOPE = 0.2


def _conv(cin: int, cout: int, k: int = 3, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, k, stride=stride, padding=k // 2)


def init_he_uniform(module: nn.Module, slope: float = SLOPE) -> None:
    """He-uniform weights for LeakyReLU(``slope``) and zero biases in every convolution of ``module`` (the DFN
    code's initialisation)."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_uniform_(m.weight, a=slope, nonlinearity="leaky_relu")
            nn.init.zeros_(m.bias)


class DFNVideoPredictor(nn.Module):
    """The DFN Moving MNIST predictor (``predict="filters"``) or its pixel-predicting baseline (``"pixels"``).

    Args:
        channels: frame channels (1 for Moving MNIST; 3 for RGB frame folders, the filters are then shared by
            the three channels).
        kernel_size: size of the dynamic filters (9).
        hidden: channels of the recurrent hidden state (128).
        predict: ``"filters"`` (DFN) or ``"pixels"`` (baseline).

    Shape:
        ``step(frame [B, C, H, W], hidden or None) -> (next_frame [B, C, H, W], hidden, filters or None)``,
        ``H`` and ``W`` even.
    """

    def __init__(self, channels: int = 1, kernel_size: int = 9, hidden: int = 128, predict: str = "filters"):
        super().__init__()
        if predict not in ("filters", "pixels"):
            raise ValueError(f"predict must be 'filters' or 'pixels', got {predict!r}")
        self.channels, self.kernel_size, self.hidden, self.predict = channels, kernel_size, hidden, predict
        self.encoder = nn.ModuleList([_conv(channels, 32), _conv(32, 32, stride=2), _conv(32, 64), _conv(64, 64)])
        self.middle = _conv(64, hidden)
        self.recurrent = nn.ModuleList([_conv(hidden, hidden), _conv(hidden, hidden)])
        self.decoder = nn.ModuleList([_conv(hidden, 64), _conv(64, 64), _conv(64, 64), _conv(64, 64)])
        out = kernel_size * kernel_size if predict == "filters" else channels
        self.head = nn.ModuleList([_conv(64, 128, k=1), _conv(128, out, k=1)])
        self.reset_parameters()

    def reset_parameters(self) -> None:
        init_he_uniform(self)

    def step(self, frame: torch.Tensor, hidden: torch.Tensor | None):
        out, hidden, filters = self._step(frame, hidden)
        return (torch.sigmoid(out) if self.predict == "pixels" else out), hidden, filters

    @property
    def predicts_logits(self) -> bool:
        """True for the pixel baseline: it has :meth:`step_logits`."""
        return self.predict == "pixels"

    def step_logits(self, frame: torch.Tensor, hidden: torch.Tensor | None):
        """The pixel baseline's ``step`` before its sigmoid (see :func:`rollout`'s ``logits``)."""
        if self.predict != "pixels":
            raise ValueError("step_logits exists for predict='pixels' only: the DFN's output is filtered pixels")
        return self._step(frame, hidden)

    def _step(self, frame: torch.Tensor, hidden: torch.Tensor | None):
        act = lambda t: F.leaky_relu(t, SLOPE)  # noqa: E731
        h = frame
        for conv in self.encoder:
            h = act(conv(h))
        mid = act(self.middle(h))
        if hidden is not None:
            r = hidden
            for conv in self.recurrent:
                r = act(conv(r))
            mid = mid + r
        hidden = mid
        d = hidden
        for n, conv in enumerate(self.decoder):
            if n == 2:
                d = F.interpolate(d, scale_factor=2, mode="nearest")
            d = act(conv(d))
        d = act(self.head[0](d))
        out = self.head[1](d)
        if self.predict == "pixels":
            return out, hidden, None
        filters = out.softmax(1)  # [B, k*k, H, W]: one convex filter per pixel, shared by the channels
        return local_filter2d(frame, filters.unsqueeze(1), self.kernel_size), hidden, filters

    def extra_repr(self) -> str:
        return f"channels={self.channels}, kernel_size={self.kernel_size}, predict={self.predict!r}"


class ConvLSTMCell(nn.Module):
    """A convolutional LSTM cell (Shi et al., NIPS 2015): the four gates from one convolution of [x, h]."""

    def __init__(self, cin: int, hidden: int, k: int = 3):
        super().__init__()
        self.hidden = hidden
        self.gates = _conv(cin + hidden, 4 * hidden, k)

    def forward(self, x, state):
        if state is None:
            zeros = x.new_zeros(x.shape[0], self.hidden, *x.shape[2:])
            state = (zeros, zeros)
        h, c = state
        i, f, o, g = self.gates(torch.cat([x, h], 1)).chunk(4, 1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        h = torch.sigmoid(o) * torch.tanh(c)
        return h, (h, c)


class ConvLSTMPredictor(nn.Module):
    """A ConvLSTM frame predictor: a stride-2 convolution to 32x32, two stacked ConvLSTM cells, a decoder back
    to full resolution, sigmoid output. Same ``step`` interface as :class:`DFNVideoPredictor`."""

    def __init__(self, channels: int = 1, hidden: int = 64):
        super().__init__()
        self.channels = channels
        self.encoder = nn.Sequential(
            _conv(channels, 32), nn.LeakyReLU(SLOPE), _conv(32, 64, stride=2), nn.LeakyReLU(SLOPE)
        )
        self.cells = nn.ModuleList([ConvLSTMCell(64, hidden), ConvLSTMCell(hidden, hidden)])
        self.decoder = nn.Sequential(
            nn.Upsample(scale_factor=2), _conv(hidden, 32), nn.LeakyReLU(SLOPE), _conv(32, channels, 1)
        )

    def step(self, frame, hidden):
        logits, hidden, _ = self.step_logits(frame, hidden)
        return torch.sigmoid(logits), hidden, None

    predicts_logits = True

    def step_logits(self, frame, hidden):
        """``step`` before the output sigmoid (see :func:`rollout`'s ``logits``)."""
        states = hidden or [None] * len(self.cells)
        h = self.encoder(frame)
        new = []
        for cell, state in zip(self.cells, states):
            h, state = cell(h, state)
            new.append(state)
        return self.decoder(h), new, None


class CopyLastFrame(nn.Module):
    """The trivial baseline: the next frame is the last one seen."""

    def step(self, frame, hidden):
        return frame, None, None


def rollout(
    model: nn.Module, frames: torch.Tensor, observed: int = 10, return_filters: bool = False, logits: bool = False
):
    """Run ``model.step`` over a sequence: the ``observed`` frames are read, then predictions are fed back.

    Args:
        frames: ``[B, T, C, H, W]``; only the first ``observed`` frames are used as input.
        logits: for models that predict pixels through a sigmoid (``predicts_logits``, with ``step_logits``),
            return the logits of the predictions instead (the fed-back frames are still the sigmoid's): training on them
            with ``binary_cross_entropy_with_logits`` keeps the gradient where the sigmoid saturates, which the
            paper's BCE on outputs clipped to ``[eps, 1 - eps]`` zeroes. Ignored by models without
            ``predicts_logits`` (the DFN's outputs are filtered pixels, never saturated).

    Returns:
        ``predictions [B, T - observed, C, H, W]`` of frames ``observed .. T-1`` (and the filters of each
        predicted frame, ``[B, T - observed, K, H, W]``, if ``return_filters`` and the model makes filters).
    """
    T = frames.shape[1]
    if not 1 <= observed < T:
        raise ValueError(f"observed must be in [1, {T - 1}] for sequences of {T} frames, got {observed}")
    hidden, preds, filters = None, [], []
    frame = frames[:, 0]
    use_logits = logits and getattr(model, "predicts_logits", False)
    for t in range(T - 1):
        if use_logits:
            out, hidden, f = model.step_logits(frame, hidden)
            pred = torch.sigmoid(out)
        else:
            pred, hidden, f = model.step(frame, hidden)
            out = pred
        if t >= observed - 1:
            preds.append(out)
            if f is not None:
                filters.append(f)
        frame = frames[:, t + 1] if t + 1 < observed else pred
    out = torch.stack(preds, 1)
    if return_filters:
        return out, (torch.stack(filters, 1) if filters else None)
    return out
