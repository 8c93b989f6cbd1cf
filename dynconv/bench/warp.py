"""``dynconv bench warp``: flow warping (Deep Feature Flow's feature propagation), ``y(p) = x(p + flow(p))``.

Shapes are ``(B, C, H, W)``; the flow is random with a spread of a few pixels (samples between pixels and past
the border). For each shape and dtype it measures, in one run and interleaved (see ``dynconv bench deform``),
forward and forward+backward (gradients of ``x`` and ``flow``) of each requested backend: ``torch`` is
``F.grid_sample`` (itself one fused kernel on CPU and CUDA), ``triton`` the fused Triton kernels (atomic and,
with ``--deterministic``, also the deterministic backward), ``reference`` the explicit gathers. Ratios are
against ``torch``; achieved GB/s counts the bytes of ``x``, ``flow`` and ``y`` once.
"""

from __future__ import annotations

import argparse
import functools

import torch

from dynconv.bench.deform import _fwd_bwd
from dynconv.bench.timing import markdown_table, measure_interleaved, no_grad_call
from dynconv.functional import warp

# Deep Feature Flow: ResNet-101 conv5 features of a 1024x2048 Cityscapes frame (stride 16), and an ImageNet-VID
# sized batch at stride 16; then a feature map of a small detector.
SHAPES = [(1, 1024, 64, 128), (4, 1024, 38, 63), (8, 256, 56, 56)]
SMALL_SHAPES = [(2, 64, 24, 32), (1, 128, 17, 23)]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--shapes", default="default", help="'default', 'small' or 'B,C,H,W;...'")
    parser.add_argument("--dtypes", default="float32", help="comma-separated: float32,bfloat16,float16")
    parser.add_argument("--backends", default="torch,reference", help="comma-separated dynconv backends to time")
    parser.add_argument("--padding-mode", default="zeros", choices=("zeros", "border", "reflection"))
    parser.add_argument(
        "--deterministic", action="store_true", help="also time the Triton backward's deterministic variant"
    )


def _parse_shapes(text: str) -> list[tuple[int, ...]]:
    if text == "default":
        return SHAPES
    if text == "small":
        return SMALL_SHAPES
    return [tuple(int(v) for v in item.split(",")) for item in text.split(";") if item]


def run(args: argparse.Namespace) -> str:
    device = torch.device(args.device)
    rows = []
    for shape in _parse_shapes(args.shapes):
        B, C, H, W = shape
        for dtype_name in args.dtypes.split(","):
            dtype = getattr(torch, dtype_name)
            gen = torch.Generator().manual_seed(0)
            x = torch.randn(B, C, H, W, generator=gen).to(device, dtype).requires_grad_()
            flow = (3.0 * torch.randn(B, 2, H, W, generator=gen)).to(device, dtype).requires_grad_()
            tensors = (x, flow)
            candidates = {}
            for name in args.backends.split(","):
                variants = [(name, None)]
                if name == "triton" and args.deterministic:
                    variants = [("triton", False), ("triton deterministic", True)]
                for label, det in variants:
                    candidates[label] = lambda a, f, name=name, det=det: warp(
                        a, f, padding_mode=args.padding_mode, backend=name, deterministic=det
                    )
            calls = {}
            for name, fn in candidates.items():
                calls[name + " fwd"] = functools.partial(no_grad_call, fn, *tensors)
                calls[name + " both"] = _fwd_bwd(fn, tensors)
            timed = measure_interleaved(calls, device, args.repeats)
            base = "torch" if "torch" in candidates else next(iter(candidates))
            io_bytes = (2 * x.numel() + flow.numel()) * x.element_size()
            for name in candidates:
                fwd, both = timed[name + " fwd"].median_s, timed[name + " both"].median_s
                fwd_peak, both_peak = timed[name + " fwd"].peak_extra_bytes, timed[name + " both"].peak_extra_bytes
                rows.append(
                    [
                        str(shape),
                        dtype_name,
                        name,
                        fwd * 1e3,
                        both * 1e3,
                        io_bytes / fwd / 1e9,
                        timed[base + " fwd"].median_s / fwd,
                        timed[base + " both"].median_s / both,
                        fwd_peak / 2**20,
                        both_peak / 2**20,
                    ]
                )
    header = [
        "(B,C,H,W)",
        "dtype",
        "impl",
        "fwd ms",
        "fwd+bwd ms",
        "fwd GB/s",
        f"fwd speed-up vs {base}",
        f"fwd+bwd speed-up vs {base}",
        "fwd peak extra MB",
        "fwd+bwd peak extra MB",
    ]
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    return f"device: {name}; padding_mode={args.padding_mode}\n\n" + markdown_table(header, rows)
