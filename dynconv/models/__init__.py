"""Reference architectures built in dynconv (no torchvision/timm dependency), with torchvision's layer names:
CIFAR-style ResNet-18 and MobileNetV2 (classification), and Deep Feature Flow's networks (video segmentation)."""

from dynconv.models.dff import DeepFeatureFlow, FeatureNet, FlowNetC, FlowNetS, TaskNet
from dynconv.models.mobilenetv2 import MobileNetV2, mobilenet_v2
from dynconv.models.resnet import ResNet, resnet18

__all__ = [
    "DeepFeatureFlow",
    "FeatureNet",
    "FlowNetC",
    "FlowNetS",
    "MobileNetV2",
    "ResNet",
    "TaskNet",
    "mobilenet_v2",
    "resnet18",
]
