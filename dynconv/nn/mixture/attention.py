"""The attentions of the kernel mixtures: small modules that map an input to its mixing coefficients.

Every one pools the input globally and returns either coefficients ``[B, K]`` / ``[B, K, C_out]`` (CondConv,
DY-CNN, DyNet) or a dict of attentions (ODConv); :class:`~dynconv.nn.mixture.KernelMixtureConv2d` turns them
into per-sample kernels. Each also says how much a uniform (input-independent) attention scales the sum of the
experts (:meth:`MixtureAttention.uniform_gain`) and how to make it uniform (:meth:`MixtureAttention.make_uniform`),
which is how a converted layer starts as its static convolution.
"""

from __future__ import annotations

import math
import numbers

import torch
import torch.nn.functional as F
from torch import nn

from dynconv._checks import as_int, pair

__all__ = ["CondConvRouting", "DyNetCoefficients", "MixtureAttention", "OmniAttention", "SoftmaxAttention"]


class MixtureAttention(nn.Module):
    """Base class: the geometry it was built for and the default initialisation of the experts.

    A subclass sets ``mixes_bias`` to False if the layer's bias is one ``[C_out]`` vector added after the
    attention rather than one bias per expert mixed like the kernels. The layer checks that every geometry
    attribute the attention has (``in_channels``, ``out_channels``, ``num_experts``, ``kernel_size``, ``groups``)
    equals its own.
    """

    mixes_bias = True

    def __init__(self, in_channels: int, num_experts: int) -> None:
        super().__init__()
        self.in_channels, self.num_experts = as_int(in_channels, "in_channels"), as_int(num_experts, "num_experts")

    def uniform_gain(self) -> float:
        """The factor by which a uniform (zero-logit) attention scales the sum of the experts."""
        raise NotImplementedError

    def make_uniform(self) -> None:
        """Zero the attention's last layer(s), so the attention is uniform and independent of the input."""
        raise NotImplementedError

    def init_experts(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        """Initialise the experts ``[K, C_out, C_in/groups, kh, kw]`` and bias in place: each expert as
        ``nn.Conv2d`` initialises its kernel (independently drawn, as CondConv and DY-CNN do)."""
        fan_in = weight[0, 0].numel()
        for k in range(weight.shape[0]):
            nn.init.kaiming_uniform_(weight[k], a=math.sqrt(5))
        if bias is not None:
            bound = 1 / math.sqrt(fan_in)
            nn.init.uniform_(bias, -bound, bound)

    def _register_temperature(self, temperature: float, device: torch.device | str | None) -> None:
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature!r}")
        self.initial_temperature = float(temperature)  # what reset_parameters() restores
        self.register_buffer("temperature", torch.tensor(float(temperature), device=device))

    def _reset_temperature(self) -> None:
        # A module built on the meta device and materialised by to_empty() holds arbitrary memory here.
        with torch.no_grad():
            self.temperature.fill_(self.initial_temperature)


class CondConvRouting(MixtureAttention):
    """CondConv's routing ``sigmoid(W_r GAP(x) + b_r)``: independent weights in ``(0, 1)``, not a softmax (a
    sample may use several experts at full strength). Returns ``[B, K]``."""

    def __init__(self, in_channels: int, num_experts: int, device=None, dtype=None) -> None:
        super().__init__(in_channels, num_experts)
        self.routing = nn.Linear(self.in_channels, self.num_experts, device=device, dtype=dtype)

    def reset_parameters(self) -> None:
        self.routing.reset_parameters()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Args: x (Tensor[B, C_in, H, W]). Returns: Tensor[B, K]."""
        return torch.sigmoid(self.routing(x.mean((2, 3))))

    def uniform_gain(self) -> float:
        return 0.5 * self.num_experts  # sigmoid(0) = 1/2 for each of K experts

    def make_uniform(self) -> None:
        nn.init.zeros_(self.routing.weight)
        nn.init.zeros_(self.routing.bias)


class _HiddenLayerAttention(MixtureAttention):
    """``FC2(ReLU(FC1(GAP(x))))`` with hidden width ``max(in_channels // reduction, min_hidden)``."""

    def __init__(self, in_channels, num_experts, outputs, reduction, min_hidden, device=None, dtype=None) -> None:
        super().__init__(in_channels, num_experts)
        hidden = max(
            self.in_channels // as_int(reduction, "reduction", minimum=1), as_int(min_hidden, "min_hidden", minimum=1)
        )
        self.fc1 = nn.Linear(self.in_channels, hidden, device=device, dtype=dtype)
        self.fc2 = nn.Linear(hidden, as_int(outputs, "outputs"), device=device, dtype=dtype)

    def reset_parameters(self) -> None:
        self.fc1.reset_parameters()
        self.fc2.reset_parameters()

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.relu(self.fc1(x.mean((2, 3)))))

    def make_uniform(self) -> None:
        nn.init.zeros_(self.fc2.weight)
        nn.init.zeros_(self.fc2.bias)


class SoftmaxAttention(_HiddenLayerAttention):
    """DY-CNN's attention ``softmax(FC2(ReLU(FC1(GAP(x)))) / temperature)``: a convex combination, hidden width
    ``max(in_channels // reduction, min_hidden)`` (the paper's C/4). The temperature is a buffer (saved with the
    model; :func:`~dynconv.nn.mixture.set_temperature` changes it). Returns ``[B, K]``, rows summing to 1."""

    def __init__(
        self, in_channels: int, num_experts: int, reduction: int = 4, min_hidden: int = 4,
        temperature: float = 30.0, device=None, dtype=None,
    ) -> None:  # fmt: skip
        super().__init__(in_channels, num_experts, num_experts, reduction, min_hidden, device, dtype)
        self._register_temperature(temperature, device)

    def reset_parameters(self) -> None:
        super().reset_parameters()
        self._reset_temperature()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Args: x (Tensor[B, C_in, H, W]). Returns: Tensor[B, K]."""
        logits = self.logits(x)
        return (logits / self.temperature.to(logits.dtype)).softmax(1)

    def uniform_gain(self) -> float:
        return 1.0  # softmax(0) = 1/K, summing to 1

    def extra_repr(self) -> str:
        return f"temperature={float(self.temperature):g}"


class DyNetCoefficients(_HiddenLayerAttention):
    """DyNet's coefficient prediction module ``sigmoid(FC2(ReLU(FC1(GAP(x)))))``: one coefficient per fixed
    kernel and output channel (``per_channel=True``, ``[B, K, C_out]``) or per fixed kernel (``[B, K]``; then it
    is CondConv's routing behind a hidden layer)."""

    def __init__(
        self, in_channels: int, out_channels: int, num_experts: int, per_channel: bool = True, reduction: int = 4,
        min_hidden: int = 4, device=None, dtype=None,
    ) -> None:  # fmt: skip
        outputs = num_experts * (out_channels if per_channel else 1)
        super().__init__(in_channels, num_experts, outputs, reduction, min_hidden, device, dtype)
        self.out_channels, self.per_channel = out_channels, per_channel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Args: x (Tensor[B, C_in, H, W]). Returns: Tensor[B, K, C_out] or Tensor[B, K]."""
        coeff = torch.sigmoid(self.logits(x))
        return coeff.unflatten(1, (self.num_experts, self.out_channels)) if self.per_channel else coeff

    def uniform_gain(self) -> float:
        return 0.5 * self.num_experts

    def extra_repr(self) -> str:
        return "" if self.per_channel else "per_channel=False"


class OmniAttention(MixtureAttention):
    """ODConv's four attentions: from ``GAP(x)``, a shared FC -> BatchNorm -> ReLU trunk of width
    ``max(int(C_in * reduction), min_channels)`` feeds the heads spatial ``[B, kh*kw]``, input channel
    ``[B, C_in]``, output channel ``[B, C_out]`` (sigmoids) and kernel ``[B, K]`` (softmax), all divided by
    ``temperature``. Heads are omitted as in the official code: the spatial one for 1x1 kernels, the
    output-channel one for depthwise layers, the kernel one for ``K = 1``. The layer's bias is one ``[C_out]``
    vector added after the attentions (``mixes_bias = False``).

    Returns a dict with ``"in_channel"``, ``"out_channel"``, ``"spatial"``, ``"kernel"`` (absent heads omitted).
    """

    mixes_bias = False

    def __init__(
        self, in_channels: int, out_channels: int, kernel_size: tuple[int, int], groups: int, num_experts: int,
        reduction: float = 0.0625, min_channels: int = 16, temperature: float = 1.0, device=None, dtype=None,
    ) -> None:  # fmt: skip
        super().__init__(in_channels, num_experts)
        self.out_channels, self.groups = as_int(out_channels, "out_channels"), as_int(groups, "groups")
        self.kernel_size = pair(kernel_size, "kernel_size")
        in_channels, out_channels, num_experts = self.in_channels, self.out_channels, self.num_experts
        self._register_temperature(temperature, device)
        factory = {"device": device, "dtype": dtype}
        if isinstance(reduction, bool) or not isinstance(reduction, numbers.Real) or not reduction > 0:
            raise ValueError(f"reduction must be a number > 0 (the trunk width is C_in * reduction), got {reduction!r}")
        width = max(int(in_channels * reduction), as_int(min_channels, "min_channels", minimum=1))
        self.fc = nn.Linear(in_channels, width, bias=False, **factory)
        self.bn = nn.BatchNorm1d(width, **factory)
        taps = self.kernel_size[0] * self.kernel_size[1]
        self.in_channel_fc = nn.Linear(width, in_channels, **factory)
        depthwise = in_channels == groups == out_channels
        self.out_channel_fc = None if depthwise else nn.Linear(width, out_channels, **factory)
        self.spatial_fc = None if taps == 1 else nn.Linear(width, taps, **factory)
        self.kernel_fc = None if num_experts == 1 else nn.Linear(width, num_experts, **factory)

    def heads(self) -> dict[str, nn.Linear]:
        """The heads this layer has, by the name of the attention they compute."""
        heads = {
            "in_channel": self.in_channel_fc,
            "out_channel": self.out_channel_fc,
            "spatial": self.spatial_fc,
            "kernel": self.kernel_fc,
        }
        return {name: fc for name, fc in heads.items() if fc is not None}

    def init_experts(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        # The official code: Kaiming-normal (fan_out) kernels, zero bias.
        for k in range(weight.shape[0]):
            nn.init.kaiming_normal_(weight[k], mode="fan_out", nonlinearity="relu")
        if bias is not None:
            nn.init.zeros_(bias)

    def reset_parameters(self) -> None:
        # The official code: Kaiming-normal (fan_out) attention FCs, zero FC biases.
        nn.init.kaiming_normal_(self.fc.weight, mode="fan_out", nonlinearity="relu")
        self.bn.reset_parameters()
        self._reset_temperature()
        for fc in self.heads().values():
            nn.init.kaiming_normal_(fc.weight, mode="fan_out", nonlinearity="relu")
            nn.init.zeros_(fc.bias)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Args: x (Tensor[B, C_in, H, W]). Returns: dict of Tensor[B, n] (n as in the class docstring)."""
        h = F.relu(self.bn(self.fc(x.mean((2, 3)))))
        t = self.temperature.to(h.dtype)
        out = {}
        for name, fc in self.heads().items():
            z = fc(h) / t
            out[name] = z.softmax(1) if name == "kernel" else torch.sigmoid(z)
        return out

    def uniform_gain(self) -> float:
        return 0.5 ** sum(1 for name in self.heads() if name != "kernel")

    def make_uniform(self) -> None:
        for fc in self.heads().values():
            nn.init.zeros_(fc.weight)
            nn.init.zeros_(fc.bias)

    def extra_repr(self) -> str:
        return f"temperature={float(self.temperature):g}"
