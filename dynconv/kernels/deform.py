"""Triton launchers of deformable convolution (DCNv1/v2; Dai et al., ICCV 2017; Zhu et al., CVPR 2019).

The sampling core (:mod:`dynconv.kernels._sampling`) gathers the bilinear columns (an im2col with offsets and
mask) straight from ``x`` in any strides, rows ordered ``[image, output pixel, tap, offset group] x channels``
as the torch backend orders them, so the convolution is one matmul done by torch (:mod:`dynconv._columns`,
cuBLAS on a GPU). The backward walks the same rows: the column gradient (one matmul) gives the offset and mask
gradients as per-row dot products with the corners, and the input gradient by a scatter, atomic or
deterministic. Images are processed in chunks whose columns fit :data:`dynconv._columns.COLUMN_BUDGET_BYTES`.
"""

from __future__ import annotations

import torch

from dynconv import _columns as cm
from dynconv.kernels import _launch as L
from dynconv.kernels import _sampling as S

__all__ = ["backward", "forward"]

INTERPRETED = S.INTERPRETED
# Block overrides for the launch rule (dynconv.kernels._launch.sampling_config); tests shrink the blocks here.
CONFIG: dict = {}
META = dict(GRID=S.GRID_CONV, OFFSET_XY=False, REMOVE_CENTER=False, PAD=0, MODE=0, PIXEL_MAJOR=False)


def _rule(weight, offset, stride, padding, dilation) -> S.Rule:
    K = weight.shape[2] * weight.shape[3]
    G = offset.shape[1] // (2 * K)
    return S.Rule(list(weight.shape[2:]), stride, padding, dilation, G, K, 1, META, blocks=CONFIG)


def _columns(x, offset, mask, b0, b1, rule: S.Rule) -> torch.Tensor:
    """The columns ``[(b1 - b0)*H_out*W_out, K*C]`` (fp32, fp64 for fp64) of images ``b0:b1``."""
    C = x.shape[1]
    Ho, Wo = offset.shape[-2:]
    cols = torch.empty((b1 - b0, Ho, Wo, rule.row_taps, C), dtype=L.acc_dtype(x.dtype), device=x.device)
    m = mask[b0:b1] if mask is not None else None
    S.gather(x[b0:b1], offset[b0:b1], m, cols.permute(0, 4, 1, 2, 3), rule)
    return cols.view(-1, rule.row_taps * C)


def forward(x, offset, weight, bias, mask, kernel_size, stride, padding, dilation):
    """Forward on validated arguments: Triton columns per chunk of images, then one torch matmul per chunk."""
    L.check_launchable(x, offset, weight, interpreted=INTERPRETED)
    B, C = x.shape[:2]
    Co = weight.shape[0]
    Ho, Wo = offset.shape[-2:]
    rule = _rule(weight, offset, stride, padding, dilation)
    acc = L.acc_dtype(x.dtype)
    wacc, bacc = weight.to(acc), bias.to(acc) if bias is not None else None
    out = torch.empty((B, Ho, Wo, Co), dtype=x.dtype, device=x.device)
    step = cm.images_per_chunk(Ho * Wo * rule.row_taps * C, B)
    for b0 in range(0, B, step):
        b1 = min(B, b0 + step)
        cols = _columns(x, offset, mask, b0, b1, rule)
        out[b0:b1].view(-1, Co).copy_(cm.columns_matmul(cols, wacc, C // weight.shape[1], bacc))
    return out.permute(0, 3, 1, 2).contiguous()


def backward(grad_out, x, offset, weight, mask, kernel_size, stride, padding, dilation, needs, deterministic=None):
    """Gradients wrt ``(x, offset, weight, bias, mask)`` (empty where ``needs`` is False).

    ``deterministic=None`` follows ``torch.are_deterministic_algorithms_enabled()``: atomics when it is off,
    the sorted two-pass accumulation when it is on.
    """
    need_x, need_offset, need_weight, need_bias, need_mask = needs
    atomic = not L.resolve_deterministic(deterministic)
    L.check_launchable(grad_out, x, offset, weight, interpreted=INTERPRETED)
    B, C, H, W = x.shape
    Co = weight.shape[0]
    Ho, Wo = offset.shape[-2:]
    G_w = C // weight.shape[1]
    rule = _rule(weight, offset, stride, padding, dilation)
    K = rule.row_taps
    acc = L.acc_dtype(x.dtype)
    wacc = weight.to(acc)
    grad_x = torch.zeros((B, C, H, W), dtype=acc, device=x.device) if need_x else None
    grad_offset = torch.empty(offset.shape, dtype=acc, device=x.device) if need_offset else None
    grad_mask = torch.empty(mask.shape, dtype=acc, device=x.device) if need_mask else None
    grad_weight = torch.zeros(weight.shape, dtype=acc, device=x.device) if need_weight else None
    gout_nhwc = grad_out.permute(0, 2, 3, 1)
    grad_bias = gout_nhwc.to(acc).sum((0, 1, 2)).to(weight.dtype) if need_bias else None
    step = cm.images_per_chunk(Ho * Wo * K * C, B)
    for b0 in range(0, B, step):
        b1 = min(B, b0 + step)
        gout2d = gout_nhwc[b0:b1].to(acc).reshape(-1, Co)
        if need_weight:
            cols = _columns(x, offset, mask, b0, b1, rule)
            grad_weight += cm.grad_weight(cols, gout2d, weight.shape, G_w)
            del cols
        if need_x or need_offset or need_mask:
            gcols = cm.grad_columns(gout2d, wacc, G_w).view(b1 - b0, Ho, Wo, K, C).permute(0, 4, 1, 2, 3)
            chunk = [t[b0:b1] if t is not None else None for t in (x, offset, mask, grad_x, grad_offset, grad_mask)]
            S.scatter(gcols, *chunk, rule, atomic)
    # Outputs of a custom op must not alias each other, so every missing gradient is its own empty tensor.
    return (
        grad_x.to(x.dtype) if need_x else x.new_empty(0),
        grad_offset.to(offset.dtype) if need_offset else x.new_empty(0),
        grad_weight.to(weight.dtype) if need_weight else x.new_empty(0),
        grad_bias if need_bias else x.new_empty(0),
        grad_mask.to(mask.dtype) if need_mask else x.new_empty(0),
    )
