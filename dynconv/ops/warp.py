"""Flow warping (Deep Feature Flow, Zhu et al., CVPR 2017): the ``torch`` and ``triton`` backends of
:func:`dynconv.warp`.

The torch backend samples at ``pixel + flow`` with the shared sampler (:mod:`dynconv.ops._sampling`, ``grid_sample``
with ``align_corners=False``), differentiable through ``grid_sample``'s own backward. ``"reflection"`` reflects
about the first and last pixel centres (kornia's convention), which is ``grid_sample``'s reflection with
``align_corners=True`` (with ``False`` it reflects about the image edges), so that mode uses that mapping. The
positions are computed in fp32 for fp16/bf16 inputs: a position near 200 in fp16 is only resolved to 1/8 pixel.
"""

from __future__ import annotations

import torch

from dynconv.backends import TRITON_OPS
from dynconv.ops import _sampling
from dynconv.ops._autograd import refuse_double_backward

__all__ = ["warp_torch", "warp_triton_op"]


def warp_torch(x: torch.Tensor, flow: torch.Tensor, mode: str, padding_mode: str) -> torch.Tensor:
    """Backward warping by the shared sampler on validated arguments (see :func:`dynconv.warp`)."""
    B, C, H, W = x.shape
    compute = x.dtype if x.dtype in (torch.float32, torch.float64) else torch.float32
    flow = flow.to(compute)
    px = torch.arange(W, device=x.device, dtype=compute).view(1, 1, W) + flow[:, 0]
    py = torch.arange(H, device=x.device, dtype=compute).view(1, H, 1) + flow[:, 1]
    # grid_sample's reflection about pixel centres is the one of align_corners=True (see _sampling.pixel_grid).
    corners = padding_mode == "reflection"
    grid = _sampling.pixel_grid(px, py, H, W, align_corners=corners)
    out = _sampling.sample(x.to(compute), grid, mode, padding_mode, align_corners=corners)
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
