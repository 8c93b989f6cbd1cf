"""``dynconv::deform_conv2d``: deformable convolution (DCNv1, Dai et al., ICCV 2017; DCNv2 with modulation,
Zhu et al., CVPR 2019) as a custom op with a hand-written backward.

The ``torch`` backend is gather + matmul on the row-table engine of the shared sampler
(:mod:`dynconv.ops._sampling`), processed in chunks of images so the column buffer stays below
:data:`dynconv._columns.COLUMN_BUDGET_BYTES`:

1. The input is laid out as a table of rows ``[B*G_off*H*W, C/G_off]`` (channels last within each offset
   group), so one sampling corner of one tap of one output pixel is one contiguous row.
2. For each of the four bilinear corners, ``index_select`` gathers the rows for every
   ``(image, output pixel, tap, offset group)`` and ``addcmul_`` accumulates them with the corner weight
   (bilinear weight x in-image x mask) into one column buffer of shape ``[nb*H_out*W_out, kh*kw*C_in]``.
   That row order makes the convolution a single ``addmm`` with the weight permuted to ``[kh*kw*C_in, C_out]``
   (bias fused), with no transposed copy of the columns.
3. The backward recomputes the corners, gets the column gradient by one matmul, and for each corner forms
   ``a = <grad_column, x_corner>`` (one dot per row): the offset, mask and bilinear-weight gradients are all
   linear in these four numbers. The input gradient is a scatter of the weighted column gradient into the
   row table (:func:`dynconv.ops._sampling.scatter_rows`).

Autograd through the gathers would keep every corner's values and weights alive (4x the columns); the
hand-written backward keeps one column buffer, one scratch buffer of the same size and the input table.
"""

from __future__ import annotations

import torch

from dynconv import _columns as cm
from dynconv.backends import TRITON_OPS
from dynconv.kernels._launch import acc_dtype
from dynconv.ops import _sampling
from dynconv.ops._autograd import refuse_double_backward

__all__ = ["deform_conv2d_op"]

TRITON_OPS["deform_conv2d"] = (torch.float32, torch.float16, torch.bfloat16)


def _chunk_geometry(offset, mask, b0, b1, kernel_size, stride, padding, dilation, H, W, acc, derivatives=False):
    """Bilinear corners of images ``b0:b1``, rows ordered (image, pixel, tap, offset group), and the mask.

    Returns ``(corners, mask)``: ``corners`` as :func:`._sampling.sampling_corners` gives them (weights without
    the mask) for tensors of shape ``[nb, H_out, W_out, kh*kw, G_off]``, indices into the rows of
    :func:`._sampling.input_table`; ``mask`` of the same shape, or None.
    """
    nb = b1 - b0
    kh, kw = kernel_size
    K = kh * kw
    Ho, Wo = offset.shape[-2:]
    G_off = offset.shape[1] // (2 * K)
    # Contiguous [2, nb, Ho, Wo, K, G]: every elementwise op below then runs on dense, vectorisable tensors.
    off = offset[b0:b1].to(acc).view(nb, G_off, K, 2, Ho, Wo).permute(3, 0, 4, 5, 2, 1).contiguous()
    dev = offset.device
    taps_y = (torch.arange(kh, device=dev, dtype=acc) * dilation[0]).repeat_interleave(kw)
    taps_x = (torch.arange(kw, device=dev, dtype=acc) * dilation[1]).repeat(kh)
    base_y = (torch.arange(Ho, device=dev, dtype=acc) * stride[0] - padding[0]).view(Ho, 1, 1, 1) + taps_y.view(K, 1)
    base_x = (torch.arange(Wo, device=dev, dtype=acc) * stride[1] - padding[1]).view(1, Wo, 1, 1) + taps_x.view(K, 1)
    py = base_y + off[0]  # [nb, Ho, Wo, K, G]
    px = base_x + off[1]
    # Row of the input table: ((image * G + group) * H + row) * W + col.
    table_base = (torch.arange(nb, device=dev).view(nb, 1, 1, 1, 1) * G_off + torch.arange(G_off, device=dev)) * (H * W)
    corners = _sampling.sampling_corners(py, px, H, W, table_base, derivatives, outside=nb * G_off * H * W)
    m = None
    if mask is not None:
        m = mask[b0:b1].to(acc).view(nb, G_off, K, Ho, Wo).permute(0, 3, 4, 2, 1).contiguous()  # [nb, Ho, Wo, K, G]
    return corners, m


def _torch_forward(x, offset, weight, bias, mask, kernel_size, stride, padding, dilation):
    B, C, H, W = x.shape
    Co = weight.shape[0]
    K = kernel_size[0] * kernel_size[1]
    Ho, Wo = offset.shape[-2:]
    G_off = offset.shape[1] // (2 * K)
    G_w = C // weight.shape[1]
    acc = acc_dtype(x.dtype)
    wacc = weight.to(acc)
    bacc = bias.to(acc) if bias is not None else None
    out = torch.empty((B, Ho, Wo, Co), dtype=x.dtype, device=x.device)
    step = cm.images_per_chunk(Ho * Wo * K * C, B, torch.finfo(acc).bits // 8)
    columns = scratch = None
    for b0 in range(0, B, step):
        b1 = min(B, b0 + step)
        rows = (b1 - b0) * Ho * Wo * K * G_off
        if columns is None or columns.shape[0] != rows:
            columns = torch.empty((rows, C // G_off), dtype=acc, device=x.device)
            scratch = torch.empty_like(columns)
        corners, m = _chunk_geometry(offset, mask, b0, b1, kernel_size, stride, padding, dilation, H, W, acc)
        _sampling.gather_rows(_sampling.input_table(x, b0, b1, G_off, acc), corners, m, columns, scratch)
        res = cm.columns_matmul(columns.view(-1, K * C), wacc, G_w, bacc)
        out[b0:b1].view(-1, Co).copy_(res)
    # The fake kernel promises a contiguous NCHW result.
    return out.permute(0, 3, 1, 2).contiguous()


def _torch_backward(grad_out, x, offset, weight, mask, kernel_size, stride, padding, dilation, needs, deterministic):
    need_x, need_offset, need_weight, need_bias, need_mask = needs
    B, C, H, W = x.shape
    Co = weight.shape[0]
    K = kernel_size[0] * kernel_size[1]
    Ho, Wo = offset.shape[-2:]
    G_off = offset.shape[1] // (2 * K)
    Cg = C // G_off
    G_w = C // weight.shape[1]
    acc = acc_dtype(x.dtype)
    wacc = weight.to(acc)
    grad_x = torch.empty((B, C, H, W), dtype=x.dtype, device=x.device) if need_x else None
    grad_offset = torch.empty(offset.shape, dtype=offset.dtype, device=x.device) if need_offset else None
    grad_mask = torch.empty(mask.shape, dtype=mask.dtype, device=x.device) if need_mask else None
    grad_weight = torch.zeros(weight.shape, dtype=acc, device=x.device) if need_weight else None
    gout_nhwc = grad_out.permute(0, 2, 3, 1)
    grad_bias = gout_nhwc.to(acc).sum((0, 1, 2)).to(weight.dtype) if need_bias else None
    need_geometry = need_x or need_offset or need_mask
    step = cm.images_per_chunk(Ho * Wo * K * C, B, torch.finfo(acc).bits // 8)
    for b0 in range(0, B, step):
        b1 = min(B, b0 + step)
        nb = b1 - b0
        rows = nb * Ho * Wo * K * G_off
        gout2d = gout_nhwc[b0:b1].to(acc).reshape(nb * Ho * Wo, Co)
        corners, m = _chunk_geometry(
            offset, mask, b0, b1, kernel_size, stride, padding, dilation, H, W, acc, need_offset
        )
        table = _sampling.input_table(x, b0, b1, G_off, acc)
        scratch = torch.empty((rows, Cg), dtype=acc, device=x.device)
        columns = torch.zeros((rows, Cg), dtype=acc, device=x.device) if need_weight else None
        gcols = cm.grad_columns(gout2d, wacc, G_w).view(rows, Cg) if need_geometry else None
        grad_table = torch.zeros_like(table) if need_x else None
        dots = []
        for index, w, *_ in corners:
            index = index.reshape(-1)
            wm = (w if m is None else w * m).reshape(-1, 1)
            torch.index_select(table, 0, index, out=scratch)
            if need_weight:
                columns.addcmul_(scratch, wm)
            if need_offset or need_mask:
                dots.append(scratch.mul_(gcols).sum(1).view(w.shape))  # a = <grad column, corner value> per row
            if need_x:
                torch.mul(gcols, wm, out=scratch)
                _sampling.scatter_rows(grad_table, index, scratch, deterministic)
        if need_weight:
            grad_weight += cm.grad_weight(columns.view(-1, K * C), gout2d, weight.shape, G_w)
        if need_offset:
            gy = sum(a * c[2] for a, c in zip(dots, corners))
            gx = sum(a * c[3] for a, c in zip(dots, corners))
            if m is not None:
                gy, gx = gy * m, gx * m
            grad_offset[b0:b1] = torch.stack((gy, gx), -1).permute(0, 4, 3, 5, 1, 2).reshape(nb, -1, Ho, Wo)
        if need_mask:
            gm = sum(a * c[1] for a, c in zip(dots, corners))
            grad_mask[b0:b1] = gm.permute(0, 4, 3, 1, 2).reshape(nb, -1, Ho, Wo)
        if need_x:
            grad_x[b0:b1] = grad_table[:-1].view(nb, G_off, H, W, Cg).permute(0, 1, 4, 2, 3).reshape(nb, C, H, W)
    # Outputs of a custom op must not alias each other, so every missing gradient is its own empty tensor.
    return (
        grad_x if need_x else x.new_empty(0),
        grad_offset if need_offset else x.new_empty(0),
        grad_weight.to(weight.dtype) if need_weight else x.new_empty(0),
        grad_bias if need_bias else x.new_empty(0),
        grad_mask if need_mask else x.new_empty(0),
    )


@torch.library.custom_op("dynconv::deform_conv2d", mutates_args=())
def deform_conv2d_op(
    x: torch.Tensor,
    offset: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    mask: torch.Tensor | None,
    stride: list[int],
    padding: list[int],
    dilation: list[int],
    backend: str,
    deterministic: bool = False,
) -> torch.Tensor:
    """Forward of deformable convolution on validated arguments (see :func:`dynconv.deform_conv2d`)."""
    kernel_size = list(weight.shape[-2:])
    if backend == "triton":
        from dynconv.kernels import deform as kernels

        return kernels.forward(x, offset, weight, bias, mask, kernel_size, stride, padding, dilation)
    return _torch_forward(x, offset, weight, bias, mask, kernel_size, stride, padding, dilation)


@deform_conv2d_op.register_fake
def _(x, offset, weight, bias, mask, stride, padding, dilation, backend, deterministic=False):
    return x.new_empty((x.shape[0], weight.shape[0], offset.shape[2], offset.shape[3]))


@torch.library.custom_op("dynconv::deform_conv2d_backward", mutates_args=())
def deform_conv2d_backward_op(
    grad_out: torch.Tensor,
    x: torch.Tensor,
    offset: torch.Tensor,
    weight: torch.Tensor,
    mask: torch.Tensor | None,
    stride: list[int],
    padding: list[int],
    dilation: list[int],
    backend: str,
    needs: list[bool],
    deterministic: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients wrt ``(x, offset, weight, bias, mask)``; one not asked for in ``needs`` comes back empty.

    ``deterministic`` selects the order-independent accumulation of the input gradient (the Triton kernels'
    sorted two-pass variant instead of atomics; ``index_put_`` instead of ``index_add_`` off the CPU).
    """
    kernel_size = list(weight.shape[-2:])
    if backend == "triton":
        from dynconv.kernels import deform as kernels

        return kernels.backward(
            grad_out, x, offset, weight, mask, kernel_size, stride, padding, dilation, needs, deterministic
        )
    return _torch_backward(
        grad_out, x, offset, weight, mask, kernel_size, stride, padding, dilation, needs, deterministic
    )


@deform_conv2d_backward_op.register_fake
def _(grad_out, x, offset, weight, mask, stride, padding, dilation, backend, needs, deterministic=False):
    shapes = (x.shape, offset.shape, weight.shape, weight.shape[:1], mask.shape if mask is not None else (0,))
    return tuple(x.new_empty(s) if need else x.new_empty(0) for s, need in zip(shapes, needs))


def _setup_context(ctx, inputs, output):
    x, offset, weight, bias, mask, stride, padding, dilation, backend, deterministic = inputs
    ctx.save_for_backward(x, offset, weight, mask)
    ctx.has_bias = bias is not None
    ctx.args = (stride, padding, dilation, backend)
    ctx.deterministic = deterministic


def _backward(ctx, grad_out):
    x, offset, weight, mask = ctx.saved_tensors
    nx, noff, nw, nb, nm = ctx.needs_input_grad[:5]
    needs = [nx, noff, nw, nb and ctx.has_bias, nm and mask is not None]
    if not any(needs):
        return (None,) * 10
    grads = deform_conv2d_backward_op(grad_out, x, offset, weight, mask, *ctx.args, needs, ctx.deterministic)
    return tuple(g if need else None for g, need in zip(grads, needs)) + (None,) * 5


deform_conv2d_op.register_autograd(_backward, setup_context=_setup_context)
refuse_double_backward(deform_conv2d_backward_op, "deform_conv2d")
