"""MobileNetV2 (Sandler et al., "MobileNetV2: Inverted Residuals and Linear Bottlenecks", CVPR 2018), with
torchvision's layer names (``features.0.0``, ``features.1.conv.0.0``, ``classifier.1``, ...) and no
torchvision dependency.

``small_input=True`` is the usual CIFAR variant: stride 1 in the stem and in the first stride-2 stage
(``c=24``), so 32x32 inputs end in a 4x4 map; ``small_input=False`` is the ImageNet network.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["InvertedResidual", "MobileNetV2", "mobilenet_v2"]


def _make_divisible(value: float, divisor: int = 8) -> int:
    new = max(divisor, int(value + divisor / 2) // divisor * divisor)
    return new + divisor if new < 0.9 * value else new


class ConvBNReLU6(nn.Sequential):
    """conv -> BN -> ReLU6 (torchvision's ``Conv2dNormActivation``: children named 0, 1, 2)."""

    def __init__(self, cin: int, cout: int, kernel_size: int = 3, stride: int = 1, groups: int = 1) -> None:
        super().__init__(
            nn.Conv2d(cin, cout, kernel_size, stride, (kernel_size - 1) // 2, groups=groups, bias=False),
            nn.BatchNorm2d(cout),
            nn.ReLU6(inplace=True),
        )


class InvertedResidual(nn.Module):
    """1x1 expansion -> 3x3 depthwise -> 1x1 linear projection, with a residual when the shape is kept."""

    def __init__(self, inp: int, oup: int, stride: int, expand_ratio: int) -> None:
        super().__init__()
        hidden = int(round(inp * expand_ratio))
        self.use_res_connect = stride == 1 and inp == oup
        layers: list[nn.Module] = []
        if expand_ratio != 1:
            layers.append(ConvBNReLU6(inp, hidden, 1))
        layers += [ConvBNReLU6(hidden, hidden, 3, stride, groups=hidden), nn.Conv2d(hidden, oup, 1, bias=False)]
        layers.append(nn.BatchNorm2d(oup))
        self.conv = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.use_res_connect else self.conv(x)


class MobileNetV2(nn.Module):
    """MobileNetV2.

    Args:
        num_classes (int): outputs of ``classifier.1``.
        width_mult (float): channel multiplier. Default 1.
        small_input (bool): CIFAR strides (see the module docstring).
        dropout (float): dropout before the classifier. Default 0.2.
        in_channels (int): input channels (1 for grayscale images). Default 3.

    Shape:
        - x: ``[B, in_channels, H, W]``; output: ``[B, num_classes]``.
    """

    # t (expansion), c (channels), n (blocks), s (stride of the first block)
    SETTINGS = (
        (1, 16, 1, 1),
        (6, 24, 2, 2),
        (6, 32, 3, 2),
        (6, 64, 4, 2),
        (6, 96, 3, 1),
        (6, 160, 3, 2),
        (6, 320, 1, 1),
    )

    def __init__(
        self,
        num_classes: int = 10,
        width_mult: float = 1.0,
        small_input: bool = True,
        dropout: float = 0.2,
        in_channels: int = 3,
    ) -> None:
        super().__init__()
        cin = _make_divisible(32 * width_mult)
        self.last_channel = _make_divisible(1280 * max(1.0, width_mult))
        features: list[nn.Module] = [ConvBNReLU6(in_channels, cin, 3, stride=1 if small_input else 2)]
        for i, (t, c, n, s) in enumerate(self.SETTINGS):
            cout = _make_divisible(c * width_mult)
            if small_input and i == 1:
                s = 1
            for j in range(n):
                features.append(InvertedResidual(cin, cout, s if j == 0 else 1, t))
                cin = cout
        features.append(ConvBNReLU6(cin, self.last_channel, 1))
        self.features = nn.Sequential(*features)
        self.classifier = nn.Sequential(nn.Dropout(dropout), nn.Linear(self.last_channel, num_classes))
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x).mean((2, 3))
        return self.classifier(x)


def mobilenet_v2(
    num_classes: int = 10, width_mult: float = 1.0, small_input: bool = True, in_channels: int = 3
) -> MobileNetV2:
    """MobileNetV2 (2.2M parameters with 10 classes at width 1); see :class:`MobileNetV2`."""
    return MobileNetV2(num_classes=num_classes, width_mult=width_mult, small_input=small_input, in_channels=in_channels)
