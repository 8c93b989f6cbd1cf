"""``dynconv::dcn_sample``: the DCNv3/DCNv4 sampling core behind :func:`dynconv.dcnv3` and :func:`dynconv.dcnv4`.

The op takes channels-last ``value [B, H, W, C]``, offsets ``[B, H_out, W_out, G, P, 2]`` and modulation
``[B, H_out, W_out, G, P]`` (normalised arguments; see :func:`dynconv.reference.dcn_sample` for the exact
sampling locations) and returns ``[B, H_out, W_out, C]``.

The ``torch`` backend samples the P kernel points with the shared sampler (:mod:`dynconv.ops._sampling`) over
all groups at once (``[B*G, C/G, H, W]``, grid ``[B*G, H_out*W_out, n, 2]``) and has a hand-written backward
(:func:`dynconv.ops._sampling.sample_backward`), so autograd saves only the inputs. InternImage's ``dcnv3_core_pytorch``
samples all P points in one call and lets autograd keep the ``[B*G, C/G, H_out*W_out, P]`` samples (P times
the output) until the backward; here that tensor is a temporary, and the points are taken in chunks whose
samples fit in :data:`CHUNK_BYTES` (one point per chunk at the largest sizes). Measured in ``docs/benchmarks.md``
(an earlier one-point-at-a-time loop was 1.3-4x slower forward on CPU).
"""

from __future__ import annotations

import torch

from dynconv.backends import TRITON_OPS
from dynconv.kernels._launch import acc_dtype
from dynconv.ops import _sampling
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
    """Sampling grids of the kernel points (:func:`dynconv.ops._sampling.pixel_grid`)."""

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
        self.H, self.W, self.offset, self.acc = H, W, offset, acc

    def grid(self, k0: int, k1: int) -> torch.Tensor:
        """The grid of points ``k0 .. k1 - 1``: ``[B*G, H_out*W_out, k1 - k0, 2]``."""
        off = self.offset[..., k0:k1, :].to(self.acc).permute(0, 3, 1, 2, 4, 5)
        off = off.reshape(self.B * self.G, self.Q, k1 - k0, 2)  # explicit sizes: B may be 0
        loc = self.base + (self.points[k0:k1] + off) * self.scale
        return _sampling.pixel_grid(loc[..., 0], loc[..., 1], self.H, self.W)


def _mask_chunk(mask: torch.Tensor, k0: int, k1: int, acc: torch.dtype) -> torch.Tensor:
    """``mask[..., k0:k1]`` as ``[B*G, 1, H_out*W_out, k1 - k0]``."""
    B, Ho, Wo, G, _ = mask.shape
    return mask[..., k0:k1].to(acc).permute(0, 3, 1, 2, 4).reshape(B * G, 1, Ho * Wo, k1 - k0)


def _torch_forward(value, offset, mask, kernel_size, stride, padding, dilation, offset_scale, remove_center):
    B, H, W, C = value.shape
    _, Ho, Wo, G, P, _ = offset.shape
    acc = acc_dtype(value.dtype)
    xg = _grouped_nchw(value, G, acc)
    geom = _Geometry((H, W), offset, kernel_size, stride, padding, dilation, offset_scale, remove_center, acc)
    out = torch.zeros((B * G, C // G, Ho * Wo), dtype=acc, device=value.device)
    for k0, k1 in _chunks(P, B * C * Ho * Wo * xg.element_size()):
        sampled = _sampling.sample(xg, geom.grid(k0, k1))  # [B*G, C/G, Ho*Wo, n]
        out += sampled.mul_(_mask_chunk(mask, k0, k1, acc)).sum(-1)
    return out.view(B, C, Ho, Wo).permute(0, 2, 3, 1).to(value.dtype).contiguous()


def _torch_backward(
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
    needs,
    deterministic=False,
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
    for k0, k1 in _chunks(P, B * C * Ho * Wo * xg.element_size()):
        grid = geom.grid(k0, k1)
        if need_mask:
            grad_m[:, :, k0:k1] = _sampling.sample(xg, grid).mul_(gy).sum(1)
        # The input gradient sums the chunk's points inside the sampler's backward.
        gx_k, gpos = _sampling.sample_backward(
            gy * _mask_chunk(mask, k0, k1, acc), xg, grid, need_value, need_offset, deterministic
        )
        if need_value:
            grad_x += gx_k
        if need_offset:
            grad_off[:, :, k0:k1] = gpos * offset_scale  # d(position)/d(offset) = offset_scale
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


# The forward's arguments, which the backward takes after grad_out: one schema for both ops.
_ARGS = (
    "Tensor value, Tensor offset, Tensor mask, int[] kernel_size, int[] stride, int[] padding, int[] dilation, "
    "float offset_scale, bool remove_center, str backend"
)


@torch.library.custom_op(
    "dynconv::dcn_sample", mutates_args=(), schema=f"({_ARGS}, bool deterministic=False) -> Tensor"
)
def dcn_sample_op(value: torch.Tensor, offset: torch.Tensor, mask: torch.Tensor, *args) -> torch.Tensor:
    """Forward of the DCNv3/DCNv4 sampling core on validated arguments (see :func:`dynconv.dcnv3`); ``args`` are
    ``kernel_size, stride, padding, dilation`` (int pairs as lists), ``offset_scale, remove_center``, the
    backend name and ``deterministic`` (the backward's order-independent scatter of ``grad value``)."""
    geometry, backend = args[:6], args[6]  # a trailing deterministic only matters to the backward
    if backend == "triton":
        from dynconv.kernels import dcnv as kernels

        return kernels.forward(value, offset, mask, *geometry)
    return _torch_forward(value, offset, mask, *geometry)


@dcn_sample_op.register_fake
def _(value, offset, mask, *args):
    B, Ho, Wo = offset.shape[:3]
    return value.new_empty((B, Ho, Wo, value.shape[3]))


@torch.library.custom_op(
    "dynconv::dcn_sample_backward",
    mutates_args=(),
    schema=(
        f"(Tensor grad_out, {_ARGS}, bool deterministic, bool need_value, bool need_offset, bool need_mask)"
        " -> (Tensor, Tensor, Tensor)"
    ),
)
def dcn_sample_backward_op(
    grad_out: torch.Tensor, value: torch.Tensor, offset: torch.Tensor, mask: torch.Tensor, *args
):
    """Gradients of ``dcn_sample`` wrt ``value``, ``offset`` and ``mask``; one not needed comes back empty. ``args``
    are the forward's, then ``need_value, need_offset, need_mask``."""
    *geometry, backend, deterministic = args[:-3]
    needs = tuple(args[-3:])
    if backend == "triton":
        from dynconv.kernels import dcnv as kernels

        return kernels.backward(grad_out, value, offset, mask, *geometry, needs, deterministic)
    return _torch_backward(grad_out, value, offset, mask, *geometry, needs, deterministic)


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
    ctx.args = (*inputs[3:], False) if len(inputs) == 10 else inputs[3:]  # deterministic omitted: its default


def _backward(ctx, grad_out):
    value, offset, mask = ctx.saved_tensors
    needs = ctx.needs_input_grad[:3]
    if not any(needs):
        return (None,) * (3 + len(ctx.args))
    grads = dcn_sample_backward_op(grad_out.contiguous(), value, offset, mask, *ctx.args, *needs)
    return tuple(g if need else None for g, need in zip(grads, needs)) + (None,) * len(ctx.args)


dcn_sample_op.register_autograd(_backward, setup_context=_setup_context)
refuse_double_backward(dcn_sample_backward_op, "dcnv3/dcnv4")
