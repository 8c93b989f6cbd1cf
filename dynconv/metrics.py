"""Frame prediction metrics. Every function takes ``pred`` and ``target`` in [0, 1] of shape ``[..., H, W]``
(leading dimensions are frames/sequences/channels) and returns a per-frame tensor of the leading shape.

The number the DFN paper reports on Moving MNIST is :func:`bce_per_frame`: binary cross-entropy **summed**
over the 64x64 pixels of a frame, averaged over the predicted frames (DFN 285.2, their baseline 432.5,
ConvLSTM 367.1).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

EPS = 1e-7


def bce_per_frame(pred: torch.Tensor, target: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    """Binary cross-entropy summed over the last two (pixel) dimensions; ``pred`` clipped to ``[eps, 1-eps]``."""
    p = pred.double().clamp(eps, 1 - eps)
    t = target.double()
    return -(t * p.log() + (1 - t) * (1 - p).log()).sum((-2, -1))


def mse_per_frame(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return (pred.double() - target.double()).pow(2).mean((-2, -1))


def mae_per_frame(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return (pred.double() - target.double()).abs().mean((-2, -1))


def psnr_per_frame(pred: torch.Tensor, target: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """Peak signal-to-noise ratio in dB, ``10 log10(range^2 / MSE)`` (``inf`` for identical frames)."""
    return 10 * torch.log10(data_range**2 / mse_per_frame(pred, target))


def _gaussian(window: int, sigma: float, dtype, device) -> torch.Tensor:
    x = torch.arange(window, dtype=dtype, device=device) - (window - 1) / 2
    g = torch.exp(-(x**2) / (2 * sigma**2))
    g = g / g.sum()
    return g[:, None] * g[None, :]


def ssim_per_frame(
    pred: torch.Tensor,
    target: torch.Tensor,
    data_range: float = 1.0,
    window: int = 11,
    sigma: float = 1.5,
    frames_per_chunk: int = 256,
) -> torch.Tensor:
    """Structural similarity (Wang et al. 2004): an 11x11 Gaussian window (sigma 1.5), ``K1=0.01``,
    ``K2=0.03``, averaged over the valid (unpadded) window positions of each frame. Frames are processed
    ``frames_per_chunk`` at a time (the float64 window statistics of a 10,000-frame test set at once would take
    tens of GB); the chunking does not change the result."""
    lead = pred.shape[:-2]
    H, W = pred.shape[-2:]
    xs = pred.reshape(-1, 1, H, W)
    ys = target.reshape(-1, 1, H, W)
    w = _gaussian(min(window, H, W), sigma, torch.float64, xs.device)[None, None]
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    out = []
    for i in range(0, xs.shape[0], frames_per_chunk):
        x, y = xs[i : i + frames_per_chunk].double(), ys[i : i + frames_per_chunk].double()
        mu_x, mu_y = F.conv2d(x, w), F.conv2d(y, w)
        sxx = F.conv2d(x * x, w) - mu_x**2
        syy = F.conv2d(y * y, w) - mu_y**2
        sxy = F.conv2d(x * y, w) - mu_x * mu_y
        ssim = ((2 * mu_x * mu_y + c1) * (2 * sxy + c2)) / ((mu_x**2 + mu_y**2 + c1) * (sxx + syy + c2))
        out.append(ssim.mean((-3, -2, -1)))
    return (torch.cat(out) if out else xs.new_empty(0, dtype=torch.float64)).reshape(lead)


def summarize(pred: torch.Tensor, target: torch.Tensor) -> dict[str, float | None]:
    """Every metric, averaged over all frames of ``[N, T, C, H, W]`` tensors (channels summed for BCE/frame).

    ``bce_per_frame_sem`` is the standard error of ``bce_per_frame`` over the ``N`` sequences (the sample
    standard deviation of the per-sequence means over ``sqrt(N)``; ``None`` for one sequence): how far an
    evaluation on ``N`` sequences may be from one on many more.
    """
    bce = bce_per_frame(pred, target).sum(-1) if pred.dim() == 5 else bce_per_frame(pred, target)
    psnr = psnr_per_frame(pred, target)
    per_sequence = bce.flatten(1).mean(1)
    n = per_sequence.numel()
    return {
        "bce_per_frame": bce.mean().item(),
        "bce_per_frame_sem": (per_sequence.std() / math.sqrt(n)).item() if n > 1 else None,
        "bce_per_pixel": bce.mean().item()
        / (pred.shape[-1] * pred.shape[-2] * (pred.shape[2] if pred.dim() == 5 else 1)),
        "mse": mse_per_frame(pred, target).mean().item(),
        "mae": mae_per_frame(pred, target).mean().item(),
        "psnr": psnr[torch.isfinite(psnr)].mean().item() if torch.isfinite(psnr).any() else math.inf,
        "ssim": ssim_per_frame(pred, target).mean().item(),
    }
