"""``dynconv bench dcnv``: the DCNv3/DCNv4 sampling core (:func:`dynconv.dcnv3`, :func:`dynconv.dcnv4`).

Shapes ``(B, H, W, G, C/G)`` with a 3x3 kernel, stride 1, "same" padding: the official DCNv4 operator benchmark
(batch 64 at 56x56 with 4 groups of 32 channels down to 7x7 with 32x32; batch 1 at high resolution with 4-8
groups of 16-64 channels). For each shape, dtype and op it measures in one run, interleaved (one call of each
candidate per round), forward and forward+backward
(grad of input, offsets and modulation) of every requested backend and of the ``grid_sample (all P)``
baseline: the formulation of InternImage's ``dcnv3_core_pytorch`` (one ``grid_sample`` over all P points,
then a weighted sum; written here from the definition), which materialises P copies of the output.
Offsets are random with a standard deviation of 2 pixels (many samples of the border rows fall outside).

On CUDA, when the official DCNv4 package imports (``pip install DCNv4`` compiles its CUDA kernels; it needs
a GPU and nvcc, and runs on CUDA tensors only), its ``DCNv4Function`` joins the dcnv4 rows as
``official DCNv4`` (``--no-official`` leaves it out): the baseline the issue names for DCNv4's forward; when it
does not import, a row says so. Each row is printed as soon as it is measured; on CUDA the kernel time by
CUDA-graph replay stands beside the eager per-call time. GB/s counts every input and the output once, and for
forward+backward twice that (their gradients).
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from dynconv.bench.report import (
    Report,
    device_note,
    parse_common,
    parse_list,
    parse_shapes,
    speedup,
    time_cells,
    time_header,
)
from dynconv.bench.timing import describe, gbs, measure_fwd_bwd, tensor_bytes
from dynconv.errors import UserError
from dynconv.functional import dcnv3, dcnv4

FULL_SHAPES = [
    (64, 56, 56, 4, 32),
    (64, 28, 28, 8, 32),
    (64, 14, 14, 16, 32),
    (64, 7, 7, 32, 32),
    (1, 200, 320, 4, 16),
    (1, 100, 160, 8, 16),
    (1, 50, 80, 8, 32),
    (1, 25, 40, 8, 64),
]
# The same shapes at batch 4 (and the two largest high-resolution ones left out): minutes on 2 CPU cores.
QUICK_SHAPES = [(4, 56, 56, 4, 32), (4, 14, 14, 16, 32), (1, 100, 160, 8, 16), (1, 25, 40, 8, 64)]
# Seconds on a CPU, with the reference backend too.
SMALL_SHAPES = [(2, 14, 14, 4, 16), (1, 20, 24, 2, 32)]
NAMED_SHAPES = {
    "default": FULL_SHAPES,
    "full": FULL_SHAPES,
    "issue": FULL_SHAPES,
    "quick": QUICK_SHAPES,
    "small": SMALL_SHAPES,
}


def grid_sample_all_points(value, offset, mask, group):
    """DCNv3 3x3/stride 1/pad 1 as one grid_sample over all points (InternImage's PyTorch formulation)."""
    B, H, W, C = value.shape
    P = 9
    Cg = C // group
    x = value.permute(0, 3, 1, 2).reshape(B * group, Cg, H, W)
    ys, xs = torch.meshgrid(
        torch.arange(H, device=value.device, dtype=value.dtype),
        torch.arange(W, device=value.device, dtype=value.dtype),
        indexing="ij",
    )
    kx, ky = torch.meshgrid(torch.arange(-1, 2), torch.arange(-1, 2), indexing="ij")  # x-major points
    kernel = torch.stack((kx.flatten(), ky.flatten()), -1).to(value)  # [P, 2]
    base = torch.stack((xs, ys), -1).view(1, H, W, 1, 1, 2)
    loc = base + kernel.view(1, 1, 1, 1, P, 2) + offset.view(B, H, W, group, P, 2)
    size = torch.tensor([W, H], device=value.device, dtype=value.dtype)
    grid = ((2 * loc + 1) / size - 1).permute(0, 3, 1, 2, 4, 5).reshape(B * group, H * W, P, 2)
    sampled = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)  # [BG, Cg, HW, P]
    m = mask.view(B, H * W, group, P).permute(0, 2, 1, 3).reshape(B * group, 1, H * W, P)
    return (sampled * m).sum(-1).view(B, C, H, W).permute(0, 2, 3, 1)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--shapes",
        default=None,
        help="'default' (= 'full' = 'issue': the official DCNv4 benchmark's), 'quick', 'small' or "
        "'B,H,W,G,Cg;...' (3x3 kernel)",
    )
    parser.add_argument("--quick", action="store_true", help="the quick subset, unless --shapes is given")
    parser.add_argument("--dtypes", default="float32", help="comma-separated: float32,bfloat16,float16,float64")
    parser.add_argument("--ops", default="dcnv3,dcnv4", help="comma-separated: dcnv3,dcnv4")
    parser.add_argument(
        "--backends", default="torch,reference", help="comma-separated dynconv backends; the first is the baseline"
    )
    parser.add_argument("--no-grid-sample", action="store_true", help="leave out the grid_sample (all P) baseline")
    parser.add_argument(
        "--no-official", action="store_true", help="leave out the official DCNv4 CUDA op (used when it imports)"
    )


def _parse_shapes(args) -> list[tuple[int, ...]]:
    text = args.shapes or ("quick" if args.quick else "default")
    return parse_shapes(text, NAMED_SHAPES, 5, "B,H,W,G,Cg")


OFFICIAL = "official DCNv4"


def official_dcnv4(group: int):
    """The official DCNv4 op for this bench's geometry (3x3, stride 1, padding 1, dilation 1, offset scale 1,
    all 9 points), as its ``DCNv4`` module calls it (``im2col_step`` 256); None when the package does not
    import (not installed, or its compiled extension missing)."""
    try:
        from DCNv4.functions import DCNv4Function
    except ImportError:
        return None

    def fn(value, offset_mask):
        # (input, offset_mask, kernel h/w, stride h/w, pad h/w, dilation h/w, group, group_channels,
        #  offset_scale, im2col_step, remove_center): the argument order of DCNv4Function.forward
        return DCNv4Function.apply(
            value, offset_mask, 3, 3, 1, 1, 1, 1, 1, 1, group, value.shape[-1] // group, 1.0, 256, False
        )

    return fn


def _candidates(op, backends, group, with_grid_sample, with_official=False):
    out = {}
    for name in backends:
        if op == "dcnv3":
            out[name] = lambda v, o, m, name=name: dcnv3(v, o, m, 3, group=group, backend=name)
        else:
            out[name] = lambda v, om, name=name: dcnv4(v, om, 3, group=group, backend=name)
    if with_grid_sample and op == "dcnv3":
        out["grid_sample (all P)"] = lambda v, o, m: grid_sample_all_points(v, o, m, group)
    official = official_dcnv4(group) if with_official and op == "dcnv4" else None
    if official is not None:
        out[OFFICIAL] = official
    return out


def run(args: argparse.Namespace) -> str:
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    shapes = _parse_shapes(args)
    dtypes, backends = parse_common(args)
    ops = parse_list(args.ops, "--ops")
    if set(ops) - {"dcnv3", "dcnv4"}:
        raise UserError(f"--ops: expected a comma-separated list of dcnv3, dcnv4, got {args.ops!r}")
    with_official = cuda and not args.no_official and "dcnv4" in ops
    # The official op cannot run without its package: a row per dcnv4 measurement says so (not a crash).
    official_missing = with_official and official_dcnv4(1) is None
    header = [
        "(B,H,W,G,C/G)",
        "dtype",
        "op",
        "impl",
        *time_header(cuda),
        "fwd GB/s",
        "fwd+bwd GB/s",
        f"fwd speed-up vs {backends[0]}",
        f"fwd+bwd speed-up vs {backends[0]}",
        "fwd peak extra MB",
        "fwd+bwd peak extra MB",
    ]
    report = Report.from_args(args, header, device_note(device, "; 3x3 kernel, stride 1, padding 1"))
    for shape in shapes:
        B, H, W, G, Cg = shape
        P = 9
        for dtype_name in dtypes:
            dtype = getattr(torch, dtype_name)
            gen = torch.Generator(device="cpu").manual_seed(0)
            value = torch.randn(B, H, W, G * Cg, generator=gen)
            offset = 2 * torch.randn(B, H, W, G * P * 2, generator=gen)
            mask = torch.softmax(torch.randn(B, H, W, G, P, generator=gen), -1).flatten(-2)
            grad_y_cpu = torch.randn(B, H, W, G * Cg, generator=gen)
            for op in ops:
                if op == "dcnv3":
                    inputs = [value, offset, mask]
                else:  # the official DCNv4 layout: per group 2P offsets then P scalars, padded to a multiple of 8
                    om = torch.cat([offset.unflatten(-1, (G, 2 * P)), mask.unflatten(-1, (G, P))], -1).flatten(-2)
                    inputs = [value, F.pad(om, (0, -om.shape[-1] % 8))]
                try:
                    inputs = [t.to(device, dtype).requires_grad_() for t in inputs]
                    grad_y = grad_y_cpu.to(device, dtype)
                except Exception as exc:  # out of memory for this shape: say so and go on with the next
                    report.failed([str(shape), dtype_name, op, "inputs"], describe(exc))
                    continue
                # every input and the output (the size of value) once; the backward as much again
                fwd_bytes = tensor_bytes(*inputs, inputs[0])
                candidates = _candidates(op, backends, G, not args.no_grid_sample, with_official)
                results = measure_fwd_bwd(candidates, inputs, device, args.repeats, warmup=2, grad_y=grad_y)
                base_fwd, base_both = results[backends[0]]
                for name, (fwd, both) in results.items():
                    cells = [
                        str(shape),
                        dtype_name,
                        op,
                        name,
                        *time_cells(fwd, both, cuda),
                        gbs(fwd_bytes, fwd),
                        gbs(2 * fwd_bytes, both),
                        speedup(base_fwd, fwd),
                        speedup(base_both, both),
                        fwd.peak_extra_mb,
                        both.peak_extra_mb,
                    ]
                    report.measured(cells, fwd=fwd, both=both)
                if op == "dcnv4" and official_missing:
                    report.failed(
                        [str(shape), dtype_name, op, OFFICIAL],
                        "the DCNv4 package does not import (pip install DCNv4 builds its CUDA kernels; "
                        "--no-official leaves this row out)",
                    )
    return report.close()
