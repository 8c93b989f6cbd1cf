"""ResNet-18 (He et al., "Deep Residual Learning for Image Recognition", CVPR 2016), with torchvision's layer
names (``conv1``, ``bn1``, ``layer1.0.conv1``, ``layer2.0.downsample.0``, ``fc``, ...) so recipes and
:func:`dynconv.convert` predicates written for torchvision models apply unchanged, and no torchvision
dependency.

``small_input=True`` is the usual CIFAR variant: a 3x3 stride-1 stem and no max pool (32x32 inputs keep a
4x4 map in the last stage); ``small_input=False`` is the ImageNet network (7x7 stride-2 stem + max pool).
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["BasicBlock", "ResNet", "resnet18"]


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with a residual connection (1x1 projection ``downsample`` when the shape changes)."""

    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = None
        if stride != 1 or inplanes != planes:
            self.downsample = nn.Sequential(
                nn.Conv2d(inplanes, planes, 1, stride=stride, bias=False), nn.BatchNorm2d(planes)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class ResNet(nn.Module):
    """ResNet with :class:`BasicBlock` stages.

    Args:
        layers (sequence of int): blocks per stage. ResNet-18: (2, 2, 2, 2).
        num_classes (int): outputs of ``fc``.
        small_input (bool): CIFAR stem (3x3, stride 1, no max pool) instead of the ImageNet one.
        width (float): channel multiplier: stage widths ``round(w * (64, 128, 256, 512))`` (at least 1).
            Default 1.
        in_channels (int): input channels (1 for grayscale images). Default 3.

    Shape:
        - x: ``[B, in_channels, H, W]``; output: ``[B, num_classes]``.
    """

    def __init__(
        self,
        layers=(2, 2, 2, 2),
        num_classes: int = 10,
        small_input: bool = True,
        width: float = 1.0,
        in_channels: int = 3,
    ) -> None:
        super().__init__()
        if not width > 0:
            raise ValueError(f"width must be > 0, got {width!r}")
        widths = [max(1, round(width * c)) for c in (64, 128, 256, 512)]
        if small_input:
            self.conv1 = nn.Conv2d(in_channels, widths[0], 3, stride=1, padding=1, bias=False)
            self.maxpool = nn.Identity()
        else:
            self.conv1 = nn.Conv2d(in_channels, widths[0], 7, stride=2, padding=3, bias=False)
            self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=True)
        inplanes = widths[0]
        for i, (planes, blocks) in enumerate(zip(widths, layers)):
            stride = 1 if i == 0 else 2
            stage = []
            for j in range(blocks):
                stage.append(BasicBlock(inplanes, planes, stride if j == 0 else 1))
                inplanes = planes
            setattr(self, f"layer{i + 1}", nn.Sequential(*stage))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(widths[3], num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def resnet18(num_classes: int = 10, small_input: bool = True, width: float = 1.0, in_channels: int = 3) -> ResNet:
    """ResNet-18 (11.2M parameters with 10 classes at width 1); see :class:`ResNet`."""
    return ResNet((2, 2, 2, 2), num_classes=num_classes, small_input=small_input, width=width, in_channels=in_channels)
