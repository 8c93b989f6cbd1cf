"""``dynconv bench local_filter``: dynamic local filtering against the unfold formulation.

Shapes are the DFN / involution ones from the foundation issue, ``(B, C, H, W, k, G)``. For each shape and
dtype it measures, in one run, forward and forward+backward of every available backend and of the
baselines: ``unfold`` (unfold, multiply, sum: what most code copies) and, with ``--compile``,
``torch.compile`` of the plain shift-and-accumulate loop.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from dynconv.bench.timing import markdown_table, measure
from dynconv.functional import local_filter2d

DEFAULT_SHAPES = [(8, 64, 64, 64, 5, 1), (4, 128, 56, 56, 7, 8), (16, 3, 64, 64, 9, 1)]
SMALL_SHAPES = [(2, 16, 32, 32, 5, 1), (2, 32, 24, 24, 7, 4)]


def unfold_local_filter(x: torch.Tensor, filters: torch.Tensor, k: int) -> torch.Tensor:
    """The formulation most code uses: unfold the k*k windows, multiply, sum (materialises k*k copies of x)."""
    B, C, H, W = x.shape
    G = filters.shape[1]
    cols = F.unfold(x, k, padding=(k - 1) // 2).view(B, G, C // G, k * k, H, W)
    return (cols * filters.unsqueeze(2)).sum(3).view(B, C, H, W)


def shift_local_filter(x: torch.Tensor, filters: torch.Tensor, k: int) -> torch.Tensor:
    """Shift-and-accumulate written with out-of-place ops, the form ``torch.compile`` is given."""
    B, C, H, W = x.shape
    G = filters.shape[1]
    p = (k - 1) // 2
    xp = F.pad(x, (p, p, p, p)).unflatten(1, (G, C // G))
    out = 0
    for i in range(k):
        for j in range(k):
            out = out + xp[..., i : i + H, j : j + W] * filters[:, :, i * k + j].unsqueeze(2)
    return out.flatten(1, 2)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--shapes", default="default", help="'default', 'small' or 'B,C,H,W,k,G;...'")
    parser.add_argument("--dtypes", default="float32", help="comma-separated: float32,bfloat16,float16")
    parser.add_argument("--backends", default="torch", help="comma-separated dynconv backends to time")
    parser.add_argument("--compile", action="store_true", help="add torch.compile of the shift loop as a baseline")


def _parse_shapes(text: str) -> list[tuple[int, ...]]:
    if text == "default":
        return DEFAULT_SHAPES
    if text == "small":
        return SMALL_SHAPES
    return [tuple(int(v) for v in item.split(",")) for item in text.split(";") if item]


def _fwd_bwd(fn, x, f):
    def step():
        x.grad = f.grad = None
        fn(x, f).sum().backward()

    return step


def run(args: argparse.Namespace) -> str:
    device = torch.device(args.device)
    rows = []
    for shape in _parse_shapes(args.shapes):
        B, C, H, W, k, G = shape
        for dtype_name in args.dtypes.split(","):
            dtype = getattr(torch, dtype_name)
            gen = torch.Generator(device="cpu").manual_seed(0)
            x = torch.randn(B, C, H, W, generator=gen).to(device, dtype).requires_grad_()
            f = torch.randn(B, G, k * k, H, W, generator=gen).to(device, dtype).requires_grad_()
            candidates = {"unfold": lambda x, f: unfold_local_filter(x, f, k)}
            for name in args.backends.split(","):
                candidates[name] = lambda x, f, name=name: local_filter2d(x, f, k, backend=name)
            if args.compile:
                torch._dynamo.reset()  # a fresh cache per shape, or dynamo's recompile limit falls back to eager
                candidates["compiled shift"] = torch.compile(lambda x, f: shift_local_filter(x, f, k))
            results = {}
            for name, fn in candidates.items():
                with torch.no_grad():
                    fwd = measure(lambda: fn(x, f), device, repeats=args.repeats)
                both = measure(_fwd_bwd(fn, x, f), device, repeats=args.repeats)
                results[name] = (fwd, both)
            base_fwd, base_both = results["unfold"]
            for name, (fwd, both) in results.items():
                rows.append(
                    [
                        str(shape),
                        dtype_name,
                        name,
                        fwd.median_ms,
                        both.median_ms,
                        base_fwd.median_s / fwd.median_s,
                        base_both.median_s / both.median_s,
                        fwd.peak_extra_mb,
                        both.peak_extra_mb,
                    ]
                )
    header = [
        "(B,C,H,W,k,G)",
        "dtype",
        "impl",
        "fwd ms",
        "fwd+bwd ms",
        "fwd speed-up vs unfold",
        "fwd+bwd speed-up vs unfold",
        "fwd peak extra MB",
        "fwd+bwd peak extra MB",
    ]
    return markdown_table(header, rows)
