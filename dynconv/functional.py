"""Public ops: argument checks, normalisation of stride/padding/dilation, and backend dispatch.

Every op follows ``torch.nn.functional.conv2d`` conventions: NCHW tensors, ``stride``/``padding``/
``dilation`` as an int or a pair, and a ``backend`` argument (``None``, ``"reference"``, ``"torch"`` or
``"triton"``; see :mod:`dynconv.backends` for the rule that picks one when it is ``None``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from dynconv import reference
from dynconv._checks import check_same, check_tensor, conv_out_size, pair
from dynconv.backends import choose_backend
from dynconv.ops.local_filter import local_filter2d_op

__all__ = ["local_filter2d", "sample_conv2d"]

IntOrPair = int | Sequence[int]


def local_filter2d(
    x: torch.Tensor,
    filters: torch.Tensor,
    kernel_size: IntOrPair,
    stride: IntOrPair = 1,
    padding: IntOrPair | None = None,
    dilation: IntOrPair = 1,
    backend: str | None = None,
) -> torch.Tensor:
    r"""Dynamic local filtering (Dynamic Filter Networks' *dynamic local filtering layer*; also the
    aggregation step of involution and of CARAFE): every output pixel of every sample has its own
    ``kh x kw`` filter, shared by the channels of a filter group.

    .. math::
        y[b, c, h, w] = \sum_{i, j} f[b, g(c), i k_w + j, h, w] \,
                        x[b, c, h s_h - p_h + i d_h, w s_w - p_w + j d_w]

    with ``g(c) = c // (C // G)`` and zeros outside the image: the window geometry of ``F.conv2d``.

    Args:
        x (Tensor[B, C, H, W]): input; any strides (channels-last and non-contiguous views work).
        filters (Tensor[B, G, kh*kw, H_out, W_out] or Tensor[B, G*kh*kw, H_out, W_out]): the per-pixel
            filters; ``C`` must be divisible by ``G``. Tap ``(i, j)`` is filter index ``i * kw + j``.
        kernel_size (int or (int, int)): ``k`` or ``(kh, kw)``.
        stride (int or (int, int)): step between output pixels in the input. Default 1.
        padding (int or (int, int) or None): zero padding on each side; ``None`` means
            ``(k - 1) // 2 * dilation`` ("same" size for odd ``k`` and stride 1). Default None.
        dilation (int or (int, int)): spacing between taps. Default 1.
        backend (str or None): ``"reference"``, ``"torch"``, ``"triton"`` or ``None`` (automatic).

    Returns:
        Tensor[B, C, H_out, W_out] in the dtype of ``x`` (fp16/bf16 accumulate in fp32), with
        ``H_out = (H + 2 p_h - d_h (k_h - 1) - 1) // s_h + 1`` and the same for ``W_out``.

    Raises:
        TypeError: a non-tensor, a non-floating dtype, or ``filters`` of another dtype than ``x``.
        ValueError: a wrong rank, ``C`` not divisible by ``G``, a filter shape that does not match the output
            size, tensors on different devices, or non-positive sizes.
    """
    x = check_tensor(x, "x", ndim=4, shape_hint="[B, C, H, W]")
    filters = check_tensor(filters, "filters", ndim=(4, 5), shape_hint="[B, G, kh*kw, H_out, W_out]")
    check_same(x, "x", filters, "filters")
    kh, kw = pair(kernel_size, "kernel_size")
    sh, sw = pair(stride, "stride")
    dh, dw = pair(dilation, "dilation")
    if padding is None:
        ph, pw = (kh - 1) // 2 * dh, (kw - 1) // 2 * dw
    else:
        ph, pw = pair(padding, "padding", minimum=0)
    B, C, H, W = x.shape
    if min(B, C, H, W) < 1:
        raise ValueError(f"x must have positive sizes [B, C, H, W], got shape {tuple(x.shape)}")
    Ho, Wo = conv_out_size(H, kh, sh, ph, dh), conv_out_size(W, kw, sw, pw, dw)
    if Ho < 1 or Wo < 1:
        raise ValueError(
            f"x of spatial size {(H, W)} is too small for kernel_size {(kh, kw)} with padding "
            f"{(ph, pw)} and dilation {(dh, dw)}: the output would be {(Ho, Wo)}"
        )
    K = kh * kw
    if filters.dim() == 4:
        if filters.shape[1] % K != 0:
            raise ValueError(
                f"filters of shape [B, G*kh*kw, H_out, W_out] must have a channel count divisible by "
                f"kh*kw = {K}, got shape {tuple(filters.shape)}"
            )
        filters = filters.unflatten(1, (filters.shape[1] // K, K))
    G = filters.shape[1]
    expected = (B, G, K, Ho, Wo)
    if G < 1 or tuple(filters.shape) != expected:
        raise ValueError(
            f"filters must have shape [B, G, kh*kw, H_out, W_out] = {list(expected)} for x of shape "
            f"{list(x.shape)}, kernel_size {(kh, kw)}, stride {(sh, sw)}, padding {(ph, pw)}, "
            f"dilation {(dh, dw)}; got {list(filters.shape)}"
        )
    if C % G != 0:
        raise ValueError(f"x channels ({C}) must be divisible by the number of filter groups G ({G})")
    args = ((kh, kw), (sh, sw), (ph, pw), (dh, dw))
    chosen = choose_backend("local_filter2d", x, filters, backend=backend)
    if chosen == "reference":
        return reference.local_filter2d(x, filters, *args)
    return local_filter2d_op(x, filters, *(list(a) for a in args), chosen)


def sample_conv2d(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    stride: IntOrPair = 1,
    padding: IntOrPair = 0,
    dilation: IntOrPair = 1,
    groups: int = 1,
    backend: str | None = None,
) -> torch.Tensor:
    r"""Sample-specific convolution: every sample of the batch is convolved with its own kernel (Dynamic Filter
    Networks' *dynamic convolution layer*; the core of CondInst's mask heads and of every kernel mixture:
    CondConv, DY-CNN, ODConv, DyNet).

    .. math::
        y[b] = \operatorname{conv2d}(x[b], w[b], \text{bias}[b], \text{stride}, \text{padding}, \text{dilation},
        \text{groups})

    Backends: ``"reference"`` loops over the samples with ``F.conv2d``; ``"torch"`` folds the batch into the
    groups of one ``F.conv2d`` call (input ``[1, B*C_in, H, W]``, weight ``[B*C_out, C_in/groups, kh, kw]``,
    ``groups = B*groups``), which is one kernel launch and differentiable through ``F.conv2d``'s own backward.
    There is no Triton kernel for this op: the grouped convolution already runs on cuDNN/oneDNN.

    Args:
        x (Tensor[B, C_in, H, W]): input; any strides.
        weight (Tensor[B, C_out, C_in/groups, kh, kw]): one kernel per sample.
        bias (Tensor[B, C_out] or None): one bias per sample. Default None.
        stride, padding, dilation (int or (int, int)): as in ``F.conv2d`` (``padding`` may be 0). Defaults 1, 0, 1.
        groups (int): channel groups of each sample's convolution, as in ``F.conv2d``. Default 1.
        backend (str or None): ``"reference"``, ``"torch"`` or ``None`` (automatic: ``torch``).

    Returns:
        Tensor[B, C_out, H_out, W_out] in the dtype of ``x``, with the output size of ``F.conv2d``.

    Raises:
        TypeError: a non-tensor, a non-floating dtype, ``weight``/``bias`` of another dtype than ``x``, or a
            non-int ``groups``.
        ValueError: a wrong rank, a batch/channel/group mismatch, tensors on different devices, non-positive
            sizes, an input too small for the kernel, or ``backend="triton"`` (no kernel for this op).
    """
    x = check_tensor(x, "x", ndim=4, shape_hint="[B, C_in, H, W]")
    weight = check_tensor(weight, "weight", ndim=5, shape_hint="[B, C_out, C_in/groups, kh, kw]")
    check_same(x, "x", weight, "weight")
    if bias is not None:
        bias = check_tensor(bias, "bias", ndim=2, shape_hint="[B, C_out]")
        check_same(x, "x", bias, "bias")
    if isinstance(groups, bool) or not isinstance(groups, int):
        raise TypeError(f"groups must be an int, got {groups!r}")
    if groups < 1:
        raise ValueError(f"groups must be >= 1, got {groups}")
    sh, sw = pair(stride, "stride")
    ph, pw = pair(padding, "padding", minimum=0)
    dh, dw = pair(dilation, "dilation")
    B, C, H, W = x.shape
    if min(B, C, H, W) < 1:
        raise ValueError(f"x must have positive sizes [B, C_in, H, W], got shape {tuple(x.shape)}")
    if C % groups != 0:
        raise ValueError(f"x channels ({C}) must be divisible by groups ({groups})")
    _, C_out, _, kh, kw = weight.shape
    expected = (B, C_out, C // groups, kh, kw)
    if tuple(weight.shape) != expected or min(C_out, kh, kw) < 1:
        raise ValueError(
            f"weight must have shape [B, C_out, C_in/groups, kh, kw] = [{B}, C_out, {C // groups}, kh, kw] for x of "
            f"shape {list(x.shape)} and groups {groups}, with positive sizes; got {list(weight.shape)}"
        )
    if C_out % groups != 0:
        raise ValueError(f"weight's C_out ({C_out}) must be divisible by groups ({groups})")
    if bias is not None and tuple(bias.shape) != (B, C_out):
        raise ValueError(f"bias must have shape [B, C_out] = {[B, C_out]}, got {list(bias.shape)}")
    Ho, Wo = conv_out_size(H, kh, sh, ph, dh), conv_out_size(W, kw, sw, pw, dw)
    if Ho < 1 or Wo < 1:
        raise ValueError(
            f"x of spatial size {(H, W)} is too small for kernel size {(kh, kw)} with padding {(ph, pw)} and "
            f"dilation {(dh, dw)}: the output would be {(Ho, Wo)}"
        )
    tensors = (x, weight) if bias is None else (x, weight, bias)
    chosen = choose_backend("sample_conv2d", *tensors, backend=backend)
    args = ((sh, sw), (ph, pw), (dh, dw), groups)
    if chosen == "reference":
        return reference.sample_conv2d(x, weight, bias, *args)
    out = torch.nn.functional.conv2d(
        x.reshape(1, B * C, H, W),
        weight.reshape(B * C_out, C // groups, kh, kw),
        None if bias is None else bias.reshape(B * C_out),
        (sh, sw),
        (ph, pw),
        (dh, dw),
        B * groups,
    )
    return out.view(B, C_out, Ho, Wo)
