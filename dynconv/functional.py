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

__all__ = ["local_filter2d"]

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
