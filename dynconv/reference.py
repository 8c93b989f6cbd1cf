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


def _sample(x: torch.Tensor, py: torch.Tensor, px: torch.Tensor, mode: str = "bilinear") -> torch.Tensor:
    """Samples of ``x`` at fractional pixel positions, zero outside the image: the one sampler of this module
    (deformable convolution, DCNv3/DCNv4 and warp all read the input through it).

    ``"bilinear"``: each of the four neighbouring pixels ``(floor(py) + a, floor(px) + b)`` contributes with
    weight ``(1 - |py - row|) (1 - |px - col|)`` if it lies inside the image and nothing otherwise, which is the
    same as torchvision's "``-1 < y < H``, then in-image corners only" rule. ``"nearest"``: the pixel at the
    position rounded half to even (``grid_sample``'s rule), or zero if that pixel is outside the image.

    An in-image corner is read even at weight 0, so a NaN or infinite pixel there makes the sample NaN
    (torchvision and ``grid_sample`` read it too); a corner outside the image reads nothing. A NaN or infinite
    position gives a NaN sample with ``"bilinear"`` (its weights are NaN), as ``grid_sample``'s bilinear ``zeros``
    mode on the CPU, and 0 with ``"nearest"`` (no pixel is inside).

    Args:
        x (Tensor[N, C, H, W]): the image.
        py, px (Tensor[N, P]): row and column of each sampling point (pixel centres at integers).
        mode (str): ``"bilinear"`` or ``"nearest"``.

    Returns:
        Tensor[N, C, P]
    """
    N, C, H, W = x.shape
    flat = x.reshape(N, C, H * W)
    if mode == "nearest":
        taps = [(torch.round(py), torch.round(px), None)]  # torch.round rounds half to even, as grid_sample
    else:
        # floor by a floor division: torch.floor has a large fixed cost per call on some CPUs (docs/benchmarks.md).
        y0, x0 = torch.div(py, 1, rounding_mode="floor"), torch.div(px, 1, rounding_mode="floor")
        taps = [
            (row, col, wy * wx)
            for row, wy in ((y0, 1 - (py - y0)), (y0 + 1, py - y0))
            for col, wx in ((x0, 1 - (px - x0)), (x0 + 1, px - x0))
        ]
    out = 0
    for row, col, weight in taps:
        inside = (row >= 0) & (row <= H - 1) & (col >= 0) & (col <= W - 1)
        values = flat.gather(2, _flat_index(row, col, H, W).unsqueeze(1).expand(N, C, row.shape[1]))
        values = torch.where(inside.unsqueeze(1), values, 0)
        out = out + (values if weight is None else values * weight.unsqueeze(1))
    return out


def _flat_index(row: torch.Tensor, col: torch.Tensor, H: int, W: int) -> torch.Tensor:
    """``row * W + col`` as int64 with both clamped into the image; NaN (a NaN position) reads pixel 0 instead of
    becoming an out-of-range int64 (the caller masks what lies outside). The product is taken in integers: in
    the positions' dtype, bf16 rounds ``row * W + col`` past 256 (fp16 past 2048)."""
    return row.nan_to_num(0).clamp(0, H - 1).long() * W + col.nan_to_num(0).clamp(0, W - 1).long()


def deform_conv2d(
    x: torch.Tensor,
    offset: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    stride: tuple[int, int],
    padding: tuple[int, int],
    dilation: tuple[int, int],
    mask: torch.Tensor | None,
) -> torch.Tensor:
    """Deformable convolution (DCNv1, and DCNv2 with ``mask``) the direct way: bilinear columns, then a
    grouped matrix product with the weight. Numerics of ``torchvision.ops.deform_conv2d``.

    Tap ``k = i * kw + j`` of output pixel ``(ho, wo)`` in offset group ``g`` samples the input at
    ``(ho s_h - p_h + i d_h + offset[b, 2 (g K + k)], wo s_w - p_w + j d_w + offset[b, 2 (g K + k) + 1])``.

    Args:
        x (Tensor[B, C_in, H, W]): input.
        offset (Tensor[B, 2*G_off*kh*kw, H_out, W_out]): (dy, dx) per tap, offset group major.
        weight (Tensor[C_out, C_in/G_w, kh, kw]): convolution weight with ``G_w`` weight groups.
        bias (Tensor[C_out] or None): added to every output pixel.
        mask (Tensor[B, G_off*kh*kw, H_out, W_out] or None): modulation of every sample (DCNv2).

    Returns:
        Tensor[B, C_out, H_out, W_out]
    """
    B, C, H, W = x.shape
    Co, Cw, kh, kw = weight.shape
    K = kh * kw
    Ho, Wo = offset.shape[-2:]
    G_off = offset.shape[1] // (2 * K)
    G_w = C // Cw
    ho = torch.arange(Ho, dtype=offset.dtype, device=x.device).view(Ho, 1)
    wo = torch.arange(Wo, dtype=offset.dtype, device=x.device).view(1, Wo)
    columns = []
    for g in range(G_off):
        x_g = x[:, g * (C // G_off) : (g + 1) * (C // G_off)]
        taps = []
        for i in range(kh):
            for j in range(kw):
                k = i * kw + j
                dy, dx = offset[:, 2 * (g * K + k)], offset[:, 2 * (g * K + k) + 1]
                py = ho * stride[0] - padding[0] + i * dilation[0] + dy  # [B, Ho, Wo]
                px = wo * stride[1] - padding[1] + j * dilation[1] + dx
                sample = _sample(x_g, py.reshape(B, Ho * Wo), px.reshape(B, Ho * Wo))  # [B, C/G_off, Ho*Wo]
                if mask is not None:
                    sample = sample * mask[:, g * K + k].reshape(B, 1, Ho * Wo)
                taps.append(sample)
        columns.append(torch.stack(taps, 2))  # [B, C/G_off, K, Ho*Wo]
    cols = torch.cat(columns, 1).reshape(B, G_w, Cw * K, Ho * Wo)
    out = torch.einsum("gok,bgkl->bgol", weight.reshape(G_w, Co // G_w, Cw * K), cols).reshape(B, Co, Ho, Wo)
    if bias is not None:
        out = out + bias.view(1, Co, 1, 1)
    return out


def warp(x: torch.Tensor, flow: torch.Tensor, mode: str, padding_mode: str) -> torch.Tensor:
    """Backward warping ``y[b, :, h, w] = x[b, :, h + flow[b, 1, h, w], w + flow[b, 0, h, w]]``, sampled
    explicitly (:func:`_sample`) with the rules of ``F.grid_sample(..., align_corners=True)``: the padding mode
    moves the position, then a neighbour outside the image counts as zero.

    Args:
        x (Tensor[B, C, H, W]): features to warp.
        flow (Tensor[B, 2, H, W]): displacement in pixels, channel 0 along W (dx), channel 1 along H (dy).
        mode (str): ``"bilinear"`` or ``"nearest"`` (round half to even, as ``grid_sample``).
        padding_mode (str): ``"zeros"``, ``"border"`` (clamp the position into the image) or ``"reflection"``
            (reflect the position about the first and last pixel centres).

    Returns:
        Tensor[B, C, H, W]
    """
    B, C, H, W = x.shape
    rows = torch.arange(H, dtype=flow.dtype, device=x.device).view(1, H, 1)
    cols = torch.arange(W, dtype=flow.dtype, device=x.device).view(1, 1, W)
    py, px = rows + flow[:, 1], cols + flow[:, 0]
    if padding_mode == "border":
        # grid_sample (CPU) clips a NaN position to the first pixel and an infinite one to the first or last.
        py, px = py.nan_to_num(0).clamp(0, H - 1), px.nan_to_num(0).clamp(0, W - 1)
    elif padding_mode == "reflection":
        py, px = _reflect(py, H - 1), _reflect(px, W - 1)
    out = _sample(x, py.reshape(B, H * W), px.reshape(B, H * W), mode)
    return out.reshape(B, C, H, W)


def _reflect(p: torch.Tensor, last: int) -> torch.Tensor:
    """Reflect positions about 0 and ``last`` until they lie in ``[0, last]`` (a triangle wave of period 2 last);
    a NaN or infinite position goes to 0, as in ``grid_sample`` (CPU)."""
    if last == 0:
        return torch.zeros_like(p)
    period = 2 * last
    q = torch.remainder(p.abs(), period)
    return torch.where(p.isfinite(), torch.where(q > last, period - q, q), 0)


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
    """The DCNv3/DCNv4 sampling core by explicit bilinear interpolation (:func:`_sample`), one group and kernel
    point at a time.

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
    ys = (torch.arange(Ho, device=value.device) * sh - ph + (dh * (kh - 1)) // 2).view(1, Ho, 1)
    xs = (torch.arange(Wo, device=value.device) * sw - pw + (dw * (kw - 1)) // 2).view(1, 1, Wo)
    points = dcn_kernel_points(kernel_size, dilation, remove_center)
    groups = []
    for g in range(G):
        x_g = value[..., g * Cg : (g + 1) * Cg].permute(0, 3, 1, 2)  # [B, C/G, H, W]
        out = value.new_zeros(B, Cg, Ho * Wo)
        for k, (dx, dy) in enumerate(points):
            px = xs + (dx + offset[:, :, :, g, k, 0]) * offset_scale  # [B, Ho, Wo]
            py = ys + (dy + offset[:, :, :, g, k, 1]) * offset_scale
            sample = _sample(x_g, py.reshape(B, Ho * Wo), px.reshape(B, Ho * Wo))  # [B, C/G, Ho*Wo]
            out = out + sample * mask[:, :, :, g, k].reshape(B, 1, Ho * Wo)
        groups.append(out)
    return torch.cat(groups, 1).view(B, C, Ho, Wo).permute(0, 2, 3, 1).contiguous()
