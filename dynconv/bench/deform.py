"""``dynconv bench deform``: deformable convolution (DCNv2: offsets and mask) and, in its own section, DCNv3/DCNv4.

DCNv2 shapes are ``(B, C, H, W)`` with a 3x3 kernel, ``C_out = C``, one offset group, stride 1, padding 1 and
random offsets of a few pixels (so samples fall between pixels and past the border, as after training). For
each shape and dtype it measures, in one run, forward and forward+backward (gradients of input, offset,
mask, weight and bias) of each requested dynconv backend and of ``torchvision.ops.deform_conv2d`` when it
imports; ratios are against torchvision when present, and against the first dynconv backend. A candidate that
cannot run (torchvision has no CUDA kernel for bfloat16) is a row saying why; each row is printed as soon as it
is measured, and on CUDA the kernel time by CUDA-graph replay stands beside the eager per-call time. GB/s
counts every input and the output once, and for forward+backward twice that (their gradients).

The candidates are timed interleaved, one call of each per round, and the medians taken over rounds: on a
shared machine a burst of someone else's load then slows every candidate alike instead of one of them
(:func:`dynconv.bench.timing.measure_interleaved`).
"""

from __future__ import annotations

import argparse
import importlib

import torch

from dynconv.bench.report import Report, device_note, parse_common, parse_shapes, speedup, time_cells, time_header
from dynconv.bench.timing import describe, gbs, measure_fwd_bwd, tensor_bytes
from dynconv.functional import deform_conv2d

DCNV2_SHAPES = [(8, 64, 56, 56), (2, 256, 64, 64)]
DCNV2_SMALL_SHAPES = [(2, 16, 24, 24), (1, 32, 20, 20)]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--shapes", default="default", help="'default' (= 'issue'), 'small' or 'B,C,H,W;...' (DCNv2, 3x3)"
    )
    parser.add_argument("--dtypes", default="float32", help="comma-separated: float32,bfloat16,float16,float64")
    parser.add_argument("--backends", default="torch,reference", help="comma-separated dynconv backends to time")
    parser.add_argument("--no-torchvision", action="store_true", help="skip torchvision even when it imports")


def _parse_shapes(text: str) -> list[tuple[int, ...]]:
    named = {"default": DCNV2_SHAPES, "small": DCNV2_SMALL_SHAPES, "issue": DCNV2_SHAPES}
    return parse_shapes(text, named, 4, "B,C,H,W")


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


def run(args: argparse.Namespace) -> str:
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    shapes = _parse_shapes(args.shapes)
    dtypes, backends = parse_common(args)
    tv_op, tv_reason = (None, "--no-torchvision") if args.no_torchvision else _torchvision_op()
    # With torchvision the ratios are against it and also against the first dynconv backend (torchvision has no
    # kernel for some dtypes: bf16 on CUDA); without, against the first backend alone.
    bases = (["torchvision"] if tv_op is not None else []) + backends[:1]
    ratio_header = []
    for base in bases:
        ratio_header += [f"fwd speed-up vs {base}", f"fwd+bwd speed-up vs {base}"]
    header = [
        "op (B,C,H,W), 3x3",
        "dtype",
        "impl",
        *time_header(cuda),
        "fwd GB/s",
        "fwd+bwd GB/s",
        *ratio_header,
        "fwd peak extra MB",
        "fwd+bwd peak extra MB",
    ]
    report = Report.from_args(args, header, device_note(device))
    for shape in shapes:
        for dtype_name in dtypes:
            dtype = getattr(torch, dtype_name)
            try:
                tensors = _inputs(shape, dtype, device)
            except Exception as exc:  # out of memory for this shape: say so and go on with the next
                report.failed(["DCNv2 " + str(shape), dtype_name, "inputs"], describe(exc))
                continue
            # every input and the output (the size of x: C_out = C, stride 1) once; the backward as much again
            fwd_bytes = tensor_bytes(*tensors, tensors[0])
            candidates = {}
            if tv_op is not None:
                candidates["torchvision"] = lambda x, o, w, b, m: tv_op(x, o, w, b, padding=1, mask=m)
            for name in backends:
                candidates[name] = lambda x, o, w, b, m, name=name: deform_conv2d(
                    x, o, w, b, padding=1, mask=m, backend=name
                )
            results = measure_fwd_bwd(candidates, tensors, device, args.repeats)
            for name, (fwd, both) in results.items():
                ratios = []
                for base in bases:
                    ratios += [speedup(results[base][0], fwd), speedup(results[base][1], both)]
                cells = [
                    "DCNv2 " + str(shape),
                    dtype_name,
                    name,
                    *time_cells(fwd, both, cuda),
                    gbs(fwd_bytes, fwd),
                    gbs(2 * fwd_bytes, both),
                    *ratios,
                    fwd.peak_extra_mb,
                    both.peak_extra_mb,
                ]
                report.measured(cells, fwd=fwd, both=both)
    if tv_op is None:
        report.footnote(f"torchvision not measured ({tv_reason}).")
    return report.close()
