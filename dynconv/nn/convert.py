"""``dynconv.convert``: swap the ``nn.Conv2d`` layers of an existing model for kernel-mixture layers.

Pretrained-weight conversion, as CondConv, DY-CNN and ODConv are applied to existing backbones: every
expert starts from the static kernel (scaled by the attention's uniform gain, plus zero-sum noise that keeps
the uniform mixture exact), and the attention's last layer starts at zero, so the converted model computes
the original function at conversion time.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from dynconv.nn.mixture import CondConv2d, DynamicConv2d, DyNetConv2d, ODConv2d

__all__ = ["KINDS", "convert", "expert_lr_scales", "skip_stem_and_pointwise", "step_response"]

KINDS: dict[str, type] = {
    "condconv": CondConv2d,
    "dynamic": DynamicConv2d,
    "dy-cnn": DynamicConv2d,
    "odconv": ODConv2d,
    "dynet": DyNetConv2d,
}


def skip_stem_and_pointwise(name: str, conv: nn.Conv2d) -> bool:
    """A predicate for :func:`convert`: keep the 3-channel stem and the 1x1 convolutions static."""
    return conv.in_channels != 3 and conv.kernel_size != (1, 1)


def convert(
    model: nn.Module,
    kind: str | type,
    num_experts: int | None = None,
    predicate: Callable[[str, nn.Conv2d], bool] | None = None,
    expert_noise: float = 0.01,
    **layer_kwargs,
) -> nn.Module:
    """Replace, in place, every ``nn.Conv2d`` of ``model`` accepted by ``predicate`` by a dynamic layer that
    computes the same function at conversion time.

    Args:
        model (nn.Module): the model to convert (modified in place and returned).
        kind (str or type): ``"condconv"``, ``"dynamic"`` (alias ``"dy-cnn"``), ``"odconv"``, ``"dynet"``, or a
            layer class with a ``from_conv(conv, expert_noise=..., **kwargs)`` classmethod.
        num_experts (int or None): experts per layer; None keeps the layer's default (CondConv 8, others 4).
        predicate (callable or None): ``predicate(qualified_name, conv) -> bool`` chooses the layers to
            convert (for example :func:`skip_stem_and_pointwise`); None converts every ``nn.Conv2d``.
        expert_noise (float): relative std of the zero-sum perturbation of the experts (see
            ``load_static_weight``). It leaves the output at conversion unchanged; 0 makes the experts exact
            copies, which then stay identical under training (they receive identical gradients).
            Default 0.01.
        **layer_kwargs: passed to the layer (``formulation``, ``temperature``, ...).

    Returns:
        nn.Module: ``model``.

    Raises:
        ValueError: an unknown ``kind``, no layer converted, or a layer that cannot be converted
            (``padding_mode`` other than zeros, uneven ``padding='same'``).
    """
    if isinstance(kind, str):
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {sorted(KINDS)} or a layer class, got {kind!r}")
        cls = KINDS[kind]
    elif isinstance(kind, type) and hasattr(kind, "from_conv"):
        cls = kind
    else:
        raise TypeError(f"kind must be a string or a layer class with from_conv, got {kind!r}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if num_experts is not None:
        layer_kwargs["num_experts"] = num_experts
    targets = [
        (name, m)
        for name, m in model.named_modules()
        if type(m) is nn.Conv2d and (predicate is None or predicate(name, m))
    ]
    if not targets:
        raise ValueError("convert found no nn.Conv2d layer to replace (check the predicate)")
    if targets[0][0] == "":
        raise ValueError("model is itself an nn.Conv2d: use the layer class's from_conv(conv) instead")
    for name, conv in targets:
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        try:
            layer = cls.from_conv(conv, expert_noise=expert_noise, **layer_kwargs)
        except ValueError as exc:
            raise ValueError(f"cannot convert layer {name!r}: {exc}") from None
        setattr(parent, attr, layer)
    return model


@torch.no_grad()
def step_response(layer: nn.Module, seed: int = 0) -> float:
    """How far one SGD step on a mixture layer's experts (``weight [K, C_out, C_in/groups, kh, kw]``) moves its
    output, relative to the same step on a static convolution of the same geometry, at the layer's current state
    (in eval mode, the attention held fixed). Both outputs are linear in their kernels, so a finite step is exact:
    the ratio is ``|y(W - e g) - y(W)| / |conv(x, e g_static)|`` on a fixed random input ``[4, C_in, 8, 8]`` and
    output gradient. At conversion it is ``sum_k c_k^2`` (see the module docstring).

    Args:
        layer (KernelMixtureConv2d): the layer (any module with a 5-d ``weight`` and ``nn.Conv2d``'s geometry).
        seed (int): seed of the random input and output gradient. Default 0.
    """
    g = torch.Generator().manual_seed(seed)
    dev, dtype = layer.weight.device, layer.weight.dtype
    x = torch.randn(4, layer.in_channels, 8, 8, generator=g).to(dev, dtype)
    was_training = layer.training
    layer.eval()
    try:
        with torch.enable_grad():
            y0 = layer(x)
            r = torch.randn(y0.shape, generator=g).to(dev, dtype)
            grad = torch.autograd.grad((y0 * r).sum(), layer.weight)[0]
        step = 1e-3 * layer.weight.norm() / grad.norm().clamp_min(1e-30)
        layer.weight.sub_(step * grad)
        moved = (layer(x) - y0).norm()
        layer.weight.add_(step * grad)
        geometry = dict(stride=layer.stride, padding=layer.padding, dilation=layer.dilation, groups=layer.groups)
        grad_static = torch.nn.grad.conv2d_weight(x, layer.weight.shape[1:], r, **geometry)
        static_moved = F.conv2d(x, step * grad_static, **geometry).norm()
    finally:
        layer.train(was_training)
    return float(moved / static_moved)


def expert_lr_scales(model: nn.Module) -> dict[str, float]:
    """For each mixture layer's experts (``"<name>.weight"``), the learning-rate factor that makes its SGD step
    move the layer's output as the static convolution's would (``1 / step_response(layer)``, measured now: call
    it right after :func:`convert`). With plain SGD (momentum included) a factor ``s`` on the experts' learning
    rate is the same as training ``W = sqrt(s) * V``: the function at conversion and the state-dict keys stay as
    they are. Give the experts' weight decay the inverse factor to keep the decay per step.

    Returns:
        dict[str, float]: parameter name -> factor (CondConv 0.5, DyNet 1, DY-CNN with 4 experts 4, ODConv 64-256).
    """
    return {
        f"{name}.weight": 1.0 / step_response(m)
        for name, m in model.named_modules()
        if isinstance(getattr(m, "weight", None), nn.Parameter) and m.weight.ndim == 5 and hasattr(m, "num_experts")
    }
