"""Triton launchers of flow warping (Deep Feature Flow, Zhu et al., CVPR 2017): ``y(p) = x(p + flow(p))``.

In the sampling core (:mod:`dynconv.kernels._sampling`) a row is a pixel with one sampling point, the
convolution grid of a 1x1 kernel plus the flow ``(dx, dy)``, with the three padding modes of
``F.grid_sample(..., align_corners=True)`` and ``"nearest"``. Tiles are ``[channels, pixels]``
(``PIXEL_MAJOR``): threads run along the pixels, contiguous in NCHW memory, and each keeps only a few pixels'
geometry (a ``[pixels, channels]`` tile put a warp across 32 channels of one pixel: strided loads, and 16
pixels of geometry per thread, spilling registers on sm_90; dynconv check-kernels).

The input gradient is scattered with fp32 atomics or deterministically; ``grid_sample``'s CUDA backward has
no deterministic variant (it raises in deterministic mode); this one does.
"""

from __future__ import annotations

import torch

from dynconv.kernels import _launch as L
from dynconv.kernels import _sampling as S

__all__ = ["backward", "forward"]

INTERPRETED = S.INTERPRETED
# Block overrides for the launch rule (dynconv.kernels._launch.sampling_config); tests shrink the blocks here
# (BLOCK_P: pixels, the sampling core's rows).
CONFIG: dict = {}


def _rule(mode: str, padding_mode: str) -> S.Rule:
    meta = dict(GRID=S.GRID_CONV, OFFSET_XY=True, REMOVE_CENTER=False, PIXEL_MAJOR=True)
    meta.update(PAD=S.PADDING_MODES[padding_mode], MODE=S.MODES[mode])
    blocks = {"BLOCK_R" if k == "BLOCK_P" else k: v for k, v in CONFIG.items()}
    return S.Rule([1, 1], [1, 1], [0, 0], [0, 0], 1, 1, 1, meta, blocks=blocks)


def forward(x: torch.Tensor, flow: torch.Tensor, mode: str, padding_mode: str) -> torch.Tensor:
    """``y(p) = x(p + flow(p))`` on validated arguments (see :func:`dynconv.warp`); output contiguous NCHW."""
    L.check_launchable(x, flow, interpreted=INTERPRETED)
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    S.gather(x, flow, None, out.unsqueeze(-1), _rule(mode, padding_mode))
    return out


def backward(grad_out, x, flow, mode, padding_mode, needs, deterministic=None):
    """Gradients wrt ``(x, flow)``; one not asked for in ``needs`` comes back empty.

    ``deterministic=None`` follows ``torch.are_deterministic_algorithms_enabled()``: fp32 atomics when it is
    off, the two-pass ``index_put_`` accumulation when it is on. ``"nearest"`` has a zero flow gradient.
    """
    need_x, need_flow = needs
    atomic = not L.resolve_deterministic(deterministic)
    L.check_launchable(grad_out, x, flow, interpreted=INTERPRETED)
    grad_x = torch.zeros(x.shape, dtype=torch.float32, device=x.device) if need_x else None
    grad_flow = torch.zeros(flow.shape, dtype=torch.float32, device=x.device) if need_flow else None
    if need_x or (need_flow and mode == "bilinear"):
        rule = _rule(mode, padding_mode)
        S.scatter(grad_out.unsqueeze(-1), x, flow, None, grad_x, grad_flow, None, rule, atomic)
    # Outputs of a custom op must not alias each other, so a missing gradient is its own empty tensor.
    return (
        grad_x.to(x.dtype) if need_x else x.new_empty(0),
        grad_flow.to(flow.dtype) if need_flow else x.new_empty(0),
    )
