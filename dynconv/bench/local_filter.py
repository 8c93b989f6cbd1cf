"""``dynconv bench local_filter``: dynamic local filtering against the unfold formulation.

Shapes are the DFN / involution ones from the foundation issue, ``(B, C, H, W, k, G)``. For each shape and
dtype it measures, in one run and interleaved (one call of each candidate per round), forward and
forward+backward of every available backend and of the baselines: ``unfold`` (unfold, multiply, sum:
what most code copies) and, with ``--compile``,
``torch.compile`` of the plain shift-and-accumulate loop (on CUDA, inductor generates Triton for it: the
baseline a hand-written kernel has to beat).

Each row is printed as soon as it is measured (see :class:`dynconv.bench.report.Report`); on CUDA the kernel
time by CUDA-graph replay stands beside the eager per-call time, and the bandwidth and speed-ups use it.
Besides times and peak memory it reports the achieved bandwidth: the forward counts the bytes of ``x``,
``filters`` and ``y`` once, forward+backward also those of ``grad_y``, ``grad_x`` and ``grad_filters``
(twice the forward's), a lower bound on the traffic of any implementation; on a GPU whose memory
bandwidth is in :data:`PEAK_BANDWIDTH_GBS` (or given with ``--peak-gbs``) also its fraction of the peak.
"""

from __future__ import annotations

import argparse
import math

import torch
import torch.nn.functional as F

from dynconv.bench.report import Report, device_note, parse_common, parse_shapes, speedup, time_cells, time_header
from dynconv.bench.timing import describe, gbs, measure_fwd_bwd, tensor_bytes
from dynconv.functional import local_filter2d
from dynconv.recipes.args import positive_float

DEFAULT_SHAPES = [(8, 64, 64, 64, 5, 1), (4, 128, 56, 56, 7, 8), (16, 3, 64, 64, 9, 1)]
SMALL_SHAPES = [(2, 16, 32, 32, 5, 1), (2, 32, 24, 24, 7, 4)]
# The shapes of the Triton issue (issue 3); the default on CUDA.
GPU_SHAPES = DEFAULT_SHAPES + [(32, 256, 28, 28, 7, 16)]

# Peak memory bandwidth in GB/s by device name (vendor data sheets), matched as substrings in this order.
PEAK_BANDWIDTH_GBS = [
    ("H200", 4800.0),
    ("H100 NVL", 3900.0),
    ("H100 PCIe", 2000.0),
    ("H100", 3350.0),  # SXM5, HBM3
    ("GH200", 4000.0),
    ("A100 80GB PCIe", 1935.0),
    ("A100-SXM4-80GB", 2039.0),
    ("A100", 1555.0),  # the 40 GB parts
    ("L40S", 864.0),
    ("L4", 300.0),
    ("A10G", 600.0),
    ("RTX 4090", 1008.0),
    ("V100", 900.0),
    ("T4", 320.0),
]


def peak_bandwidth_gbs(device: torch.device) -> float:
    """The data-sheet memory bandwidth of ``device`` in GB/s, or ``nan`` when unknown (and on CPU)."""
    if device.type != "cuda":
        return float("nan")
    name = torch.cuda.get_device_name(device)
    for pattern, peak in PEAK_BANDWIDTH_GBS:
        if pattern in name:
            return peak
    return float("nan")


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
    parser.add_argument(
        "--shapes",
        default="default",
        help="'default' (on CUDA: 'issue'), 'small', 'issue' (= 'gpu': issue 3's shapes) or 'B,C,H,W,k,G;...'",
    )
    parser.add_argument("--dtypes", default="float32", help="comma-separated: float32,bfloat16,float16,float64")
    parser.add_argument("--backends", default="torch", help="comma-separated dynconv backends to time")
    parser.add_argument("--compile", action="store_true", help="add torch.compile of the shift loop as a baseline")
    parser.add_argument(
        "--peak-gbs",
        type=positive_float,
        default=None,
        help="the device's memory bandwidth in GB/s (default: known GPUs)",
    )


def _parse_shapes(text: str, device: torch.device) -> list[tuple[int, ...]]:
    named = {
        "default": GPU_SHAPES if device.type == "cuda" else DEFAULT_SHAPES,
        "small": SMALL_SHAPES,
        "issue": GPU_SHAPES,
        "gpu": GPU_SHAPES,
    }
    return parse_shapes(text, named, 6, "B,C,H,W,k,G")


def run(args: argparse.Namespace) -> str:
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    peak_gbs = args.peak_gbs if args.peak_gbs is not None else peak_bandwidth_gbs(device)
    shapes = _parse_shapes(args.shapes, device)
    dtypes, backends = parse_common(args)
    header = [
        "(B,C,H,W,k,G)",
        "dtype",
        "impl",
        *time_header(cuda),
        "fwd GB/s",
        "fwd frac. of peak BW",
        "fwd+bwd GB/s",
        "fwd+bwd frac. of peak BW",
        "fwd speed-up vs unfold",
        "fwd+bwd speed-up vs unfold",
        "fwd speed-up vs torch",
        "fwd+bwd speed-up vs torch",
        "fwd peak extra MB",
        "fwd+bwd peak extra MB",
    ]
    with_peak = math.isfinite(peak_gbs)  # unknown peak bandwidth (CPU, unlisted GPU): no fraction columns
    keep = [i for i, h in enumerate(header) if with_peak or "frac. of peak" not in h]
    note = device_note(device, f"; peak bandwidth: {peak_gbs:.0f} GB/s" if with_peak else "")
    report = Report.from_args(args, [header[i] for i in keep], note)
    for shape in shapes:
        B, C, H, W, k, G = shape
        for dtype_name in dtypes:
            dtype = getattr(torch, dtype_name)
            try:
                gen = torch.Generator(device="cpu").manual_seed(0)
                x = torch.randn(B, C, H, W, generator=gen).to(device, dtype).requires_grad_()
                f = torch.randn(B, G, k * k, H, W, generator=gen).to(device, dtype).requires_grad_()
                grad_y = torch.randn(B, C, H, W, generator=gen).to(device, dtype)
            except Exception as exc:  # out of memory for this shape: say so and go on with the next
                report.failed([str(shape), dtype_name, "inputs"], describe(exc))
                continue
            # x, filters and y once (y has the size of x here: stride 1, "same" padding).
            fwd_bytes = tensor_bytes(x, f, x)
            candidates = {"unfold": lambda x, f: unfold_local_filter(x, f, k)}
            for name in backends:
                candidates[name] = lambda x, f, name=name: local_filter2d(x, f, k, backend=name)
            if args.compile:
                torch._dynamo.reset()  # a fresh cache per shape, or dynamo's recompile limit falls back to eager
                candidates["compiled shift"] = torch.compile(lambda x, f: shift_local_filter(x, f, k))
            # A materialised grad_y (not the stride-0 one of .sum().backward()), so the backward reads it from
            # memory as in training and the bandwidth column counts bytes that were moved.
            results = measure_fwd_bwd(candidates, (x, f), device, args.repeats, warmup=2, grad_y=grad_y)
            base_fwd, base_both = results["unfold"]
            torch_fwd, torch_both = results.get("torch", (None, None))
            for name, (fwd, both) in results.items():
                fwd_gbs, both_gbs = gbs(fwd_bytes, fwd), gbs(2 * fwd_bytes, both)
                cells = [
                    str(shape),
                    dtype_name,
                    name,
                    *time_cells(fwd, both, cuda),
                    fwd_gbs,
                    fwd_gbs / peak_gbs,
                    both_gbs,
                    both_gbs / peak_gbs,
                    speedup(base_fwd, fwd),
                    speedup(base_both, both),
                    speedup(torch_fwd, fwd) if torch_fwd else math.nan,
                    speedup(torch_both, both) if torch_both else math.nan,
                    fwd.peak_extra_mb,
                    both.peak_extra_mb,
                ]
                report.measured([cells[i] for i in keep], fwd=fwd, both=both)
    return report.close()
