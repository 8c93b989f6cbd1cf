"""Triton kernels for dynamic local filtering (Dynamic Filter Networks' *dynamic local filtering layer*,
De Brabandere et al., NIPS 2016; the aggregation step of involution, Li et al., CVPR 2021):

    y[b, c, ho, wo] = sum_{i, j} f[b, g(c), i*kw + j, ho, wo] * x[b, c, ho*sh - ph + i*dh, wo*sw - pw + j*dw]

Local filtering keeps its own kernels rather than the bilinear sampling core of the deformable ops
(:mod:`dynconv.kernels._sampling`): its taps sit on the integer grid, so it needs no interpolation, and its input
gradient is a gather too (no scatter, no atomics).

Three kernels, each a gather (every program writes its own tile once: no atomics, deterministic):

* ``forward``: one program per (channel block, output tile, b, g); a loop over the taps loads each tap's
  filter tile once and multiplies it into the shifted window of ``BLOCK_C`` channels.
* grad wrt ``x``: ``gx[b, c, h, w] = sum_{i, j} gy[b, c, ho, wo] * f[b, g, i*kw + j, ho, wo]`` over the taps
  whose window reaches ``(h, w)``: ``ho = (h + ph - i*dh) / sh`` must be an integer in ``[0, H_out)``. Input
  pixels are split into the ``sh * sw`` residue classes ``(h mod sh, w mod sw)``; inside one class a tap
  either hits every pixel or none, so a program skips the taps of other classes with one scalar branch
  instead of masking ``1 - 1/(sh*sw)`` of its loads. For stride 1 this is the transposed local filter.
* grad wrt ``filters``: ``gf[b, g, k, ho, wo] = sum_{c in g} gy[b, c, ho, wo] * x[b, c, window_k(ho, wo)]``,
  one program per (output tile, b, g) reducing over the group's channels in ``BLOCK_C`` blocks.

Every tensor is addressed through its strides, so NCHW, channels-last and other non-contiguous inputs are
read in place (no layout copy); outputs are contiguous NCHW (the op's fake kernels promise it). Products
accumulate in fp32 (fp64 for fp64 inputs) and are stored in the input dtype. Offsets are computed in int32
unless a tensor spans 2**30 elements or more (a factor-2 margin for the masked lanes past the edges), when
the program ids, and with them every offset, are promoted to int64.

Taps: a runtime loop over the kernel rows, the taps of a row unrolled: unrolling all k*k taps made large kernels
compile more than ten times slower (docs/benchmarks.md, "Notes behind code choices").

Block sizes: one tile (``BLOCK_H x BLOCK_W`` pixels, warps) per kernel and shape from the rule in
:func:`dynconv.kernels._launch.local_filter_tile`, with ``BLOCK_C`` from
:func:`dynconv.kernels._launch.local_filter_block_c`: a new shape compiles one variant of each kernel and times
nothing. ``DYNCONV_AUTOTUNE=1`` times the candidate tiles once per device, dtype and shape and caches the winner
on disk (:func:`dynconv.kernels._launch.select`).

``TRITON_INTERPRET`` is read by ``triton.jit`` when this module is imported: set it before the first call
of the ``triton`` backend.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from dynconv.kernels import _launch as L

__all__ = ["forward", "backward"]

# Whether the kernels below were created by the interpreter (decided when this module was imported).
INTERPRETED = L.triton_interpret()

# Tests set this to run the int64 offset path on small tensors.
FORCE_INT64 = False


@triton.jit
def _program(pid, n_cb, tiles_h, tiles_w, INT64: tl.constexpr):
    """Channel block, tile row, tile column and the rest (image, group, ...) of program ``pid``: channel blocks
    vary fastest, so programs that run together share the filter tile in L2."""
    if INT64:
        pid = pid.to(tl.int64)
    rest = pid // n_cb
    tw = rest % tiles_w
    rest = rest // tiles_w
    return pid % n_cb, rest % tiles_h, tw, rest // tiles_h


@triton.jit
def _output_tile(th, tw, HO, WO, SH, SW, PH, PW, BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr):
    """Output rows and columns of a tile (``[1, BLOCK_H, 1]``, ``[1, 1, BLOCK_W]``), their in-range flag and the
    input row and column of their first tap."""
    ho = (th * BLOCK_H + tl.arange(0, BLOCK_H))[None, :, None]
    wo = (tw * BLOCK_W + tl.arange(0, BLOCK_W))[None, None, :]
    return ho, wo, (ho < HO) & (wo < WO), ho * SH - PH, wo * SW - PW


@triton.jit
def _tap(hi0, wi0, i, j, DH, DW, H, W, sh, sw):
    """Offset (with strides ``sh``, ``sw``) and in-image flag of tap ``(i, j)`` of a tile's windows."""
    hi = hi0 + i * DH
    wi = wi0 + j * DW
    return hi * sh + wi * sw, (hi >= 0) & (hi < H) & (wi >= 0) & (wi < W)


@triton.jit
def _forward_kernel(  # x [B, C, H, W] and filters [B, G, KH*KW, HO, WO] in any strides; y [B, C, HO, WO] written
    x_ptr, f_ptr, y_ptr, G, C_PER_G, H, W, HO, WO, sxb, sxc, sxh, sxw, sfb, sfg, sfk, sfh, sfw, syb, syc, syh, syw,
    KH: tl.constexpr, KW: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr, PH: tl.constexpr, PW: tl.constexpr,
    DH: tl.constexpr, DW: tl.constexpr, ACC_F64: tl.constexpr, INT64: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr,
):  # fmt: skip
    acc_dtype = tl.float64 if ACC_F64 else tl.float32
    n_cb = tl.cdiv(C_PER_G, BLOCK_C)
    cb, th, tw, bg = _program(tl.program_id(0), n_cb, tl.cdiv(HO, BLOCK_H), tl.cdiv(WO, BLOCK_W), INT64)
    b = bg // G
    g = bg % G
    c = (cb * BLOCK_C + tl.arange(0, BLOCK_C))[:, None, None]
    c_ok = c < C_PER_G
    ho, wo, p_ok, hi0, wi0 = _output_tile(th, tw, HO, WO, SH, SW, PH, PW, BLOCK_H, BLOCK_W)
    x_base = x_ptr + b * sxb + (g * C_PER_G + c) * sxc
    f_base = f_ptr + b * sfb + g * sfg + ho * sfh + wo * sfw
    acc = tl.zeros([BLOCK_C, BLOCK_H, BLOCK_W], dtype=acc_dtype)
    for i in range(KH):
        for j in tl.static_range(KW):
            f_tap = tl.load(f_base + (i * KW + j) * sfk, mask=p_ok, other=0.0).to(acc_dtype)
            x_off, x_ok = _tap(hi0, wi0, i, j, DH, DW, H, W, sxh, sxw)
            x_tap = tl.load(x_base + x_off, mask=c_ok & p_ok & x_ok, other=0.0).to(acc_dtype)
            acc += x_tap * f_tap
    y_off = b * syb + (g * C_PER_G + c) * syc + ho * syh + wo * syw
    tl.store(y_ptr + y_off, acc.to(y_ptr.dtype.element_ty), mask=c_ok & p_ok)


@triton.jit
def _grad_x_kernel(  # grad y [B, C, HO, WO] and filters [B, G, KH*KW, HO, WO] in any strides; grad x written
    gy_ptr, f_ptr, gx_ptr, G, C_PER_G, H, W, HO, WO, sgb, sgc, sgh, sgw, sfb, sfg, sfk, sfh, sfw, sxb, sxc, sxh, sxw,
    KH: tl.constexpr, KW: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr, PH: tl.constexpr, PW: tl.constexpr,
    DH: tl.constexpr, DW: tl.constexpr, ACC_F64: tl.constexpr, INT64: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr,
):  # fmt: skip
    # A tile covers input pixels of one residue class (rh, rw): h = rh + SH * t.
    acc_dtype = tl.float64 if ACC_F64 else tl.float32
    n_cb = tl.cdiv(C_PER_G, BLOCK_C)
    tiles_h, tiles_w = tl.cdiv(tl.cdiv(H, SH), BLOCK_H), tl.cdiv(tl.cdiv(W, SW), BLOCK_W)
    cb, th, tw, rest = _program(tl.program_id(0), n_cb, tiles_h, tiles_w, INT64)
    rw = rest % SW
    rest = rest // SW
    rh = rest % SH
    b = rest // SH // G
    g = rest // SH % G
    c = (cb * BLOCK_C + tl.arange(0, BLOCK_C))[:, None, None]
    h = rh + SH * (th * BLOCK_H + tl.arange(0, BLOCK_H))[None, :, None]
    w = rw + SW * (tw * BLOCK_W + tl.arange(0, BLOCK_W))[None, None, :]
    c_ok = c < C_PER_G
    p_ok = (h < H) & (w < W)
    gy_base = gy_ptr + b * sgb + (g * C_PER_G + c) * sgc
    f_base = f_ptr + b * sfb + g * sfg
    acc = tl.zeros([BLOCK_C, BLOCK_H, BLOCK_W], dtype=acc_dtype)
    for i in range(KH):
        for j in tl.static_range(KW):
            # Within the class, tap (i, j) reaches these pixels iff (h + PH - i*DH) is a multiple of SH (the
            # same for every h of the class), and likewise along w. For stride 1 the test folds to true.
            if ((rh + PH - i * DH) % SH == 0) & ((rw + PW - j * DW) % SW == 0):
                num_h = h + PH - i * DH
                num_w = w + PW - j * DW
                # num_h is an exact multiple of SH here, so // is exact whatever its rounding of negatives.
                ho = num_h // SH
                wo = num_w // SW
                tap_ok = p_ok & (num_h >= 0) & (ho < HO) & (num_w >= 0) & (wo < WO)
                f_tap = tl.load(f_base + (i * KW + j) * sfk + ho * sfh + wo * sfw, mask=tap_ok, other=0.0)
                gy_tap = tl.load(gy_base + ho * sgh + wo * sgw, mask=tap_ok & c_ok, other=0.0)
                acc += gy_tap.to(acc_dtype) * f_tap.to(acc_dtype)
    gx_off = b * sxb + (g * C_PER_G + c) * sxc + h * sxh + w * sxw
    tl.store(gx_ptr + gx_off, acc.to(gx_ptr.dtype.element_ty), mask=c_ok & p_ok)


@triton.jit
def _grad_filters_kernel(  # grad y [B, C, HO, WO] and x [B, C, H, W] in any strides; grad filters written
    gy_ptr, x_ptr, gf_ptr, G, C_PER_G, H, W, HO, WO, sgb, sgc, sgh, sgw, sxb, sxc, sxh, sxw, sfb, sfg, sfk, sfh, sfw,
    KH: tl.constexpr, KW: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr, PH: tl.constexpr, PW: tl.constexpr,
    DH: tl.constexpr, DW: tl.constexpr, ACC_F64: tl.constexpr, INT64: tl.constexpr, SINGLE_C_BLOCK: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr,
):  # fmt: skip
    acc_dtype = tl.float64 if ACC_F64 else tl.float32
    _, th, tw, bg = _program(tl.program_id(0), 1, tl.cdiv(HO, BLOCK_H), tl.cdiv(WO, BLOCK_W), INT64)
    b = bg // G
    g = bg % G
    ho, wo, p_ok, hi0, wi0 = _output_tile(th, tw, HO, WO, SH, SW, PH, PW, BLOCK_H, BLOCK_W)
    gy_base = gy_ptr + b * sgb + g * C_PER_G * sgc + ho * sgh + wo * sgw
    x_base = x_ptr + b * sxb + g * C_PER_G * sxc
    gf_base = gf_ptr + b * sfb + g * sfg + ho * sfh + wo * sfw
    c0 = tl.arange(0, BLOCK_C)[:, None, None]
    if SINGLE_C_BLOCK:
        # The whole group fits in one block: load grad_y once and reuse it for every tap.
        gy = tl.load(gy_base + c0 * sgc, mask=(c0 < C_PER_G) & p_ok, other=0.0).to(acc_dtype)
    for i in range(KH):
        for j in tl.static_range(KW):
            x_off, x_ok = _tap(hi0, wi0, i, j, DH, DW, H, W, sxh, sxw)
            x_ok = x_ok & p_ok
            if SINGLE_C_BLOCK:
                x_tap = tl.load(x_base + c0 * sxc + x_off, mask=x_ok & (c0 < C_PER_G), other=0.0)
                acc = tl.sum(gy * x_tap.to(acc_dtype), axis=0)
            else:
                acc = tl.zeros([BLOCK_H, BLOCK_W], dtype=acc_dtype)
                for cs in range(0, C_PER_G, BLOCK_C):
                    c = cs + c0
                    c_ok = c < C_PER_G
                    gy = tl.load(gy_base + c * sgc, mask=c_ok & p_ok, other=0.0)
                    x_tap = tl.load(x_base + c * sxc + x_off, mask=x_ok & c_ok, other=0.0)
                    acc += tl.sum(gy.to(acc_dtype) * x_tap.to(acc_dtype), axis=0)
            gf_tap = gf_base + (i * KW + j) * sfk
            tl.store(gf_tap, acc[None, :, :].to(gf_ptr.dtype.element_ty), mask=p_ok)


def _meta(kernel_size, stride, padding, dilation, f64: bool, block_c: int, *tensors, **extra) -> dict:
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = kernel_size, stride, padding, dilation
    int64 = FORCE_INT64 or L.needs_int64(*tensors)
    return dict(KH=kh, KW=kw, SH=sh, SW=sw, PH=ph, PW=pw, DH=dh, DW=dw, ACC_F64=f64, INT64=int64, BLOCK_C=block_c,
                **extra)  # fmt: skip


def _launch(kernel, grid, args, meta: dict, rows: int, cols: int, like: torch.Tensor) -> None:
    """Launch ``kernel`` with the tile of the rule (or, with ``DYNCONV_AUTOTUNE=1``, the cached fastest) for
    programs covering ``rows x cols`` pixels; ``grid(tile)`` is the launch grid of a tile."""
    key = [args[4], *args[5:9], *(meta[k] for k in ("KH", "KW", "SH", "SW", "PH", "PW", "DH", "DW", "BLOCK_C"))]
    L.launch_local_filter(kernel, grid, args, meta, rows, cols, like, key, INTERPRETED)


def forward(x, filters, kernel_size, stride, padding, dilation) -> torch.Tensor:
    """Dynamic local filtering on validated arguments.

    Args:
        x (Tensor[B, C, H, W]): input, any strides.
        filters (Tensor[B, G, kh*kw, H_out, W_out]): per-pixel filters, any strides, dtype of ``x``.
        kernel_size, stride, padding, dilation (list[int] of length 2): the window geometry.

    Returns:
        Tensor[B, C, H_out, W_out]: contiguous, dtype of ``x``.
    """
    L.check_launchable(x, filters, interpreted=INTERPRETED)
    B, C, H, W = x.shape
    _, G, _, Ho, Wo = filters.shape
    y = L.output_buffer((B, C, Ho, Wo), x, INTERPRETED)
    cpg, f64 = C // G, L.acc_is_f64(x.dtype)
    block_c = L.local_filter_block_c(cpg, 16, f64)
    args = (x, filters, y, G, cpg, H, W, Ho, Wo, *x.stride(), *filters.stride(), *y.stride())
    meta = _meta(kernel_size, stride, padding, dilation, f64, block_c, x, filters, y)

    def grid(m):
        return (triton.cdiv(cpg, block_c) * triton.cdiv(Ho, m["BLOCK_H"]) * triton.cdiv(Wo, m["BLOCK_W"]) * B * G,)

    _launch(_forward_kernel, grid, args, meta, Ho, Wo, x)
    return y.to(x.dtype)


def backward(grad_out, x, filters, kernel_size, stride, padding, dilation, need_x, need_filters):
    """Gradients of :func:`forward` wrt ``x`` and ``filters`` (``grad_out``: ``[B, C, H_out, W_out]``, any
    strides; the rest as in :func:`forward`). Contiguous, in the input dtype; one not asked for is empty."""
    L.check_launchable(x, filters, grad_out, interpreted=INTERPRETED)
    B, C, H, W = x.shape
    _, G, _, Ho, Wo = filters.shape
    cpg, f64 = C // G, L.acc_is_f64(x.dtype)
    geometry = (kernel_size, stride, padding, dilation, f64)
    sh, sw = stride
    grad_x, grad_f = x.new_empty(0), filters.new_empty(0)
    if need_x:
        grad_x = L.output_buffer((B, C, H, W), x, INTERPRETED)
        block_c = L.local_filter_block_c(cpg, 16, f64)
        args = (grad_out, filters, grad_x, G, cpg, H, W, Ho, Wo, *grad_out.stride(), *filters.stride())
        args += tuple(grad_x.stride())
        meta = _meta(*geometry, block_c, grad_out, filters, grad_x)
        rows, cols = triton.cdiv(H, sh), triton.cdiv(W, sw)

        def grid_x(m):
            tiles = triton.cdiv(rows, m["BLOCK_H"]) * triton.cdiv(cols, m["BLOCK_W"])
            return (triton.cdiv(cpg, block_c) * tiles * sh * sw * B * G,)

        _launch(_grad_x_kernel, grid_x, args, meta, rows, cols, x)
        grad_x = grad_x.to(x.dtype)
    if need_filters:
        grad_f = L.output_buffer(filters.shape, filters, INTERPRETED)
        block_c = L.local_filter_block_c(cpg, 32, f64)
        args = (grad_out, x, grad_f, G, cpg, H, W, Ho, Wo, *grad_out.stride(), *x.stride(), *grad_f.stride())
        meta = _meta(*geometry, block_c, grad_out, x, grad_f, SINGLE_C_BLOCK=cpg <= block_c)

        def grid_f(m):
            return (triton.cdiv(Ho, m["BLOCK_H"]) * triton.cdiv(Wo, m["BLOCK_W"]) * B * G,)

        _launch(_grad_filters_kernel, grid_f, args, meta, Ho, Wo, x)
        grad_f = grad_f.to(filters.dtype)
    return grad_x, grad_f
