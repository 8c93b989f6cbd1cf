"""dynconv.convert on real architectures (ResNet-18, MobileNetV2 built in dynconv.models)."""

import copy

import pytest
import torch
from torch import nn

import dynconv
from dynconv.models import mobilenet_v2, resnet18

pytestmark = pytest.mark.usefixtures("one_thread")


LAYER_OF = {"condconv": dynconv.CondConv2d, "dynamic": dynconv.DynamicConv2d, "odconv": dynconv.ODConv2d,
            "dynet": dynconv.DyNetConv2d}  # fmt: skip


def _assert_same_function(converted, original, x):
    with torch.no_grad():
        y, yc = original(x), converted(x)
    scale = y.abs().max()
    assert scale > 0
    err = (yc - y).abs().max()
    assert err <= 1e-4 * scale, f"max abs diff {err:.3g} against output scale {scale:.3g}"


@pytest.mark.parametrize("kind", sorted(LAYER_OF))
@pytest.mark.parametrize("arch", ["resnet18", "mobilenet_v2"])
def test_convert_preserves_outputs(arch, kind):
    torch.manual_seed(0)
    model = (resnet18 if arch == "resnet18" else mobilenet_v2)(num_classes=10)
    # Running statistics away from (0, 1), so the eval-mode comparison is not of near-zero outputs.
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_var.uniform_(0.5, 2.0)
                m.running_mean.normal_(0, 0.1)
    model.eval()
    n_convs = sum(type(m) is nn.Conv2d for m in model.modules())
    converted = dynconv.convert(copy.deepcopy(model), kind, num_experts=2).eval()
    layers = [m for m in converted.modules() if isinstance(m, LAYER_OF[kind])]
    assert len(layers) == n_convs and not any(type(m) is nn.Conv2d for m in converted.modules())
    assert all(m.num_experts == 2 for m in layers)
    _assert_same_function(converted, model, torch.randn(2, 3, 32, 32))


@pytest.mark.parametrize(
    "arch, kind", [("resnet18", "condconv"), ("mobilenet_v2", "dynamic"), ("mobilenet_v2", "odconv")]
)
def test_converted_model_trains(arch, kind):
    """Loss on a fixed small batch goes down with SGD, and the attention layers receive gradient."""
    torch.manual_seed(0)
    model = (resnet18 if arch == "resnet18" else mobilenet_v2)(num_classes=4)
    dynconv.convert(model, kind, num_experts=2, predicate=dynconv.skip_stem_and_pointwise, expert_noise=0.1)
    if kind == "dynamic":
        dynconv.set_temperature(model, dynconv.temperature_schedule(0))
    model.train()
    x, target = torch.randn(4, 3, 16, 16), torch.tensor([0, 1, 2, 3])
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    losses = []
    for _ in range(6):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), target)
        loss.backward()
        losses.append(loss.item())
        opt.step()
    assert losses[-1] < 0.7 * losses[0], losses
    layer = next(m for m in model.modules() if isinstance(m, LAYER_OF[kind]))
    attention_params = [p for n, p in layer.named_parameters() if n not in ("weight", "bias") and p.grad is not None]
    assert any(p.grad.abs().sum() > 0 for p in attention_params)
    # the experts have moved apart from one another (the zero-sum perturbation broke their symmetry)
    w = layer.weight.detach()
    assert (w[0] - w[1]).abs().max() > 0


def test_predicate_skips_stem_and_pointwise():
    model = resnet18()
    dynconv.convert(model, "dynamic", predicate=dynconv.skip_stem_and_pointwise)
    assert type(model.conv1) is nn.Conv2d  # stem
    assert type(model.layer2[0].downsample[0]) is nn.Conv2d  # 1x1 projection
    assert isinstance(model.layer1[0].conv1, dynconv.DynamicConv2d)
    assert isinstance(model.layer4[1].conv2, dynconv.DynamicConv2d)


def test_custom_predicate_and_layer_kwargs():
    model = mobilenet_v2()
    dynconv.convert(model, "condconv", predicate=lambda name, conv: name.startswith("features.1."), formulation="loop")
    converted = [n for n, m in model.named_modules() if isinstance(m, dynconv.CondConv2d)]
    assert converted == ["features.1.conv.0.0", "features.1.conv.1"]
    assert model.features[1].conv[0][0].formulation == "loop"
    assert model.features[1].conv[0][0].groups == 32  # depthwise kept


def test_convert_errors():
    with pytest.raises(ValueError, match=r"kind must be one of \['condconv', 'dy-cnn', 'dynamic', 'dynet', 'odconv'\]"):
        dynconv.convert(resnet18(), "involution")
    with pytest.raises(TypeError, match="kind must be a string or a layer class"):
        dynconv.convert(resnet18(), 3)
    with pytest.raises(ValueError, match="found no nn.Conv2d layer"):
        dynconv.convert(resnet18(), "dynamic", predicate=lambda n, m: False)
    with pytest.raises(ValueError, match=r"cannot convert layer '1': only padding_mode='zeros'"):
        dynconv.convert(nn.Sequential(nn.ReLU(), nn.Conv2d(3, 4, 3, padding=1, padding_mode="reflect")), "dynamic")
    with pytest.raises(ValueError, match=r"cannot convert layer '0': padding='same' .* pads unevenly"):
        dynconv.convert(nn.Sequential(nn.Conv2d(3, 4, 2, padding="same")), "odconv")
    with pytest.raises(ValueError, match="model is itself an nn.Conv2d"):
        dynconv.convert(nn.Conv2d(3, 4, 3), "dynamic")
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        dynconv.convert("resnet", "dynamic")
