"""Triton kernels for the DCNv3/DCNv4 sampling core (InternImage's DCNv3, Wang et al., CVPR 2023; DCNv4,
Xiong et al., CVPR 2024); the definition is :func:`dynconv.reference.dcn_sample`.

Layouts are the ops' channels-last ones: ``value [B, H, W, C]``, ``offset [B, H_out, W_out, G, P, 2]``,
``mask [B, H_out, W_out, G, P]``, ``out [B, H_out, W_out, C]`` (contiguous: the launchers copy when needed).
A program covers ``BLOCK_Q`` output pixels of one group of one sample, with all ``C/G`` channels of the group in
one ``BLOCK_C`` vector (channels-last makes each corner's load one contiguous run of ``C/G`` values, as the
official DCNv4 kernel reads them), and loops over the P kernel points; ``BLOCK_Q`` shrinks as ``BLOCK_C`` grows
(:func:`dynconv.kernels._launch.dcnv_config`).

* ``forward``: per point, four masked corner loads ``[BLOCK_Q, BLOCK_C]`` weighted by the bilinear weights
  times the modulation, accumulated in fp32 (fp64 for fp64 inputs).
* ``backward``: the same loop; ``grad_mask`` and ``grad_offset`` are reductions over the group's channels
  inside the program (no atomics); ``grad_value`` is a scatter to the four corners: fp32 ``atomic_add`` by
  default, or, when ``torch.are_deterministic_algorithms_enabled()``, the kernel writes every contribution
  and its row and ``index_put_(accumulate=True)`` (deterministic in that mode) sums them: P*4 times the
  output in memory, the price of determinism.

``TRITON_INTERPRET`` is read by ``triton.jit`` when this module is imported.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from dynconv.kernels import _launch as L

__all__ = ["forward", "backward"]

# Whether the kernels below were created by the interpreter (decided when this module was imported).
INTERPRETED = L.triton_interpret()


@triton.jit
def _corner(value_ptr, row_base, yy, xx, H, W, C, c, qmask, cmask):
    valid = qmask & (yy >= 0) & (yy < H) & (xx >= 0) & (xx < W)
    ptr = value_ptr + row_base + ((yy * W + xx).to(tl.int64) * C)[:, None] + c[None, :]
    return tl.load(ptr, mask=valid[:, None] & cmask[None, :], other=0.0), valid


@triton.jit
def _point(offset_ptr, mask_ptr, om, k, qmask, base_x, base_y, offset_scale,
           KH: tl.constexpr, KW: tl.constexpr, DH: tl.constexpr, DW: tl.constexpr,
           REMOVE_CENTER: tl.constexpr, ACC: tl.constexpr):  # fmt: skip
    kk = k
    if REMOVE_CENTER:
        kk = tl.where(k >= (KW // 2) * KH + KH // 2, k + 1, k)
    ix = kk // KH
    iy = kk % KH
    gx = (ix * DW - (DW * (KW - 1)) // 2).to(ACC)
    gy = (iy * DH - (DH * (KH - 1)) // 2).to(ACC)
    ox = tl.load(offset_ptr + 2 * (om + k), mask=qmask, other=0.0).to(ACC)
    oy = tl.load(offset_ptr + 2 * (om + k) + 1, mask=qmask, other=0.0).to(ACC)
    m = tl.load(mask_ptr + om + k, mask=qmask, other=0.0).to(ACC)
    px = base_x + (gx + ox) * offset_scale
    py = base_y + (gy + oy) * offset_scale
    x0f = tl.floor(px)
    y0f = tl.floor(py)
    return px - x0f, py - y0f, x0f.to(tl.int32), y0f.to(tl.int32), m


@triton.jit
def _dcn_forward_kernel(value_ptr, offset_ptr, mask_ptr, out_ptr, scale_ptr, H, W, HO, WO,
                        G: tl.constexpr, CG: tl.constexpr, P: tl.constexpr,
                        KH: tl.constexpr, KW: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr,
                        PH: tl.constexpr, PW: tl.constexpr, DH: tl.constexpr, DW: tl.constexpr,
                        REMOVE_CENTER: tl.constexpr, ACC: tl.constexpr,
                        BLOCK_Q: tl.constexpr, BLOCK_C: tl.constexpr):  # fmt: skip
    pid_q = tl.program_id(0)
    g = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)  # with it every offset below is int64: tensors may pass 2**31 elements
    C = G * CG
    # offset_scale from a one-element tensor of the accumulation dtype: a Python float argument is fp32 on
    # the GPU (the interpreter keeps it fp64), which cost fp64 inputs 8 digits.
    offset_scale = tl.load(scale_ptr).to(ACC)
    q = pid_q * BLOCK_Q + tl.arange(0, BLOCK_Q)
    qmask = q < HO * WO
    ho = q // WO
    wo = q % WO
    c = tl.arange(0, BLOCK_C)
    cmask = c < CG
    base_y = (ho * SH - PH + (DH * (KH - 1)) // 2).to(ACC)
    base_x = (wo * SW - PW + (DW * (KW - 1)) // 2).to(ACC)
    om = ((b * HO * WO + q) * G + g) * P
    row_base = b * H * W * C + g * CG
    acc = tl.zeros((BLOCK_Q, BLOCK_C), dtype=ACC)
    for k in range(P):
        fx, fy, x0, y0, m = _point(offset_ptr, mask_ptr, om, k, qmask, base_x, base_y, offset_scale,
                                   KH, KW, DH, DW, REMOVE_CENTER, ACC)  # fmt: skip
        v00, _ = _corner(value_ptr, row_base, y0, x0, H, W, C, c, qmask, cmask)
        v01, _ = _corner(value_ptr, row_base, y0, x0 + 1, H, W, C, c, qmask, cmask)
        v10, _ = _corner(value_ptr, row_base, y0 + 1, x0, H, W, C, c, qmask, cmask)
        v11, _ = _corner(value_ptr, row_base, y0 + 1, x0 + 1, H, W, C, c, qmask, cmask)
        acc += ((1 - fy) * (1 - fx) * m)[:, None] * v00.to(ACC)
        acc += ((1 - fy) * fx * m)[:, None] * v01.to(ACC)
        acc += (fy * (1 - fx) * m)[:, None] * v10.to(ACC)
        acc += (fy * fx * m)[:, None] * v11.to(ACC)
    out = out_ptr + ((b * HO * WO + q) * C + g * CG)[:, None] + c[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=qmask[:, None] & cmask[None, :])


@triton.jit
def _scatter(grad_value_ptr, contrib_ptr, rows_ptr, slot, row_base, yy, xx, valid, H, W, C, c, qmask, cmask, coeff,
             gy, b, DETERMINISTIC: tl.constexpr, BLOCK_C: tl.constexpr):  # fmt: skip
    contrib = coeff[:, None] * gy
    if DETERMINISTIC:
        # contribution [slot, BLOCK_C] and its target row b*H*W + y*W + x (B*H*W, a dump row, when outside)
        tl.store(contrib_ptr + slot[:, None] * BLOCK_C + tl.arange(0, BLOCK_C)[None, :], contrib, mask=qmask[:, None])
        row = tl.where(valid, b * H * W + yy * W + xx, -1)
        tl.store(rows_ptr + slot, row, mask=qmask)
    else:
        ptr = grad_value_ptr + row_base + ((yy * W + xx).to(tl.int64) * C)[:, None] + c[None, :]
        tl.atomic_add(ptr, contrib, mask=valid[:, None] & cmask[None, :])


@triton.jit
def _dcn_backward_kernel(value_ptr, offset_ptr, mask_ptr, grad_out_ptr, grad_value_ptr, grad_offset_ptr,
                         grad_mask_ptr, contrib_ptr, rows_ptr, scale_ptr, H, W, HO, WO,
                         G: tl.constexpr, CG: tl.constexpr, P: tl.constexpr,
                         KH: tl.constexpr, KW: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr,
                         PH: tl.constexpr, PW: tl.constexpr, DH: tl.constexpr, DW: tl.constexpr,
                         REMOVE_CENTER: tl.constexpr, ACC: tl.constexpr, NEED_VALUE: tl.constexpr,
                         DETERMINISTIC: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_C: tl.constexpr):  # fmt: skip
    pid_q = tl.program_id(0)
    g = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)  # with it every offset below is int64: tensors may pass 2**31 elements
    C = G * CG
    # offset_scale from a one-element tensor of the accumulation dtype: a Python float argument is fp32 on
    # the GPU (the interpreter keeps it fp64), which cost fp64 inputs 8 digits.
    offset_scale = tl.load(scale_ptr).to(ACC)
    q = pid_q * BLOCK_Q + tl.arange(0, BLOCK_Q)
    qmask = q < HO * WO
    ho = q // WO
    wo = q % WO
    c = tl.arange(0, BLOCK_C)
    cmask = c < CG
    base_y = (ho * SH - PH + (DH * (KH - 1)) // 2).to(ACC)
    base_x = (wo * SW - PW + (DW * (KW - 1)) // 2).to(ACC)
    om = ((b * HO * WO + q) * G + g) * P
    row_base = b * H * W * C + g * CG
    gy_ptr = grad_out_ptr + ((b * HO * WO + q) * C + g * CG)[:, None] + c[None, :]
    gy = tl.load(gy_ptr, mask=qmask[:, None] & cmask[None, :], other=0.0).to(ACC)
    for k in range(P):
        fx, fy, x0, y0, m = _point(offset_ptr, mask_ptr, om, k, qmask, base_x, base_y, offset_scale,
                                   KH, KW, DH, DW, REMOVE_CENTER, ACC)  # fmt: skip
        v00, ok00 = _corner(value_ptr, row_base, y0, x0, H, W, C, c, qmask, cmask)
        v01, ok01 = _corner(value_ptr, row_base, y0, x0 + 1, H, W, C, c, qmask, cmask)
        v10, ok10 = _corner(value_ptr, row_base, y0 + 1, x0, H, W, C, c, qmask, cmask)
        v11, ok11 = _corner(value_ptr, row_base, y0 + 1, x0 + 1, H, W, C, c, qmask, cmask)
        v00, v01, v10, v11 = v00.to(ACC), v01.to(ACC), v10.to(ACC), v11.to(ACC)
        sampled = ((1 - fy) * (1 - fx))[:, None] * v00 + ((1 - fy) * fx)[:, None] * v01
        sampled += (fy * (1 - fx))[:, None] * v10 + (fy * fx)[:, None] * v11
        tl.store(grad_mask_ptr + om + k, tl.sum(gy * sampled, axis=1), mask=qmask)
        d_x = (1 - fy)[:, None] * (v01 - v00) + fy[:, None] * (v11 - v10)
        d_y = (1 - fx)[:, None] * (v10 - v00) + fx[:, None] * (v11 - v01)
        tl.store(grad_offset_ptr + 2 * (om + k), tl.sum(gy * d_x, axis=1) * m * offset_scale, mask=qmask)
        tl.store(grad_offset_ptr + 2 * (om + k) + 1, tl.sum(gy * d_y, axis=1) * m * offset_scale, mask=qmask)
        if NEED_VALUE:
            slot = (om + k) * 4
            _scatter(grad_value_ptr, contrib_ptr, rows_ptr, slot, row_base, y0, x0, ok00, H, W, C, c, qmask, cmask,
                     (1 - fy) * (1 - fx) * m, gy, b, DETERMINISTIC, BLOCK_C)  # fmt: skip
            _scatter(grad_value_ptr, contrib_ptr, rows_ptr, slot + 1, row_base, y0, x0 + 1, ok01, H, W, C, c, qmask,
                     cmask, (1 - fy) * fx * m, gy, b, DETERMINISTIC, BLOCK_C)  # fmt: skip
            _scatter(grad_value_ptr, contrib_ptr, rows_ptr, slot + 2, row_base, y0 + 1, x0, ok10, H, W, C, c, qmask,
                     cmask, fy * (1 - fx) * m, gy, b, DETERMINISTIC, BLOCK_C)  # fmt: skip
            _scatter(grad_value_ptr, contrib_ptr, rows_ptr, slot + 3, row_base, y0 + 1, x0 + 1, ok11, H, W, C, c, qmask,
                     cmask, fy * fx * m, gy, b, DETERMINISTIC, BLOCK_C)  # fmt: skip


def _meta(value, offset, kernel_size, stride, padding, dilation, remove_center):
    B, H, W, C = value.shape
    _, Ho, Wo, G, P, _ = offset.shape
    Cg = C // G
    f64 = L.acc_is_f64(value.dtype)
    config = L.dcnv_config(Cg, f64, interpreted=INTERPRETED)
    meta = dict(G=G, CG=Cg, P=P, KH=kernel_size[0], KW=kernel_size[1], SH=stride[0], SW=stride[1])
    meta.update(PH=padding[0], PW=padding[1], DH=dilation[0], DW=dilation[1], REMOVE_CENTER=remove_center)
    meta.update(ACC=tl.float64 if f64 else tl.float32, **config)
    grid = (triton.cdiv(Ho * Wo, config["BLOCK_Q"]), G, B)
    return meta, grid


def _scale(offset_scale: float, value: torch.Tensor) -> torch.Tensor:
    return torch.full((1,), offset_scale, dtype=L.acc_dtype(value.dtype), device=value.device)


def forward(value, offset, mask, kernel_size, stride, padding, dilation, offset_scale, remove_center):
    """``[B, H_out, W_out, C]`` in the dtype of ``value`` (the launcher of :func:`_dcn_forward_kernel`)."""
    L.check_launchable(value, offset, mask, interpreted=INTERPRETED)
    value, offset, mask = value.contiguous(), offset.contiguous(), mask.contiguous()
    B, H, W, C = value.shape
    _, Ho, Wo = offset.shape[:3]
    out = value.new_empty((B, Ho, Wo, C))
    meta, grid = _meta(value, offset, kernel_size, stride, padding, dilation, remove_center)
    with L.on_device(value):
        _dcn_forward_kernel[grid](value, offset, mask, out, _scale(offset_scale, value), H, W, Ho, Wo, **meta)
    return out


def backward(grad_out, value, offset, mask, kernel_size, stride, padding, dilation, offset_scale, remove_center,
             needs, deterministic=None):  # fmt: skip
    """Gradients wrt ``value``, ``offset`` and ``mask`` (one not in ``needs`` comes back empty).

    ``deterministic=None`` follows ``torch.are_deterministic_algorithms_enabled()``.
    """
    need_value, need_offset, need_mask = needs
    deterministic = L.resolve_deterministic(deterministic)
    L.check_launchable(grad_out, value, offset, mask, interpreted=INTERPRETED)
    value, offset, mask = value.contiguous(), offset.contiguous(), mask.contiguous()
    grad_out = grad_out.contiguous()
    B, H, W, C = value.shape
    _, Ho, Wo, G, P, _ = offset.shape
    meta, grid = _meta(value, offset, kernel_size, stride, padding, dilation, remove_center)
    acc = L.acc_dtype(value.dtype)
    grad_offset = torch.empty(offset.shape, dtype=acc, device=value.device)
    grad_mask = torch.empty(mask.shape, dtype=acc, device=value.device)
    grad_value = torch.zeros(value.shape, dtype=acc, device=value.device) if need_value else grad_offset
    contrib = rows = grad_offset  # placeholders, never read when not deterministic
    if need_value and deterministic:
        slots = B * Ho * Wo * G * P * 4
        contrib = torch.empty((slots, meta["BLOCK_C"]), dtype=acc, device=value.device)
        rows = torch.empty(slots, dtype=torch.int64, device=value.device)
    with L.on_device(value):
        _dcn_backward_kernel[grid](
            value, offset, mask, grad_out, grad_value, grad_offset, grad_mask, contrib, rows,
            _scale(offset_scale, value), H, W, Ho, Wo,
            NEED_VALUE=need_value, DETERMINISTIC=bool(deterministic), **meta,
        )  # fmt: skip
    if need_value and deterministic:
        groups = torch.arange(G, device=value.device).repeat_interleave(P * 4).repeat(B * Ho * Wo)
        keep = rows >= 0
        rows_view = grad_value.view(B * H * W, G, C // G)
        rows_view.index_put_((rows[keep], groups[keep]), contrib[keep, : C // G], accumulate=True)
    grad_value = grad_value.to(value.dtype) if need_value else value.new_empty(0)
    grad_offset = grad_offset.to(offset.dtype) if need_offset else offset.new_empty(0)
    grad_mask = grad_mask.to(mask.dtype) if need_mask else mask.new_empty(0)
    return grad_value, grad_offset, grad_mask
