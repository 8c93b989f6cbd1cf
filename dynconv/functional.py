"""Public ops: argument checks, normalisation of stride/padding/dilation, and backend dispatch.

Every op follows ``torch.nn.functional.conv2d`` conventions: NCHW tensors, ``stride``/``padding``/
``dilation`` as an int or a pair (numpy integers and one-element sequences too, as ``F.conv2d`` takes them), fake
and meta tensors for shape propagation, and keyword-only ``backend`` (``None``, ``"reference"``, ``"torch"`` or
``"triton"``; see :mod:`dynconv.backends` for the rule that picks one when it is ``None``) and ``deterministic``
(``None`` follows ``torch.are_deterministic_algorithms_enabled()``; each op says what it changes) arguments.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from dynconv import reference
from dynconv._checks import as_int, autocast_op, check_same, check_tensor, conv_out_size, conv_padding, pair
from dynconv.backends import choose_backend
from dynconv.ops.dcnv import dcn_sample_op
from dynconv.ops.deform import deform_conv2d_op
from dynconv.ops.local_filter import local_filter2d_op
from dynconv.ops.warp import warp_torch, warp_triton_op

__all__ = ["dcnv3", "dcnv4", "deform_conv2d", "local_filter2d", "sample_conv2d", "warp"]

IntOrPair = int | Sequence[int]


@autocast_op("input", "offset", "weight", "bias", "mask")
def deform_conv2d(
    input: torch.Tensor,
    offset: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    stride: IntOrPair = (1, 1),
    padding: IntOrPair | str = (0, 0),
    dilation: IntOrPair = (1, 1),
    mask: torch.Tensor | None = None,
    *,
    backend: str | None = None,
    deterministic: bool | None = None,
) -> torch.Tensor:
    r"""Deformable convolution: DCNv1 (Dai et al., "Deformable Convolutional Networks", ICCV 2017) and, with
    ``mask``, DCNv2 (Zhu et al., "Deformable ConvNets v2", CVPR 2019). Same signature, layouts and numerics as
    ``torchvision.ops.deform_conv2d``, so either can replace the other.

    .. math::
        y[b, o, p] = \mathrm{bias}[o] + \sum_{c \in \mathrm{group}(o)} \sum_{k} w[o, c, k] \, m[b, g(c), k, p]
                     \, x_{\mathrm{bilinear}}[b, c, p\,s - \mathrm{pad} + k\,d + \Delta[b, g(c), k, p]]

    Convention:
        - Tap ``k = i * kw + j`` (row ``i`` of the kernel, column ``j``) of output pixel ``(ho, wo)`` samples
          the input at row ``ho * stride_h - pad_h + i * dilation_h + dy`` and column
          ``wo * stride_w - pad_w + j * dilation_w + dx``, pixel centres at integer coordinates.
        - ``offset[:, 2 * (g * kh * kw + k)]`` is ``dy`` and ``offset[:, 2 * (g * kh * kw + k) + 1]`` is ``dx``
          of tap ``k`` in offset group ``g``; ``mask[:, g * kh * kw + k]`` modulates it. Input channel ``c``
          belongs to offset group ``c // (C_in / G_off)``.
        - Bilinear interpolation of the four neighbouring pixels, a neighbour outside the image counting as
          zero (so a sample with ``-1 < y < H`` still sees its in-image neighbours, and one further out is 0).
        - Offset gradients at exactly integer positions are the right-sided derivatives (``floor`` picks the
          corners), as in torchvision.
        - Non-finite values, on every backend: a NaN or infinite value in ``input``, ``weight``, ``bias`` or
          ``mask`` propagates through the products as in ``F.conv2d``; a sample reads its in-image corners even at
          weight 0 (so a NaN pixel reaches the samples next to it, as in torchvision) and no pixel for a corner
          outside the image. A NaN offset makes its sample, hence every output channel of that pixel, NaN
          (torchvision too); an infinite offset does the same (torchvision counts it as outside the image, 0), as
          in the DCNv3/DCNv4 ops and ``grid_sample``'s bilinear ``zeros`` mode on the CPU.

    Args:
        input (Tensor[B, C_in, H, W]): input features.
        offset (Tensor[B, 2*G_off*kh*kw, H_out, W_out]): sampling offsets in pixels, ``G_off`` offset groups.
        weight (Tensor[C_out, C_in/G_w, kh, kw]): convolution weight; ``G_w = C_in / weight.shape[1]`` groups.
        bias (Tensor[C_out] or None): optional bias. Default None.
        stride, padding, dilation (int or (int, int)): as in ``F.conv2d`` (``padding`` also ``"valid"`` or
            ``"same"``). Defaults 1, 0, 1.
        mask (Tensor[B, G_off*kh*kw, H_out, W_out] or None): modulation scalars (DCNv2); None means all ones.
        backend (str or None): ``"reference"``, ``"torch"``, ``"triton"`` or None (automatic), keyword only.
        deterministic (bool or None): accumulate the input gradient in a fixed order (the Triton backend then
            sums sorted contributions instead of using fp32 atomics). None (default) follows
            ``torch.are_deterministic_algorithms_enabled()``. Keyword only.

    Returns:
        Tensor[B, C_out, H_out, W_out] with ``H_out = (H + 2 pad_h - dilation_h (kh - 1) - 1) // stride_h + 1``
        (and the same for ``W_out``), in the dtype of ``input`` (fp16/bf16 accumulate in fp32).

    Raises:
        TypeError: a non-tensor, a non-floating dtype, or tensors of different dtypes.
        ValueError: a wrong rank, channel counts that do not divide into the groups, an offset, mask or bias
            of the wrong shape, tensors on different devices, or an input too small for the kernel.
    """
    x = check_tensor(input, "input", ndim=4, shape_hint="[B, C_in, H, W]")
    offset = check_tensor(offset, "offset", ndim=4, shape_hint="[B, 2*offset_groups*kh*kw, H_out, W_out]")
    weight = check_tensor(weight, "weight", ndim=4, shape_hint="[C_out, C_in/groups, kh, kw]")
    check_same(x, "input", offset, "offset")
    check_same(x, "input", weight, "weight")
    if bias is not None:
        bias = check_tensor(bias, "bias", ndim=1, shape_hint="[C_out]")
        check_same(x, "input", bias, "bias")
    if mask is not None:
        mask = check_tensor(mask, "mask", ndim=4, shape_hint="[B, offset_groups*kh*kw, H_out, W_out]")
        check_same(x, "input", mask, "mask")
    sh, sw = pair(stride, "stride")
    dh, dw = pair(dilation, "dilation")
    Co, Cw, kh, kw = weight.shape
    (ph, pw), extra = conv_padding(padding, (kh, kw), (sh, sw), (dh, dw))
    x = _pad_end(x, extra)
    B, C, H, W = x.shape
    if min(C, H, W) < 1 or min(Co, Cw, kh, kw) < 1:
        raise ValueError(
            f"input [B, C_in, H, W] and weight [C_out, C_in/groups, kh, kw] must have positive sizes "
            f"(B may be 0), got input {tuple(x.shape)} and weight {tuple(weight.shape)}"
        )
    if C % Cw != 0 or Co % (C // Cw) != 0:
        raise ValueError(
            f"input channels ({C}) must be divisible by weight.shape[1] ({Cw}), and the output channels "
            f"({Co}) by the resulting number of groups; got input {tuple(x.shape)}, weight {tuple(weight.shape)}"
        )
    K = kh * kw
    if offset.shape[1] == 0 or offset.shape[1] % (2 * K) != 0:
        raise ValueError(
            f"offset.shape[1] must be a positive multiple of 2*kh*kw = {2 * K} (2 * offset_groups * kh * kw), "
            f"got offset of shape {tuple(offset.shape)}"
        )
    G_off = offset.shape[1] // (2 * K)
    if C % G_off != 0:
        raise ValueError(f"input channels ({C}) must be divisible by the number of offset groups ({G_off})")
    Ho, Wo = conv_out_size(H, kh, sh, ph, dh), conv_out_size(W, kw, sw, pw, dw)
    if Ho < 1 or Wo < 1:
        raise ValueError(
            f"input of spatial size {(H, W)} is too small for kernel_size {(kh, kw)} with padding "
            f"{(ph, pw)} and dilation {(dh, dw)}: the output would be {(Ho, Wo)}"
        )
    expected = (B, 2 * G_off * K, Ho, Wo)
    if tuple(offset.shape) != expected:
        raise ValueError(
            f"offset must have shape [B, 2*offset_groups*kh*kw, H_out, W_out] = {list(expected)} for input "
            f"{list(x.shape)}, weight {list(weight.shape)}, stride {(sh, sw)}, padding {(ph, pw)}, "
            f"dilation {(dh, dw)}; got {list(offset.shape)}"
        )
    if mask is not None and tuple(mask.shape) != (B, G_off * K, Ho, Wo):
        raise ValueError(
            f"mask must have shape [B, offset_groups*kh*kw, H_out, W_out] = {[B, G_off * K, Ho, Wo]} "
            f"(offset_groups = {G_off} from the offset), got {list(mask.shape)}"
        )
    if bias is not None and tuple(bias.shape) != (Co,):
        raise ValueError(f"bias must have shape [C_out] = [{Co}], got {list(bias.shape)}")
    tensors = [t for t in (x, offset, weight, bias, mask) if t is not None]
    chosen = choose_backend("deform_conv2d", *tensors, backend=backend)
    args = ((sh, sw), (ph, pw), (dh, dw))
    if chosen == "reference":
        return reference.deform_conv2d(x, offset, weight, bias, *args, mask)
    if deterministic is None:
        deterministic = torch.are_deterministic_algorithms_enabled()
    return deform_conv2d_op(x, offset, weight, bias, mask, *(list(a) for a in args), chosen, bool(deterministic))


WARP_MODES = ("bilinear", "nearest")
WARP_PADDING_MODES = ("zeros", "border", "reflection")


@autocast_op("x", "flow", widest=True)
def warp(
    x: torch.Tensor,
    flow: torch.Tensor,
    mode: str = "bilinear",
    padding_mode: str = "zeros",
    *,
    backend: str | None = None,
    deterministic: bool | None = None,
) -> torch.Tensor:
    r"""Backward warping of features by a dense flow field, as Deep Feature Flow (Zhu et al., CVPR 2017)
    propagates key-frame features to the current frame: ``y(p) = x(p + flow(p))``.

    Convention:
        - ``x``: ``[B, C, H, W]``; ``flow``: ``[B, 2, H, W]`` in pixels, channel 0 the horizontal
          displacement ``dx`` (along W) and channel 1 the vertical ``dy`` (along H), FlowNet's order.
        - Backward warping: the output at pixel ``(h, w)`` reads the input at ``(h + dy, w + dx)``; the flow
          lives on the output grid and points into the input.
        - Pixel centres at integer coordinates, ``0 .. W-1`` and ``0 .. H-1``: the mapping of
          ``F.grid_sample(..., align_corners=True)``. ``"reflection"`` reflects about the first and last pixel
          centres; ``"border"`` clamps the position into ``[0, W-1] x [0, H-1]``; ``"zeros"`` counts every
          neighbour outside the image as zero.
        - ``"nearest"`` rounds half to even (``grid_sample``'s rule) and has zero gradient wrt the flow.
        - Non-finite flow, as ``grid_sample`` on the CPU: with ``"zeros"`` a NaN or infinite position gives NaN
          (``"bilinear"``) or 0 (``"nearest"``); ``"border"`` clips NaN to the first pixel and +-inf to the
          last/first; ``"reflection"`` puts a NaN or infinite position on the first pixel (the ``triton`` backend
          gives NaN or 0 there instead). A NaN or infinite value of ``x`` reaches the outputs whose in-image
          corners include it (even at weight 0, as ``grid_sample``). ``grid_sample`` on CUDA maps a non-finite
          position out of the image instead, so with ``"zeros"`` the CUDA ``torch`` backend gives 0 where the CPU
          gives NaN.

    Args:
        x (Tensor[B, C, H, W]): features to warp.
        flow (Tensor[B, 2, H, W]): displacement in pixels, (dx, dy).
        mode (str): ``"bilinear"`` or ``"nearest"``. Default ``"bilinear"``.
        padding_mode (str): ``"zeros"``, ``"border"`` or ``"reflection"``. Default ``"zeros"``.
        backend (str or None): ``"reference"`` (explicit gathers), ``"torch"`` (``grid_sample`` through
            :mod:`dynconv.ops._sampling`; positions are exact up to the rounding of its coordinate normalisation,
            about ``W`` or ``H`` float epsilons), ``"triton"`` (fused
            gather forward and backward, fp32/fp16/bf16, fp32 accumulation) or None (see
            :mod:`dynconv.backends`: Triton for CUDA tensors when it is installed). Keyword only.
        deterministic (bool or None): make the Triton backward accumulate the gradient wrt ``x`` in a fixed
            order (two passes) instead of with fp32 atomics. ``None`` follows
            ``torch.are_deterministic_algorithms_enabled()`` (``grid_sample``'s CUDA backward refuses to run
            in that mode; the Triton backend does). Keyword only.

    Returns:
        Tensor[B, C, H, W] in the dtype of ``x``; differentiable wrt ``x`` and ``flow``.

    Raises:
        TypeError: a non-tensor, a non-floating dtype, or ``flow`` of another dtype than ``x``.
        ValueError: a wrong rank, a flow that is not ``[B, 2, H, W]`` for ``x``, an unknown mode, or
            tensors on different devices.
    """
    x = check_tensor(x, "x", ndim=4, shape_hint="[B, C, H, W]")
    flow = check_tensor(flow, "flow", ndim=4, shape_hint="[B, 2, H, W]")
    check_same(x, "x", flow, "flow")
    if mode not in WARP_MODES:
        raise ValueError(f"mode must be one of {WARP_MODES}, got {mode!r}")
    if padding_mode not in WARP_PADDING_MODES:
        raise ValueError(f"padding_mode must be one of {WARP_PADDING_MODES}, got {padding_mode!r}")
    B, C, H, W = x.shape
    if min(C, H, W) < 1:
        raise ValueError(f"x must have positive sizes [B, C, H, W] (B may be 0), got shape {tuple(x.shape)}")
    if tuple(flow.shape) != (B, 2, H, W):
        raise ValueError(f"flow must have shape [B, 2, H, W] = {[B, 2, H, W]} for x, got {list(flow.shape)}")
    chosen = choose_backend("warp", x, flow, backend=backend)
    if chosen == "triton":
        if deterministic is None:
            deterministic = torch.are_deterministic_algorithms_enabled()
        return warp_triton_op(x, flow, mode, padding_mode, bool(deterministic))
    if chosen == "reference":
        return reference.warp(x, flow, mode, padding_mode)
    return warp_torch(x, flow, mode, padding_mode)


@autocast_op("x", "filters")
def local_filter2d(
    x: torch.Tensor,
    filters: torch.Tensor,
    kernel_size: IntOrPair,
    stride: IntOrPair = 1,
    padding: IntOrPair | str | None = None,
    dilation: IntOrPair = 1,
    *,
    backend: str | None = None,
    deterministic: bool | None = None,
) -> torch.Tensor:
    r"""Dynamic local filtering (Dynamic Filter Networks' *dynamic local filtering layer*; also the
    aggregation step of involution and of CARAFE): every output pixel of every sample has its own
    ``kh x kw`` filter, shared by the channels of a filter group.

    .. math::
        y[b, c, h, w] = \sum_{i, j} f[b, g(c), i k_w + j, h, w] \,
                        x[b, c, h s_h - p_h + i d_h, w s_w - p_w + j d_w]

    with ``g(c) = c // (C // G)`` and zeros outside the image: the window geometry of ``F.conv2d``. NaN and Inf
    propagate as in ``F.conv2d`` (a NaN filter tap over the zero padding still gives NaN).

    Args:
        x (Tensor[B, C, H, W]): input; any strides (channels-last and non-contiguous views work).
        filters (Tensor[B, G, kh*kw, H_out, W_out] or Tensor[B, G*kh*kw, H_out, W_out]): the per-pixel
            filters; ``C`` must be divisible by ``G``. Tap ``(i, j)`` is filter index ``i * kw + j``.
        kernel_size (int or (int, int)): ``k`` or ``(kh, kw)``.
        stride (int or (int, int)): step between output pixels in the input. Default 1.
        padding (int or (int, int) or str or None): zero padding on each side, or ``"valid"``/``"same"`` as in
            ``F.conv2d``; ``None`` means ``(k - 1) // 2 * dilation`` ("same" size for odd ``k`` and stride 1).
            Default None.
        dilation (int or (int, int)): spacing between taps. Default 1.
        backend (str or None): ``"reference"``, ``"torch"``, ``"triton"`` or ``None`` (automatic). Keyword only.
        deterministic (bool or None): accepted for the signature every dynconv op shares; it changes nothing here,
            because every backend already computes both gradients by gathers (each output element written once, no
            atomics), so repeated runs are bitwise equal. None (default) follows
            ``torch.are_deterministic_algorithms_enabled()``. Keyword only.

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
        (ph, pw), extra = conv_padding(padding, (kh, kw), (sh, sw), (dh, dw))
        x = _pad_end(x, extra)
    B, C, H, W = x.shape
    if min(C, H, W) < 1:
        raise ValueError(f"x must have positive sizes [B, C, H, W] (B may be 0), got shape {tuple(x.shape)}")
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
    # deterministic needs no dispatch: every backend's backward is a gather (see the docstring).
    chosen = choose_backend("local_filter2d", x, filters, backend=backend)
    if chosen == "reference":
        return reference.local_filter2d(x, filters, *args)
    return local_filter2d_op(x, filters, *(list(a) for a in args), chosen)


@autocast_op("x", "weight", "bias")
def sample_conv2d(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    stride: IntOrPair = 1,
    padding: IntOrPair | str = 0,
    dilation: IntOrPair = 1,
    groups: int = 1,
    *,
    backend: str | None = None,
    deterministic: bool | None = None,
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
    There is no Triton kernel for this op: the grouped convolution already runs on cuDNN/oneDNN. Under
    ``torch.export`` (ONNX export, :mod:`dynconv.onnx`) the ``"torch"`` backend traces as ``unfold`` + a batched
    matmul instead, so an exported graph keeps the batch dynamic (ONNX's ``Conv`` has a static group count).

    Args:
        x (Tensor[B, C_in, H, W]): input; any strides.
        weight (Tensor[B, C_out, C_in/groups, kh, kw]): one kernel per sample.
        bias (Tensor[B, C_out] or None): one bias per sample. Default None.
        stride, padding, dilation (int or (int, int)): as in ``F.conv2d`` (``padding`` also ``"valid"`` or
            ``"same"``). Defaults 1, 0, 1.
        groups (int): channel groups of each sample's convolution, as in ``F.conv2d``. Default 1.
        backend (str or None): ``"reference"``, ``"torch"`` or ``None`` (automatic: ``torch``). Keyword only.
        deterministic (bool or None): make the backward run in a fixed order. On the CPU every backend already
            does (``F.conv2d``'s CPU backward has no atomics), so it changes nothing there. On CUDA, with neither
            ``torch.use_deterministic_algorithms`` nor ``torch.backends.cudnn.deterministic`` set (cuDNN then picks
            deterministic algorithms itself), ``True`` makes the ``"torch"`` backend compute ``unfold`` + a batched
            matmul (whose backward is a gather) instead of the grouped ``F.conv2d``, whose cuDNN backward may use
            atomics; that holds ``kh*kw`` times the input. None (default) follows
            ``torch.are_deterministic_algorithms_enabled()``. Keyword only.

    Returns:
        Tensor[B, C_out, H_out, W_out] in the dtype of ``x``, with the output size of ``F.conv2d``.

    Raises:
        TypeError: a non-tensor, a non-floating dtype, ``weight``/``bias`` of another dtype than ``x``, or a
            non-int ``groups``.
        ValueError: a wrong rank, a batch/channel/group mismatch, tensors on different devices, non-positive
            sizes (the batch may be 0, as in ``F.conv2d``), or an input too small for the kernel.
        BackendError: ``backend="triton"`` (no kernel for this op; ``DYNCONV_BACKEND=triton`` falls back to
            ``torch`` with a warning instead).
    """
    x = check_tensor(x, "x", ndim=4, shape_hint="[B, C_in, H, W]")
    weight = check_tensor(weight, "weight", ndim=5, shape_hint="[B, C_out, C_in/groups, kh, kw]")
    check_same(x, "x", weight, "weight")
    if bias is not None:
        bias = check_tensor(bias, "bias", ndim=2, shape_hint="[B, C_out]")
        check_same(x, "x", bias, "bias")
    groups = as_int(groups, "groups", minimum=1)
    sh, sw = pair(stride, "stride")
    dh, dw = pair(dilation, "dilation")
    (ph, pw), extra = conv_padding(padding, tuple(weight.shape[-2:]), (sh, sw), (dh, dw))
    x = _pad_end(x, extra)
    B, C, H, W = x.shape
    if min(C, H, W) < 1:
        raise ValueError(f"x must have positive sizes [B, C_in, H, W] (B may be 0), got shape {tuple(x.shape)}")
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
    if B == 0:
        # An empty batch (CondInst with no instances), as F.conv2d takes one: an empty output, still in the
        # autograd graph of x and weight (the grouped call below would have 0 groups).
        return sample_conv2d_unfold(x, weight, bias, *args)
    if chosen == "reference":
        return reference.sample_conv2d(x, weight, bias, *args)
    if deterministic is None:
        deterministic = torch.are_deterministic_algorithms_enabled()
    cudnn_decides = torch.are_deterministic_algorithms_enabled() or torch.backends.cudnn.deterministic
    if deterministic and x.device.type == "cuda" and not cudnn_decides:
        return sample_conv2d_unfold(x, weight, bias, *args)
    if is_exporting():
        # ONNX's Conv takes its group count as a static attribute, so the grouped call below would fix the batch
        # size of an exported graph (for CondInst's mask heads the batch is the number of instances).
        return sample_conv2d_unfold(x, weight, bias, *args)
    out = F.conv2d(
        x.reshape(1, B * C, H, W),
        weight.reshape(B * C_out, C // groups, kh, kw),
        None if bias is None else bias.reshape(B * C_out),
        (sh, sw),
        (ph, pw),
        (dh, dw),
        B * groups,
    )
    return out.view(B, C_out, Ho, Wo)


def _pad_end(x: torch.Tensor, extra: tuple[int, int]) -> torch.Tensor:
    """``x`` with ``extra`` zero rows/columns at the bottom/right: the odd part of ``padding="same"``."""
    return F.pad(x, (0, extra[1], 0, extra[0])) if any(extra) else x


def is_exporting() -> bool:
    """Whether ``torch.export`` (and with it ``torch.onnx.export(dynamo=True)``) is tracing the call."""
    check = getattr(torch.compiler, "is_exporting", None)
    return bool(check and check())


def sample_conv2d_unfold(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    stride: tuple[int, int],
    padding: tuple[int, int],
    dilation: tuple[int, int],
    groups: int,
) -> torch.Tensor:
    """:func:`sample_conv2d` on validated arguments as ``unfold`` + a batched matmul: no operator whose
    attributes depend on the batch size (what :func:`sample_conv2d` traces to under ``torch.export``, for
    ONNX graphs with a dynamic batch). It holds the ``kh*kw`` times larger columns, so it is not the eager
    path."""
    B, C, H, W = x.shape
    _, C_out, _, kh, kw = weight.shape
    cols = F.unfold(x, (kh, kw), dilation=dilation, padding=padding, stride=stride)  # [B, C*kh*kw, L]
    cols = cols.unflatten(1, (groups, -1))  # [B, groups, C/groups*kh*kw, L]
    out = weight.unflatten(1, (groups, -1)).flatten(3) @ cols  # [B, groups, C_out/groups, L]
    out = out.flatten(1, 2).unflatten(2, (conv_out_size(H, kh, stride[0], padding[0], dilation[0]), -1))
    return out if bias is None else out + bias[:, :, None, None]


def _dcn_geometry(value, tensors, kernel_size, stride, padding, dilation, group, offset_scale, remove_center):
    """Validate the arguments shared by :func:`dcnv3` and :func:`dcnv4`; return the normalised ones.

    ``tensors`` are the op's offset and modulation tensors, ``{name: (tensor, shape_hint)}``: each must be a 4-D
    floating tensor of the dtype and device of ``value`` (their sizes are the caller's to check). Returns
    ``value``, those tensors in order, ``(B, H_out, W_out, group, P)``, the geometry arguments of the sampling op
    and the words that locate a wrong shape (``for input of shape ...``).
    """
    value = check_tensor(value, "input", ndim=4, shape_hint="[B, H, W, C] (channels-last)")
    kh, kw = pair(kernel_size, "kernel_size")
    sh, sw = pair(stride, "stride")
    dh, dw = pair(dilation, "dilation")
    ph, pw = ((kh - 1) // 2 * dh, (kw - 1) // 2 * dw) if padding is None else pair(padding, "padding", minimum=0)
    group = as_int(group, "group")
    if group < 1:
        raise ValueError(f"group must be a positive int, got {group!r}")
    if isinstance(offset_scale, bool) or not isinstance(offset_scale, numbers.Real):
        raise TypeError(f"offset_scale must be a float, got {offset_scale!r}")
    if not isinstance(remove_center, bool):
        raise TypeError(f"remove_center must be a bool, got {remove_center!r}")
    if remove_center and (kh % 2 == 0 or kw % 2 == 0):
        raise ValueError(f"remove_center needs an odd kernel_size (it has a centre point), got {(kh, kw)}")
    B, H, W, C = value.shape
    if min(H, W, C) < 1:
        raise ValueError(f"input must have positive sizes [B, H, W, C] (B may be 0), got shape {tuple(value.shape)}")
    if C % group != 0:
        raise ValueError(f"input channels ({C}) must be divisible by group ({group})")
    Ho, Wo = conv_out_size(H, kh, sh, ph, dh), conv_out_size(W, kw, sw, pw, dw)
    if Ho < 1 or Wo < 1:
        raise ValueError(
            f"input of spatial size {(H, W)} is too small for kernel_size {(kh, kw)} with padding "
            f"{(ph, pw)} and dilation {(dh, dw)}: the output would be {(Ho, Wo)}"
        )
    P = kh * kw - int(remove_center)
    args = ([kh, kw], [sh, sw], [ph, pw], [dh, dw], float(offset_scale), remove_center)
    checked = [check_tensor(t, name, ndim=4, shape_hint=hint) for name, (t, hint) in tensors.items()]
    for name, t in zip(tensors, checked):
        check_same(value, "input", t, name)
    where = f"for input of shape {list(value.shape)}, kernel_size {(kh, kw)}, stride {(sh, sw)}, " \
        f"padding {(ph, pw)}, dilation {(dh, dw)}, group {group}, remove_center {remove_center}"  # fmt: skip
    return value, checked, (B, Ho, Wo, group, P), args, where


def _dcn_dispatch(op_name, value, offset, mask, args, backend, deterministic):
    chosen = choose_backend(op_name, value, offset, mask, backend=backend)
    if chosen == "reference":
        kernel_size, stride, padding, dilation, offset_scale, remove_center = args
        return reference.dcn_sample(
            value, offset, mask, tuple(kernel_size), tuple(stride), tuple(padding), tuple(dilation),
            offset_scale, remove_center,
        )  # fmt: skip
    if deterministic is None:
        deterministic = torch.are_deterministic_algorithms_enabled()
    return dcn_sample_op(value, offset, mask, *args, chosen, bool(deterministic))


@autocast_op("input", "offset", "mask")
def dcnv3(
    input: torch.Tensor,
    offset: torch.Tensor,
    mask: torch.Tensor,
    kernel_size: IntOrPair = 3,
    stride: IntOrPair = 1,
    padding: IntOrPair | None = None,
    dilation: IntOrPair = 1,
    group: int = 1,
    offset_scale: float = 1.0,
    remove_center: bool = False,
    *,
    backend: str | None = None,
    deterministic: bool | None = None,
) -> torch.Tensor:
    r"""The DCNv3 core (InternImage, Wang et al., CVPR 2023): deformable sampling with ``group`` groups of
    channels that share offsets and modulation, channels-last, no weights (the projections live in
    :class:`dynconv.nn.DCNv3`).

    .. math::
        y[b, h, w, c] = \sum_k m[b, h, w, g, k] \, x[b, p_0(h, w) + (p_k + \Delta[b, h, w, g, k]) s, c]

    with ``g = c // (C / group)``, ``p_0`` the centre of the ``F.conv2d`` window of output ``(h, w)``,
    ``p_k`` the centred, dilated kernel grid (points ordered x-major as the official kernels:
    :func:`dynconv.reference.dcn_kernel_points`), ``s = offset_scale``, bilinear sampling and zeros outside the
    image. This matches InternImage's ``DCNv3Function`` / ``dcnv3_core_pytorch``. A NaN or infinite offset makes
    its sample NaN (``grid_sample``'s CPU rule; the official CUDA kernel skips such a point, and so does the
    ``torch`` backend on CUDA, where ``grid_sample`` maps it out of the image); a non-finite value of
    ``input`` or ``mask`` propagates, a point's corners outside the image reading nothing.

    Args:
        input (Tensor[B, H, W, C]): channels-last input; ``C`` divisible by ``group``.
        offset (Tensor[B, H_out, W_out, group*P*2]): ``(x, y)`` offsets in pixels, ``P = kh*kw`` (minus one with
            ``remove_center``), laid out as ``[group, P, 2]``.
        mask (Tensor[B, H_out, W_out, group*P]): modulation, laid out as ``[group, P]``. DCNv3 softmax-normalises
            it over the P points per group *before* this op (the module does); the op uses it as given.
        kernel_size, stride, dilation (int or (int, int)): window geometry as ``F.conv2d``. Default 3, 1, 1.
        padding (int or (int, int) or None): zero padding; ``None`` means ``(k - 1) // 2 * dilation``.
        group (int): number of offset groups. Default 1.
        offset_scale (float): scale of the offsets (and of the kernel grid, as in the official kernels). Default 1.
        remove_center (bool): leave out the centre kernel point (odd kernels only). Default False.
        backend (str or None): ``"reference"``, ``"torch"``, ``"triton"`` or ``None`` (automatic, see
            :mod:`dynconv.backends`; Triton on CUDA tensors). Keyword only.
        deterministic (bool or None): make the Triton backward accumulate ``grad input`` in a fixed order (a
            sorted two-pass scatter instead of fp32/fp64 atomics: bitwise repeatable, P*4 times the output in
            memory). ``None`` (default) follows ``torch.are_deterministic_algorithms_enabled()``. On CPU every
            backend's backward is deterministic already; on CUDA ``True`` makes the ``torch`` backend scatter
            ``grad input`` with ``index_put_(accumulate=True)`` instead of ``grid_sample``'s atomic backward
            (:mod:`dynconv.ops._sampling`). The ``reference`` backend ignores it. Keyword only.

    Returns:
        Tensor[B, H_out, W_out, C] in the dtype of ``input`` (fp16/bf16 accumulate in fp32).

    Raises:
        TypeError: a non-tensor, a non-floating dtype, or tensors of different dtypes.
        ValueError: a wrong rank or shape (the message gives the expected one), ``C`` not divisible by ``group``,
            tensors on different devices, or non-positive sizes.
    """
    tensors = {"offset": (offset, "[B, H_out, W_out, group*P*2]"), "mask": (mask, "[B, H_out, W_out, group*P]")}
    value, (offset, mask), (B, Ho, Wo, G, P), args, where = _dcn_geometry(
        input, tensors, kernel_size, stride, padding, dilation, group, offset_scale, remove_center
    )
    if tuple(offset.shape) != (B, Ho, Wo, G * P * 2):
        raise ValueError(
            f"offset must have shape [B, H_out, W_out, group*P*2] = {[B, Ho, Wo, G * P * 2]} {where}; "
            f"got {list(offset.shape)}"
        )
    if tuple(mask.shape) != (B, Ho, Wo, G * P):
        raise ValueError(
            f"mask must have shape [B, H_out, W_out, group*P] = {[B, Ho, Wo, G * P]} {where}; got {list(mask.shape)}"
        )
    offset, mask = offset.view(B, Ho, Wo, G, P, 2), mask.view(B, Ho, Wo, G, P)
    return _dcn_dispatch("dcnv3", value, offset, mask, args, backend, deterministic)


@autocast_op("input", "offset_mask")
def dcnv4(
    input: torch.Tensor,
    offset_mask: torch.Tensor,
    kernel_size: IntOrPair = 3,
    stride: IntOrPair = 1,
    padding: IntOrPair | None = None,
    dilation: IntOrPair = 1,
    group: int = 1,
    offset_scale: float = 1.0,
    remove_center: bool = False,
    *,
    backend: str | None = None,
    deterministic: bool | None = None,
) -> torch.Tensor:
    r"""The DCNv4 core (Xiong et al., "Efficient Deformable ConvNets", CVPR 2024): the sampling of
    :func:`dcnv3` with offsets and modulation in **one** tensor, as one linear layer predicts them, and
    **no softmax** on the modulation (unbounded aggregation weights).

    Args:
        input (Tensor[B, H, W, C]): channels-last input; ``C`` divisible by ``group``.
        offset_mask (Tensor[B, H_out, W_out, M]): the official DCNv4 layout: for each group, ``2P`` offsets
            (``(x, y)`` per point) followed by ``P`` modulation scalars, i.e. ``[group, 3P]`` flattened, then
            zero channels up to ``M = ceil(3 * group * P / 8) * 8`` (the official op reads that padded width;
            ``M = 3 * group * P`` is accepted too).
        kernel_size, stride, padding, dilation, group, offset_scale, remove_center, backend, deterministic: as
            :func:`dcnv3`.

    Returns:
        Tensor[B, H_out, W_out, C] in the dtype of ``input``.

    Raises:
        TypeError, ValueError: as :func:`dcnv3`, for ``offset_mask`` of the wrong shape, dtype or device.
    """
    value, (offset_mask,), (B, Ho, Wo, G, P), args, where = _dcn_geometry(
        input, {"offset_mask": (offset_mask, "[B, H_out, W_out, M]")}, kernel_size, stride, padding, dilation, group,
        offset_scale, remove_center,
    )  # fmt: skip
    used = 3 * G * P
    padded = -(-used // 8) * 8
    if tuple(offset_mask.shape[:3]) != (B, Ho, Wo) or offset_mask.shape[3] not in (used, padded):
        raise ValueError(
            f"offset_mask must have shape [B, H_out, W_out, M] = {[B, Ho, Wo, padded]} (or M = 3*group*P = {used}) "
            f"{where}; got {list(offset_mask.shape)}"
        )
    per_group = offset_mask[..., :used].unflatten(3, (G, 3 * P))
    offset = per_group[..., : 2 * P].unflatten(4, (P, 2))
    mask = per_group[..., 2 * P :]
    return _dcn_dispatch("dcnv4", value, offset, mask, args, backend, deterministic)
