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
