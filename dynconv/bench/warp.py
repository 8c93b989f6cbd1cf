"""``dynconv bench warp``: flow warping (Deep Feature Flow's feature propagation), ``y(p) = x(p + flow(p))``.

Shapes are ``(B, C, H, W)``; the flow is random with a spread of a few pixels (samples between pixels and past
the border). For each shape and dtype it measures, in one run and interleaved (see ``dynconv bench deform``),
forward and forward+backward (gradients of ``x`` and ``flow``) of each requested backend: ``torch`` is
``F.grid_sample`` (itself one fused kernel on CPU and CUDA), ``triton`` the fused Triton kernels (atomic and,
with ``--deterministic``, also the deterministic backward), ``reference`` the explicit gathers. Ratios are
against ``torch``; achieved GB/s counts the bytes of ``x``, ``flow`` and ``y`` once, and for forward+backward
twice that (their gradients). Each row is printed as soon as it is measured; on CUDA the kernel time by CUDA-graph
replay stands beside the eager per-call time, and GB/s and speed-ups use it.
"""

from __future__ import annotations

import argparse

import torch

from dynconv.bench.report import Report, device_note, parse_common, parse_shapes, speedup, time_cells, time_header
from dynconv.bench.timing import describe, gbs, measure_fwd_bwd, tensor_bytes
from dynconv.functional import warp

# Deep Feature Flow: ResNet-101 conv5 features of a 1024x2048 Cityscapes frame (stride 16), and an ImageNet-VID
# sized batch at stride 16; then a feature map of a small detector.
SHAPES = [(1, 1024, 64, 128), (4, 1024, 38, 63), (8, 256, 56, 56)]
SMALL_SHAPES = [(2, 64, 24, 32), (1, 128, 17, 23)]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--shapes", default="default", help="'default' (= 'issue'), 'small' or 'B,C,H,W;...'")
    parser.add_argument("--dtypes", default="float32", help="comma-separated: float32,bfloat16,float16,float64")
    parser.add_argument("--backends", default="torch,reference", help="comma-separated dynconv backends to time")
    parser.add_argument("--padding-mode", default="zeros", choices=("zeros", "border", "reflection"))
    parser.add_argument(
        "--deterministic", action="store_true", help="also time the Triton backward's deterministic variant"
    )


def _parse_shapes(text: str) -> list[tuple[int, ...]]:
    return parse_shapes(text, {"default": SHAPES, "small": SMALL_SHAPES, "issue": SHAPES}, 4, "B,C,H,W")


def run(args: argparse.Namespace) -> str:
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    shapes = _parse_shapes(args.shapes)
    dtypes, backends = parse_common(args)
    labels = []
    for name in backends:
        if name == "triton" and args.deterministic:
            labels += [("triton", name, False), ("triton deterministic", name, True)]
        else:
            labels.append((name, name, None))
    base = "torch" if "torch" in backends else labels[0][0]
    header = [
        "(B,C,H,W)",
        "dtype",
        "impl",
        *time_header(cuda),
        "fwd GB/s",
        "fwd+bwd GB/s",
        f"fwd speed-up vs {base}",
        f"fwd+bwd speed-up vs {base}",
        "fwd peak extra MB",
        "fwd+bwd peak extra MB",
    ]
    report = Report.from_args(args, header, device_note(device, f"; padding_mode={args.padding_mode}"))
    for shape in shapes:
        B, C, H, W = shape
        for dtype_name in dtypes:
            dtype = getattr(torch, dtype_name)
            try:
                gen = torch.Generator().manual_seed(0)
                x = torch.randn(B, C, H, W, generator=gen).to(device, dtype).requires_grad_()
                flow = (3.0 * torch.randn(B, 2, H, W, generator=gen)).to(device, dtype).requires_grad_()
            except Exception as exc:  # out of memory for this shape: say so and go on with the next
                report.failed([str(shape), dtype_name, "inputs"], describe(exc))
                continue
            tensors = (x, flow)
            candidates = {
                label: lambda a, f, name=name, det=det: warp(
                    a, f, padding_mode=args.padding_mode, backend=name, deterministic=det
                )
                for label, name, det in labels
            }
            results = measure_fwd_bwd(candidates, tensors, device, args.repeats)
            io_bytes = tensor_bytes(x, flow, x)  # x, flow and y (the size of x) once
            base_fwd, base_both = results[base]
            for name, (fwd, both) in results.items():
                cells = [
                    str(shape),
                    dtype_name,
                    name,
                    *time_cells(fwd, both, cuda),
                    gbs(io_bytes, fwd),
                    gbs(2 * io_bytes, both),
                    speedup(base_fwd, fwd),
                    speedup(base_both, both),
                    fwd.peak_extra_mb,
                    both.peak_extra_mb,
                ]
                report.measured(cells, fwd=fwd, both=both)
    return report.close()
