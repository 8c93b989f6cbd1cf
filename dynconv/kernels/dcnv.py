"""Triton launchers of the DCNv3/DCNv4 sampling (InternImage's DCNv3, Wang et al., CVPR 2023; DCNv4, Xiong et
al., CVPR 2024); the definition is :func:`dynconv.reference.dcn_sample`.

Layouts are the ops' channels-last ones: ``value [B, H, W, C]``, ``offset [B, H_out, W_out, G, P, 2]``,
``mask [B, H_out, W_out, G, P]``, ``out [B, H_out, W_out, C]`` (the launchers make them contiguous). In the
sampling core (:mod:`dynconv.kernels._sampling`) a row is (image, output pixel, group) and its P points are
summed; with channels last, each corner's load is one contiguous run of ``C/G`` values, as the official DCNv4
kernel reads them. The backward reduces ``grad_mask`` and ``grad_offset`` over the group's channels inside the
program and scatters ``grad_value`` to the corners: fp32 (fp64 for fp64) atomics, or deterministically (P*4
times the output in memory, the price of determinism).
"""

from __future__ import annotations

import torch

from dynconv.kernels import _launch as L
from dynconv.kernels import _sampling as S

__all__ = ["backward", "forward"]

INTERPRETED = S.INTERPRETED
META = dict(GRID=S.GRID_DCN, OFFSET_XY=True, PAD=0, MODE=0, PIXEL_MAJOR=False)


def _views(value, offset, mask):
    """``[B, channels, H, W]`` views of the channels-last tensors (contiguous first)."""
    B, Ho, Wo = offset.shape[:3]
    return (
        value.permute(0, 3, 1, 2),
        offset.reshape(B, Ho, Wo, -1).permute(0, 3, 1, 2),
        mask.reshape(B, Ho, Wo, -1).permute(0, 3, 1, 2),
    )


def _rule(offset, kernel_size, stride, padding, dilation, offset_scale, remove_center) -> S.Rule:
    G, P = offset.shape[3:5]
    meta = dict(META, REMOVE_CENTER=remove_center)
    return S.Rule(kernel_size, stride, padding, dilation, G, 1, P, meta, offset_scale)


def forward(value, offset, mask, kernel_size, stride, padding, dilation, offset_scale, remove_center):
    """``[B, H_out, W_out, C]`` in the dtype of ``value``."""
    L.check_launchable(value, offset, mask, interpreted=INTERPRETED)
    value, offset, mask = value.contiguous(), offset.contiguous(), mask.contiguous()
    B, Ho, Wo = offset.shape[:3]
    out = value.new_empty((B, Ho, Wo, value.shape[3]))
    rule = _rule(offset, kernel_size, stride, padding, dilation, offset_scale, remove_center)
    S.gather(*_views(value, offset, mask), out.permute(0, 3, 1, 2).unsqueeze(-1), rule)
    return out


def backward(grad_out, value, offset, mask, kernel_size, stride, padding, dilation, offset_scale, remove_center,
             needs, deterministic=None):  # fmt: skip
    """Gradients wrt ``value``, ``offset`` and ``mask`` (one not in ``needs`` comes back empty).

    ``deterministic=None`` follows ``torch.are_deterministic_algorithms_enabled()``.
    """
    need_value, need_offset, need_mask = needs
    atomic = not L.resolve_deterministic(deterministic)
    L.check_launchable(grad_out, value, offset, mask, interpreted=INTERPRETED)
    value, offset, mask, grad_out = value.contiguous(), offset.contiguous(), mask.contiguous(), grad_out.contiguous()
    tensors = (value, offset, mask)
    acc = L.acc_dtype(value.dtype)
    grads = [torch.empty(t.shape, dtype=acc, device=t.device) if need else None for t, need in zip(tensors, needs)]
    if need_value:
        grads[0].zero_()
    gviews = _views(*(g if g is not None else t for g, t in zip(grads, tensors)))
    rule = _rule(offset, kernel_size, stride, padding, dilation, offset_scale, remove_center)
    gy = grad_out.permute(0, 3, 1, 2).unsqueeze(-1)
    S.scatter(gy, *_views(*tensors), *(v if n else None for v, n in zip(gviews, needs)), rule, atomic)
    return tuple(g.to(t.dtype) if g is not None else t.new_empty(0) for g, t in zip(grads, tensors))
