"""Kernel-mixture convolutions: a bank of K expert kernels mixed per sample by input-dependent attention.

* :class:`CondConv2d` -- CondConv (Yang et al., "CondConv: Conditionally Parameterized Convolutions for
  Efficient Inference", NeurIPS 2019): routing = global average pool -> linear -> **sigmoid** (independent
  weights, not a convex combination).
* :class:`DynamicConv2d` -- Dynamic Convolution / DY-CNN (Chen et al., "Dynamic Convolution: Attention over
  Convolution Kernels", CVPR 2020): attention = pool -> FC -> ReLU -> FC -> **softmax with temperature**,
  K = 4, the temperature annealed from 30 to 1 over the first epochs (:func:`temperature_schedule`).
* :class:`ODConv2d` -- Omni-Dimensional Dynamic Convolution (Li et al., ICLR 2022): four attentions (spatial
  ``k*k``, input channel, output channel, kernel) multiplied into the kernel.
* :class:`DyNetConv2d` -- DyNet (Zhang et al., "DyNet: Dynamic Convolution for Accelerating Convolutional
  Neural Networks", 2020): a *coefficient prediction module* (pool -> FC -> ReLU -> FC -> sigmoid) and a
  *dynamic generation module* that fuses fixed kernels with the coefficients. The fusion is the same
  computation as CondConv's, with one coefficient per (kernel, output channel) instead of per kernel, so it
  shares the implementation below; with ``per_channel=False`` it is exactly CondConv routing behind a hidden
  layer. (DyNet's code is not public, and the per-output-channel granularity is our reading of the paper that
  was not re-checked against its text when this was written: ``per_channel=False`` gives the per-kernel
  variant. Either way the computation is CondConv's mixture, tested by the same oracle.)

Every layer takes the ``nn.Conv2d`` arguments (``padding`` also as ``"valid"`` or ``"same"``; ``"same"`` needs
stride 1, as in ``nn.Conv2d``, and an even ``dilation * (kernel_size - 1)``, i.e. symmetric padding) and
computes, for sample ``b``,
``y[b] = conv2d(x[b], sum_k a[b, k] * W_k) + sum_k a[b, k] * bias_k`` with :func:`dynconv.sample_conv2d`.

Formulations (the ``formulation`` argument of every layer here):

* ``"grouped"``: mix the kernels per sample (``B x K x P`` multiply-adds for ``P`` kernel weights), then one
  convolution with the batch folded into the groups. Fewest FLOPs, but it materialises ``B`` kernels.
* ``"experts"`` ("batched experts", CondConv's mixture-of-experts view): ``K`` static convolutions of the
  whole batch as one convolution with ``K * C_out`` outputs, then the coefficient-weighted sum of the outputs.
  ``K`` times the convolution FLOPs, but dense (ungrouped) convolutions and no per-sample kernel. (ODConv
  runs it as one matmul over the im2col columns, its spatial attention scaling their taps: see
  :class:`ODConv2d`.)
* ``"chunked"``: the grouped formulation over chunks of at most 4 samples whose kernels together take at most
  8 MB (one sample per chunk for kernels above 4 MB): only one chunk's kernels exist at a time, and they are
  still in cache when the convolution reads them.
* ``"loop"``: one sample at a time, mixing its kernel and calling ``F.conv2d`` (chunks of one sample).
* ``"auto"`` (default): with one sample, ``"grouped"`` (a plain convolution with the mixed kernel). With
  ``B > 1``, ``"experts"`` when the per-sample kernel is large against the output map,
  ``C_in/groups * kh * kw > r * K * H_out * W_out``, else ``"chunked"`` on CPU and ``"grouped"`` on other
  devices. The left side is the per-sample kernel size over ``C_out`` (what the per-sample formulations
  write and read per sample), the right side the ``K`` expert outputs per output channel (what the experts
  formulation writes). ``r = 32`` on CPU, from ``dynconv bench mixture --layers ... --batches 64 --threads 1``
  (``DynamicConv2d(C, C, 3)``, latency over the static convolution, chunked / experts, with the left side over
  ``K * H_out * W_out``): 72 (C=512, 4x4) 9.3 / 5.4; 23.5 (C=512, 7x7) 4.7 / 4.9; 9 (C=256, 8x8) 2.8 / 3.8;
  2.9 (C=256, 14x14) 1.9 / 5.9; below that chunked 0.8-1.4, experts 3.9-4.8 (``docs/benchmarks.md``; these
  per-layer timings vary by about 20% between runs). ODConv's experts formulation (``--layer-kind odconv``)
  crosses over at the same place: 72: chunked 21.8 / experts 8.5; 23.5: 4.5 / 7.7; 9: 3.0 / 7.6. ``r = 2``
  elsewhere, calibrated against the grouped
  formulation on CPU before the chunked one existed; not yet measured on a GPU. Under ``torch.export`` (ONNX
  export, :mod:`dynconv.onnx`) ``"auto"`` is ``"grouped"``, which :func:`dynconv.sample_conv2d` then traces
  as unfold + matmul, so the exported graph keeps the batch and image size dynamic.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from dynconv._checks import conv_out_size, pair
from dynconv.functional import is_exporting, sample_conv2d

__all__ = [
    "CondConv2d",
    "DyNetConv2d",
    "DynamicConv2d",
    "ODConv2d",
    "set_temperature",
    "temperature_schedule",
]

FORMULATIONS = ("auto", "grouped", "experts", "chunked", "loop")
# The "chunked" formulation: at most this many samples per chunk, and kernels of at most this many bytes.
CHUNK_SAMPLES = 4
CHUNK_BYTES = 8 * 2**20
# "auto" picks "experts" at batch > 1 when C_in/groups * kh * kw > ratio * K * H_out * W_out (module docstring).
EXPERTS_RATIO = {"cpu": 32}
EXPERTS_RATIO_DEFAULT = 2


def _zero_sum_noise(shape: torch.Size, scale: float, like: torch.Tensor) -> torch.Tensor:
    """Noise of std ``scale`` over the expert axis (dim 0) with zero mean across experts, so that a uniform
    mixture of ``W/gain + noise_k`` is exactly ``W``: the experts start different (gradient descent can tell
    them apart: identical experts under uniform attention receive identical updates forever) while the
    converted layer still computes the static convolution at step 0."""
    if scale == 0 or shape[0] == 1:
        return torch.zeros(shape, dtype=like.dtype, device=like.device)
    noise = torch.randn(shape, dtype=like.dtype, device=like.device) * scale
    return noise - noise.mean(0, keepdim=True)


class _KernelMixtureConv2d(nn.Module):
    """Shared parameters and argument handling: ``weight [K, C_out, C_in/groups, kh, kw]``, ``bias [K, C_out]``."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | Sequence[int],
        stride: int | Sequence[int] = 1,
        padding: int | Sequence[int] | str = 0,
        dilation: int | Sequence[int] = 1,
        groups: int = 1,
        bias: bool = True,
        num_experts: int = 4,
        formulation: str = "auto",
        mixed_bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        for name, value in (("in_channels", in_channels), ("out_channels", out_channels), ("groups", groups)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if isinstance(num_experts, bool) or not isinstance(num_experts, int) or num_experts < 1:
            raise ValueError(f"num_experts must be a positive int, got {num_experts!r}")
        if in_channels % groups or out_channels % groups:
            raise ValueError(
                f"in_channels ({in_channels}) and out_channels ({out_channels}) must be divisible by groups ({groups})"
            )
        if formulation not in FORMULATIONS:
            raise ValueError(f"formulation must be one of {FORMULATIONS}, got {formulation!r}")
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
        kh, kw = self.kernel_size
        self.weight = nn.Parameter(torch.empty(num_experts, out_channels, in_channels // groups, kh, kw, **factory))
        if bias:
            shape = (num_experts, out_channels) if mixed_bias else (out_channels,)
            self.bias = nn.Parameter(torch.empty(shape, **factory))
        else:
            self.register_parameter("bias", None)

    def _reset_experts(self) -> None:
        # Each expert gets nn.Conv2d's own initialisation (independently drawn, as CondConv/DY-CNN initialise
        # every kernel like the static layer's).
        fan_in = self.weight.shape[2] * self.kernel_size[0] * self.kernel_size[1]
        for k in range(self.num_experts):
            nn.init.kaiming_uniform_(self.weight[k], a=math.sqrt(5))
        if self.bias is not None:
            bound = 1 / math.sqrt(fan_in)
            nn.init.uniform_(self.bias, -bound, bound)

    def _conv_extra_repr(self) -> str:
        parts = [
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}",
            f"num_experts={self.num_experts}",
        ]
        if self.stride != (1, 1):
            parts.append(f"stride={self.stride}")
        if self.padding != (0, 0):
            parts.append(f"padding={self.padding}")
        if self.dilation != (1, 1):
            parts.append(f"dilation={self.dilation}")
        if self.groups != 1:
            parts.append(f"groups={self.groups}")
        if self.bias is None:
            parts.append("bias=False")
        if self.formulation != "auto":
            parts.append(f"formulation={self.formulation!r}")
        return ", ".join(parts)

    def _per_sample_conv(self, x: torch.Tensor, formulation: str, kernels) -> torch.Tensor:
        """Convolve each sample with its own kernel, ``chunk`` samples per call of :func:`sample_conv2d`.

        ``kernels(lo, hi)`` returns the mixed ``(weight [n, C_out, C_in/groups, kh, kw], bias [n, C_out] or
        None)`` of samples ``lo:hi``, so at most one chunk of kernels exists at a time.
        """
        B = x.shape[0]
        args = (self.stride, self.padding, self.dilation, self.groups)
        if formulation == "grouped":  # one call, no Python loop over a (possibly symbolic, in export) batch
            return sample_conv2d(x, *kernels(0, B), *args, backend="torch")
        chunk = _chunk_size(formulation, B, self.weight[0].numel() * self.weight.element_size())
        outs = []
        for lo in range(0, max(B, 1), chunk):  # B = 0: one empty chunk
            hi = min(lo + chunk, B)
            weight, bias = kernels(lo, hi)
            outs.append(sample_conv2d(x[lo:hi], weight, bias, *args, backend="torch"))
        return outs[0] if len(outs) == 1 else torch.cat(outs)

    def choose_formulation(self, x: torch.Tensor) -> str:
        """The formulation ``"auto"`` picks for input ``x`` (the rule in the module docstring)."""
        if self.formulation != "auto":
            return self.formulation
        if is_exporting():
            return "grouped"  # the one formulation without shape-dependent choices or Python loops (dynconv.onnx)
        Ho, Wo = self._output_size(x)
        per_sample_kernel = self.weight.shape[2] * self.kernel_size[0] * self.kernel_size[1]
        ratio = EXPERTS_RATIO.get(x.device.type, EXPERTS_RATIO_DEFAULT)
        if x.shape[0] > 1 and per_sample_kernel > ratio * self.num_experts * Ho * Wo:
            return "experts"
        return _per_sample_formulation(x)

    def _check_input(self, x: torch.Tensor) -> None:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"x must have shape [B, {self.in_channels}, H, W], got {tuple(x.shape)}")

    def _output_size(self, x: torch.Tensor) -> tuple[int, int]:
        H, W = x.shape[-2:]
        return (
            conv_out_size(H, self.kernel_size[0], self.stride[0], self.padding[0], self.dilation[0]),
            conv_out_size(W, self.kernel_size[1], self.stride[1], self.padding[1], self.dilation[1]),
        )

    def uniform_attention_gain(self) -> float:
        """The factor by which a uniform (zero-logit) attention scales the sum of the experts."""
        raise NotImplementedError

    def _zero_attention(self) -> None:
        """Zero the attention's last layer(s), so the attention is uniform and independent of the input."""
        raise NotImplementedError

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
        self._zero_attention()
        gain = self.uniform_attention_gain()
        w = weight.to(self.weight) / gain
        scale = expert_noise * float(weight.std()) if weight.numel() > 1 else 0.0
        self.weight.copy_(w.expand_as(self.weight) + _zero_sum_noise(self.weight.shape, scale, self.weight))
        if self.bias is not None:
            b = torch.zeros(self.out_channels) if bias is None else bias
            b = b.to(self.bias)
            self.bias.copy_((b / gain).expand_as(self.bias) if self.bias.dim() == 2 else b)

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, expert_noise: float = 0.0, **kwargs) -> _KernelMixtureConv2d:
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


def _per_sample_formulation(x: torch.Tensor) -> str:
    # On CPU (oneDNN, one thread) at batch 64, a few samples per convolution beat one convolution with B*groups
    # groups where kernels are large (ResNet-18 224x224 forward, grouped / chunked ms: 8932 / 5619; per layer,
    # C=256 at 14x14: x3.4 / x1.9 of static) and are within noise of it elsewhere (MobileNetV2 224x224: 3433 /
    # 3855 in one run, 3813 / 3035 in another); docs/benchmarks.md. On CUDA the single grouped launch is the
    # usual choice (not measured here: no GPU on the development machine).
    if is_exporting():
        return "grouped"
    return "chunked" if x.device.type == "cpu" and x.shape[0] > 1 else "grouped"


def _chunk_size(formulation: str, batch: int, kernel_bytes: int) -> int:
    """Samples per convolution for a per-sample formulation (``kernel_bytes``: one sample's mixed kernel)."""
    if formulation == "grouped":
        return max(batch, 1)
    if formulation == "loop":
        return 1
    return max(1, min(CHUNK_SAMPLES, CHUNK_BYTES // max(kernel_bytes, 1)))


class _CoefficientMixture(_KernelMixtureConv2d):
    """Layers whose attention is one coefficient per sample and expert (``[B, K]``) or per sample, expert and
    output channel (``[B, K, C_out]``): CondConv, DY-CNN, DyNet."""

    def attention(self, x: torch.Tensor) -> torch.Tensor:
        """The mixing coefficients: Tensor[B, K] or Tensor[B, K, C_out]."""
        raise NotImplementedError

    def mixed_kernel(self, coeff: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Per-sample kernels from coefficients.

        Args:
            coeff (Tensor[B, K] or Tensor[B, K, C_out]): mixing coefficients.

        Returns:
            (Tensor[B, C_out, C_in/groups, kh, kw], Tensor[B, C_out] or None)
        """
        B = coeff.shape[0]
        if coeff.dim() == 2:
            weight = (coeff @ self.weight.flatten(1)).view(B, *self.weight.shape[1:])
            bias = coeff @ self.bias if self.bias is not None else None
        else:
            weight = torch.einsum("bko,koi->boi", coeff, self.weight.flatten(2)).view(B, *self.weight.shape[1:])
            bias = (coeff * self.bias).sum(1) if self.bias is not None else None
        return weight, bias

    def _experts_forward(self, x: torch.Tensor, coeff: torch.Tensor) -> torch.Tensor:
        K, C_out, G = self.num_experts, self.out_channels, self.groups
        # Group-major order of the K*C_out outputs: F.conv2d splits its output channels into G contiguous
        # blocks, so every block must hold all experts of that group's output channels.
        w = self.weight.unflatten(1, (G, C_out // G)).transpose(0, 1).flatten(0, 2)
        y = F.conv2d(x, w, None, self.stride, self.padding, self.dilation, G)
        y = y.unflatten(1, (G, K, C_out // G))  # [B, G, K, C_out/G, Ho, Wo]
        c = coeff if coeff.dim() == 3 else coeff.unsqueeze(-1).expand(-1, -1, C_out)
        c = c.unflatten(2, (G, C_out // G)).transpose(1, 2)  # [B, G, K, C_out/G]
        # Under autocast y is in the low precision while the attention is float32: keep y's dtype, as
        # nn.Conv2d's output has it there.
        out = (y * c.to(y.dtype)[..., None, None]).sum(2).flatten(1, 2)
        if self.bias is not None:
            bias = coeff @ self.bias if coeff.dim() == 2 else (coeff * self.bias).sum(1)
            out = out + bias.to(out.dtype)[:, :, None, None]
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Args: x (Tensor[B, C_in, H, W]). Returns: Tensor[B, C_out, H_out, W_out]."""
        self._check_input(x)
        coeff = self.attention(x)
        formulation = self.choose_formulation(x)
        if formulation == "experts":
            return self._experts_forward(x, coeff)
        return self._per_sample_conv(x, formulation, lambda lo, hi: self.mixed_kernel(coeff[lo:hi]))


class CondConv2d(_CoefficientMixture):
    """CondConv (Yang et al., NeurIPS 2019): ``K`` experts, routing ``r = sigmoid(W_r GAP(x) + b_r)``.

    The routing weights are independent sigmoids (the paper's choice: a sample may use several experts at
    full strength), not a softmax. Takes the ``nn.Conv2d`` arguments plus:

    Args:
        num_experts (int): ``K``. Default 8 (the paper's CondConv-EfficientNet setting).
        formulation (str): ``"auto"``, ``"grouped"``, ``"experts"`` or ``"loop"`` (module docstring).
        device, dtype: factory arguments.

    Shape:
        - x: ``[B, C_in, H, W]``; output: ``[B, C_out, H_out, W_out]`` (``F.conv2d``'s size).
        - ``attention(x)``: ``[B, K]`` routing weights in ``(0, 1)``.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | Sequence[int],
        stride: int | Sequence[int] = 1,
        padding: int | Sequence[int] | str = 0,
        dilation: int | Sequence[int] = 1,
        groups: int = 1,
        bias: bool = True,
        num_experts: int = 8,
        formulation: str = "auto",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(
            in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias, num_experts,
            formulation, device=device, dtype=dtype,
        )  # fmt: skip
        self.routing = nn.Linear(in_channels, num_experts, device=device, dtype=dtype)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        self._reset_experts()
        self.routing.reset_parameters()

    def attention(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.routing(x.mean((2, 3))))

    def uniform_attention_gain(self) -> float:
        return 0.5 * self.num_experts  # sigmoid(0) = 1/2 for each of K experts

    def _zero_attention(self) -> None:
        nn.init.zeros_(self.routing.weight)
        nn.init.zeros_(self.routing.bias)

    def extra_repr(self) -> str:
        return self._conv_extra_repr()


class DynamicConv2d(_CoefficientMixture):
    """Dynamic Convolution / DY-CNN (Chen et al., CVPR 2020): ``K`` kernels aggregated with
    ``softmax(FC2(ReLU(FC1(GAP(x)))) / temperature)``.

    The attention is a convex combination (softmax), squeezed by ``reduction`` in the hidden layer as in
    the paper (C/4). The paper trains with a large temperature at first (near-uniform attention, so every
    kernel is trained) and anneals it linearly from 30 to 1 over the first 10 epochs:
    call ``set_temperature(model, temperature_schedule(epoch))`` each epoch. The temperature is a buffer,
    so it is saved with the model.

    Args:
        num_experts (int): ``K``. Default 4 (the paper's default).
        reduction (int): hidden width of the attention is ``max(in_channels // reduction, min_hidden)``.
            Default 4.
        min_hidden (int): lower bound of the hidden width (for the 3-channel stem). Default 4.
        temperature (float): initial softmax temperature. Default 30 (the start of the paper's schedule).
        formulation (str): see the module docstring.

    Shape:
        - x: ``[B, C_in, H, W]``; output: ``[B, C_out, H_out, W_out]``.
        - ``attention(x)``: ``[B, K]``, rows summing to 1.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | Sequence[int],
        stride: int | Sequence[int] = 1,
        padding: int | Sequence[int] | str = 0,
        dilation: int | Sequence[int] = 1,
        groups: int = 1,
        bias: bool = True,
        num_experts: int = 4,
        reduction: int = 4,
        min_hidden: int = 4,
        temperature: float = 30.0,
        formulation: str = "auto",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(
            in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias, num_experts,
            formulation, device=device, dtype=dtype,
        )  # fmt: skip
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature!r}")
        hidden = max(in_channels // reduction, min_hidden)
        self.fc1 = nn.Linear(in_channels, hidden, device=device, dtype=dtype)
        self.fc2 = nn.Linear(hidden, num_experts, device=device, dtype=dtype)
        self.register_buffer("temperature", torch.tensor(float(temperature), device=device))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        self._reset_experts()
        self.fc1.reset_parameters()
        self.fc2.reset_parameters()

    def attention(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.fc2(F.relu(self.fc1(x.mean((2, 3)))))
        return (logits / self.temperature.to(logits.dtype)).softmax(1)

    def uniform_attention_gain(self) -> float:
        return 1.0  # softmax(0) = 1/K, summing to 1

    def _zero_attention(self) -> None:
        nn.init.zeros_(self.fc2.weight)
        nn.init.zeros_(self.fc2.bias)

    def extra_repr(self) -> str:
        return self._conv_extra_repr() + f", temperature={float(self.temperature):g}"


class DyNetConv2d(_CoefficientMixture):
    """DyNet (Zhang et al., 2020): fixed kernels fused with predicted coefficients.

    The coefficient prediction module is ``sigmoid(FC2(ReLU(FC1(GAP(x)))))`` with one coefficient per
    fixed kernel and output channel (``per_channel=True``), or per fixed kernel (``per_channel=False``; then
    this is CondConv's routing with a hidden layer). The dynamic generation module is the coefficient-weighted
    sum of the fixed kernels, the same computation as CondConv, and runs through the same formulations.

    Args:
        num_experts (int): number of fixed kernels. Default 4.
        per_channel (bool): one coefficient per (kernel, output channel). Default True.
        reduction, min_hidden (int): hidden width ``max(in_channels // reduction, min_hidden)``. Defaults 4, 4.

    Shape:
        - x: ``[B, C_in, H, W]``; output: ``[B, C_out, H_out, W_out]``.
        - ``attention(x)``: ``[B, K, C_out]`` (or ``[B, K]`` with ``per_channel=False``) in ``(0, 1)``.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | Sequence[int],
        stride: int | Sequence[int] = 1,
        padding: int | Sequence[int] | str = 0,
        dilation: int | Sequence[int] = 1,
        groups: int = 1,
        bias: bool = True,
        num_experts: int = 4,
        per_channel: bool = True,
        reduction: int = 4,
        min_hidden: int = 4,
        formulation: str = "auto",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(
            in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias, num_experts,
            formulation, device=device, dtype=dtype,
        )  # fmt: skip
        self.per_channel = per_channel
        hidden = max(in_channels // reduction, min_hidden)
        self.fc1 = nn.Linear(in_channels, hidden, device=device, dtype=dtype)
        self.fc2 = nn.Linear(hidden, num_experts * (out_channels if per_channel else 1), device=device, dtype=dtype)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        self._reset_experts()
        self.fc1.reset_parameters()
        self.fc2.reset_parameters()

    def attention(self, x: torch.Tensor) -> torch.Tensor:
        coeff = torch.sigmoid(self.fc2(F.relu(self.fc1(x.mean((2, 3))))))
        return coeff.unflatten(1, (self.num_experts, self.out_channels)) if self.per_channel else coeff

    def uniform_attention_gain(self) -> float:
        return 0.5 * self.num_experts

    def _zero_attention(self) -> None:
        nn.init.zeros_(self.fc2.weight)
        nn.init.zeros_(self.fc2.bias)

    def extra_repr(self) -> str:
        return self._conv_extra_repr() + ("" if self.per_channel else ", per_channel=False")


class ODConv2d(_KernelMixtureConv2d):
    """Omni-Dimensional Dynamic Convolution (Li, Zhou and Yao, ICLR 2022).

    From ``GAP(x)``, a shared FC -> BatchNorm -> ReLU trunk (width ``max(C_in * reduction, min_channels)``)
    feeds four heads: spatial ``a_s [B, kh*kw]``, input channel ``a_c [B, C_in]`` and output channel
    ``a_f [B, C_out]`` (sigmoids), and kernel ``a_w [B, K]`` (softmax), all with ``temperature``. The kernel
    of sample ``b`` is

        ``W[b] = sum_k a_w[b,k] * a_f[b,:,None,None,None] * a_c[b,None,:,None,None] * a_s[b,None,None,:] * W_k``

    Each channel attention is multiplied into whichever is smaller, the per-sample kernel (``P`` weights) or
    the activation it scales (``C_in*H*W`` of the input, ``C_out*H_out*W_out`` of the output; the official
    code always scales the activations): the product is the same, and on early layers of large maps the
    kernel is the cheaper one. Heads are omitted as in the official code: the spatial one for 1x1 kernels, the
    output-channel one for depthwise layers, the kernel one for ``K = 1``. The bias (one per layer, not
    mixed) is added after the output-channel attention.

    Args:
        num_experts (int): ``K``. Default 4 (the paper's ODConv 4x; use 1 for ODConv 1x).
        reduction (float): trunk width ratio. Default 1/16.
        min_channels (int): minimum trunk width. Default 16.
        temperature (float): attention temperature. Default 1.
        formulation (str): as for the other mixtures (module docstring), with the same ``"auto"`` rule. In the
            ``"experts"`` formulation the spatial attention, which scales tap ``t`` of every expert alike, scales
            tap ``t`` of the input's im2col columns instead, and the ``K`` experts run as one matmul over them
            (no per-sample kernel; the columns take ``kh*kw`` times the input's memory, which the rule only
            allows on small maps).

    Shape:
        - x: ``[B, C_in, H, W]``; output: ``[B, C_out, H_out, W_out]``.
        - ``attention(x)``: a dict with ``"spatial" [B, kh*kw]``, ``"in_channel" [B, C_in]``,
          ``"out_channel" [B, C_out]``, ``"kernel" [B, K]`` (absent heads are omitted).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | Sequence[int],
        stride: int | Sequence[int] = 1,
        padding: int | Sequence[int] | str = 0,
        dilation: int | Sequence[int] = 1,
        groups: int = 1,
        bias: bool = True,
        num_experts: int = 4,
        reduction: float = 0.0625,
        min_channels: int = 16,
        temperature: float = 1.0,
        formulation: str = "auto",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(
            in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias, num_experts,
            formulation, mixed_bias=False, device=device, dtype=dtype,
        )  # fmt: skip
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature!r}")
        factory = {"device": device, "dtype": dtype}
        width = max(int(in_channels * reduction), min_channels)
        self.fc = nn.Linear(in_channels, width, bias=False, **factory)
        self.bn = nn.BatchNorm1d(width, **factory)
        kh, kw = self.kernel_size
        self.in_channel_fc = nn.Linear(width, in_channels, **factory)
        depthwise = in_channels == groups == out_channels
        self.out_channel_fc = None if depthwise else nn.Linear(width, out_channels, **factory)
        self.spatial_fc = None if kh * kw == 1 else nn.Linear(width, kh * kw, **factory)
        self.kernel_fc = None if num_experts == 1 else nn.Linear(width, num_experts, **factory)
        self.register_buffer("temperature", torch.tensor(float(temperature), device=device))
        self.reset_parameters()

    def _heads(self) -> dict[str, nn.Linear]:
        heads = {
            "in_channel": self.in_channel_fc,
            "out_channel": self.out_channel_fc,
            "spatial": self.spatial_fc,
            "kernel": self.kernel_fc,
        }
        return {name: fc for name, fc in heads.items() if fc is not None}

    def reset_parameters(self) -> None:
        # The official code: Kaiming-normal (fan_out) kernels and attention FCs, zero FC biases.
        for k in range(self.num_experts):
            nn.init.kaiming_normal_(self.weight[k], mode="fan_out", nonlinearity="relu")
        if self.bias is not None:
            nn.init.zeros_(self.bias)
        nn.init.kaiming_normal_(self.fc.weight, mode="fan_out", nonlinearity="relu")
        self.bn.reset_parameters()
        for fc in self._heads().values():
            nn.init.kaiming_normal_(fc.weight, mode="fan_out", nonlinearity="relu")
            nn.init.zeros_(fc.bias)

    def attention(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        h = F.relu(self.bn(self.fc(x.mean((2, 3)))))
        t = self.temperature.to(h.dtype)
        out = {}
        for name, fc in self._heads().items():
            z = fc(h) / t
            out[name] = z.softmax(1) if name == "kernel" else torch.sigmoid(z)
        return out

    def uniform_attention_gain(self) -> float:
        sigmoid_heads = sum(1 for name in self._heads() if name != "kernel")
        return 0.5**sigmoid_heads

    def _zero_attention(self) -> None:
        for fc in self._heads().values():
            nn.init.zeros_(fc.weight)
            nn.init.zeros_(fc.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Args: x (Tensor[B, C_in, H, W]). Returns: Tensor[B, C_out, H_out, W_out]."""
        self._check_input(x)
        att = self.attention(x)
        if torch.is_autocast_enabled(x.device.type):
            # The attention (float32 from its sigmoids/softmax) in the convolution's low precision, so that
            # scaling the output by it keeps the dtype nn.Conv2d returns under autocast.
            low = torch.get_autocast_dtype(x.device.type)
            att = {name: a.to(low) for name, a in att.items()}
        per_sample_kernel = "spatial" in att or "kernel" in att
        formulation = self.choose_formulation(x) if per_sample_kernel else "static"
        P = self.weight[0].numel()
        Ho, Wo = self._output_size(x)
        per_sample = formulation not in ("static", "experts")  # a kernel per sample is materialised
        fold_in = per_sample and P < x.shape[1] * x.shape[2] * x.shape[3]  # not Size.numel(): export specialises
        fold_out = per_sample and "out_channel" in att and P < self.out_channels * Ho * Wo
        if not fold_in:
            x = x * att["in_channel"][:, :, None, None]
        if formulation == "experts":
            y = self._experts_forward(x, att, Ho, Wo)
        elif formulation == "static":
            # Nothing per-sample inside the kernel (ODConv 1x on a 1x1 layer): one static convolution.
            y = F.conv2d(x, self.weight[0], None, self.stride, self.padding, self.dilation, self.groups)
        else:
            # Mix over the experts first (one matmul per chunk of samples), then scale the taps: the spatial
            # attention does not depend on the expert, so this equals scaling every expert and mixing, without
            # a B x K x P tensor.
            def kernels(lo: int, hi: int) -> tuple[torch.Tensor, None]:
                n = hi - lo
                if "kernel" in att:
                    weight = (att["kernel"][lo:hi] @ self.weight.flatten(1)).view(n, *self.weight.shape[1:])
                else:
                    weight = self.weight[0].expand(n, *self.weight.shape[1:])
                if "spatial" in att:
                    weight = weight * att["spatial"][lo:hi].view(n, 1, 1, *self.kernel_size)
                if fold_in:  # kernel column i of group g's rows reads input channel g * C_in/G + i
                    G = self.groups
                    a_in = att["in_channel"][lo:hi].view(n, G, 1, -1).expand(-1, -1, self.out_channels // G, -1)
                    weight = weight * a_in.reshape(n, self.out_channels, -1, 1, 1)
                if fold_out:
                    weight = weight * att["out_channel"][lo:hi].view(n, -1, 1, 1, 1)
                return weight, None

            y = self._per_sample_conv(x, formulation, kernels)
        if "out_channel" in att and not fold_out:
            y = y * att["out_channel"][:, :, None, None]
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)[:, None, None]
        return y

    def _experts_forward(self, x: torch.Tensor, att: dict[str, torch.Tensor], Ho: int, Wo: int) -> torch.Tensor:
        """The batched experts formulation: ``K`` static convolutions of the batch as one matmul over its
        im2col columns, then the kernel-attention-weighted sum. The spatial attention scales tap ``t`` of every
        expert alike, so it scales tap ``t`` of the columns instead: no per-sample kernel exists. ``x`` is
        already scaled by the input-channel attention; the output-channel attention and bias come after."""
        B, K, G, C_out = x.shape[0], self.num_experts, self.groups, self.out_channels
        taps = self.kernel_size[0] * self.kernel_size[1]
        L = Ho * Wo
        cols = F.unfold(x, self.kernel_size, self.dilation, self.padding, self.stride)  # [B, C_in * taps, L]
        if "spatial" in att:
            cols = cols.view(B, self.in_channels, taps, L) * att["spatial"][:, None, :, None]
        # [G, B * L, C_in/G * taps] @ [G, C_in/G * taps, K * C_out/G]: one GEMM per group, experts side by side.
        depth = self.in_channels // G * taps  # one group's column length (explicit: B may be 0)
        cols = cols.reshape(B, G, depth, L).permute(1, 0, 3, 2).reshape(G, B * L, depth)
        w = self.weight.view(K, G, C_out // G, depth).permute(1, 3, 0, 2).reshape(G, depth, K * (C_out // G))
        y = torch.bmm(cols, w).view(G, B, L, K, C_out // G)
        if "kernel" in att:
            y = (y * att["kernel"][None, :, None, :, None]).sum(3)
        else:
            y = y.squeeze(3)
        return y.permute(1, 0, 3, 2).reshape(B, C_out, Ho, Wo)

    def extra_repr(self) -> str:
        return self._conv_extra_repr() + f", temperature={float(self.temperature):g}"


def temperature_schedule(epoch: float, anneal_epochs: float = 10, start: float = 30.0, end: float = 1.0) -> float:
    """DY-CNN's temperature: linear from ``start`` at epoch 0 to ``end`` at ``anneal_epochs``, then ``end``.

    Args:
        epoch (float): the current (possibly fractional) epoch.
        anneal_epochs (float): length of the annealing. Default 10 (the paper).
        start, end (float): temperatures. Defaults 30 and 1 (the paper).
    """
    if anneal_epochs <= 0:
        raise ValueError(f"anneal_epochs must be > 0, got {anneal_epochs!r}")
    progress = min(max(epoch / anneal_epochs, 0.0), 1.0)
    return start + (end - start) * progress


def set_temperature(model: nn.Module, temperature: float) -> int:
    """Set the attention temperature of every :class:`DynamicConv2d` and :class:`ODConv2d` in ``model``.

    Returns:
        int: how many layers were updated.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature!r}")
    count = 0
    for m in model.modules():
        if isinstance(m, (DynamicConv2d, ODConv2d)):
            m.temperature.fill_(float(temperature))
            count += 1
    return count
