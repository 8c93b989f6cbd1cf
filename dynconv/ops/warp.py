"""Flow warping (Deep Feature Flow, Zhu et al., CVPR 2017): the ``torch`` and ``triton`` backends of
:func:`dynconv.warp`.

``F.grid_sample`` already is a fused bilinear gather with a scatter backward (wrt the input) and an
analytic backward wrt the grid, on CPU and CUDA, so the torch backend only turns the flow in pixels into
its normalised grid. ``align_corners=True`` puts pixel centres at ``-1`` and ``+1`` for the first and
last pixel, so a position ``p`` in pixels maps to ``2 p / (size - 1) - 1`` and ``reflection`` reflects
about pixel centres (kornia's convention). The grid is built in fp32 for fp16/bf16 inputs: a position
near 200 in fp16 is only resolved to 1/8 pixel.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dynconv.backends import TRITON_OPS
from dynconv.ops._autograd import refuse_double_backward

__all__ = ["flow_to_grid", "warp_torch", "warp_triton_op"]


def flow_to_grid(flow: torch.Tensor) -> torch.Tensor:
    """The ``grid_sample`` grid (``align_corners=True``) that samples at ``pixel + flow``.

    Args:
        flow (Tensor[B, 2, H, W]): (dx, dy) in pixels; ``H, W >= 2``.

    Returns:
        Tensor[B, H, W, 2]: (x, y) in ``[-1, 1]`` for positions inside the image.
    """
    B, _, H, W = flow.shape
    cols = torch.arange(W, device=flow.device, dtype=flow.dtype).view(1, 1, W)
    rows = torch.arange(H, device=flow.device, dtype=flow.dtype).view(1, H, 1)
    gx = (cols + flow[:, 0]) * (2.0 / (W - 1)) - 1.0
    gy = (rows + flow[:, 1]) * (2.0 / (H - 1)) - 1.0
    return torch.stack((gx, gy), dim=-1)


def warp_torch(x: torch.Tensor, flow: torch.Tensor, mode: str, padding_mode: str) -> torch.Tensor:
    """Backward warping by ``grid_sample`` on validated arguments (see :func:`dynconv.warp`); ``H, W >= 2``."""
    compute = x.dtype if x.dtype in (torch.float32, torch.float64) else torch.float32
    grid = flow_to_grid(flow.to(compute))
    out = F.grid_sample(x.to(compute), grid, mode=mode, padding_mode=padding_mode, align_corners=True)
    return out.to(x.dtype)


# ------------------------------------------------------------------------------------------------ triton

# The torch backend needs no custom op (grid_sample is one); the Triton kernels are registered as one, with
# their own backward, so torch.compile traces through them and autograd reaches the fused backward.
TRITON_OPS["warp"] = (torch.float32, torch.float16, torch.bfloat16)


@torch.library.custom_op("dynconv::warp_triton", mutates_args=())
def warp_triton_op(
    x: torch.Tensor, flow: torch.Tensor, mode: str, padding_mode: str, deterministic: bool
) -> torch.Tensor:
    """Forward of the Triton backend on validated arguments (see :func:`dynconv.warp`)."""
    from dynconv.kernels import warp as kernels

    return kernels.forward(x, flow, mode, padding_mode)


@warp_triton_op.register_fake
def _(x, flow, mode, padding_mode, deterministic):
    return x.new_empty(x.shape)


@torch.library.custom_op("dynconv::warp_triton_backward", mutates_args=())
def warp_triton_backward_op(
    grad_out: torch.Tensor,
    x: torch.Tensor,
    flow: torch.Tensor,
    mode: str,
    padding_mode: str,
    needs: list[bool],
    deterministic: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients wrt ``(x, flow)``; one not asked for in ``needs`` comes back empty."""
    from dynconv.kernels import warp as kernels

    return kernels.backward(grad_out, x, flow, mode, padding_mode, needs, deterministic)


@warp_triton_backward_op.register_fake
def _(grad_out, x, flow, mode, padding_mode, needs, deterministic):
    return tuple(t.new_empty(t.shape) if need else t.new_empty(0) for t, need in zip((x, flow), needs))


def _setup_context(ctx, inputs, output):
    x, flow, mode, padding_mode, deterministic = inputs
    ctx.save_for_backward(x, flow)
    ctx.args = (mode, padding_mode)
    ctx.deterministic = deterministic


def _backward(ctx, grad_out):
    x, flow = ctx.saved_tensors
    needs = list(ctx.needs_input_grad[:2])
    if not any(needs):
        return (None,) * 5
    grads = warp_triton_backward_op(grad_out, x, flow, *ctx.args, needs, ctx.deterministic)
    return tuple(g if need else None for g, need in zip(grads, needs)) + (None,) * 3


warp_triton_op.register_autograd(_backward, setup_context=_setup_context)
refuse_double_backward(warp_triton_backward_op, "warp", "the 'triton' backend has", "'torch' or 'reference'")
