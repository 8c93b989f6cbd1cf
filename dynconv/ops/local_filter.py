"""``dynconv::local_filter2d``: the custom op behind :func:`dynconv.local_filter2d`, with its autograd.

The op takes normalised arguments (5-D filters, pairs for every size) and a backend name, and runs the
``torch`` shift-and-accumulate implementation below or a Triton kernel. It is registered with
``torch.library`` together with a fake (meta) implementation, so ``torch.compile(fullgraph=True)``
traces through it without a graph break, and with a hand-written backward (itself a custom op).

Why shift-and-accumulate with a hand-written backward: the unfold formulation materialises a
``[B, C*k*k, H*W]`` tensor (k*k times the input), and autograd through a Python loop of taps keeps one
intermediate per tap. Looping over the k*k taps with an in-place ``addcmul_`` into one fp32 buffer
keeps memory at inputs + outputs, and the backward below is the same loop run the other way: grad of
``x`` accumulates ``grad_y * f_k`` into the shifted window of a padded buffer (a strided view, so no
atomics and deterministic), grad of the filters is ``sum_c grad_y * x_k`` per tap. Measured in
``docs/benchmarks.md``.
"""

from __future__ import annotations

import torch

from dynconv.backends import TRITON_OPS
from dynconv.kernels._launch import acc_dtype
from dynconv.ops._autograd import refuse_double_backward

__all__ = ["local_filter2d_op"]

# The Triton kernels (dynconv/kernels/local_filter.py) accumulate in fp32, and in fp64 for fp64 inputs, which
# lets gradcheck check them too.
TRITON_OPS["local_filter2d"] = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _padded(x: torch.Tensor, padding: list[int], dtype: torch.dtype) -> torch.Tensor:
    """``x`` zero-padded by ``padding`` as a contiguous NCHW tensor of ``dtype`` (one copy, also the layout change)."""
    B, C, H, W = x.shape
    ph, pw = padding
    if ph == 0 and pw == 0 and x.dtype == dtype and x.is_contiguous():
        return x
    xp = x.new_zeros((B, C, H + 2 * ph, W + 2 * pw), dtype=dtype)
    xp[:, :, ph : ph + H, pw : pw + W] = x
    return xp


def _tap_window(
    xp: torch.Tensor, i: int, j: int, out_hw: tuple[int, int], stride: list[int], dilation: list[int]
) -> torch.Tensor:
    """The strided view of the padded input that tap ``(i, j)`` reads for every output pixel."""
    Ho, Wo = out_hw
    h0, w0 = i * dilation[0], j * dilation[1]
    return xp[:, :, h0 : h0 + stride[0] * (Ho - 1) + 1 : stride[0], w0 : w0 + stride[1] * (Wo - 1) + 1 : stride[1]]


def _torch_forward(x, filters, kernel_size, stride, padding, dilation):
    B, C = x.shape[:2]
    _, G, K, Ho, Wo = filters.shape
    acc = acc_dtype(x.dtype)
    # Reading x in a low precision and accumulating in fp32 would mix dtypes in every addcmul_; one upcast
    # of x (fused with the padding copy) is cheaper than k*k upcasts of its windows.
    # The filters are upcast one tap at a time: a whole fp32 copy would be 2x their bf16 size.
    xp = _padded(x, padding, acc)
    out = torch.zeros((B, G, C // G, Ho, Wo), dtype=acc, device=x.device)
    kh, kw = kernel_size
    for i in range(kh):
        for j in range(kw):
            win = _tap_window(xp, i, j, (Ho, Wo), stride, dilation).unflatten(1, (G, C // G))
            out.addcmul_(win, filters[:, :, i * kw + j].unsqueeze(2).to(acc))
    return out.view(B, C, Ho, Wo).to(x.dtype)


def _torch_backward(grad_out, x, filters, kernel_size, stride, padding, dilation, need_x, need_f):
    B, C, H, W = x.shape
    _, G, K, Ho, Wo = filters.shape
    acc = acc_dtype(x.dtype)
    gy = grad_out.to(acc).contiguous().view(B, G, C // G, Ho, Wo)
    kh, kw = kernel_size
    ph, pw = padding
    grad_xp = x.new_zeros((B, C, H + 2 * ph, W + 2 * pw), dtype=acc) if need_x else None
    # grad_f is written tap by tap in the filters' dtype (sums are taken in fp32 before the cast).
    grad_f = torch.empty((B, G, K, Ho, Wo), dtype=filters.dtype, device=x.device) if need_f else None
    xp = _padded(x, padding, acc) if need_f else None
    # One product buffer reused by every tap: a fresh [B, C, H_out, W_out] temporary per tap costs a page
    # fault storm whenever the allocator returns it to the OS (measured 2.6x slower backward).
    prod = torch.empty_like(gy) if need_f else None
    for i in range(kh):
        for j in range(kw):
            k = i * kw + j
            if need_x:
                win = _tap_window(grad_xp, i, j, (Ho, Wo), stride, dilation).unflatten(1, (G, C // G))
                win.addcmul_(gy, filters[:, :, k].unsqueeze(2).to(acc))
            if need_f:
                win = _tap_window(xp, i, j, (Ho, Wo), stride, dilation).unflatten(1, (G, C // G))
                torch.mul(gy, win, out=prod)
                if grad_f.dtype == acc:
                    torch.sum(prod, dim=2, out=grad_f[:, :, k])
                else:
                    grad_f[:, :, k] = prod.sum(2)
    # The fake kernel promises contiguous gradients (inductor checks the strides), so crop with a copy.
    grad_x = grad_xp[:, :, ph : ph + H, pw : pw + W].to(x.dtype).contiguous() if need_x else x.new_empty(0)
    grad_f = grad_f if need_f else filters.new_empty(0)
    return grad_x, grad_f


# The forward's arguments, which the backward takes after grad_out: one schema for both ops.
_ARGS = "Tensor x, Tensor filters, int[] kernel_size, int[] stride, int[] padding, int[] dilation, str backend"


@torch.library.custom_op("dynconv::local_filter2d", mutates_args=(), schema=f"({_ARGS}) -> Tensor")
def local_filter2d_op(x: torch.Tensor, filters: torch.Tensor, *args) -> torch.Tensor:
    """Forward of dynamic local filtering on validated arguments (see :func:`dynconv.local_filter2d`); ``args`` are
    ``kernel_size, stride, padding, dilation`` (int pairs as lists) and the backend name."""
    *geometry, backend = args
    if backend == "triton":
        from dynconv.kernels import local_filter as kernels

        return kernels.forward(x, filters, *geometry)
    return _torch_forward(x, filters, *geometry)


@local_filter2d_op.register_fake
def _(x, filters, *args):
    B, C = x.shape[:2]
    Ho, Wo = filters.shape[-2:]
    return x.new_empty((B, C, Ho, Wo))


@torch.library.custom_op(
    "dynconv::local_filter2d_backward",
    mutates_args=(),
    schema=f"(Tensor grad_out, {_ARGS}, bool need_x, bool need_filters) -> (Tensor, Tensor)",
)
def local_filter2d_backward_op(grad_out: torch.Tensor, x: torch.Tensor, filters: torch.Tensor, *args):
    """Gradients of ``local_filter2d`` wrt ``x`` and ``filters``; a gradient not needed comes back empty. ``args``
    are the forward's, then ``need_x, need_filters``."""
    *geometry, backend, need_x, need_filters = args
    if backend == "triton":
        from dynconv.kernels import local_filter as kernels

        return kernels.backward(grad_out, x, filters, *geometry, need_x, need_filters)
    return _torch_backward(grad_out, x, filters, *geometry, need_x, need_filters)


@local_filter2d_backward_op.register_fake
def _(grad_out, x, filters, *args):
    need_x, need_filters = args[-2:]
    gx = x.new_empty(x.shape) if need_x else x.new_empty(0)
    gf = filters.new_empty(filters.shape) if need_filters else filters.new_empty(0)
    return gx, gf


def _setup_context(ctx, inputs, output):
    x, filters, kernel_size, stride, padding, dilation, backend = inputs
    ctx.save_for_backward(x, filters)
    ctx.args = (kernel_size, stride, padding, dilation, backend)


def _backward(ctx, grad_out):
    x, filters = ctx.saved_tensors
    need_x, need_f = ctx.needs_input_grad[:2]
    if not (need_x or need_f):
        return (None,) * 7
    grad_x, grad_f = local_filter2d_backward_op(grad_out, x, filters, *ctx.args, need_x, need_f)
    return (grad_x if need_x else None, grad_f if need_f else None) + (None,) * 5


local_filter2d_op.register_autograd(_backward, setup_context=_setup_context)
refuse_double_backward(local_filter2d_backward_op, "local_filter2d")
