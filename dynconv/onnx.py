"""ONNX export of models that use dynconv's ops.

dynconv's fast paths are ``torch.library`` custom ops, which ``torch.onnx.export`` cannot translate on its own
(torch's exporter knows ``torchvision::deform_conv2d`` but not ours). This module gives each custom op an
ONNX translation written with standard operators only, so an exported model runs in any ONNX runtime:

============================  ===============================================================================
``dynconv::deform_conv2d``    ``DeformConv`` (opset 19), as torch's exporter translates torchvision's op
``dynconv::local_filter2d``   ``Pad`` and, per tap, a strided ``Slice`` times that tap's filter, accumulated
                              (no ``k*k`` copy of the input, as in the ``torch`` backend)
``dynconv::dcn_sample``       ``GridSample`` over all kernel points, ``Mul`` by the modulation, ``ReduceSum``
                              (InternImage's ``dcnv3_core_pytorch`` formulation): :func:`dynconv.dcnv3`,
                              :func:`dynconv.dcnv4`
``dynconv::warp_triton``      ``GridSample`` (``align_corners=1``); :func:`dynconv.warp`'s other backends are
                              plain ``grid_sample`` and export without help
============================  ===============================================================================

The translations read the channel counts from the traced shapes (they become ONNX attributes); batch and
spatial sizes may be dynamic (``dynamic_shapes``). fp16/bf16 inputs are computed in fp32, as the ops
accumulate, and cast back.

Use :func:`export` (``torch.onnx.export`` with the table added and opset >= 19) or pass
:func:`translation_table` yourself::

    onnx_program = dynconv.onnx.export(model, (x,), "model.onnx", dynamic_shapes=({0: "batch"},))
    torch.onnx.export(model, (x,), "model.onnx", dynamo=True, opset_version=19,
                      custom_translation_table=dynconv.onnx.translation_table())

Needs the optional packages ``onnx`` and ``onnxscript`` (``pip install dynconv[onnx]``; ``onnxruntime`` to
run the result). Tested against ONNX Runtime in ``tests/test_onnx.py``.

Everything else is made of ordinary torch ops. :func:`dynconv.sample_conv2d` (``DynamicFilterLayer``,
``DynamicMaskHead``, the kernel mixtures) folds the batch into the groups of a convolution in eager mode; under
``torch.export`` it traces as ``unfold`` + a batched matmul and the mixtures' ``"auto"`` formulation is
``"grouped"``, so their graphs keep the batch (CondInst: the number of instances) and image size dynamic too.
The explicit ``"chunked"`` and ``"loop"`` formulations loop over the batch in Python and export with a fixed one.
Channel counts must be static. ``warp(mode="nearest")`` may round a position within float error of a
half-pixel tie the other way than eager mode (the graph normalises coordinates for ``GridSample``).
"""

from __future__ import annotations

from typing import Any

import torch

from dynconv.reference import dcn_kernel_points

__all__ = ["OPSET", "export", "translation_table"]

#: The ONNX opset the translations need (``DeformConv`` is new in 19).
OPSET = 19


def _onnx_modules():
    try:
        from onnxscript import ir
        from onnxscript import opset19 as op
    except ImportError as e:
        raise ImportError(
            "dynconv.onnx needs the optional packages onnx and onnxscript: pip install 'dynconv[onnx]'"
        ) from e
    return op, ir


def _compute_dtype(t) -> Any:
    """The ONNX dtype a translation computes in: fp32 for fp16/bf16 (the ops accumulate in fp32), else as is."""
    _, ir = _onnx_modules()
    return ir.DataType.FLOAT if t.dtype in (ir.DataType.FLOAT16, ir.DataType.BFLOAT16) else t.dtype


def _ints(values) -> Any:
    op, _ = _onnx_modules()
    return op.Constant(value_ints=[int(v) for v in values])


def _scalar(value: float, like) -> Any:
    op, _ = _onnx_modules()
    return op.CastLike(op.Constant(value_float=float(value)), like)


def _static(dim, what: str) -> int:
    if not isinstance(dim, int):
        raise ValueError(f"ONNX export of dynconv needs a static {what} (it becomes an attribute), got {dim!r}")
    return dim


# ------------------------------------------------------------------------------------------ translations


def _deform_conv2d(x, offset, weight, bias, mask, stride, padding, dilation, backend, deterministic=False):
    op, _ = _onnx_modules()
    kh, kw = (_static(d, "kernel size") for d in weight.shape[2:])
    group = _static(x.shape[1], "input channel count") // _static(weight.shape[1], "weight.shape[1]")
    offset_group = _static(offset.shape[1], "offset channel count") // (2 * kh * kw)
    return op.DeformConv(
        x,
        weight,
        offset,
        bias,
        mask,
        dilations=list(dilation),
        group=group,
        kernel_shape=[kh, kw],
        offset_group=offset_group,
        pads=[padding[0], padding[1], padding[0], padding[1]],
        strides=list(stride),
    )


def _local_filter2d(x, filters, kernel_size, stride, padding, dilation, backend):
    # x [B, C, H, W], filters [B, G, kh*kw, H_out, W_out]: y = sum over taps of filter * shifted x.
    op, _ = _onnx_modules()
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = kernel_size, stride, padding, dilation
    C, G = _static(x.shape[1], "channel count"), _static(filters.shape[1], "filter group count")
    dtype = _compute_dtype(x)
    xc, fc = op.Cast(x, to=dtype), op.Cast(filters, to=dtype)
    xp = op.Pad(xc, _ints([0, 0, ph, pw, 0, 0, ph, pw]))
    # [B, G, C/G, H_pad, W_pad], so a tap of the filters [B, G, 1, H_out, W_out] broadcasts over a group.
    xg = op.Reshape(xp, op.Concat(op.Shape(xp, start=0, end=1), _ints([G, C // G]), op.Shape(xp, start=2), axis=0))
    # A tap's window spans (H_out - 1) * stride + 1 rows from its first one (and likewise for columns).
    span = op.Add(op.Mul(op.Sub(op.Shape(filters, start=3, end=5), _ints([1, 1])), _ints([sh, sw])), _ints([1, 1]))
    out = None
    for i in range(kh):
        for j in range(kw):
            start = _ints([i * dh, j * dw])
            tap = op.Slice(xg, start, op.Add(start, span), _ints([3, 4]), _ints([sh, sw]))
            t = i * kw + j
            term = op.Mul(tap, op.Slice(fc, _ints([t]), _ints([t + 1]), _ints([2])))
            out = term if out is None else op.Add(out, term)
    shape = op.Concat(op.Shape(x, start=0, end=2), op.Shape(filters, start=3, end=5), axis=0)
    return op.Cast(op.Reshape(out, shape), to=x.dtype)


def _dcn_sample(value, offset, mask, kernel_size, stride, padding, dilation, offset_scale, remove_center, *_):
    # value [B, H, W, C], offset [B, H_out, W_out, G, P, 2] (dx, dy), mask [B, H_out, W_out, G, P].
    op, _ = _onnx_modules()
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = kernel_size, stride, padding, dilation
    C, G = _static(value.shape[3], "channel count"), _static(offset.shape[3], "group count")
    P = _static(offset.shape[4], "number of kernel points")
    dtype = _compute_dtype(value)
    v = op.Cast(value, to=dtype)
    # [B*G, C/G, H, W]: the layout GridSample reads.
    vg = op.Reshape(
        op.Transpose(v, perm=[0, 3, 1, 2]), op.Concat(_ints([-1, C // G]), op.Shape(v, start=1, end=3), axis=0)
    )
    hw_out = op.Shape(offset, start=1, end=3)
    q = op.ReduceProd(hw_out, keepdims=1)  # H_out * W_out
    off = op.Cast(op.Transpose(offset, perm=[0, 3, 1, 2, 4, 5]), to=dtype)
    off = op.Reshape(off, op.Concat(_ints([-1]), q, _ints([P, 2]), axis=0))  # [B*G, H_out*W_out, P, 2]
    # Base pixel (x, y) of every output position, as dynconv.ops.dcnv._Geometry builds it.
    h_out, w_out = op.Slice(hw_out, _ints([0]), _ints([1])), op.Slice(hw_out, _ints([1]), _ints([2]))
    zero, one = op.Constant(value_int=0), op.Constant(value_int=1)
    xs = op.Cast(op.Range(zero, op.Squeeze(w_out), one), to=dtype)
    ys = op.Cast(op.Range(zero, op.Squeeze(h_out), one), to=dtype)
    xs = op.Add(op.Mul(xs, _scalar(sw, off)), _scalar(-pw + (dw * (kw - 1)) // 2, off))
    ys = op.Add(op.Mul(ys, _scalar(sh, off)), _scalar(-ph + (dh * (kh - 1)) // 2, off))
    grid_x = op.Expand(op.Unsqueeze(xs, _ints([0])), hw_out)
    grid_y = op.Expand(op.Unsqueeze(ys, _ints([1])), hw_out)
    base = op.Reshape(op.Concat(op.Unsqueeze(grid_x, _ints([2])), op.Unsqueeze(grid_y, _ints([2])), axis=2),
                      _ints([1, -1, 1, 2]))  # fmt: skip
    points = op.CastLike(
        op.Constant(value_floats=[float(c) for p in dcn_kernel_points((kh, kw), (dh, dw), remove_center) for c in p]),
        off,
    )
    loc = op.Add(base, op.Mul(op.Add(op.Reshape(points, _ints([1, 1, P, 2])), off), _scalar(offset_scale, off)))
    # align_corners=0 maps pixel coordinate p to (2p + 1) / size - 1; size is (W, H).
    size = op.Cast(op.Concat(op.Shape(v, start=2, end=3), op.Shape(v, start=1, end=2), axis=0), to=dtype)
    grid = op.Sub(op.Div(op.Add(op.Mul(loc, _scalar(2.0, loc)), _scalar(1.0, loc)), size), _scalar(1.0, loc))
    sampled = op.GridSample(vg, grid, align_corners=0, mode="bilinear", padding_mode="zeros")  # [B*G, C/G, Q, P]
    m = op.Cast(op.Transpose(mask, perm=[0, 3, 1, 2, 4]), to=dtype)
    m = op.Reshape(m, op.Concat(_ints([-1, 1]), q, _ints([P]), axis=0))
    out = op.ReduceSum(op.Mul(sampled, m), _ints([3]), keepdims=0)  # [B*G, C/G, Q]
    out = op.Reshape(out, op.Concat(op.Shape(v, start=0, end=1), _ints([C]), hw_out, axis=0))
    return op.Cast(op.Transpose(out, perm=[0, 2, 3, 1]), to=value.dtype)


def _warp(x, flow, mode, padding_mode, deterministic):
    # y(p) = x(p + flow(p)), pixel centres at integers: GridSample with align_corners=1 maps pixel p to 2p/(size-1)-1.
    op, _ = _onnx_modules()
    dtype = _compute_dtype(x)
    xc, fc = op.Cast(x, to=dtype), op.Cast(flow, to=dtype)
    hw = op.Shape(x, start=2, end=4)
    h, w = op.Squeeze(op.Slice(hw, _ints([0]), _ints([1]))), op.Squeeze(op.Slice(hw, _ints([1]), _ints([2])))
    zero, one = op.Constant(value_int=0), op.Constant(value_int=1)
    cols = op.Cast(op.Range(zero, w, one), to=dtype)  # [W]
    rows = op.Unsqueeze(op.Cast(op.Range(zero, h, one), to=dtype), _ints([1]))  # [H, 1]
    two = _scalar(2.0, fc)
    scale_x = op.Div(two, op.Cast(op.Sub(w, one), to=dtype))
    scale_y = op.Div(two, op.Cast(op.Sub(h, one), to=dtype))
    dx = op.Squeeze(op.Slice(fc, _ints([0]), _ints([1]), _ints([1])), _ints([1]))  # [B, H, W]
    dy = op.Squeeze(op.Slice(fc, _ints([1]), _ints([2]), _ints([1])), _ints([1]))
    gx = op.Sub(op.Mul(op.Add(cols, dx), scale_x), _scalar(1.0, fc))
    gy = op.Sub(op.Mul(op.Add(rows, dy), scale_y), _scalar(1.0, fc))
    grid = op.Concat(op.Unsqueeze(gx, _ints([3])), op.Unsqueeze(gy, _ints([3])), axis=3)
    out = op.GridSample(xc, grid, align_corners=1, mode=mode, padding_mode=padding_mode)
    return op.Cast(out, to=x.dtype)


def translation_table() -> dict:
    """``{custom op: ONNX translation}`` for ``torch.onnx.export(..., custom_translation_table=...)``."""
    _onnx_modules()  # a clear ImportError now rather than inside the exporter
    ops = torch.ops.dynconv
    return {
        ops.deform_conv2d.default: _deform_conv2d,
        ops.local_filter2d.default: _local_filter2d,
        ops.dcn_sample.default: _dcn_sample,
        ops.warp_triton.default: _warp,
    }


def export(model: torch.nn.Module, args: tuple, f=None, **kwargs):
    """``torch.onnx.export(model, args, f, dynamo=True, ...)`` with dynconv's translations and opset >= 19.

    Args:
        model (nn.Module): the model to export (put it in ``eval()`` mode first, as for any export).
        args (tuple): example inputs.
        f (str or None): where to save the ``.onnx`` file; None only returns the program.
        **kwargs: passed on to ``torch.onnx.export`` (``dynamic_shapes``, ``input_names``, ...); a
            ``custom_translation_table`` of your own is merged over dynconv's.

    Returns:
        torch.onnx.ONNXProgram.

    Raises:
        ValueError: ``opset_version`` below 19, or a channel count that is not static.
    """
    table = translation_table()
    table.update(kwargs.pop("custom_translation_table", None) or {})
    opset = kwargs.pop("opset_version", None) or OPSET
    if opset < OPSET:
        raise ValueError(f"opset_version must be >= {OPSET} (ONNX DeformConv), got {opset}")
    kwargs.setdefault("dynamo", True)
    if not kwargs["dynamo"]:
        raise ValueError("dynamo=False (the TorchScript exporter) is not supported: dynconv's ops translate "
                         "through the dynamo exporter's custom_translation_table")  # fmt: skip
    return torch.onnx.export(model, args, f, opset_version=opset, custom_translation_table=table, **kwargs)
