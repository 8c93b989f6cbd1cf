"""Slow, obviously correct implementations: the oracle every fast path is tested against.

Nothing here is tuned. Each function is written in the most direct way the definition allows and is
differentiable through plain autograd, so ``torch.autograd.gradcheck`` in float64 checks it too.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def local_filter2d(
    x: torch.Tensor,
    filters: torch.Tensor,
    kernel_size: tuple[int, int],
    stride: tuple[int, int],
    padding: tuple[int, int],
    dilation: tuple[int, int],
) -> torch.Tensor:
    """Dynamic local filtering by ``F.unfold``: every output pixel takes the dot product of its own filter
    with the ``kh x kw`` window of ``x`` that ``F.conv2d`` would read.

    Args:
        x (Tensor[B, C, H, W]): input.
        filters (Tensor[B, G, kh*kw, H_out, W_out]): per-pixel filters; channel ``c`` uses group
            ``c // (C // G)``, tap ``(i, j)`` is index ``i * kw + j``.

    Returns:
        Tensor[B, C, H_out, W_out]
    """
    B, C, H, W = x.shape
    _, G, K, Ho, Wo = filters.shape
    cols = F.unfold(x, kernel_size, dilation=dilation, padding=padding, stride=stride)  # [B, C*K, Ho*Wo]
    cols = cols.view(B, G, C // G, K, Ho, Wo)
    return (cols * filters.unsqueeze(2)).sum(3).reshape(B, C, Ho, Wo)


def sample_conv2d(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    stride: tuple[int, int],
    padding: tuple[int, int],
    dilation: tuple[int, int],
    groups: int,
) -> torch.Tensor:
    """Sample-specific convolution as a loop over the batch: sample ``b`` is ``F.conv2d`` with ``weight[b]``.

    Args:
        x (Tensor[B, C_in, H, W]): input.
        weight (Tensor[B, C_out, C_in/groups, kh, kw]): one kernel per sample.
        bias (Tensor[B, C_out] or None): one bias per sample.

    Returns:
        Tensor[B, C_out, H_out, W_out]
    """
    outs = [
        F.conv2d(x[b : b + 1], weight[b], None if bias is None else bias[b], stride, padding, dilation, groups)
        for b in range(x.shape[0])
    ]
    return torch.cat(outs, 0)
