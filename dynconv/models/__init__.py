"""Reference architectures built in dynconv (no torchvision/timm dependency), with torchvision's layer names."""

from dynconv.models.mobilenetv2 import MobileNetV2, mobilenet_v2
from dynconv.models.resnet import ResNet, resnet18

__all__ = ["MobileNetV2", "ResNet", "mobilenet_v2", "resnet18"]
