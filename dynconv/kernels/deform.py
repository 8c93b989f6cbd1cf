"""Triton kernels of deformable convolution (DCNv1/v2; Dai et al., ICCV 2017; Zhu et al., CVPR 2019).

The forward kernel builds the bilinear columns (an im2col with offsets and mask) straight from ``x`` in any
strides, in the row order of the torch backend (``[image, output pixel, tap, offset group] x channels``),
so the convolution is one matmul done by torch (cuBLAS). The backward kernel walks the same rows: it
gathers the four corners again, reduces ``a = <grad column, corner>`` per row for the offset and mask
gradients, and spreads the column gradient to the input either with fp32 atomics (fast, order-dependent)
or, deterministically, by writing every corner's contribution and summing them with
``index_put_(accumulate=True)`` (sorted, deterministic under ``torch.use_deterministic_algorithms``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from dynconv import _columns as cm
from dynconv.kernels import _launch as L

__all__ = ["backward", "forward"]

# Rows (image, pixel, tap, group) x channels per program and warps (dynconv.kernels._launch.deform_config).
# Tests shrink the blocks here.
INTERPRETED = L.triton_interpret()
CONFIG = L.deform_config(interpreted=INTERPRETED)


@triton.jit
def _row_geometry(
    rows, b0, off_ptr, s_ob, s_oc, s_oh, s_ow, mask_ptr, s_mb, s_mc, s_mh, s_mw,
    Ho, Wo, G, K: tl.constexpr, KW: tl.constexpr,
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w, row_ok, HAS_MASK: tl.constexpr,
):  # fmt: skip
    """Image, group, tap, output pixel, sampling position and mask of every row of a block."""
    g = rows % G
    t = rows // G
    k = t % K
    t = t // K
    wo = t % Wo
    t = t // Wo
    ho = t % Ho
    b = (t // Ho + b0).to(tl.int64)
    i = k // KW
    j = k % KW
    ch = (g * K + k) * 2
    o_base = b * s_ob + ho.to(tl.int64) * s_oh + wo.to(tl.int64) * s_ow
    dy = tl.load(off_ptr + o_base + ch.to(tl.int64) * s_oc, mask=row_ok, other=0.0).to(tl.float32)
    dx = tl.load(off_ptr + o_base + (ch + 1).to(tl.int64) * s_oc, mask=row_ok, other=0.0).to(tl.float32)
    py = (ho * stride_h - pad_h + i * dil_h).to(tl.float32) + dy
    px = (wo * stride_w - pad_w + j * dil_w).to(tl.float32) + dx
    if HAS_MASK:
        m_off = b * s_mb + (g * K + k).to(tl.int64) * s_mc + ho.to(tl.int64) * s_mh + wo.to(tl.int64) * s_mw
        m = tl.load(mask_ptr + m_off, mask=row_ok, other=0.0).to(tl.float32)
    else:
        m = tl.full(py.shape, 1.0, tl.float32)
    return b, g, k, ho, wo, py, px, m


@triton.jit
def _deform_columns_kernel(
    x_ptr, s_xb, s_xc, s_xh, s_xw,  # input [B, C, H, W], any strides
    off_ptr, s_ob, s_oc, s_oh, s_ow,  # offset [B, 2*G*K, Ho, Wo]
    mask_ptr, s_mb, s_mc, s_mh, s_mw,  # mask [B, G*K, Ho, Wo] (unused without HAS_MASK)
    cols_ptr,  # columns [R, Cg] fp32, contiguous
    R, b0, H, W, Ho, Wo, G, Cg,
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
    K: tl.constexpr, KW: tl.constexpr, HAS_MASK: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    chans = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    row_ok = rows < R
    chan_ok = chans < Cg
    b, g, k, ho, wo, py, px, m = _row_geometry(
        rows, b0, off_ptr, s_ob, s_oc, s_oh, s_ow, mask_ptr, s_mb, s_mc, s_mh, s_mw, Ho, Wo, G, K, KW,
        stride_h, stride_w, pad_h, pad_w, dil_h, dil_w, row_ok, HAS_MASK,
    )  # fmt: skip
    y0f = tl.floor(py)
    x0f = tl.floor(px)
    ly = py - y0f
    lx = px - x0f
    y0 = y0f.to(tl.int32)
    x0 = x0f.to(tl.int32)
    c_off = (g * Cg)[:, None].to(tl.int64) * s_xc + chans[None, :].to(tl.int64) * s_xc
    base = b[:, None] * s_xb + c_off
    acc = tl.zeros((BLOCK_R, BLOCK_C), dtype=tl.float32)
    for corner in tl.static_range(4):
        row = y0 + corner // 2
        col = x0 + corner % 2
        wy = ly if corner // 2 == 1 else 1.0 - ly
        wx = lx if corner % 2 == 1 else 1.0 - lx
        inside = row_ok & (row >= 0) & (row < H) & (col >= 0) & (col < W)
        ptrs = x_ptr + base + (row.to(tl.int64) * s_xh + col.to(tl.int64) * s_xw)[:, None]
        v = tl.load(ptrs, mask=inside[:, None] & chan_ok[None, :], other=0.0).to(tl.float32)
        acc += v * (wy * wx * m)[:, None]
    out = cols_ptr + rows[:, None].to(tl.int64) * Cg + chans[None, :]
    tl.store(out, acc, mask=row_ok[:, None] & chan_ok[None, :])


@triton.jit
def _deform_backward_kernel(
    x_ptr, s_xb, s_xc, s_xh, s_xw,  # input [B, C, H, W], any strides
    off_ptr, s_ob, s_oc, s_oh, s_ow,  # offset [B, 2*G*K, Ho, Wo]
    mask_ptr, s_mb, s_mc, s_mh, s_mw,  # mask [B, G*K, Ho, Wo]
    gcols_ptr,  # column gradient [R, Cg] fp32, contiguous
    gx_ptr,  # ATOMIC: grad input [B, C, H, W] fp32 contiguous; else contributions [4, R, Cg] fp32
    gidx_ptr,  # not ATOMIC: [4, R] int64 row of the grad table [nb*G*H*W, Cg] each contribution goes to
    goff_ptr,  # grad offset [B, 2*G*K, Ho, Wo] fp32 contiguous
    gmask_ptr,  # grad mask [B, G*K, Ho, Wo] fp32 contiguous
    R, b0, C, H, W, Ho, Wo, G, Cg,
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
    K: tl.constexpr, KW: tl.constexpr, HAS_MASK: tl.constexpr, NEED_X: tl.constexpr, ATOMIC: tl.constexpr,
    NEED_OFFSET: tl.constexpr, NEED_MASK: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < R
    b, g, k, ho, wo, py, px, m = _row_geometry(
        rows, b0, off_ptr, s_ob, s_oc, s_oh, s_ow, mask_ptr, s_mb, s_mc, s_mh, s_mw, Ho, Wo, G, K, KW,
        stride_h, stride_w, pad_h, pad_w, dil_h, dil_w, row_ok, HAS_MASK,
    )  # fmt: skip
    y0f = tl.floor(py)
    x0f = tl.floor(px)
    ly = py - y0f
    lx = px - x0f
    y0 = y0f.to(tl.int32)
    x0 = x0f.to(tl.int32)
    grad_y = tl.zeros((BLOCK_R,), dtype=tl.float32)
    grad_x = tl.zeros((BLOCK_R,), dtype=tl.float32)
    grad_m = tl.zeros((BLOCK_R,), dtype=tl.float32)
    for corner in tl.static_range(4):
        row = y0 + corner // 2
        col = x0 + corner % 2
        wy = ly if corner // 2 == 1 else 1.0 - ly
        wx = lx if corner % 2 == 1 else 1.0 - lx
        sy = 1.0 if corner // 2 == 1 else -1.0
        sx = 1.0 if corner % 2 == 1 else -1.0
        inside = row_ok & (row >= 0) & (row < H) & (col >= 0) & (col < W)
        w = wy * wx * m
        pix = row.to(tl.int64) * s_xh + col.to(tl.int64) * s_xw
        a = tl.zeros((BLOCK_R,), dtype=tl.float32)
        if not ATOMIC:
            table_row = ((b - b0) * G + g) * H * W + tl.minimum(tl.maximum(row, 0), H - 1) * W
            table_row += tl.minimum(tl.maximum(col, 0), W - 1)
            tl.store(gidx_ptr + corner * R + rows.to(tl.int64), table_row, mask=row_ok)
        for c0 in range(0, Cg, BLOCK_C):
            chans = c0 + tl.arange(0, BLOCK_C)
            chan_ok = chans < Cg
            both = row_ok[:, None] & chan_ok[None, :]
            gc = tl.load(gcols_ptr + rows[:, None].to(tl.int64) * Cg + chans[None, :], mask=both, other=0.0)
            if NEED_OFFSET or NEED_MASK:
                c_off = (g * Cg)[:, None].to(tl.int64) * s_xc + chans[None, :].to(tl.int64) * s_xc
                ptrs = x_ptr + b[:, None] * s_xb + c_off + pix[:, None]
                v = tl.load(ptrs, mask=inside[:, None] & chan_ok[None, :], other=0.0).to(tl.float32)
                a += tl.sum(gc * v, axis=1)
            if NEED_X:
                contrib = gc * (w * inside.to(tl.float32))[:, None]
                if ATOMIC:
                    chan = (g * Cg)[:, None].to(tl.int64) + chans[None, :]
                    dst = ((b[:, None] * C + chan) * H + row.to(tl.int64)[:, None]) * W + col.to(tl.int64)[:, None]
                    tl.atomic_add(gx_ptr + dst, contrib, mask=inside[:, None] & chan_ok[None, :], sem="relaxed")
                else:
                    dst = (corner * R + rows[:, None].to(tl.int64)) * Cg + chans[None, :]
                    tl.store(gx_ptr + dst, contrib, mask=both)
        in_f = inside.to(tl.float32)
        grad_y += sy * wx * in_f * a
        grad_x += sx * wy * in_f * a
        grad_m += wy * wx * in_f * a
    pix_out = ho.to(tl.int64) * Wo + wo
    if NEED_OFFSET:
        ch = (g * K + k) * 2
        o_base = (b * (2 * G * K) + ch) * Ho * Wo + pix_out
        tl.store(goff_ptr + o_base, grad_y * m, mask=row_ok)
        tl.store(goff_ptr + o_base + Ho * Wo, grad_x * m, mask=row_ok)
    if NEED_MASK:
        tl.store(gmask_ptr + (b * (G * K) + g * K + k) * Ho * Wo + pix_out, grad_m, mask=row_ok)


def _geometry_args(x, offset, mask, kernel_size, stride, padding, dilation):
    K = kernel_size[0] * kernel_size[1]
    G = offset.shape[1] // (2 * K)
    mask_t = mask if mask is not None else offset  # a valid pointer; never read without HAS_MASK
    return (
        (x, *x.stride(), offset, *offset.stride(), mask_t, *mask_t.stride()),
        (stride[0], stride[1], padding[0], padding[1], dilation[0], dilation[1]),
        G,
        K,
    )


def _columns(x, offset, mask, b0, b1, kernel_size, stride, padding, dilation):
    B, C, H, W = x.shape
    Ho, Wo = offset.shape[-2:]
    tensors, geometry, G, K = _geometry_args(x, offset, mask, kernel_size, stride, padding, dilation)
    R = (b1 - b0) * Ho * Wo * K * G
    Cg = C // G
    cols = torch.empty((R, Cg), dtype=torch.float32, device=x.device)
    grid = (triton.cdiv(R, CONFIG["BLOCK_R"]), triton.cdiv(Cg, CONFIG["BLOCK_C"]))
    with L.on_device(x):
        _deform_columns_kernel[grid](
            *tensors, cols, R, b0, H, W, Ho, Wo, G, Cg, *geometry,
            K=K, KW=kernel_size[1], HAS_MASK=mask is not None, **CONFIG,
        )  # fmt: skip
    return cols


def forward(x, offset, weight, bias, mask, kernel_size, stride, padding, dilation):
    """Forward on validated arguments: Triton columns per chunk of images, then one torch matmul per chunk."""
    L.check_launchable(x, offset, weight, interpreted=INTERPRETED)
    B, C = x.shape[:2]
    Co = weight.shape[0]
    K = kernel_size[0] * kernel_size[1]
    Ho, Wo = offset.shape[-2:]
    G_w = C // weight.shape[1]
    wacc = weight.float()
    bacc = bias.float() if bias is not None else None
    out = torch.empty((B, Ho, Wo, Co), dtype=x.dtype, device=x.device)
    step = cm.images_per_chunk(Ho * Wo * K * C, B)
    for b0 in range(0, B, step):
        b1 = min(B, b0 + step)
        cols = _columns(x, offset, mask, b0, b1, kernel_size, stride, padding, dilation)
        out[b0:b1].view(-1, Co).copy_(cm.columns_matmul(cols.view(-1, K * C), wacc, G_w, bacc))
    return out.permute(0, 3, 1, 2).contiguous()


def backward(grad_out, x, offset, weight, mask, kernel_size, stride, padding, dilation, needs, deterministic=None):
    """Gradients wrt ``(x, offset, weight, bias, mask)`` (empty where ``needs`` is False).

    ``deterministic=None`` follows ``torch.are_deterministic_algorithms_enabled()``: atomics when it is off,
    the sorted two-pass accumulation when it is on.
    """
    need_x, need_offset, need_weight, need_bias, need_mask = needs
    deterministic = L.resolve_deterministic(deterministic)
    L.check_launchable(grad_out, x, offset, weight, interpreted=INTERPRETED)
    B, C, H, W = x.shape
    Co = weight.shape[0]
    K = kernel_size[0] * kernel_size[1]
    Ho, Wo = offset.shape[-2:]
    G_w = C // weight.shape[1]
    acc = L.acc_dtype(x.dtype)
    wacc = weight.to(acc)
    tensors, geometry, G, _ = _geometry_args(x, offset, mask, kernel_size, stride, padding, dilation)
    Cg = C // G
    dev = x.device
    atomic = not deterministic
    grad_x = torch.zeros((B, C, H, W), dtype=torch.float32, device=dev) if need_x else None
    grad_offset = torch.empty(offset.shape, dtype=torch.float32, device=dev) if need_offset else None
    grad_mask = torch.empty(mask.shape, dtype=torch.float32, device=dev) if need_mask else None
    grad_weight = torch.zeros(weight.shape, dtype=acc, device=dev) if need_weight else None
    gout_nhwc = grad_out.permute(0, 2, 3, 1)
    grad_bias = gout_nhwc.to(acc).sum((0, 1, 2)).to(weight.dtype) if need_bias else None
    dummy = torch.empty(1, dtype=torch.float32, device=dev)
    step = cm.images_per_chunk(Ho * Wo * K * C, B)
    for b0 in range(0, B, step):
        b1 = min(B, b0 + step)
        nb = b1 - b0
        R = nb * Ho * Wo * K * G
        gout2d = gout_nhwc[b0:b1].to(acc).reshape(nb * Ho * Wo, Co)
        if need_weight:
            cols = _columns(x, offset, mask, b0, b1, kernel_size, stride, padding, dilation)
            grad_weight += cm.grad_weight(cols.view(-1, K * C), gout2d, weight.shape, G_w)
            del cols
        if not (need_x or need_offset or need_mask):
            continue
        gcols = cm.grad_columns(gout2d, wacc, G_w).contiguous()
        if need_x and not atomic:
            gx_buffer = torch.empty((4, R, Cg), dtype=torch.float32, device=dev)
            gidx = torch.empty((4, R), dtype=torch.int64, device=dev)
        else:
            gx_buffer = grad_x if need_x else dummy
            gidx = dummy
        with L.on_device(x):
            _deform_backward_kernel[(triton.cdiv(R, CONFIG["BLOCK_R"]),)](
                *tensors, gcols, gx_buffer, gidx,
                grad_offset if need_offset else dummy, grad_mask if need_mask else dummy,
                R, b0, C, H, W, Ho, Wo, G, Cg, *geometry,
                K=K, KW=kernel_size[1], HAS_MASK=mask is not None, NEED_X=need_x, ATOMIC=atomic,
                NEED_OFFSET=need_offset, NEED_MASK=need_mask, **CONFIG,
            )  # fmt: skip
        if need_x and not atomic:
            table = torch.zeros((nb * G * H * W, Cg), dtype=torch.float32, device=dev)
            table.index_put_((gidx.view(-1),), gx_buffer.view(-1, Cg), accumulate=True)
            grad_x[b0:b1] = table.view(nb, G, H, W, Cg).permute(0, 1, 4, 2, 3).reshape(nb, C, H, W)
    # Outputs of a custom op must not alias each other, so every missing gradient is its own empty tensor.
    return (
        grad_x.to(x.dtype) if need_x else x.new_empty(0),
        grad_offset.to(offset.dtype) if need_offset else x.new_empty(0),
        grad_weight.to(weight.dtype) if need_weight else x.new_empty(0),
        grad_bias if need_bias else x.new_empty(0),
        grad_mask.to(mask.dtype) if need_mask else x.new_empty(0),
    )
