"""``dynconv::dcn_sample``: the DCNv3/DCNv4 sampling core behind :func:`dynconv.dcnv3` and :func:`dynconv.dcnv4`.

The op takes channels-last ``value [B, H, W, C]``, offsets ``[B, H_out, W_out, G, P, 2]`` and modulation
``[B, H_out, W_out, G, P]`` (normalised arguments; see :func:`dynconv.reference.dcn_sample` for the exact
sampling locations) and returns ``[B, H_out, W_out, C]``.

The ``torch`` backend loops over the P kernel points (not over pixels): one ``grid_sample`` per point over all
groups at once (``[B*G, C/G, H, W]``) accumulated in place into one fp32 buffer, and a hand-written backward
that runs the same loop with ``aten.grid_sampler_2d_backward``. Sampling all points in one ``grid_sample``
call, as InternImage's ``dcnv3_core_pytorch`` does, materialises a ``[B*G, C/G, H_out*W_out, P]`` tensor (P
times the output) and autograd keeps it for the backward; the loop keeps memory at inputs + outputs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dynconv.backends import TRITON_OPS
from dynconv.reference import dcn_kernel_points

__all__ = ["dcn_sample_op"]

# The Triton kernels (dynconv/kernels/dcnv.py) accumulate in fp32, and in fp64 for fp64 inputs (gradcheck).
for _op in ("dcnv3", "dcnv4"):
    TRITON_OPS[_op] = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    # fp16/bf16 accumulate in fp32 (CPU grid_sample has no half kernels either); fp64 stays fp64 for gradcheck.
    return torch.float64 if dtype == torch.float64 else torch.float32


def _grouped_nchw(t: torch.Tensor, G: int, dtype: torch.dtype) -> torch.Tensor:
    """``[B, H, W, C]`` -> contiguous ``[B*G, C/G, H, W]`` of ``dtype`` (the layout grid_sample reads)."""
    B, H, W, C = t.shape
    return t.permute(0, 3, 1, 2).to(dtype).reshape(B * G, C // G, H, W).contiguous()


class _Geometry:
    """Normalised ``grid_sample`` grids of each kernel point (align_corners=False, pixel centres at integers)."""

    def __init__(self, value_hw, offset, kernel_size, stride, padding, dilation, offset_scale, remove_center, acc):
        H, W = value_hw
        B, Ho, Wo, G, P, _ = offset.shape
        kh, kw = kernel_size
        (sh, sw), (ph, pw), (dh, dw) = stride, padding, dilation
        device = offset.device
        self.H, self.W, self.scale = H, W, offset_scale
        self.points = dcn_kernel_points(kernel_size, dilation, remove_center)
        # Base pixel coordinates of every output position (before the kernel point and the offset).
        self.ys = (torch.arange(Ho, device=device, dtype=acc) * sh - ph + (dh * (kh - 1)) // 2).view(1, 1, Ho, 1)
        self.xs = (torch.arange(Wo, device=device, dtype=acc) * sw - pw + (dw * (kw - 1)) // 2).view(1, 1, 1, Wo)
        # [B, G, P, 2, Ho, Wo] in acc: one strided read per point below.
        self.offset = offset.to(acc).permute(0, 3, 4, 5, 1, 2)
        self.shape = (B * G, Ho, Wo)

    def grid(self, k: int) -> torch.Tensor:
        dx, dy = self.points[k]
        px = self.xs + (dx + self.offset[:, :, k, 0]) * self.scale  # [B, G, Ho, Wo]
        py = self.ys + (dy + self.offset[:, :, k, 1]) * self.scale
        # align_corners=False maps pixel coordinate p to (2p + 1) / size - 1.
        gx = (2 * px + 1) / self.W - 1
        gy = (2 * py + 1) / self.H - 1
        return torch.stack((gx, gy), dim=-1).reshape(*self.shape, 2)


def _torch_forward(value, offset, mask, kernel_size, stride, padding, dilation, offset_scale, remove_center):
    B, H, W, C = value.shape
    _, Ho, Wo, G, P, _ = offset.shape
    acc = _acc_dtype(value.dtype)
    xg = _grouped_nchw(value, G, acc)
    geom = _Geometry((H, W), offset, kernel_size, stride, padding, dilation, offset_scale, remove_center, acc)
    m = mask.permute(0, 3, 4, 1, 2)  # [B, G, P, Ho, Wo]
    out = torch.zeros((B * G, C // G, Ho, Wo), dtype=acc, device=value.device)
    for k in range(P):
        sampled = F.grid_sample(xg, geom.grid(k), mode="bilinear", padding_mode="zeros", align_corners=False)
        out.addcmul_(sampled, m[:, :, k].reshape(B * G, 1, Ho, Wo).to(acc))
    return out.view(B, C, Ho, Wo).permute(0, 2, 3, 1).to(value.dtype).contiguous()


def _torch_backward(
    grad_out, value, offset, mask, kernel_size, stride, padding, dilation, offset_scale, remove_center, needs
):
    need_value, need_offset, need_mask = needs
    B, H, W, C = value.shape
    _, Ho, Wo, G, P, _ = offset.shape
    acc = _acc_dtype(value.dtype)
    xg = _grouped_nchw(value, G, acc)
    gy = _grouped_nchw(grad_out, G, acc)  # [B*G, C/G, Ho, Wo]
    geom = _Geometry((H, W), offset, kernel_size, stride, padding, dilation, offset_scale, remove_center, acc)
    m = mask.permute(0, 3, 4, 1, 2)
    grad_x = torch.zeros_like(xg) if need_value else None
    grad_off = torch.empty((B, G, P, 2, Ho, Wo), dtype=acc, device=value.device) if need_offset else None
    grad_m = torch.empty((B, G, P, Ho, Wo), dtype=acc, device=value.device) if need_mask else None
    # d(grid coordinate)/d(offset) = offset_scale * 2 / size (the inverse of the normalisation in _Geometry.grid).
    dgrid = (offset_scale * 2 / W, offset_scale * 2 / H)
    for k in range(P):
        grid = geom.grid(k)
        m_k = m[:, :, k].reshape(B * G, 1, Ho, Wo).to(acc)
        if need_mask:
            sampled = F.grid_sample(xg, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
            grad_m[:, :, k] = (sampled * gy).sum(1).view(B, G, Ho, Wo)
        if need_value or need_offset:
            # interpolation 0 = bilinear, padding 0 = zeros.
            gx_k, ggrid = torch.ops.aten.grid_sampler_2d_backward(
                gy * m_k, xg, grid, 0, 0, False, [need_value, need_offset]
            )
            if need_value:
                grad_x += gx_k
            if need_offset:
                ggrid = ggrid.view(B, G, Ho, Wo, 2)
                grad_off[:, :, k, 0] = ggrid[..., 0] * dgrid[0]
                grad_off[:, :, k, 1] = ggrid[..., 1] * dgrid[1]
    grad_value = (
        grad_x.view(B, C, H, W).permute(0, 2, 3, 1).to(value.dtype).contiguous() if need_value else value.new_empty(0)
    )
    grad_offset = (
        grad_off.permute(0, 4, 5, 1, 2, 3).to(offset.dtype).contiguous() if need_offset else offset.new_empty(0)
    )
    grad_mask = grad_m.permute(0, 3, 4, 1, 2).to(mask.dtype).contiguous() if need_mask else mask.new_empty(0)
    return grad_value, grad_offset, grad_mask


@torch.library.custom_op("dynconv::dcn_sample", mutates_args=())
def dcn_sample_op(
    value: torch.Tensor,
    offset: torch.Tensor,
    mask: torch.Tensor,
    kernel_size: list[int],
    stride: list[int],
    padding: list[int],
    dilation: list[int],
    offset_scale: float,
    remove_center: bool,
    backend: str,
) -> torch.Tensor:
    """Forward of the DCNv3/DCNv4 sampling core on validated arguments (see :func:`dynconv.dcnv3`)."""
    if backend == "triton":
        from dynconv.kernels import dcnv as kernels

        return kernels.forward(value, offset, mask, kernel_size, stride, padding, dilation, offset_scale, remove_center)
    return _torch_forward(value, offset, mask, kernel_size, stride, padding, dilation, offset_scale, remove_center)


@dcn_sample_op.register_fake
def _(value, offset, mask, kernel_size, stride, padding, dilation, offset_scale, remove_center, backend):
    B, Ho, Wo = offset.shape[:3]
    return value.new_empty((B, Ho, Wo, value.shape[3]))


@torch.library.custom_op("dynconv::dcn_sample_backward", mutates_args=())
def dcn_sample_backward_op(
    grad_out: torch.Tensor,
    value: torch.Tensor,
    offset: torch.Tensor,
    mask: torch.Tensor,
    kernel_size: list[int],
    stride: list[int],
    padding: list[int],
    dilation: list[int],
    offset_scale: float,
    remove_center: bool,
    backend: str,
    need_value: bool,
    need_offset: bool,
    need_mask: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of ``dcn_sample`` wrt ``value``, ``offset`` and ``mask``; one not needed comes back empty."""
    if backend == "triton":
        from dynconv.kernels import dcnv as kernels

        needs = (need_value, need_offset, need_mask)
        args = (kernel_size, stride, padding, dilation, offset_scale, remove_center, needs)
        return kernels.backward(grad_out, value, offset, mask, *args)
    return _torch_backward(
        grad_out,
        value,
        offset,
        mask,
        kernel_size,
        stride,
        padding,
        dilation,
        offset_scale,
        remove_center,
        (need_value, need_offset, need_mask),
    )


@dcn_sample_backward_op.register_fake
def _(grad_out, value, offset, mask, *args):
    need_value, need_offset, need_mask = args[-3:]
    return (
        value.new_empty(value.shape) if need_value else value.new_empty(0),
        offset.new_empty(offset.shape) if need_offset else offset.new_empty(0),
        mask.new_empty(mask.shape) if need_mask else mask.new_empty(0),
    )


def _setup_context(ctx, inputs, output):
    value, offset, mask = inputs[:3]
    ctx.save_for_backward(value, offset, mask)
    ctx.args = inputs[3:]


def _backward(ctx, grad_out):
    value, offset, mask = ctx.saved_tensors
    needs = ctx.needs_input_grad[:3]
    if not any(needs):
        return (None,) * 10
    grads = dcn_sample_backward_op(grad_out.contiguous(), value, offset, mask, *ctx.args, *needs)
    return tuple(g if need else None for g, need in zip(grads, needs)) + (None,) * 7


dcn_sample_op.register_autograd(_backward, setup_context=_setup_context)
