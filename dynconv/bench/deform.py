"""``dynconv bench deform``: deformable convolution (DCNv2: offsets and mask) and, in its own section, DCNv3/DCNv4.

DCNv2 shapes are ``(B, C, H, W)`` with a 3x3 kernel, ``C_out = C``, one offset group, stride 1, padding 1 and
random offsets of a few pixels (so samples fall between pixels and past the border, as after training). For
each shape and dtype it measures, in one run, forward and forward+backward (gradients of input, offset,
mask, weight and bias) of each requested dynconv backend and of ``torchvision.ops.deform_conv2d`` when it
imports; ratios are against torchvision when present, otherwise against our ``torch`` backend.

The candidates are timed interleaved, one call of each per round, and the medians taken over rounds: on a
shared machine a burst of someone else's load then slows every candidate alike instead of one of them (timed
back to back, the same forward varied 88-592 ms between consecutive runs here).
"""

from __future__ import annotations

import argparse
import functools
import importlib

import torch

from dynconv.bench.timing import fwd_bwd_columns, markdown_table, measure_interleaved, no_grad_call
from dynconv.functional import deform_conv2d

DCNV2_SHAPES = [(8, 64, 56, 56), (2, 256, 64, 64)]
DCNV2_SMALL_SHAPES = [(2, 16, 24, 24), (1, 32, 20, 20)]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--shapes", default="default", help="'default', 'small' or 'B,C,H,W;...' (DCNv2, 3x3)")
    parser.add_argument("--dtypes", default="float32", help="comma-separated: float32,bfloat16,float16")
    parser.add_argument("--backends", default="torch,reference", help="comma-separated dynconv backends to time")
    parser.add_argument("--no-torchvision", action="store_true", help="skip torchvision even when it imports")


def _parse_shapes(text: str) -> list[tuple[int, ...]]:
    if text == "default":
        return DCNV2_SHAPES
    if text == "small":
        return DCNV2_SMALL_SHAPES
    return [tuple(int(v) for v in item.split(",")) for item in text.split(";") if item]


def _torchvision_op():
    """``torchvision.ops.deform_conv2d`` or the reason it is not available."""
    try:
        return importlib.import_module("torchvision.ops").deform_conv2d, None
    except Exception as exc:  # not installed, or built for another torch
        return None, f"{type(exc).__name__}: {exc}"


def _inputs(shape, dtype, device):
    B, C, H, W = shape
    gen = torch.Generator(device="cpu").manual_seed(0)

    def rand(*size, scale=1.0):
        return (scale * torch.randn(*size, generator=gen)).to(device, dtype).requires_grad_()

    x = rand(B, C, H, W)
    offset = rand(B, 18, H, W, scale=2.0)
    mask = torch.rand(B, 9, H, W, generator=gen).to(device, dtype).requires_grad_()
    weight = rand(C, C, 3, 3, scale=(C * 9) ** -0.5)
    bias = rand(C)
    return x, offset, weight, bias, mask


def _fwd_bwd(fn, tensors):
    def step():
        for t in tensors:
            t.grad = None
        fn(*tensors).sum().backward()

    return step


def run(args: argparse.Namespace) -> str:
    device = torch.device(args.device)
    tv_op, tv_reason = (None, "--no-torchvision") if args.no_torchvision else _torchvision_op()
    rows = []
    for shape in _parse_shapes(args.shapes):
        for dtype_name in args.dtypes.split(","):
            dtype = getattr(torch, dtype_name)
            tensors = _inputs(shape, dtype, device)
            candidates = {}
            if tv_op is not None:
                candidates["torchvision"] = lambda x, o, w, b, m: tv_op(x, o, w, b, padding=1, mask=m)
            for name in args.backends.split(","):
                candidates[name] = lambda x, o, w, b, m, name=name: deform_conv2d(
                    x, o, w, b, padding=1, mask=m, backend=name
                )
            fwd_calls, both_calls = {}, {}
            for name, fn in candidates.items():
                fwd_calls[name + " fwd"] = functools.partial(no_grad_call, fn, *tensors)
                both_calls[name + " both"] = _fwd_bwd(fn, tensors)
            timed = measure_interleaved({**fwd_calls, **both_calls}, device, args.repeats)
            results = {name: (timed[name + " fwd"], timed[name + " both"]) for name in candidates}
            base_name = "torchvision" if "torchvision" in results else "torch"
            base_fwd, base_both = results.get(base_name, next(iter(results.values())))
            for name, (fwd, both) in results.items():
                rows.append(["DCNv2 " + str(shape), dtype_name, name, *fwd_bwd_columns(fwd, both, base_fwd, base_both)])
    header = [
        "op (B,C,H,W), 3x3",
        "dtype",
        "impl",
        "fwd ms",
        "fwd+bwd ms",
        f"fwd speed-up vs {base_name}",
        f"fwd+bwd speed-up vs {base_name}",
        "fwd peak extra MB",
        "fwd+bwd peak extra MB",
    ]
    table = markdown_table(header, rows)
    if tv_op is None:
        table += f"\n\ntorchvision not measured ({tv_reason})."
    return table
