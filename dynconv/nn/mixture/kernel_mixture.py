"""``KernelMixtureConv2d``: a bank of ``K`` expert kernels mixed per sample by an input-dependent attention.

One layer serves CondConv, DY-CNN, DyNet and ODConv; what differs between them is the attention module
(:mod:`dynconv.nn.mixture.attention`), and the public classes (:mod:`dynconv.nn.mixture.layers`) only build it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from dynconv._checks import as_int, conv_out_size, pair
from dynconv.functional import sample_conv2d
from dynconv.nn.mixture import formulation as _formulation
from dynconv.nn.mixture.attention import MixtureAttention

__all__ = ["KernelMixtureConv2d"]

# The annotations of the nn.Conv2d arguments, short enough for the layers' signatures to take four lines.
IntOrPair = int | Sequence[int]
Padding = int | Sequence[int] | str
Device = torch.device | str | None
DType = torch.dtype | None
_GEOMETRY = ("in_channels", "out_channels", "num_experts", "kernel_size", "groups")


def _positive_int(value: object, name: str) -> int:
    """An int >= 1 as ``nn.Conv2d`` takes it (numpy integers too; not a bool or a float)."""
    value = as_int(value, name)
    if value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


class KernelMixtureConv2d(nn.Module):
    """``y[b] = a_out[b] * conv2d(a_in[b] * x[b], W[b]) + bias[b]`` with ``W[b] = sum_k a_k[b] * a_s[b] * W_k``.

    The attention module returns either mixing coefficients ``a_k`` (``[B, K]``, or ``[B, K, C_out]`` for one
    per expert and output channel) or a dict of the attentions it has among ``"kernel"`` (``a_k``),
    ``"spatial"`` (``a_s [B, kh*kw]``, scaling the taps), ``"in_channel"`` (``a_in [B, C_in]``) and
    ``"out_channel"`` (``a_out [B, C_out]``); an absent one is 1 (without ``"kernel"``, which needs ``K = 1``,
    ``W[b]`` is built from ``W_0``). The bias is mixed like the kernels (``[K, C_out]``) unless the
    attention's ``mixes_bias`` is False (one ``[C_out]`` bias). Each channel attention is multiplied into
    whichever is smaller, the per-sample kernel or the activation it scales: the product is the same.

    Takes the ``nn.Conv2d`` arguments (``padding`` also as ``"valid"`` or ``"same"``; ``"same"`` needs stride 1,
    as in ``nn.Conv2d``, and an even ``dilation * (kernel_size - 1)``, i.e. symmetric padding) plus:

    Args:
        num_experts (int): ``K``.
        formulation (str): how the mixture runs (:mod:`dynconv.nn.mixture.formulation`). Default ``"auto"``.
        attention (MixtureAttention or callable): the attention, or a function that builds it from the keyword
            arguments ``device`` and ``dtype`` (called once the other arguments are checked), such as
            ``functools.partial(SoftmaxAttention, in_channels, num_experts)``. Its geometry must match the layer's.
        device, dtype: factory arguments.

    The state dict keeps the attention's entries beside ``weight`` and ``bias`` (``routing.weight``, not
    ``attention.routing.weight``), where the layers kept them before the attention was a module of its own,
    so older checkpoints load; ``named_parameters()`` names them under ``attention.``.

    Shape:
        - x: ``[B, C_in, H, W]``; output: ``[B, C_out, H_out, W_out]`` (``F.conv2d``'s size).
    """

    def __init__(
        self, in_channels: int, out_channels: int, kernel_size: IntOrPair, stride: IntOrPair = 1, padding: Padding = 0,
        dilation: IntOrPair = 1, groups: int = 1, bias: bool = True, num_experts: int = 4, formulation: str = "auto",
        *, attention: MixtureAttention | Callable[..., MixtureAttention], device: Device = None, dtype: DType = None,
    ) -> None:  # fmt: skip
        super().__init__()
        in_channels, out_channels = (
            _positive_int(in_channels, "in_channels"),
            _positive_int(out_channels, "out_channels"),
        )
        groups, num_experts = _positive_int(groups, "groups"), _positive_int(num_experts, "num_experts")
        if in_channels % groups or out_channels % groups:
            raise ValueError(
                f"in_channels ({in_channels}) and out_channels ({out_channels}) must be divisible by groups ({groups})"
            )
        if formulation not in _formulation.FORMULATIONS:
            raise ValueError(f"formulation must be one of {_formulation.FORMULATIONS}, got {formulation!r}")
        self.in_channels, self.out_channels, self.groups = in_channels, out_channels, groups
        self.kernel_size = pair(kernel_size, "kernel_size")
        self.stride = pair(stride, "stride")
        self.dilation = pair(dilation, "dilation")
        if isinstance(padding, str):  # nn.Conv2d's "valid" / "same"
            padding = _string_padding(padding, self.kernel_size, self.stride, self.dilation)
        self.padding = pair(padding, "padding", minimum=0)
        self.num_experts = num_experts
        self.formulation = formulation
        factory = {"device": device, "dtype": dtype}
        if not isinstance(attention, nn.Module):
            attention = attention(**factory)
        if not isinstance(attention, MixtureAttention):
            raise TypeError(f"attention must be a MixtureAttention, got {type(attention).__name__}")
        for name in _GEOMETRY:
            if hasattr(attention, name) and getattr(attention, name) != getattr(self, name):
                built, own = getattr(attention, name), getattr(self, name)
                raise ValueError(f"attention was built for {name}={built!r}, the layer has {own!r}")
        kh, kw = self.kernel_size
        self.weight = nn.Parameter(torch.empty(num_experts, out_channels, in_channels // groups, kh, kw, **factory))
        if bias:
            shape = (num_experts, out_channels) if attention.mixes_bias else (out_channels,)
            self.bias = nn.Parameter(torch.empty(shape, **factory))
        else:
            self.register_parameter("bias", None)
        self.attention = attention
        self.register_state_dict_post_hook(_flatten_attention_keys)
        self.register_load_state_dict_pre_hook(_nest_attention_keys)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        self.attention.init_experts(self.weight, self.bias)
        self.attention.reset_parameters()

    @property
    def temperature(self) -> torch.Tensor:
        """The attention's temperature buffer (DY-CNN, ODConv); AttributeError for an attention without one."""
        return self.attention.temperature

    def extra_repr(self) -> str:
        parts = [
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}",
            f"num_experts={self.num_experts}",
        ]
        for name, default in (("stride", (1, 1)), ("padding", (0, 0)), ("dilation", (1, 1)), ("groups", 1)):
            if getattr(self, name) != default:
                parts.append(f"{name}={getattr(self, name)}")
        if self.bias is None:
            parts.append("bias=False")
        if self.formulation != "auto":
            parts.append(f"formulation={self.formulation!r}")
        return ", ".join(parts + [text for text in [self.attention.extra_repr()] if text])

    def choose_formulation(self, x: torch.Tensor) -> str:
        """The formulation ``"auto"`` picks for input ``x`` (:func:`.formulation.choose_formulation`)."""
        if self.formulation != "auto":
            return self.formulation
        depth = self.weight.shape[2] * self.kernel_size[0] * self.kernel_size[1]
        kernel_bytes = self.weight[0].numel() * self.weight.element_size()
        return _formulation.choose_formulation(x, depth, self.num_experts, self._output_size(x), kernel_bytes)

    def uniform_attention_gain(self) -> float:
        """The factor by which a uniform (zero-logit) attention scales the sum of the experts."""
        return self.attention.uniform_gain()

    def mixed_kernel(self, coeff: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Per-sample kernels from coefficients.

        Args:
            coeff (Tensor[B, K] or Tensor[B, K, C_out]): mixing coefficients.

        Returns:
            (Tensor[B, C_out, C_in/groups, kh, kw], Tensor[B, C_out] or None): the mixed kernels and biases
            (None without a mixed bias).
        """
        mixed_bias = self.bias is not None and self.bias.dim() == 2
        return _mix(coeff, self.weight), _mix(coeff, self.bias) if mixed_bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Args: x (Tensor[B, C_in, H, W]). Returns: Tensor[B, C_out, H_out, W_out]."""
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"x must have shape [B, {self.in_channels}, H, W], got {tuple(x.shape)}")
        att = self.attention(x)
        att = {"kernel": att} if isinstance(att, torch.Tensor) else att
        if torch.amp.is_autocast_available(x.device.type) and torch.is_autocast_enabled(x.device.type):
            # The attention (float32 from its sigmoids/softmax) in the convolution's low precision, so that
            # scaling the output by it keeps the dtype nn.Conv2d returns under autocast.
            low = torch.get_autocast_dtype(x.device.type)
            att = {name: a.to(low) for name, a in att.items()}
        formulation = self.choose_formulation(x) if "kernel" in att or "spatial" in att else "static"
        Ho, Wo = self._output_size(x)
        P = self.weight[0].numel()
        per_sample = formulation not in ("static", "experts")  # a kernel per sample is materialised
        # A channel attention goes into that kernel where it is smaller than the activation it would scale (the
        # product of the sizes, not Size.numel(), which torch.export specialises).
        fold_in = per_sample and "in_channel" in att and P < x.shape[1] * x.shape[2] * x.shape[3]
        fold_out = per_sample and "out_channel" in att and P < self.out_channels * Ho * Wo
        scale_out = "out_channel" in att and not fold_out
        # A mixed bias joins the convolution unless the output-channel attention still has to scale its output.
        bias_in_conv = self.bias is not None and self.bias.dim() == 2 and not scale_out
        if "in_channel" in att and not fold_in:
            x = x * att["in_channel"][:, :, None, None]
        if formulation == "static":  # nothing per sample inside the kernel (ODConv 1x on a 1x1 layer)
            y = F.conv2d(
                _dense_conv_input(x, self.weight),
                self.weight[0],
                None,
                self.stride,
                self.padding,
                self.dilation,
                self.groups,
            )
            bias_in_conv = False
        elif formulation == "experts":
            y = self._experts_forward(x, att, Ho, Wo)
            bias_in_conv = False
        else:

            def kernels(lo: int, hi: int) -> tuple[torch.Tensor, torch.Tensor | None]:
                n = hi - lo
                if "kernel" in att:
                    weight = _mix(att["kernel"][lo:hi], self.weight)
                else:
                    weight = self.weight[0].expand(n, *self.weight.shape[1:])
                # The spatial attention does not depend on the expert: scaling the mixed kernel's taps equals
                # scaling every expert's, without a B x K x P tensor.
                if "spatial" in att:
                    weight = weight * att["spatial"][lo:hi].view(n, 1, 1, *self.kernel_size)
                if fold_in:  # kernel column i of group g's rows reads input channel g * C_in/G + i
                    G, C_in_g = self.groups, self.in_channels // self.groups  # explicit sizes: n may be 0
                    a_in = att["in_channel"][lo:hi].view(n, G, 1, C_in_g).expand(-1, -1, self.out_channels // G, -1)
                    weight = weight * a_in.reshape(n, self.out_channels, C_in_g, 1, 1)
                if fold_out:
                    weight = weight * att["out_channel"][lo:hi].view(n, self.out_channels, 1, 1, 1)
                return weight, self._bias(att, lo, hi) if bias_in_conv else None

            y = self._per_sample_conv(x, formulation, kernels)
        if scale_out:
            y = y * att["out_channel"][:, :, None, None]
        if self.bias is not None and not bias_in_conv:
            bias = self._bias(att, 0, x.shape[0])
            y = y + bias.to(y.dtype)[..., None, None]
        return y

    def _bias(self, att: dict[str, torch.Tensor], lo: int, hi: int) -> torch.Tensor:
        """The bias of samples ``lo:hi``: Tensor[hi - lo, C_out] mixed, or the layer's Tensor[C_out]."""
        if self.bias.dim() == 1:
            return self.bias
        if "kernel" not in att:
            return self.bias[0].expand(hi - lo, -1)
        return _mix(att["kernel"][lo:hi], self.bias)

    def _per_sample_conv(self, x: torch.Tensor, formulation: str, kernels) -> torch.Tensor:
        """Convolve each sample with its own kernel, ``chunk`` samples per call of :func:`sample_conv2d`.

        ``kernels(lo, hi)`` returns the mixed ``(weight [n, C_out, C_in/groups, kh, kw], bias [n, C_out] or
        None)`` of samples ``lo:hi``, so at most one chunk of kernels exists at a time.
        """
        B = x.shape[0]
        args = (self.stride, self.padding, self.dilation, self.groups)
        if formulation == "grouped":  # one call, no Python loop over a (possibly symbolic, in export) batch
            return sample_conv2d(x, *kernels(0, B), *args, backend="torch")
        chunk = _formulation.chunk_size(formulation, B, self.weight[0].numel() * self.weight.element_size())
        outs = []
        for lo in range(0, max(B, 1), chunk):  # B = 0: one empty chunk
            hi = min(lo + chunk, B)
            outs.append(sample_conv2d(x[lo:hi], *kernels(lo, hi), *args, backend="torch"))
        return outs[0] if len(outs) == 1 else torch.cat(outs)

    def _experts_forward(self, x: torch.Tensor, att: dict[str, torch.Tensor], Ho: int, Wo: int) -> torch.Tensor:
        """The batched experts formulation, without bias: the ``K`` static convolutions of the batch, then their
        coefficient-weighted sum. With a spatial attention, which scales tap ``t`` of every expert alike, they
        run as one matmul over the im2col columns with tap ``t`` scaled instead (no per-sample kernel; the
        columns take ``kh*kw`` times the input's memory, which the ``"auto"`` rule only allows on small maps)."""
        B, K, G, C_out = x.shape[0], self.num_experts, self.groups, self.out_channels
        # Coefficients by group: [B, G, K, C_out/G] (all ones without a kernel attention, K = 1).
        c = att["kernel"] if "kernel" in att else x.new_ones(B, 1)
        c = (c if c.dim() == 3 else c.unsqueeze(-1).expand(-1, -1, C_out)).unflatten(2, (G, C_out // G))
        c = c.transpose(1, 2)
        if "spatial" not in att:
            # Group-major order of the K*C_out outputs: F.conv2d splits its output channels into G contiguous
            # blocks, so every block must hold all experts of that group's output channels.
            w = self.weight.unflatten(1, (G, C_out // G)).transpose(0, 1).flatten(0, 2)
            y = F.conv2d(_dense_conv_input(x, self.weight), w, None, self.stride, self.padding, self.dilation, G)
            y = y.unflatten(1, (G, K, C_out // G))  # [B, G, K, C_out/G, Ho, Wo]
            # Under autocast y is in the low precision: keep its dtype, as nn.Conv2d's output has it there.
            return (y * c.to(y.dtype)[..., None, None]).sum(2).flatten(1, 2)
        taps, L = self.kernel_size[0] * self.kernel_size[1], Ho * Wo
        cols = F.unfold(x, self.kernel_size, self.dilation, self.padding, self.stride)  # [B, C_in * taps, L]
        cols = cols.view(B, self.in_channels, taps, L) * att["spatial"][:, None, :, None]
        # [G, B * L, C_in/G * taps] @ [G, C_in/G * taps, K * C_out/G]: one GEMM per group, experts side by side.
        depth = self.in_channels // G * taps  # one group's column length (explicit: B may be 0)
        cols = cols.reshape(B, G, depth, L).permute(1, 0, 3, 2).reshape(G, B * L, depth)
        w = self.weight.view(K, G, C_out // G, depth).permute(1, 3, 0, 2).reshape(G, depth, K * (C_out // G))
        y = torch.bmm(cols, w).view(G, B, L, K, C_out // G)
        y = (y * c.transpose(0, 1)[:, :, None].to(y.dtype)).sum(3)
        # The permuted reshape would be a view in channels-last strides, whatever the input's layout; the layers
        # after it (and their backward) then run channels-last, where a torch kernel corrupts the heap
        # (_dense_conv_input). Return the layout F.conv2d would: the input's.
        return y.permute(1, 0, 3, 2).reshape(B, C_out, Ho, Wo).contiguous(memory_format=_memory_format(x))

    def _output_size(self, x: torch.Tensor) -> tuple[int, int]:
        H, W = x.shape[-2:]
        return (
            conv_out_size(H, self.kernel_size[0], self.stride[0], self.padding[0], self.dilation[0]),
            conv_out_size(W, self.kernel_size[1], self.stride[1], self.padding[1], self.dilation[1]),
        )

    @torch.no_grad()
    def load_static_weight(
        self, weight: torch.Tensor, bias: torch.Tensor | None = None, expert_noise: float = 0.0
    ) -> None:
        """Make the layer compute the static convolution ``F.conv2d(x, weight, bias, ...)`` for every input.

        The attention's last layer is zeroed (uniform attention) and every expert is set to
        ``weight / gain`` (``gain`` = :meth:`uniform_attention_gain`) plus zero-sum noise of standard deviation
        ``expert_noise * weight.std()``, which leaves the uniform mixture exactly equal to ``weight`` but lets
        the experts differ, so training can separate them. This is what :func:`dynconv.convert` uses.

        Args:
            weight (Tensor[C_out, C_in/groups, kh, kw]): the static kernel.
            bias (Tensor[C_out] or None): the static bias (zero if the layer has a bias and this is None).
            expert_noise (float): relative std of the zero-sum perturbation of the experts. Default 0.
        """
        expected = tuple(self.weight.shape[1:])
        if tuple(weight.shape) != expected:
            raise ValueError(f"weight must have shape {list(expected)}, got {list(weight.shape)}")
        if bias is not None and tuple(bias.shape) != (self.out_channels,):
            raise ValueError(f"bias must have shape [{self.out_channels}], got {list(bias.shape)}")
        if bias is not None and self.bias is None:
            raise ValueError("bias was given but the layer was built with bias=False")
        self.attention.make_uniform()
        gain = self.uniform_attention_gain()
        w = weight.to(self.weight) / gain
        scale = expert_noise * float(weight.std()) if weight.numel() > 1 else 0.0
        self.weight.copy_(w.expand_as(self.weight) + _zero_sum_noise(self.weight.shape, scale, self.weight))
        if self.bias is not None:
            b = torch.zeros(self.out_channels) if bias is None else bias
            b = b.to(self.bias)
            self.bias.copy_((b / gain).expand_as(self.bias) if self.bias.dim() == 2 else b)

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, expert_noise: float = 0.0, **kwargs) -> KernelMixtureConv2d:
        """A layer with ``conv``'s arguments, device and dtype that computes ``conv``
        (see :meth:`load_static_weight`)."""
        if conv.padding_mode != "zeros":
            raise ValueError(f"only padding_mode='zeros' can be converted, got {conv.padding_mode!r}")
        layer = cls(
            conv.in_channels,
            conv.out_channels,
            conv.kernel_size,
            stride=conv.stride,
            padding=conv.padding,
            dilation=conv.dilation,
            groups=conv.groups,
            bias=conv.bias is not None,
            device=conv.weight.device,
            dtype=conv.weight.dtype,
            **kwargs,
        )
        layer.load_static_weight(conv.weight, conv.bias, expert_noise=expert_noise)
        layer.train(conv.training)
        return layer


def _memory_format(x: torch.Tensor) -> torch.memory_format:
    """The layout ``F.conv2d`` gives its output for input ``x``: channels-last only for a channels-last input
    (not for one contiguous in both layouts, such as a 1x1 map or one channel)."""
    if not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def _dense_conv_input(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``x`` for a dense ``F.conv2d`` with kernels ``weight [K, C_out, C_in/groups, kh, kw]``, made contiguous
    (NCHW) for a 1x1 kernel: in torch 2.13 (CPU, float32), the backward of a 1x1 stride-2 convolution of a
    channels-last input with 2-6 input channels and batch > 1 writes past the weight gradient (oneDNN's
    ``jit_avx2_1x1_convolution_bwd_weights``) and corrupts the heap (docs/benchmarks.md, "mixture"). Every 1x1
    kernel, not only strided ones: only the failing cases that were found are known, and the copy is small."""
    if weight.shape[-2:] == (1, 1) and not x.is_contiguous():
        return x.contiguous()
    return x


def _mix(coeff: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
    """``sum_k coeff[b, k(, o)] * experts[k, o, ...]``: Tensor[B, *experts.shape[1:]] from ``coeff`` [B, K] or
    [B, K, C_out] and ``experts`` [K, C_out, ...]."""
    B, K = coeff.shape[:2]
    if coeff.dim() == 2:
        return (coeff @ experts.reshape(K, -1)).view(B, *experts.shape[1:])
    return torch.einsum("bko,koi->boi", coeff, experts.reshape(K, experts.shape[1], -1)).view(B, *experts.shape[1:])


def _zero_sum_noise(shape: torch.Size, scale: float, like: torch.Tensor) -> torch.Tensor:
    """Noise of std ``scale`` over the expert axis (dim 0) with zero mean across experts, so that a uniform
    mixture of ``W/gain + noise_k`` is exactly ``W``: the experts start different (gradient descent can tell
    them apart: identical experts under uniform attention receive identical updates forever) while the
    converted layer still computes the static convolution at step 0."""
    if scale == 0 or shape[0] == 1:
        return torch.zeros(shape, dtype=like.dtype, device=like.device)
    noise = torch.randn(shape, dtype=like.dtype, device=like.device) * scale
    return noise - noise.mean(0, keepdim=True)


def _string_padding(
    padding: str, kernel_size: tuple[int, int], stride: tuple[int, int], dilation: tuple[int, int]
) -> tuple[int, int]:
    """nn.Conv2d's ``padding="valid"`` (none) or ``"same"`` (output size = input size, stride 1) as a pair."""
    if padding == "valid":
        return (0, 0)
    if padding != "same":
        raise ValueError(f"padding must be an int, a pair of ints, 'valid' or 'same', got {padding!r}")
    if stride != (1, 1):
        raise ValueError(f"padding='same' is not supported for strided convolutions (stride {stride}), as in nn.Conv2d")
    total = [d * (k - 1) for d, k in zip(dilation, kernel_size)]
    if any(t % 2 for t in total):
        raise ValueError(
            f"padding='same' with kernel_size {kernel_size} and dilation {dilation} pads unevenly; "
            "only symmetric padding is supported"
        )
    return (total[0] // 2, total[1] // 2)


def _flatten_attention_keys(module: nn.Module, state_dict: dict, prefix: str, local_metadata: dict) -> None:
    """State-dict post hook: ``attention.fc1.weight`` saved as ``fc1.weight`` (the keys before the split)."""
    inner = prefix + "attention."
    for key in [k for k in state_dict if k.startswith(inner)]:
        state_dict[prefix + key[len(inner) :]] = state_dict.pop(key)


def _nest_attention_keys(module: nn.Module, state_dict: dict, prefix: str, *args) -> None:
    """Load-state-dict pre hook, the inverse of :func:`_flatten_attention_keys`: every key of this layer but
    ``weight`` and ``bias`` belongs to the attention."""
    own = (prefix + "weight", prefix + "bias")
    inner = prefix + "attention."
    for key in [k for k in state_dict if k.startswith(prefix) and k not in own and not k.startswith(inner)]:
        state_dict[prefix + "attention." + key[len(prefix) :]] = state_dict.pop(key)
