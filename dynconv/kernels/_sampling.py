"""The sampling core: one gather kernel and one backward for deformable convolution (v1/v2), DCNv3/DCNv4 and
flow warping, with the ``@triton.jit`` helpers they are built from.

Each op is (sampling positions, per-point weight, reduction) over rows of output channels:

    y[row, c] = sum_{k < P} m[row, k] * bilinear(x[b(row), g(row) * Cg + c], pos(row, k))

* ``deform_conv2d``: a row is (image, output pixel, tap, offset group) and P = 1: the rows are the columns that
  torch then multiplies by the weight (:mod:`dynconv._columns`). ``pos`` = the tap on the convolution grid plus
  the learned offset ``(dy, dx)``; ``m`` = the mask (DCNv2) or 1 (DCNv1).
* DCNv3/DCNv4: a row is (image, output pixel, group) and the P kernel points are summed; ``pos`` = the centred,
  x-major point grid plus the offset ``(dx, dy)``, both times ``offset_scale``, the centre point left out with
  ``remove_center``; ``m`` = the modulation.
* warp: a row is (image, pixel), one group, P = 1; ``pos`` = the pixel plus the flow ``(dx, dy)`` (the
  convolution grid of a 1x1 kernel) after warp's padding rule (zeros, border, reflection about the pixel
  centres), rounded half to even for ``"nearest"``; ``m`` = 1.

Every tensor is given as a 4-D ``[B, channels, H, W]`` view through its strides, so NCHW, channels-last
(``s_c == 1``: DCNv3/v4's ``[B, H, W, C]``) and strided inputs are read in place; ``y`` (and its gradient)
has a fifth stride for the row's tap (deform's columns). Offsets use the ``needs_int64`` rule of
:mod:`dynconv.kernels._launch` (``INT64``). The tile is ``[rows, channels]``, or ``[channels, rows]`` with
``PIXEL_MAJOR`` (warp's NCHW, where consecutive rows are consecutive pixels and threads should run along them).

Backward: a program walks all channel blocks of its rows. The position and mask gradients are per-row dot
products with the four corners, reduced in registers (no atomics); the input gradient is scattered to the
corners with fp32/fp64 atomics (``ATOMIC``) or deterministically: every contribution and the row of a
``[B*H*W*G, C/G]`` table (channels-last ``[B, H, W, C]``) it belongs to are written out and summed by
``index_put_(accumulate=True)`` (:func:`scatter_sum`), sorted and deterministic.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from dynconv.kernels import _launch as L

INTERPRETED = L.triton_interpret()

GRID_CONV, GRID_DCN = 0, 1
MODES = {"bilinear": 0, "nearest": 1}
PADDING_MODES = {"zeros": 0, "border": 1, "reflection": 2}


# ------------------------------------------------------------------------------------------- jit helpers


@triton.jit
def _row_ids(block, R, Ho, Wo, G, KR: tl.constexpr, INT64: tl.constexpr, BLOCK_R: tl.constexpr):
    """In-range flag, image, output row and column, row tap and group of the rows of ``block``."""
    rows = block * BLOCK_R + tl.arange(0, BLOCK_R)
    if INT64:
        rows = rows.to(tl.int64)
    g = rows % G
    t = rows // G
    kr = 0
    if KR > 1:  # deform: the row's tap
        kr = t % KR
        t = t // KR
    wo = t % Wo
    t = t // Wo
    return rows, rows < R, t // Ho, t % Ho, wo, kr, g


@triton.jit
def _pad(p, size, PAD: tl.constexpr):
    """A position along an axis of ``size`` pixel centres after warp's padding rule, and its derivative."""
    if PAD == 1:  # border: clamp into the image; zero derivative where clamped (grid_sample's rule)
        last = tl.zeros_like(p) + (size - 1)  # a float tensor, also when Triton specialises size == 1
        d = ((p > 0) & (p < last)).to(p.dtype)
        p = tl.minimum(tl.maximum(p, 0.0), last)
    elif PAD == 2:  # reflection about the first and last pixel centres: a triangle wave of period 2 * last
        last = tl.zeros_like(p) + (size - 1)
        # A NaN or infinite position reflects to the first pixel, as grid_sample's does (no gradient there).
        finite = tl.abs(p) <= 3.0e38  # False for NaN and +-inf
        p = tl.where(finite, p, 0.0)
        period = 2.0 * last
        a = tl.abs(p)
        sign = tl.where(p < 0, -1.0, 1.0)
        q = a - tl.floor(a / tl.maximum(period, 1e-30)) * period
        flip = q > last
        p = tl.where(last == 0, 0.0, tl.where(flip, period - q, q))
        d = tl.where((last == 0) | (finite == 0), 0.0, tl.where(flip, -sign, sign))
    else:
        d = 1.0
    return p, d


@triton.jit
def _round_half_even(v):
    r = tl.floor(v + 0.5)
    odd = (r - 2.0 * tl.floor(r * 0.5)) != 0.0
    return tl.where(((r - v) == 0.5) & odd, r - 1.0, r)


@triton.jit
def _point(off_ptr, s_ob, s_oc, s_oh, s_ow, m_ptr, s_mb, s_mc, s_mh, s_mw, scale, ok, b, ho, wo, g, k, H, W,
           SH, SW, PH, PW, DH, DW, KH: tl.constexpr, KW: tl.constexpr, NK: tl.constexpr, GRID: tl.constexpr,
           OFFSET_XY: tl.constexpr, REMOVE_CENTER: tl.constexpr, PAD: tl.constexpr, MODE: tl.constexpr,
           HAS_MASK: tl.constexpr, ACC: tl.constexpr):  # fmt: skip
    """Point ``k`` of every row: top-left corner ``(y0, x0)``, fractions ``(ly, lx)``, weight ``m`` and
    ``d position / d offset`` per axis (``offset_scale`` and the padding rule's derivative)."""
    ch = (g * NK + k) * 2  # offset channel of the point's first component
    o = off_ptr + b * s_ob + ch * s_oc + ho * s_oh + wo * s_ow
    o0 = tl.load(o, mask=ok, other=0.0).to(ACC)
    o1 = tl.load(o + s_oc, mask=ok, other=0.0).to(ACC)
    if OFFSET_XY:
        oy, ox = o1, o0
    else:
        oy, ox = o0, o1
    if GRID == 1:  # DCNv3/v4: x-major points, centred on the window, grid and offset scaled together
        kk = k
        if REMOVE_CENTER:
            kk = tl.where(k >= (KW // 2) * KH + KH // 2, k + 1, k)
        cy = (DH * (KH - 1)) // 2
        cx = (DW * (KW - 1)) // 2
        py = (ho * SH - PH + cy).to(ACC) + (((kk % KH) * DH - cy).to(ACC) + oy) * scale
        px = (wo * SW - PW + cx).to(ACC) + (((kk // KH) * DW - cx).to(ACC) + ox) * scale
        dy = scale
        dx = scale
    else:  # the convolution grid, points row-major (a 1x1 grid for flow)
        py = (ho * SH - PH + (k // KW) * DH).to(ACC) + oy
        px = (wo * SW - PW + (k % KW) * DW).to(ACC) + ox
        py, dy = _pad(py, H, PAD)
        px, dx = _pad(px, W, PAD)
    if HAS_MASK:
        m = tl.load(m_ptr + b * s_mb + (g * NK + k) * s_mc + ho * s_mh + wo * s_mw, mask=ok, other=0.0).to(ACC)
    else:
        m = 1.0
    if MODE == 1:  # nearest: one corner of weight 1
        y0f = _round_half_even(py)
        x0f = _round_half_even(px)
        ly = tl.zeros_like(py)
        lx = tl.zeros_like(px)
    else:
        y0f = tl.floor(py)
        x0f = tl.floor(px)
        ly = py - y0f
        lx = px - x0f
    return y0f.to(tl.int32), x0f.to(tl.int32), ly, lx, m, dy, dx


@triton.jit
def _corner(corner: tl.constexpr, y0, x0, ly, lx, ok, H, W, INT64: tl.constexpr, GRAD: tl.constexpr = True):
    """Row, column, in-image flag, bilinear weight and (with ``GRAD``) its derivatives wrt the position of one
    corner."""
    row = y0 + corner // 2
    col = x0 + corner % 2
    if INT64:
        row = row.to(tl.int64)
        col = col.to(tl.int64)
    wy = ly if corner // 2 == 1 else 1.0 - ly
    wx = lx if corner % 2 == 1 else 1.0 - lx
    dwy, dwx = 0.0, 0.0
    if GRAD:
        dwy = wx if corner // 2 == 1 else -wx
        dwx = wy if corner % 2 == 1 else -wy
    inside = ok & (row >= 0) & (row < H) & (col >= 0) & (col < W)
    return row, col, inside, wy * wx, dwy, dwx


@triton.jit
def _load_corner(x_ptr, x_row, row, col, s_xh, s_xw, x_chan, inside, c_ok, CA: tl.constexpr, RA: tl.constexpr):
    ptrs = x_ptr + tl.expand_dims(x_row + row * s_xh + col * s_xw, CA) + tl.expand_dims(x_chan, RA)
    return tl.load(ptrs, mask=tl.expand_dims(inside, CA) & tl.expand_dims(c_ok, RA), other=0.0)


@triton.jit
def _scatter_corner(gx_ptr, s_gb, s_gc, s_gh, s_gw, slot, b, g, row, col, inside, contrib, chans, c_ok, ok, Cg,
                    ATOMIC: tl.constexpr, CA: tl.constexpr, RA: tl.constexpr):  # fmt: skip
    """Add ``contrib`` (a tile) to the corner's input pixels: atomically into ``grad x``, or (deterministic) into
    row ``slot`` of the contributions ``[slots, Cg]``, zero outside the image."""
    if ATOMIC:
        dst = tl.expand_dims(b * s_gb + g * Cg * s_gc + row * s_gh + col * s_gw, CA) + tl.expand_dims(chans * s_gc, RA)
        mask = tl.expand_dims(inside, CA) & tl.expand_dims(c_ok, RA)
        tl.atomic_add(gx_ptr + dst, contrib, mask=mask, sem="relaxed")
    else:
        dst = tl.expand_dims(slot * Cg, CA) + tl.expand_dims(chans, RA)
        contrib = contrib * tl.expand_dims(inside.to(contrib.dtype), CA)
        tl.store(gx_ptr + dst, contrib, mask=tl.expand_dims(ok, CA) & tl.expand_dims(c_ok, RA))


# ----------------------------------------------------------------------------------------------- kernels


@triton.jit
def forward_kernel(
    x_ptr, s_xb, s_xc, s_xh, s_xw,  # input [B, C, H, W] (channels-last: s_xc == 1)
    off_ptr, s_ob, s_oc, s_oh, s_ow,  # offsets [B, 2*G*NK, Ho, Wo], channel (g*NK + k)*2 + axis
    m_ptr, s_mb, s_mc, s_mh, s_mw,  # modulation [B, G*NK, Ho, Wo] (read only with HAS_MASK)
    y_ptr, s_yb, s_yc, s_yh, s_yw, s_yk,  # output: rows (b, ho, wo, row tap) x channels
    scale_ptr,  # [1] offset_scale in the accumulation dtype (read only with the DCN grid)
    R, H, W, Ho, Wo, G, Cg, SH, SW, PH, PW, DH, DW,
    KH: tl.constexpr, KW: tl.constexpr, KR: tl.constexpr, P: tl.constexpr, GRID: tl.constexpr,
    OFFSET_XY: tl.constexpr, REMOVE_CENTER: tl.constexpr, PAD: tl.constexpr, MODE: tl.constexpr,
    HAS_MASK: tl.constexpr, PIXEL_MAJOR: tl.constexpr, ACC: tl.constexpr, INT64: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    CA: tl.constexpr = 0 if PIXEL_MAJOR else 1  # the channel axis of a tile
    RA: tl.constexpr = 1 - CA
    rows, ok, b, ho, wo, kr, g = _row_ids(tl.program_id(0), R, Ho, Wo, G, KR, INT64, BLOCK_R)
    chans = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    if INT64:
        chans = chans.to(tl.int64)
    c_ok = chans < Cg
    scale = tl.load(scale_ptr).to(ACC) if GRID == 1 else 1.0
    x_row = b * s_xb + g * Cg * s_xc
    if PIXEL_MAJOR:
        acc = tl.zeros((BLOCK_C, BLOCK_R), dtype=ACC)
    else:
        acc = tl.zeros((BLOCK_R, BLOCK_C), dtype=ACC)
    for kl in range(P):
        y0, x0, ly, lx, m, _, _ = _point(
            off_ptr, s_ob, s_oc, s_oh, s_ow, m_ptr, s_mb, s_mc, s_mh, s_mw, scale, ok, b, ho, wo, g, kr + kl, H, W,
            SH, SW, PH, PW, DH, DW, KH, KW, KR * P, GRID, OFFSET_XY, REMOVE_CENTER, PAD, MODE, HAS_MASK, ACC,
        )  # fmt: skip
        for corner in tl.static_range(1 if MODE == 1 else 4):
            row, col, inside, w, _, _ = _corner(corner, y0, x0, ly, lx, ok, H, W, INT64, False)
            v = _load_corner(x_ptr, x_row, row, col, s_xh, s_xw, chans * s_xc, inside, c_ok, CA, RA)
            acc += v.to(ACC) * tl.expand_dims(w * m, CA)
    y_row = b * s_yb + g * Cg * s_yc + ho * s_yh + wo * s_yw + kr * s_yk
    ptrs = y_ptr + tl.expand_dims(y_row, CA) + tl.expand_dims(chans * s_yc, RA)
    tl.store(ptrs, acc.to(y_ptr.dtype.element_ty), mask=tl.expand_dims(ok, CA) & tl.expand_dims(c_ok, RA))


@triton.jit
def backward_kernel(
    x_ptr, s_xb, s_xc, s_xh, s_xw,  # input [B, C, H, W], as in the forward
    off_ptr, s_ob, s_oc, s_oh, s_ow,  # offsets, as in the forward
    m_ptr, s_mb, s_mc, s_mh, s_mw,  # modulation, as in the forward
    gy_ptr, s_yb, s_yc, s_yh, s_yw, s_yk,  # gradient of the output rows
    gx_ptr, s_gb, s_gc, s_gh, s_gw,  # ATOMIC: grad input [B, C, H, W] (ACC); else contributions [slots, Cg] (ACC)
    idx_ptr,  # not ATOMIC: [slots] int64, the row of the [B*H*W*G, Cg] table each contribution goes to
    goff_ptr, s_pb, s_pc, s_ph, s_pw,  # grad offsets (ACC), layout of the offsets
    gm_ptr, s_qb, s_qc, s_qh, s_qw,  # grad modulation (ACC), layout of the modulation
    scale_ptr, R, H, W, Ho, Wo, G, Cg, SH, SW, PH, PW, DH, DW,
    KH: tl.constexpr, KW: tl.constexpr, KR: tl.constexpr, P: tl.constexpr, GRID: tl.constexpr,
    OFFSET_XY: tl.constexpr, REMOVE_CENTER: tl.constexpr, PAD: tl.constexpr, MODE: tl.constexpr,
    HAS_MASK: tl.constexpr, PIXEL_MAJOR: tl.constexpr, ACC: tl.constexpr, INT64: tl.constexpr,
    NEED_X: tl.constexpr, NEED_OFFSET: tl.constexpr, NEED_MASK: tl.constexpr, ATOMIC: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    NC: tl.constexpr = 1 if MODE == 1 else 4  # corners
    CA: tl.constexpr = 0 if PIXEL_MAJOR else 1  # the channel axis of a tile
    RA: tl.constexpr = 1 - CA
    rows, ok, b, ho, wo, kr, g = _row_ids(tl.program_id(0), R, Ho, Wo, G, KR, INT64, BLOCK_R)
    scale = tl.load(scale_ptr).to(ACC) if GRID == 1 else 1.0
    x_row = b * s_xb + g * Cg * s_xc
    gy_row = b * s_yb + g * Cg * s_yc + ho * s_yh + wo * s_yw + kr * s_yk
    for kl in range(P):
        k = kr + kl
        y0, x0, ly, lx, m, dy, dx = _point(
            off_ptr, s_ob, s_oc, s_oh, s_ow, m_ptr, s_mb, s_mc, s_mh, s_mw, scale, ok, b, ho, wo, g, k, H, W,
            SH, SW, PH, PW, DH, DW, KH, KW, KR * P, GRID, OFFSET_XY, REMOVE_CENTER, PAD, MODE, HAS_MASK, ACC,
        )  # fmt: skip
        slot = (rows * P + kl) * NC
        if NEED_X and not ATOMIC:  # the table row of every corner: ((b * H + y) * W + x) * G + g, clamped
            for corner in tl.static_range(NC):
                row, col, _, _, _, _ = _corner(corner, y0, x0, ly, lx, ok, H, W, INT64, False)
                row = tl.minimum(tl.maximum(row, 0), H - 1)
                col = tl.minimum(tl.maximum(col, 0), W - 1)
                tl.store(idx_ptr + slot + corner, ((b * H + row) * W + col) * G + g, mask=ok)
        g_py = tl.zeros(ly.shape, dtype=ACC)
        g_px = tl.zeros(ly.shape, dtype=ACC)
        g_m = tl.zeros(ly.shape, dtype=ACC)
        for c0 in range(0, Cg, BLOCK_C):
            chans = c0 + tl.arange(0, BLOCK_C)
            if INT64:
                chans = chans.to(tl.int64)
            c_ok = chans < Cg
            ptrs = gy_ptr + tl.expand_dims(gy_row, CA) + tl.expand_dims(chans * s_yc, RA)
            gy = tl.load(ptrs, mask=tl.expand_dims(ok, CA) & tl.expand_dims(c_ok, RA), other=0.0).to(ACC)
            for corner in tl.static_range(NC):
                row, col, inside, w, dwy, dwx = _corner(corner, y0, x0, ly, lx, ok, H, W, INT64)
                if (NEED_OFFSET and MODE == 0) or NEED_MASK:
                    v = _load_corner(x_ptr, x_row, row, col, s_xh, s_xw, chans * s_xc, inside, c_ok, CA, RA)
                    dot = tl.sum(gy * v.to(ACC), axis=CA)
                    g_py += dot * dwy
                    g_px += dot * dwx
                    g_m += dot * w
                if NEED_X:
                    contrib = gy * tl.expand_dims(w * m, CA)
                    _scatter_corner(gx_ptr, s_gb, s_gc, s_gh, s_gw, slot + corner, b, g, row, col, inside, contrib,
                                    chans, c_ok, ok, Cg, ATOMIC, CA, RA)  # fmt: skip
        ch = (g * KR * P + k) * 2
        if NEED_OFFSET:
            p = goff_ptr + b * s_pb + ch * s_pc + ho * s_ph + wo * s_pw
            g_y = g_py * m * dy if MODE == 0 else g_py * 0.0
            g_x = g_px * m * dx if MODE == 0 else g_px * 0.0
            tl.store(p, g_x if OFFSET_XY else g_y, mask=ok)
            tl.store(p + s_pc, g_y if OFFSET_XY else g_x, mask=ok)
        if NEED_MASK:
            tl.store(gm_ptr + b * s_qb + (ch // 2) * s_qc + ho * s_qh + wo * s_qw, g_m, mask=ok)


# ------------------------------------------------------------------------------------------ launchers


class Rule(NamedTuple):
    """One op's sampling rule: the window geometry, ``groups`` (G), taps per row index (KR: deform's rows are
    taps), points summed per row (P), ``offset_scale`` (DCN grid), the position rule's constexprs ``meta``
    (GRID, OFFSET_XY, REMOVE_CENTER, PAD, MODE, PIXEL_MAJOR) and ``blocks`` overriding the launch rule's
    (tests shrink the blocks)."""

    kernel_size: list
    stride: list
    padding: list
    dilation: list
    groups: int
    row_taps: int
    points: int
    meta: dict
    offset_scale: float = 1.0
    blocks: dict = {}


def _strides(*tensors) -> list:
    return [v for t in tensors for v in (t, *t.stride())]


def _launch_args(x, offset, mask, y, rule: Rule, backward: bool, *tensors):
    """The arguments after the tensors: ``offset_scale`` as a one-element tensor of the accumulation dtype (a
    Python float argument is fp32 on the GPU, fp64 in the interpreter), sizes, geometry; and the constexprs."""
    B, C, H, W = x.shape
    Ho, Wo = y.shape[2:4]
    G, KR, P = rule.groups, rule.row_taps, rule.points
    f64 = L.acc_is_f64(x.dtype)
    scale = torch.full((1,), rule.offset_scale, dtype=L.acc_dtype(x.dtype), device=x.device)
    (sh, sw), (ph, pw), (dh, dw) = rule.stride, rule.padding, rule.dilation
    scalars = (scale, B * Ho * Wo * KR * G, H, W, Ho, Wo, G, C // G, sh, sw, ph, pw, dh, dw)
    config = {**L.sampling_config(C // G, f64, backward, INTERPRETED), **rule.blocks}
    int64 = L.needs_int64(x, offset, y, *tensors, *([mask] if mask is not None else []))
    kh, kw = rule.kernel_size
    meta = dict(KH=kh, KW=kw, KR=KR, P=P, HAS_MASK=mask is not None, ACC=tl.float64 if f64 else tl.float32)
    return scalars, dict(meta, INT64=int64, **rule.meta, **config)


def gather(x, offset, mask, y, rule: Rule):
    """Launch :func:`forward_kernel`: ``y`` (a 5-D ``[B, C, Ho, Wo, KR]`` view) from ``x``, ``offset`` and ``mask``
    (4-D ``[B, channels, H, W]`` views; ``mask`` None without modulation)."""
    scalars, meta = _launch_args(x, offset, mask, y, rule, False)
    if scalars[1] == 0:
        return y
    grid = (triton.cdiv(scalars[1], meta["BLOCK_R"]), triton.cdiv(scalars[7], meta["BLOCK_C"]))
    m = mask if mask is not None else offset  # a valid pointer, never read without HAS_MASK
    with L.on_device(x):
        forward_kernel[grid](*_strides(x, offset, m, y), *scalars, **meta)
    return y


def scatter(grad_out, x, offset, mask, grad_x, grad_offset, grad_mask, rule: Rule, atomic: bool) -> None:
    """Launch :func:`backward_kernel`. ``grad_out`` as ``y`` of :func:`gather`; ``grad_x``, ``grad_offset`` and
    ``grad_mask`` (None when not needed) 4-D views of buffers in the accumulation dtype, ``grad_x`` zero-filled.
    Deterministic (``atomic=False``): ``grad_x`` is written by :func:`scatter_sum`."""
    B, C = x.shape[:2]
    slots = B * grad_out.shape[2] * grad_out.shape[3] * rule.row_taps * rule.groups * rule.points
    slots *= 1 if rule.meta.get("MODE", 0) == 1 else 4
    if slots == 0:
        return
    acc = L.acc_dtype(x.dtype)
    dummy = torch.empty((1, 1, 1, 1), dtype=acc, device=x.device)
    contrib, index = dummy, dummy
    if grad_x is not None and not atomic:
        contrib = torch.empty((slots, C // rule.groups), dtype=acc, device=x.device)
        index = torch.empty(slots, dtype=torch.int64, device=x.device)
    target = grad_x if atomic and grad_x is not None else contrib.view(1, 1, *contrib.shape)
    scalars, meta = _launch_args(x, offset, mask, grad_out, rule, True, target)
    m = mask if mask is not None else offset
    grads = (t if t is not None else dummy for t in (grad_offset, grad_mask))
    with L.on_device(x):
        backward_kernel[(triton.cdiv(scalars[1], meta["BLOCK_R"]),)](
            *_strides(x, offset, m, grad_out, target), index, *_strides(*grads), *scalars, NEED_X=grad_x is not None,
            NEED_OFFSET=grad_offset is not None, NEED_MASK=grad_mask is not None, ATOMIC=atomic, **meta,
        )  # fmt: skip
    if grad_x is not None and not atomic:
        scatter_sum(contrib, index, grad_x)


def scatter_sum(contrib: torch.Tensor, index: torch.Tensor, grad_x: torch.Tensor) -> None:
    """The deterministic scatter: ``table[index[s]] += contrib[s]`` over the ``[B*H*W*G, C/G]`` rows of
    ``grad_x [B, C, H, W]`` (zero-filled) read channels-last. ``index_put_(accumulate=True)`` sorts the indices
    (deterministic under ``torch.use_deterministic_algorithms``)."""
    table = grad_x.permute(0, 2, 3, 1)
    direct = table.is_contiguous()  # DCNv3/v4's [B, H, W, C] buffer: accumulate in place
    if not direct:
        table = torch.zeros(table.shape, dtype=table.dtype, device=table.device)
    table.view(-1, contrib.shape[1]).index_put_((index,), contrib, accumulate=True)
    if not direct:
        grad_x.copy_(table.permute(0, 3, 1, 2))
