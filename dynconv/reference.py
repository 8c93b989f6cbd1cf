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


def dcn_kernel_points(
    kernel_size: tuple[int, int], dilation: tuple[int, int], remove_center: bool
) -> list[tuple[int, int]]:
    """The ``(dx, dy)`` kernel grid of DCNv3/DCNv4, in the order of the official kernels.

    The grid is centred (``dx`` runs from ``-(d_w (k_w - 1)) // 2`` in steps of ``d_w``) and the points are
    ordered **x-major**: point ``ix * kh + iy`` is column ``ix``, row ``iy`` (InternImage builds the grid with
    ``meshgrid(xs, ys)``, and its CUDA kernel loops over ``i < kernel_w`` outside ``j < kernel_h``). With
    ``remove_center`` the centre point of an odd kernel is left out (DCNv4's ``remove_center``).
    """
    kh, kw = kernel_size
    dh, dw = dilation
    cy, cx = (dh * (kh - 1)) // 2, (dw * (kw - 1)) // 2
    points = []
    for ix in range(kw):
        for iy in range(kh):
            if remove_center and ix == kw // 2 and iy == kh // 2:
                continue
            points.append((ix * dw - cx, iy * dh - cy))
    return points


def dcn_sample(
    value: torch.Tensor,
    offset: torch.Tensor,
    mask: torch.Tensor,
    kernel_size: tuple[int, int],
    stride: tuple[int, int],
    padding: tuple[int, int],
    dilation: tuple[int, int],
    offset_scale: float,
    remove_center: bool,
) -> torch.Tensor:
    """The DCNv3/DCNv4 sampling core by explicit bilinear interpolation: four gathers per kernel point.

    Output pixel ``(ho, wo)`` of group ``g`` sums, over the kernel points ``k = (dx_k, dy_k)``
    (:func:`dcn_kernel_points`), ``mask[.., g, k]`` times ``value`` bilinearly sampled (zero outside the image,
    pixel centres at integer coordinates) at

        x = wo s_w - p_w + (d_w (k_w - 1)) // 2 + (dx_k + offset[.., g, k, 0]) * offset_scale
        y = ho s_h - p_h + (d_h (k_h - 1)) // 2 + (dy_k + offset[.., g, k, 1]) * offset_scale

    (the official kernels scale the kernel grid by ``offset_scale`` too).

    Args:
        value (Tensor[B, H, W, C]): channels-last input; group ``g`` is channels ``g*C/G .. (g+1)*C/G - 1``.
        offset (Tensor[B, H_out, W_out, G, P, 2]): ``(x, y)`` offsets in pixels.
        mask (Tensor[B, H_out, W_out, G, P]): modulation scalars (already softmax-normalised for DCNv3).

    Returns:
        Tensor[B, H_out, W_out, C]
    """
    B, H, W, C = value.shape
    _, Ho, Wo, G, P, _ = offset.shape
    Cg = C // G
    (sh, sw), (ph, pw), (dh, dw) = stride, padding, dilation
    kh, kw = kernel_size
    v = value.reshape(B, H * W, G, Cg)
    ys = (torch.arange(Ho, device=value.device) * sh - ph + (dh * (kh - 1)) // 2).view(1, Ho, 1, 1)
    xs = (torch.arange(Wo, device=value.device) * sw - pw + (dw * (kw - 1)) // 2).view(1, 1, Wo, 1)
    out = value.new_zeros(B, Ho * Wo, G, Cg)
    for k, (dx, dy) in enumerate(dcn_kernel_points(kernel_size, dilation, remove_center)):
        px = xs + (dx + offset[..., k, 0]) * offset_scale  # [B, Ho, Wo, G]
        py = ys + (dy + offset[..., k, 1]) * offset_scale
        x0, y0 = px.detach().floor(), py.detach().floor()
        fx, fy = px - x0, py - y0
        corners = ((0, 0, (1 - fy) * (1 - fx)), (0, 1, (1 - fy) * fx), (1, 0, fy * (1 - fx)), (1, 1, fy * fx))
        for oy, ox, weight in corners:
            yi, xi = y0.long() + oy, x0.long() + ox
            inside = (yi >= 0) & (yi < H) & (xi >= 0) & (xi < W)
            index = (yi.clamp(0, H - 1) * W + xi.clamp(0, W - 1)).reshape(B, Ho * Wo, G, 1).expand(-1, -1, -1, Cg)
            coeff = (weight * inside * mask[..., k]).reshape(B, Ho * Wo, G, 1)
            out = out + torch.gather(v, 1, index) * coeff
    return out.reshape(B, Ho, Wo, C)
