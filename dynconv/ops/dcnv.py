"""``dynconv::dcn_sample``: the DCNv3/DCNv4 sampling core behind :func:`dynconv.dcnv3` and :func:`dynconv.dcnv4`.

The op takes channels-last ``value [B, H, W, C]``, offsets ``[B, H_out, W_out, G, P, 2]`` and modulation
``[B, H_out, W_out, G, P]`` (normalised arguments; see :func:`dynconv.reference.dcn_sample` for the exact
sampling locations) and returns ``[B, H_out, W_out, C]``.

The ``torch`` backend samples the P kernel points with ``grid_sample`` over all groups at once
(``[B*G, C/G, H, W]``, grid ``[B*G, H_out*W_out, n, 2]``) and has a hand-written backward
(``aten.grid_sampler_2d_backward``), so autograd saves only the inputs. InternImage's ``dcnv3_core_pytorch``
samples all P points in one call and lets autograd keep the ``[B*G, C/G, H_out*W_out, P]`` samples (P times
the output) until the backward; here that tensor is a temporary, and the points are taken in chunks whose
samples fit in :data:`CHUNK_BYTES` (one point per chunk at the largest sizes). Measured in ``docs/benchmarks.md``
(an earlier one-point-at-a-time loop was 1.3-4x slower forward on CPU).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dynconv.backends import TRITON_OPS
from dynconv.kernels._launch import acc_dtype
from dynconv.ops._autograd import refuse_double_backward
from dynconv.reference import dcn_kernel_points

__all__ = ["dcn_sample_op"]

# The Triton kernels (dynconv/kernels/dcnv.py) accumulate in fp32, and in fp64 for fp64 inputs (gradcheck).
for _op in ("dcnv3", "dcnv4"):
    TRITON_OPS[_op] = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _grouped_nchw(t: torch.Tensor, G: int, dtype: torch.dtype) -> torch.Tensor:
    """``[B, H, W, C]`` -> contiguous ``[B*G, C/G, H, W]`` of ``dtype`` (the layout grid_sample reads)."""
    B, H, W, C = t.shape
    return t.permute(0, 3, 1, 2).to(dtype).reshape(B * G, C // G, H, W).contiguous()


# Bytes of the [B*G, C/G, H_out*W_out, n] temporaries a chunk of n kernel points may take (see _chunks).
CHUNK_BYTES = 256 * 2**20


def _chunks(P: int, per_point_bytes: int) -> list[tuple[int, int]]:
    """Split the P kernel points into chunks whose sampled values fit in :data:`CHUNK_BYTES` (at least one point)."""
    n = max(1, min(P, CHUNK_BYTES // max(1, per_point_bytes)))
    return [(k, min(P, k + n)) for k in range(0, P, n)]


class _Geometry:
    """Normalised ``grid_sample`` grids of the kernel points (align_corners=False, pixel centres at integers)."""

    def __init__(self, value_hw, offset, kernel_size, stride, padding, dilation, offset_scale, remove_center, acc):
        H, W = value_hw
        B, Ho, Wo, G, P, _ = offset.shape
        kh, kw = kernel_size
        (sh, sw), (ph, pw), (dh, dw) = stride, padding, dilation
        device = offset.device
        self.scale, self.B, self.G, self.Q = offset_scale, B, G, Ho * Wo
        self.points = torch.tensor(dcn_kernel_points(kernel_size, dilation, remove_center), dtype=acc, device=device)
        # Base pixel coordinates (x, y) of every output position, before the kernel point and the offset.
        ys = torch.arange(Ho, device=device, dtype=acc) * sh - ph + (dh * (kh - 1)) // 2
        xs = torch.arange(Wo, device=device, dtype=acc) * sw - pw + (dw * (kw - 1)) // 2
        self.base = torch.stack(torch.meshgrid(xs, ys, indexing="xy"), -1).view(1, Ho * Wo, 1, 2)
        self.size = torch.tensor([W, H], dtype=acc, device=device)
        self.offset, self.acc = offset, acc

    def grid(self, k0: int, k1: int) -> torch.Tensor:
        """The grid of points ``k0 .. k1 - 1``: ``[B*G, H_out*W_out, k1 - k0, 2]``."""
        off = self.offset[..., k0:k1, :].to(self.acc).permute(0, 3, 1, 2, 4, 5)
        off = off.reshape(self.B * self.G, self.Q, k1 - k0, 2)  # explicit sizes: B may be 0
        loc = self.base + (self.points[k0:k1] + off) * self.scale
        # align_corners=False maps pixel coordinate p to (2p + 1) / size - 1.
        return (2 * loc + 1) / self.size - 1


def _mask_chunk(mask: torch.Tensor, k0: int, k1: int, acc: torch.dtype) -> torch.Tensor:
    """``mask[..., k0:k1]`` as ``[B*G, 1, H_out*W_out, k1 - k0]``."""
    B, Ho, Wo, G, _ = mask.shape
    return mask[..., k0:k1].to(acc).permute(0, 3, 1, 2, 4).reshape(B * G, 1, Ho * Wo, k1 - k0)


def _sample(xg: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    return F.grid_sample(xg, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def _torch_forward(value, offset, mask, kernel_size, stride, padding, dilation, offset_scale, remove_center):
    B, H, W, C = value.shape
    _, Ho, Wo, G, P, _ = offset.shape
    acc = acc_dtype(value.dtype)
    xg = _grouped_nchw(value, G, acc)
    geom = _Geometry((H, W), offset, kernel_size, stride, padding, dilation, offset_scale, remove_center, acc)
    out = torch.zeros((B * G, C // G, Ho * Wo), dtype=acc, device=value.device)
    for k0, k1 in _chunks(P, B * C * Ho * Wo * xg.element_size()):
        sampled = _sample(xg, geom.grid(k0, k1))  # [B*G, C/G, Ho*Wo, n]
        out += sampled.mul_(_mask_chunk(mask, k0, k1, acc)).sum(-1)
    return out.view(B, C, Ho, Wo).permute(0, 2, 3, 1).to(value.dtype).contiguous()


def _torch_backward(
    grad_out, value, offset, mask, kernel_size, stride, padding, dilation, offset_scale, remove_center, needs
):
    need_value, need_offset, need_mask = needs
    B, H, W, C = value.shape
    _, Ho, Wo, G, P, _ = offset.shape
    acc = acc_dtype(value.dtype)
    xg = _grouped_nchw(value, G, acc)
    gy = _grouped_nchw(grad_out, G, acc).view(B * G, C // G, Ho * Wo, 1)
    geom = _Geometry((H, W), offset, kernel_size, stride, padding, dilation, offset_scale, remove_center, acc)
    grad_x = torch.zeros_like(xg) if need_value else None
    grad_off = torch.empty((B * G, Ho * Wo, P, 2), dtype=acc, device=value.device) if need_offset else None
    grad_m = torch.empty((B * G, Ho * Wo, P), dtype=acc, device=value.device) if need_mask else None
    # d(grid coordinate)/d(offset) = offset_scale * 2 / size (the inverse of the normalisation in _Geometry.grid).
    dgrid = offset_scale * 2 / geom.size
    for k0, k1 in _chunks(P, B * C * Ho * Wo * xg.element_size()):
        grid = geom.grid(k0, k1)
        if need_mask:
            grad_m[:, :, k0:k1] = _sample(xg, grid).mul_(gy).sum(1)
        if need_value or need_offset:
            # interpolation 0 = bilinear, padding 0 = zeros; grad_input sums the chunk's points inside aten.
            gx_k, ggrid = torch.ops.aten.grid_sampler_2d_backward(
                gy * _mask_chunk(mask, k0, k1, acc), xg, grid, 0, 0, False, [need_value, need_offset]
            )
            if need_value:
                grad_x += gx_k
            if need_offset:
                grad_off[:, :, k0:k1] = ggrid * dgrid
    grad_value = (
        grad_x.view(B, C, H, W).permute(0, 2, 3, 1).to(value.dtype).contiguous() if need_value else value.new_empty(0)
    )
    if need_offset:
        grad_offset = grad_off.view(B, G, Ho, Wo, P, 2).permute(0, 2, 3, 1, 4, 5).to(offset.dtype).contiguous()
    else:
        grad_offset = offset.new_empty(0)
    if need_mask:
        grad_mask = grad_m.view(B, G, Ho, Wo, P).permute(0, 2, 3, 1, 4).to(mask.dtype).contiguous()
    else:
        grad_mask = mask.new_empty(0)
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
    deterministic: bool = False,
) -> torch.Tensor:
    """Forward of the DCNv3/DCNv4 sampling core on validated arguments (see :func:`dynconv.dcnv3`).

    ``deterministic`` selects the Triton backward's order-independent scatter of ``grad value`` (the torch backend
    ignores it)."""
    if backend == "triton":
        from dynconv.kernels import dcnv as kernels

        return kernels.forward(value, offset, mask, kernel_size, stride, padding, dilation, offset_scale, remove_center)
    return _torch_forward(value, offset, mask, kernel_size, stride, padding, dilation, offset_scale, remove_center)


@dcn_sample_op.register_fake
def _(value, offset, mask, *args):  # args: kernel_size .. backend, deterministic
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
    deterministic: bool,
    need_value: bool,
    need_offset: bool,
    need_mask: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of ``dcn_sample`` wrt ``value``, ``offset`` and ``mask``; one not needed comes back empty."""
    if backend == "triton":
        from dynconv.kernels import dcnv as kernels

        needs = (need_value, need_offset, need_mask)
        args = (kernel_size, stride, padding, dilation, offset_scale, remove_center, needs, deterministic)
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
        return (None,) * 11
    grads = dcn_sample_backward_op(grad_out.contiguous(), value, offset, mask, *ctx.args, *needs)
    return tuple(g if need else None for g, need in zip(grads, needs)) + (None,) * 8


dcn_sample_op.register_autograd(_backward, setup_context=_setup_context)
refuse_double_backward(dcn_sample_backward_op, "dcnv3/dcnv4")
