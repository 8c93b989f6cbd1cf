"""Triton kernels of flow warping (Deep Feature Flow, Zhu et al., CVPR 2017): ``y(p) = x(p + flow(p))``.

The same bilinear gather as the deformable kernels (``dynconv/kernels/deform.py``), with one sampling point
per output pixel, the three padding modes of ``F.grid_sample(..., align_corners=True)`` and ``"nearest"``.

- Forward: a program takes a block of pixels x a block of channels, computes each pixel's position once
  (fp32, whatever the input dtype), gathers the four corners from ``x`` in any strides and accumulates in
  fp32.
- Backward: a program takes a block of pixels and walks all channel blocks. The flow gradient is the
  per-pixel reduction ``sum_c grad_y * d sample / d position``, done in registers (no atomics). The input
  gradient spreads ``grad_y * corner weight`` to the four corners: with fp32 atomics (fast, the summation
  order depends on scheduling), or deterministically, by writing every corner's contribution and index and
  summing them with ``index_put_(accumulate=True)`` (sorted, deterministic under
  ``torch.use_deterministic_algorithms``). ``grid_sample``'s CUDA backward has no deterministic variant
  (it raises in deterministic mode); this one does.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from dynconv.kernels import _launch as L

__all__ = ["backward", "forward"]

MODES = {"bilinear": 0, "nearest": 1}
PADDING_MODES = {"zeros": 0, "border": 1, "reflection": 2}

# Pixels x channels per program and warps (dynconv.kernels._launch.warp_config). Tests shrink the blocks here.
INTERPRETED = L.triton_interpret()
CONFIG = L.warp_config(interpreted=INTERPRETED)


@triton.jit
def _pad_position(p, size, PAD: tl.constexpr):
    """A position along an axis of ``size`` pixel centres ``0 .. size-1`` after the padding rule, and its
    derivative."""
    last = tl.zeros_like(p) + (size - 1)  # a float tensor, also when Triton specialises size == 1
    if PAD == 1:  # border: clamp into the image; zero derivative where clamped (grid_sample's rule)
        d = ((p > 0) & (p < last)).to(tl.float32)
        p = tl.minimum(tl.maximum(p, 0.0), last)
    elif PAD == 2:  # reflection about the first and last pixel centres: a triangle wave of period 2 * last
        # A NaN or infinite position reflects to the first pixel, as grid_sample's does (no gradient there).
        finite = tl.abs(p) <= 3.0e38  # False for NaN and +-inf
        p = tl.where(finite, p, 0.0)
        period = 2.0 * last
        a = tl.abs(p)
        sign = tl.where(p < 0, -1.0, 1.0)
        q = a - tl.floor(a / tl.maximum(period, 1e-30)) * period
        flip = q > last
        p = tl.where(flip, period - q, q)
        d = tl.where(flip, -sign, sign)
        p = tl.where(last == 0, 0.0, p)
        d = tl.where((last == 0) | (finite == 0), 0.0, d)
    else:
        d = tl.full(p.shape, 1.0, tl.float32)
    return p, d


@triton.jit
def _round_half_even(v):
    r = tl.floor(v + 0.5)
    odd = (r - 2.0 * tl.floor(r * 0.5)) != 0.0
    return tl.where(((r - v) == 0.5) & odd, r - 1.0, r)


@triton.jit
def _pixel_geometry(pix, N, H, W, flow_ptr, s_fb, s_fc, s_fh, s_fw, PAD: tl.constexpr):
    """Image, row, column, sampling position (after padding) and its derivatives of every pixel of a block."""
    ok = pix < N
    w = pix % W
    t = pix // W
    h = t % H
    b = (t // H).to(tl.int64)
    f_base = b * s_fb + h.to(tl.int64) * s_fh + w.to(tl.int64) * s_fw
    dx = tl.load(flow_ptr + f_base, mask=ok, other=0.0).to(tl.float32)
    dy = tl.load(flow_ptr + f_base + s_fc, mask=ok, other=0.0).to(tl.float32)
    px, dpx = _pad_position(w.to(tl.float32) + dx, W, PAD)
    py, dpy = _pad_position(h.to(tl.float32) + dy, H, PAD)
    return ok, b, h, w, px, py, dpx, dpy


@triton.jit
def _corner(corner: tl.constexpr, px, py, H, W, ok, MODE: tl.constexpr):
    """Row, column, weight and in-image flag of one of the (up to) four corners read for each pixel."""
    if MODE == 1:  # nearest: one "corner", weight 1
        row = _round_half_even(py).to(tl.int32)
        col = _round_half_even(px).to(tl.int32)
        weight = tl.full(px.shape, 1.0, tl.float32)
    else:
        y0f = tl.floor(py)
        x0f = tl.floor(px)
        ly = py - y0f
        lx = px - x0f
        row = y0f.to(tl.int32) + corner // 2
        col = x0f.to(tl.int32) + corner % 2
        weight = (ly if corner // 2 == 1 else 1.0 - ly) * (lx if corner % 2 == 1 else 1.0 - lx)
    inside = ok & (row >= 0) & (row < H) & (col >= 0) & (col < W)
    return row, col, weight, inside


@triton.jit
def _warp_forward_kernel(
    x_ptr, s_xb, s_xc, s_xh, s_xw,  # input [B, C, H, W], any strides
    flow_ptr, s_fb, s_fc, s_fh, s_fw,  # flow [B, 2, H, W], any strides
    out_ptr,  # output [B, C, H, W], contiguous
    N, C, H, W,
    MODE: tl.constexpr, PAD: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    # Tiles are [channels, pixels]: threads run along the pixels, contiguous in NCHW memory, and each keeps
    # only a few pixels' geometry (a [pixels, channels] tile put a warp across 32 channels of one pixel: strided
    # loads, and 16 pixels of geometry per thread, spilling registers on sm_90; dynconv check-kernels).
    pix = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    chans = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    chan_ok = chans < C
    ok, b, h, w, px, py, dpx, dpy = _pixel_geometry(pix, N, H, W, flow_ptr, s_fb, s_fc, s_fh, s_fw, PAD)
    base = b[None, :] * s_xb + chans[:, None].to(tl.int64) * s_xc
    acc = tl.zeros((BLOCK_C, BLOCK_P), dtype=tl.float32)
    for corner in tl.static_range(1 if MODE == 1 else 4):
        row, col, weight, inside = _corner(corner, px, py, H, W, ok, MODE)
        ptrs = x_ptr + base + (row.to(tl.int64) * s_xh + col.to(tl.int64) * s_xw)[None, :]
        v = tl.load(ptrs, mask=inside[None, :] & chan_ok[:, None], other=0.0).to(tl.float32)
        acc += v * weight[None, :]
    hw = h.to(tl.int64) * W + w
    dst = (b[None, :] * C + chans[:, None].to(tl.int64)) * H * W + hw[None, :]
    tl.store(out_ptr + dst, acc.to(out_ptr.dtype.element_ty), mask=ok[None, :] & chan_ok[:, None])


@triton.jit
def _warp_backward_kernel(
    x_ptr, s_xb, s_xc, s_xh, s_xw,  # input [B, C, H, W], any strides
    flow_ptr, s_fb, s_fc, s_fh, s_fw,  # flow [B, 2, H, W], any strides
    gy_ptr, s_gb, s_gc, s_gh, s_gw,  # grad output [B, C, H, W], any strides
    gx_ptr,  # ATOMIC: grad input [B, C, H, W] fp32 contiguous; else contributions [CORNERS, N, C] fp32
    gidx_ptr,  # not ATOMIC: [CORNERS, N] int64, the row of the [B*H*W, C] grad table each contribution goes to
    gflow_ptr,  # grad flow [B, 2, H, W] fp32 contiguous
    N, C, H, W,
    MODE: tl.constexpr, PAD: tl.constexpr, NEED_X: tl.constexpr, ATOMIC: tl.constexpr,
    NEED_FLOW: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    pix = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    ok, b, h, w, px, py, dpx, dpy = _pixel_geometry(pix, N, H, W, flow_ptr, s_fb, s_fc, s_fh, s_fw, PAD)
    g_base = b * s_gb + h.to(tl.int64) * s_gh + w.to(tl.int64) * s_gw
    n64 = pix.to(tl.int64) * 0 + N  # N per pixel in int64: corner * N can pass 2**31
    grad_px = tl.zeros((BLOCK_P,), dtype=tl.float32)
    grad_py = tl.zeros((BLOCK_P,), dtype=tl.float32)
    lx = px - tl.floor(px)
    ly = py - tl.floor(py)
    for corner in tl.static_range(1 if MODE == 1 else 4):
        row, col, weight, inside = _corner(corner, px, py, H, W, ok, MODE)
        xpix = row.to(tl.int64) * s_xh + col.to(tl.int64) * s_xw
        if not ATOMIC:
            table_row = (b * H + tl.minimum(tl.maximum(row, 0), H - 1)) * W + tl.minimum(tl.maximum(col, 0), W - 1)
            tl.store(gidx_ptr + (pix.to(tl.int64) + n64 * corner), table_row, mask=ok)
        a = tl.zeros((BLOCK_P,), dtype=tl.float32)
        for c0 in range(0, C, BLOCK_C):
            chans = c0 + tl.arange(0, BLOCK_C)
            chan_ok = chans < C
            both = ok[None, :] & chan_ok[:, None]
            gy = tl.load(gy_ptr + g_base[None, :] + chans[:, None].to(tl.int64) * s_gc, mask=both, other=0.0)
            gy = gy.to(tl.float32)
            if NEED_FLOW and MODE == 0:
                ptrs = x_ptr + b[None, :] * s_xb + chans[:, None].to(tl.int64) * s_xc + xpix[None, :]
                v = tl.load(ptrs, mask=inside[None, :] & chan_ok[:, None], other=0.0).to(tl.float32)
                a += tl.sum(gy * v, axis=0)
            if NEED_X:
                contrib = gy * (weight * inside.to(tl.float32))[None, :]
                if ATOMIC:
                    dst = ((b[None, :] * C + chans[:, None].to(tl.int64)) * H + row.to(tl.int64)[None, :]) * W
                    dst += col.to(tl.int64)[None, :]
                    tl.atomic_add(gx_ptr + dst, contrib, mask=inside[None, :] & chan_ok[:, None], sem="relaxed")
                else:
                    dst = (pix.to(tl.int64) + n64 * corner)[None, :] * C + chans[:, None]
                    tl.store(gx_ptr + dst, contrib, mask=both)
        if MODE == 0:
            wy = ly if corner // 2 == 1 else 1.0 - ly
            wx = lx if corner % 2 == 1 else 1.0 - lx
            sy = 1.0 if corner // 2 == 1 else -1.0
            sx = 1.0 if corner % 2 == 1 else -1.0
            grad_px += sx * wy * a
            grad_py += sy * wx * a
    if NEED_FLOW:
        hw = h.to(tl.int64) * W + w
        tl.store(gflow_ptr + (b * 2) * H * W + hw, grad_px * dpx, mask=ok)
        tl.store(gflow_ptr + (b * 2 + 1) * H * W + hw, grad_py * dpy, mask=ok)


def _args(x: torch.Tensor, flow: torch.Tensor):
    return (x, *x.stride(), flow, *flow.stride())


def forward(x: torch.Tensor, flow: torch.Tensor, mode: str, padding_mode: str) -> torch.Tensor:
    """``y(p) = x(p + flow(p))`` on validated arguments (see :func:`dynconv.warp`); output contiguous NCHW."""
    L.check_launchable(x, flow, interpreted=INTERPRETED)
    B, C, H, W = x.shape
    out = torch.empty((B, C, H, W), dtype=x.dtype, device=x.device)
    N = B * H * W
    if N == 0:
        return out
    grid = (triton.cdiv(N, CONFIG["BLOCK_P"]), triton.cdiv(C, CONFIG["BLOCK_C"]))
    with L.on_device(x):
        _warp_forward_kernel[grid](
            *_args(x, flow), out, N, C, H, W, MODE=MODES[mode], PAD=PADDING_MODES[padding_mode], **CONFIG
        )
    return out


def backward(
    grad_out: torch.Tensor,
    x: torch.Tensor,
    flow: torch.Tensor,
    mode: str,
    padding_mode: str,
    needs: list[bool],
    deterministic: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients wrt ``(x, flow)``; one not asked for in ``needs`` comes back empty.

    ``deterministic=None`` follows ``torch.are_deterministic_algorithms_enabled()``: fp32 atomics when it is
    off, the two-pass ``index_put_`` accumulation when it is on. ``"nearest"`` has a zero flow gradient.
    """
    need_x, need_flow = needs
    deterministic = L.resolve_deterministic(deterministic)
    L.check_launchable(grad_out, x, flow, interpreted=INTERPRETED)
    B, C, H, W = x.shape
    N = B * H * W
    dev = x.device
    corners = 1 if mode == "nearest" else 4
    grad_x = torch.zeros((B, C, H, W), dtype=torch.float32, device=dev) if need_x else None
    grad_flow = torch.zeros((B, 2, H, W), dtype=torch.float32, device=dev) if need_flow else None
    dummy = torch.empty(1, dtype=torch.float32, device=dev)
    atomic = not deterministic
    if need_x and not atomic:
        gx_buffer = torch.empty((corners, N, C), dtype=torch.float32, device=dev)
        gidx = torch.empty((corners, N), dtype=torch.int64, device=dev)
    else:
        gx_buffer = grad_x if need_x else dummy
        gidx = dummy
    if N > 0 and (need_x or (need_flow and mode == "bilinear")):
        with L.on_device(x):
            _warp_backward_kernel[(triton.cdiv(N, CONFIG["BLOCK_P"]),)](
                *_args(x, flow), grad_out, *grad_out.stride(), gx_buffer, gidx,
                grad_flow if need_flow else dummy, N, C, H, W,
                MODE=MODES[mode], PAD=PADDING_MODES[padding_mode], NEED_X=need_x, ATOMIC=atomic,
                NEED_FLOW=need_flow, **CONFIG,
            )  # fmt: skip
    if need_x and not atomic and N > 0:
        table = torch.zeros((N, C), dtype=torch.float32, device=dev)
        table.index_put_((gidx.view(-1),), gx_buffer.view(-1, C), accumulate=True)
        grad_x = table.view(B, H, W, C).permute(0, 3, 1, 2).contiguous()
    # Outputs of a custom op must not alias each other, so a missing gradient is its own empty tensor.
    return (
        grad_x.to(x.dtype) if need_x else x.new_empty(0),
        grad_flow.to(flow.dtype) if need_flow else x.new_empty(0),
    )
