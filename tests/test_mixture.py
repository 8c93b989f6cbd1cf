"""Kernel-mixture layers (CondConv, DY-CNN, ODConv, DyNet) against explicit per-sample mixed kernels."""

import copy
import functools
import random
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import dynconv
from dynconv.nn.mixture import FORMULATIONS, KernelMixtureConv2d, MixtureAttention, SoftmaxAttention
from dynconv.testing import assert_close, assert_close_lowp

pytestmark = pytest.mark.usefixtures("one_thread")


LAYERS = [dynconv.CondConv2d, dynconv.DynamicConv2d, dynconv.DyNetConv2d, dynconv.ODConv2d]


def explicit_output(layer, x):
    """y[b] = F.conv2d(x[b], W[b]) + bias[b] with W[b] built here from the layer's attention, one sample at a time."""
    att = layer.attention(x)
    outs = []
    G = layer.groups
    cout, cin_g = layer.out_channels, layer.in_channels // G
    for b in range(x.shape[0]):
        if isinstance(layer, dynconv.ODConv2d):
            kernel = torch.zeros_like(layer.weight[0])
            for k in range(layer.num_experts):
                wk = layer.weight[k]
                if "kernel" in att:
                    wk = wk * att["kernel"][b, k]
                if "spatial" in att:
                    wk = wk * att["spatial"][b].view(*layer.kernel_size)
                kernel = kernel + wk
            # input-channel attention of global channel g*cin_g + i on kernel column i of group g's rows
            col_att = torch.stack(
                [att["in_channel"][b, (o // (cout // G)) * cin_g + torch.arange(cin_g)] for o in range(cout)]
            )
            kernel = kernel * col_att[:, :, None, None]
            if "out_channel" in att:
                kernel = kernel * att["out_channel"][b][:, None, None, None]
            bias = layer.bias
        else:
            a = att[b]
            if a.dim() == 1:
                a = a[:, None].expand(-1, cout)  # [K, C_out]
            kernel = sum(a[k][:, None, None, None] * layer.weight[k] for k in range(layer.num_experts))
            bias = None if layer.bias is None else sum(a[k] * layer.bias[k] for k in range(layer.num_experts))
        outs.append(F.conv2d(x[b : b + 1], kernel, bias, layer.stride, layer.padding, layer.dilation, G))
    return torch.cat(outs)


def make_case(seed):
    rng = random.Random(seed)
    groups = rng.choice([1, 1, 2])
    return dict(
        cin=groups * rng.choice([2, 3]),
        cout=groups * rng.choice([2, 4]),
        k=rng.choice([1, 3, (3, 1)]),
        stride=rng.choice([1, 2]),
        padding=rng.choice([0, 1]),
        dilation=rng.choice([1, 2]),
        groups=groups,
        bias=rng.random() < 0.5,
        K=rng.choice([1, 2, 3]),
        B=rng.choice([1, 3]),
        H=rng.choice([7, 8]),
        W=rng.choice([6, 9]),
    )


CASES = [make_case(s) for s in range(8)]


def build(cls, case, **kwargs):
    layer = cls(
        case["cin"], case["cout"], case["k"], case["stride"], case["padding"], case["dilation"], case["groups"],
        case["bias"], num_experts=case["K"], **kwargs,
    )  # fmt: skip
    if isinstance(layer, dynconv.ODConv2d):
        layer.eval()  # BatchNorm in the attention trunk: use running statistics, valid at batch 1
        torch.nn.init.normal_(layer.bias) if layer.bias is not None else None
    return layer.double()


def _formulations(cls):
    return list(FORMULATIONS)


@pytest.mark.parametrize("cls", LAYERS, ids=lambda c: c.__name__)
@pytest.mark.parametrize("case", CASES, ids=[str(i) for i in range(len(CASES))])
def test_matches_explicit_mixed_kernel_forward_backward(cls, case):
    """Random attention: every formulation equals the explicit per-sample mixed-kernel convolution, and so do the
    gradients of the input and of every parameter (experts, biases, attention)."""
    torch.manual_seed(1)
    layer = build(cls, case, temperature=0.7) if cls in (dynconv.DynamicConv2d, dynconv.ODConv2d) else build(cls, case)
    x = torch.randn(case["B"], case["cin"], case["H"], case["W"], dtype=torch.float64, requires_grad=True)
    ref = explicit_output(layer, x)
    gy = torch.randn_like(ref)
    params = [p for p in layer.parameters()]
    ref_grads = torch.autograd.grad(ref, [x] + params, gy, allow_unused=True)
    for formulation in _formulations(cls):
        layer.formulation = formulation
        out = layer(x)
        assert_close(out, ref, what=f"{formulation} output {case}")
        grads = torch.autograd.grad(out, [x] + params, gy, allow_unused=True)
        for g, gr, name in zip(grads, ref_grads, ["x"] + [n for n, _ in layer.named_parameters()]):
            if gr is None:
                assert g is None or torch.count_nonzero(g) == 0, name
            else:
                assert_close(g, gr, what=f"{formulation} grad {name} {case}")


def test_explicit_oracle_is_not_trivial():
    """Sanity of the oracle: attention differs between samples, so a static-kernel answer would fail the test."""
    layer = dynconv.DynamicConv2d(4, 4, 3, padding=1, temperature=0.5).double()
    x = torch.randn(3, 4, 6, 6, dtype=torch.float64)
    att = layer.attention(x)
    assert (att[0] - att[1]).abs().max() > 1e-3
    static = F.conv2d(x, layer.weight.mean(0), layer.bias.mean(0), padding=1)
    assert not torch.allclose(explicit_output(layer, x), static)


@pytest.mark.parametrize("cls", LAYERS, ids=lambda c: c.__name__)
@pytest.mark.parametrize(
    "conv_args",
    [
        dict(in_channels=4, out_channels=6, kernel_size=3, padding=1),
        dict(in_channels=4, out_channels=4, kernel_size=3, stride=2, padding=1, groups=4, bias=False),
        dict(in_channels=6, out_channels=4, kernel_size=1, groups=2),
        dict(in_channels=3, out_channels=5, kernel_size=(3, 5), padding="same", dilation=2),
    ],
    ids=["3x3", "depthwise", "1x1-grouped", "same"],
)
@pytest.mark.parametrize("num_experts", [1, 3])
def test_uniform_attention_equals_static_conv(cls, conv_args, num_experts):
    """from_conv (what convert uses) with perturbed experts still computes the static convolution exactly."""
    conv = torch.nn.Conv2d(**conv_args).double()
    if conv.bias is not None:
        torch.nn.init.normal_(conv.bias)
    layer = cls.from_conv(conv, expert_noise=0.5, num_experts=num_experts)
    x = torch.randn(3, conv.in_channels, 9, 8, dtype=torch.float64)
    if cls is dynconv.ODConv2d:
        layer.train()  # batch statistics in the trunk: must not matter, the heads are zero
    if num_experts > 1:
        assert (layer.weight[0] - layer.weight[1]).abs().max() > 0  # the experts really differ
    for formulation in _formulations(cls):
        layer.formulation = formulation
        assert_close(layer(x), conv(x), what=formulation)


@pytest.mark.parametrize("cls", LAYERS, ids=lambda c: c.__name__)
def test_string_padding_as_nn_conv2d(cls):
    """padding="same"/"valid" as nn.Conv2d takes them: the same layer as with the explicit pair."""
    torch.manual_seed(0)
    x = torch.randn(2, 4, 9, 8, dtype=torch.float64)
    for padding, explicit, kernel_size, dilation in (("same", (2, 4), (3, 5), 2), ("valid", (0, 0), 3, 1)):
        layer = cls(4, 6, kernel_size, padding=padding, dilation=dilation).double().eval()
        assert layer.padding == explicit
        twin = cls(4, 6, kernel_size, padding=explicit, dilation=dilation).double().eval()
        twin.load_state_dict(layer.state_dict())
        out = layer(x)
        assert_close(out, twin(x))
        if padding == "same":
            assert out.shape[-2:] == x.shape[-2:]
    with pytest.raises(ValueError, match=r"padding='same' is not supported for strided convolutions"):
        cls(4, 6, 3, stride=2, padding="same")
    with pytest.raises(ValueError, match=r"padding='same' with kernel_size \(2, 2\) .* pads unevenly"):
        cls(4, 6, 2, padding="same")
    with pytest.raises(ValueError, match=r"padding must be an int, a pair of ints, 'valid' or 'same', got 'full'"):
        cls(4, 6, 3, padding="full")


def test_one_expert_dynamic_conv_is_the_static_conv():
    """DY-CNN with K = 1: softmax over one kernel is 1 whatever the input, so it is F.conv2d with that kernel."""
    layer = dynconv.DynamicConv2d(5, 7, 3, stride=2, padding=1, num_experts=1).double()
    x = torch.randn(2, 5, 11, 10, dtype=torch.float64)
    assert_close(layer(x), F.conv2d(x, layer.weight[0], layer.bias[0], 2, 1))


def test_condconv_routing_is_sigmoid_not_softmax():
    layer = dynconv.CondConv2d(4, 4, 3, num_experts=5)
    x = torch.randn(6, 4, 5, 5)
    r = layer.attention(x)
    assert_close(r, torch.sigmoid(layer.attention.routing(x.mean((2, 3)))))
    assert not torch.allclose(r.sum(1), torch.ones(6))


def test_dynamic_conv_attention_is_tempered_softmax():
    layer = dynconv.DynamicConv2d(32, 8, 3, temperature=1.0)
    x = torch.randn(4, 32, 5, 5)
    logits = layer.attention.fc2(F.relu(layer.attention.fc1(x.mean((2, 3)))))
    assert layer.attention.fc1.out_features == 8  # hidden width C/4, as in the paper
    assert_close(layer.attention(x), logits.softmax(1))
    dynconv.set_temperature(layer, 30.0)
    assert_close(layer.attention(x), (logits / 30).softmax(1))


def test_odconv_attention_heads_and_shapes():
    layer = dynconv.ODConv2d(32, 48, 3, padding=1, num_experts=4).eval()
    att = layer.attention(torch.randn(2, 32, 7, 7))
    assert {k: tuple(v.shape) for k, v in att.items()} == {
        "in_channel": (2, 32),
        "out_channel": (2, 48),
        "spatial": (2, 9),
        "kernel": (2, 4),
    }
    assert_close(att["kernel"].sum(1), torch.ones(2))
    assert layer.attention.fc.out_features == 16  # max(32 / 16, 16)
    dw = dynconv.ODConv2d(8, 8, 1, groups=8, num_experts=1)
    assert set(dw.attention(torch.randn(2, 8, 3, 3)).keys()) == {"in_channel"}


def test_dynet_coefficients_per_kernel_and_channel():
    layer = dynconv.DyNetConv2d(8, 6, 3, num_experts=3)
    assert tuple(layer.attention(torch.randn(2, 8, 5, 5)).shape) == (2, 3, 6)
    layer = dynconv.DyNetConv2d(8, 6, 3, num_experts=3, per_channel=False)
    assert tuple(layer.attention(torch.randn(2, 8, 5, 5)).shape) == (2, 3)


def test_temperature_schedule_and_setter():
    assert dynconv.temperature_schedule(0) == 30.0
    assert dynconv.temperature_schedule(5) == pytest.approx(15.5)
    assert dynconv.temperature_schedule(10) == 1.0
    assert dynconv.temperature_schedule(25) == 1.0
    assert dynconv.temperature_schedule(1, anneal_epochs=2, start=10, end=2) == pytest.approx(6.0)
    model = torch.nn.Sequential(dynconv.DynamicConv2d(3, 4, 3), dynconv.ODConv2d(4, 4, 3), dynconv.CondConv2d(4, 4, 1))
    assert dynconv.set_temperature(model, 2.5) == 2
    assert float(model[0].temperature) == 2.5 and float(model[1].temperature) == 2.5
    state = model.state_dict()
    assert float(state["0.temperature"]) == 2.5  # saved with the model
    with pytest.raises(ValueError, match="temperature must be > 0"):
        dynconv.set_temperature(model, 0)
    with pytest.raises(ValueError, match="anneal_epochs must be > 0"):
        dynconv.temperature_schedule(1, anneal_epochs=0)


def test_high_temperature_makes_attention_near_uniform():
    layer = dynconv.DynamicConv2d(8, 8, 3, num_experts=4, temperature=1e4)
    att = layer.attention(torch.randn(5, 8, 6, 6) * 10)
    assert (att - 0.25).abs().max() < 1e-3


def test_auto_formulation_rule():
    layer = dynconv.DynamicConv2d(512, 512, 3, padding=1)  # ResNet-18 layer4 at 32x32 input: 4x4 maps
    x = torch.zeros(2, 512, 4, 4)
    assert layer.choose_formulation(x) == "experts"  # CPU: 512*9 = 4608 > 32 * 4 * 16
    assert layer.choose_formulation(x[:1]) == "grouped"  # one sample: the mixed kernel is a plain conv
    x7 = torch.zeros(2, 512, 7, 7)  # ResNet-18 layer4 at 224x224 input
    assert layer.choose_formulation(x7) == "chunked"  # CPU: 4608 < 32 * 4 * 49
    assert layer.choose_formulation(x7.to("meta")) == "experts"  # elsewhere: 4608 > 2 * 4 * 49
    small = dynconv.DynamicConv2d(64, 64, 3, padding=1)
    # CPU: 576 < 32 * 4 * 1024; 64 kernels of 147 KB exceed GROUPED_BYTES (4 MiB), 2 do not (one call either way)
    assert small.choose_formulation(torch.zeros(64, 64, 32, 32)) == "chunked"
    assert small.choose_formulation(torch.zeros(2, 64, 32, 32)) == "grouped"
    assert small.choose_formulation(torch.zeros(2, 64, 32, 32, device="meta")) == "grouped"  # not CPU
    mid = dynconv.DynamicConv2d(128, 128, 3, padding=1)
    assert mid.choose_formulation(torch.zeros(8, 128, 8, 8)) == "chunked"  # CPU: 1152 < 32 * 4 * 64; 8 x 590 KB
    assert mid.choose_formulation(torch.zeros(2, 128, 8, 8, device="meta")) == "experts"  # 1152 > 2 * 4 * 64
    forced = dynconv.DynamicConv2d(512, 512, 3, padding=1, formulation="grouped")
    assert forced.choose_formulation(x) == "grouped"
    od = dynconv.ODConv2d(8, 8, 3)
    assert od.choose_formulation(torch.zeros(2, 8, 5, 5)) == "grouped"  # CPU: 2 kernels of 2.3 KB
    # The narrow ResNet-18 of the classification recipe (width 1/8, 28x28 images), training at batch 64: one
    # grouped call where the 64 kernels take at most 4 MiB (8 channels: 147 KB; 32: 2.3 MB), chunks above (64: 9.4 MB).
    for c, size, expected in ((8, 28, "grouped"), (32, 7, "grouped"), (64, 4, "chunked")):
        narrow = dynconv.DynamicConv2d(c, c, 3, padding=1)
        assert narrow.choose_formulation(torch.zeros(64, c, size, size)) == expected, (c, size)
    assert od.choose_formulation(torch.zeros(1, 8, 5, 5)) == "grouped"


def test_chunk_size_rule():
    from dynconv.nn.mixture import CHUNK_BYTES, CHUNK_SAMPLES, chunk_size

    assert chunk_size("grouped", 64, 10**9) == 64
    assert chunk_size("loop", 64, 1) == 1
    assert chunk_size("chunked", 64, 1000) == CHUNK_SAMPLES  # small kernels: the sample cap
    assert chunk_size("chunked", 64, CHUNK_BYTES // 3) == 3  # three kernels fit the byte budget
    assert chunk_size("chunked", 64, 512 * 512 * 9 * 4) == 1  # ResNet-18 layer4 (9.4 MB): one per chunk


@pytest.mark.parametrize("cls", LAYERS, ids=lambda c: c.__name__)
@pytest.mark.parametrize("samples,budget", [(1, 10**9), (2, 10**9), (3, 10**9), (4, 1)])
def test_chunked_matches_explicit_for_any_chunk(cls, samples, budget, monkeypatch):
    """Chunks of 1, 2 and 3 samples (7 samples: a short last chunk) and a byte budget that forces one sample
    per chunk: output and gradients equal the explicit per-sample mixed-kernel convolution."""
    from dynconv.nn.mixture import formulation

    monkeypatch.setattr(formulation, "CHUNK_SAMPLES", samples)
    monkeypatch.setattr(formulation, "CHUNK_BYTES", budget)
    torch.manual_seed(0)
    case = dict(cin=6, cout=4, k=3, stride=1, padding=1, dilation=1, groups=2, bias=True, K=3)
    layer = build(cls, case)
    layer.formulation = "chunked"
    x = torch.randn(7, 6, 5, 6, dtype=torch.float64, requires_grad=True)
    ref = explicit_output(layer, x)
    out = layer(x)
    assert_close(out, ref, what="output")
    gy = torch.randn_like(ref)
    for g, gr in zip(torch.autograd.grad(out, [x, layer.weight], gy), torch.autograd.grad(ref, [x, layer.weight], gy)):
        assert_close(g, gr, what="gradient")


@pytest.mark.parametrize("cls", LAYERS, ids=lambda c: c.__name__)
def test_gradcheck(cls):
    layer = cls(4, 4, 3, padding=1, groups=2, num_experts=2).double()
    if cls is dynconv.ODConv2d:
        layer.eval()
    x = torch.randn(2, 4, 5, 5, dtype=torch.float64, requires_grad=True)
    for formulation in _formulations(cls):
        layer.formulation = formulation
        assert torch.autograd.gradcheck(layer, (x,))


@pytest.mark.parametrize("cls", LAYERS, ids=lambda c: c.__name__)
def test_repr_and_reset(cls):
    layer = cls(4, 8, 3, stride=2, groups=2, bias=False, num_experts=2)
    text = repr(layer)
    assert "4, 8, kernel_size=(3, 3)" in text and "stride=(2, 2)" in text and "groups=2" in text
    assert "bias=False" in text and "num_experts=2" in text and "padding" not in text.split("(")[1].split(")")[0]
    before = layer.weight.detach().clone()
    layer.reset_parameters()
    assert not torch.equal(before, layer.weight)


@pytest.mark.parametrize(
    "cls, kwargs, exc, match",
    [
        (dynconv.CondConv2d, dict(formulation="fast"), ValueError, r"formulation must be one of"),
        (
            dynconv.DynamicConv2d,
            dict(groups=3),
            ValueError,
            r"in_channels \(4\) and out_channels \(8\) must be divisible",
        ),
        (dynconv.DynamicConv2d, dict(num_experts=0), ValueError, r"num_experts must be a positive int, got 0"),
        (dynconv.DynamicConv2d, dict(temperature=0.0), ValueError, r"temperature must be > 0"),
        (dynconv.DyNetConv2d, dict(kernel_size=0), ValueError, r"kernel_size must be >= 1"),
        (dynconv.CondConv2d, dict(in_channels=0), ValueError, r"in_channels must be a positive int, got 0"),
    ],
)
def test_bad_constructor_arguments(cls, kwargs, exc, match):
    args = dict(in_channels=4, out_channels=8, kernel_size=3)
    args.update(kwargs)
    with pytest.raises(exc, match=match):
        cls(**args)


def test_bad_forward_and_weight_inputs():
    layer = dynconv.DynamicConv2d(4, 8, 3)
    with pytest.raises(ValueError, match=r"x must have shape \[B, 4, H, W\], got \(2, 5, 8, 8\)"):
        layer(torch.randn(2, 5, 8, 8))
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        layer("image")
    with pytest.raises(ValueError, match=r"weight must have shape \[8, 4, 3, 3\], got \[8, 4, 1, 1\]"):
        layer.load_static_weight(torch.randn(8, 4, 1, 1))
    with pytest.raises(ValueError, match=r"bias must have shape \[8\]"):
        layer.load_static_weight(torch.randn(8, 4, 3, 3), torch.randn(4))
    no_bias = dynconv.CondConv2d(4, 8, 3, bias=False)
    with pytest.raises(ValueError, match="layer was built with bias=False"):
        no_bias.load_static_weight(torch.randn(8, 4, 3, 3), torch.randn(8))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("cls", LAYERS, ids=lambda c: c.__name__)
def test_low_precision_forward(cls, dtype):
    """fp16/bf16 layers within twice the error of the explicit oracle run in that dtype (vs the fp32 oracle)."""
    torch.manual_seed(2)
    layer = cls(6, 8, 3, padding=1, groups=2, num_experts=3).eval()
    x = torch.randn(3, 6, 7, 7)
    with torch.no_grad():
        ref32 = explicit_output(layer, x)
        low = copy.deepcopy(layer).to(dtype)
        ref_lowp = explicit_output(low, x.to(dtype))
        for formulation in _formulations(cls):
            low.formulation = formulation
            out = low(x.to(dtype))
            assert out.dtype == dtype
            assert_close_lowp(out, ref_lowp, ref32, atol=1e-2, what=formulation)


@pytest.mark.parametrize("cls", LAYERS, ids=lambda c: c.__name__)
@pytest.mark.parametrize("k,K", [(3, 3), (1, 1)], ids=["3x3-K3", "1x1-K1"])
def test_autocast_every_formulation(cls, k, K):
    """Under CPU autocast (bfloat16) every formulation returns what nn.Conv2d returns there, a bfloat16 output
    (the float32 attention must not promote it), close to the float32 result, with float32 gradients."""
    torch.manual_seed(4)
    layer = cls(6, 8, k, padding=k // 2, groups=2, num_experts=K)
    conv = torch.nn.Conv2d(6, 8, k, padding=k // 2, groups=2)
    x = torch.randn(3, 6, 7, 7, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected_dtype = conv(x).dtype
    assert expected_dtype == torch.bfloat16
    for formulation in _formulations(cls):
        layer.formulation = formulation
        ref = layer(x).detach()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = layer(x)
        assert out.dtype == expected_dtype, formulation
        torch.testing.assert_close(out.float(), ref, rtol=0.05, atol=0.05, msg=formulation)
        grads = torch.autograd.grad(out.float().sum(), [x, layer.weight])
        assert all(g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads), formulation


@pytest.mark.slow
def test_torch_compile_fullgraph():
    torch._dynamo.reset()
    x = torch.randn(2, 8, 6, 6)
    for layer in (dynconv.DynamicConv2d(8, 8, 3, padding=1).eval(), dynconv.ODConv2d(8, 8, 3, padding=1).eval()):
        for formulation in ("grouped", "experts", "chunked", "loop"):
            layer.formulation = formulation
            compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
            assert_close(compiled(x), layer(x))


@pytest.mark.parametrize(
    "cin,cout,groups,hw",
    [(4, 6, 2, 9), (6, 6, 3, 10), (8, 8, 1, 2)],
    ids=["attention-in-kernel", "depthwise-ish-in-kernel", "attention-on-activations"],
)
def test_odconv_channel_attention_in_kernel_or_on_activations(cin, cout, groups, hw):
    """ODConv multiplies each channel attention into the kernel where that is cheaper (large maps, small
    kernels: P < C*H*W) and into the activations otherwise; either way it equals the explicit kernel."""
    torch.manual_seed(3)
    case = dict(cin=cin, cout=cout, k=3, stride=1, padding=1, dilation=1, groups=groups, bias=True, K=2)
    layer = build(dynconv.ODConv2d, case, temperature=0.7)
    for fc in layer.attention.heads().values():
        torch.nn.init.normal_(fc.weight)  # attentions far from uniform, different per channel
    x = torch.randn(3, cin, hw, hw + 1, dtype=torch.float64, requires_grad=True)
    ref = explicit_output(layer, x)
    gy = torch.randn_like(ref)
    params = [x] + list(layer.parameters())
    ref_grads = torch.autograd.grad(ref, params, gy)
    for formulation in ("grouped", "chunked"):
        layer.formulation = formulation
        out = layer(x)
        assert_close(out, ref, what=formulation)
        for g, gr in zip(torch.autograd.grad(out, params, gy), ref_grads):
            assert_close(g, gr, what=f"{formulation} gradient")


@pytest.mark.parametrize("cls", LAYERS, ids=lambda c: c.__name__)
def test_batch_of_zero(cls):
    """An empty batch (zero detections, a fully filtered batch) gives nn.Conv2d's empty output in every
    formulation, in training and in evaluation, and backpropagates."""
    conv = torch.nn.Conv2d(4, 6, 3, stride=2, padding=1)
    layer = cls(4, 6, 3, stride=2, padding=1, num_experts=2)
    x = torch.randn(0, 4, 7, 7, requires_grad=True)
    for training in (True, False):
        layer.train(training)
        for formulation in _formulations(cls):
            layer.formulation = formulation
            out = layer(x)
            assert out.shape == conv(x).shape == (0, 6, 4, 4), formulation
            out.sum().backward()
            assert x.grad.shape == x.shape


CHECKPOINTS = torch.load(Path(__file__).with_name("data") / "mixture_checkpoints.pt", weights_only=True)


@pytest.mark.parametrize("entry", CHECKPOINTS, ids=[f"{i}-{e['class']}" for i, e in enumerate(CHECKPOINTS)])
def test_checkpoint_of_the_old_layers_loads_and_computes_the_same(entry):
    """State dicts saved by the layers before ``nn/mixture.py`` became a package (tests/data/
    make_mixture_checkpoints.py): the same keys in the same order, a strict load, the same extra_repr, and in
    every formulation the output the old layer computed on the saved input."""
    layer = getattr(dynconv, entry["class"])(**entry["kwargs"]).eval()
    assert list(layer.state_dict()) == list(entry["state"])
    layer.load_state_dict(entry["state"], strict=True)
    assert layer.extra_repr() == entry["extra_repr"]
    with torch.no_grad():
        for formulation in _formulations(type(layer)):
            layer.formulation = formulation
            assert_close(layer(entry["x"]), entry["y"], what=f"{entry['class']} {formulation}")


def test_odconv_empty_batch_with_the_attentions_in_the_kernel():
    """An empty batch where the channel attentions go into the per-sample kernel (P < C*H*W): nn.Conv2d's
    empty output, not a reshape error."""
    layer = dynconv.ODConv2d(4, 6, 3, padding=1, num_experts=2).eval()
    x = torch.randn(0, 4, 9, 9, requires_grad=True)
    for formulation in ("grouped", "chunked", "loop"):
        layer.formulation = formulation
        out = layer(x)
        assert out.shape == (0, 6, 9, 9), formulation
        out.sum().backward()


class _KernelAndOutputAttention(MixtureAttention):
    """Softmax over the experts and a sigmoid per output channel, with a mixed bias: a combination none of the
    four papers uses, so it exercises the general rule ``y = a_out * conv(x, W[b]) + bias[b]``."""

    def __init__(self, in_channels, out_channels, num_experts, device=None, dtype=None):
        super().__init__(in_channels, num_experts)
        self.out_channels = out_channels
        self.kernel_fc = torch.nn.Linear(in_channels, num_experts, device=device, dtype=dtype)
        self.out_fc = torch.nn.Linear(in_channels, out_channels, device=device, dtype=dtype)

    def reset_parameters(self):
        self.kernel_fc.reset_parameters()
        self.out_fc.reset_parameters()

    def forward(self, x):
        pooled = x.mean((2, 3))
        return {"kernel": self.kernel_fc(pooled).softmax(1), "out_channel": torch.sigmoid(self.out_fc(pooled))}


@pytest.mark.parametrize("hw", [3, 9], ids=["attention-on-activations", "attention-in-kernel"])
def test_kernel_mixture_with_a_new_attention(hw):
    """KernelMixtureConv2d with an attention of one's own: every formulation equals the per-sample convolution
    with the mixed kernel, scaled by the output-channel attention, plus the mixed bias."""
    torch.manual_seed(5)
    attention = functools.partial(_KernelAndOutputAttention, 4, 6, 3)
    layer = KernelMixtureConv2d(4, 6, 3, padding=1, groups=2, num_experts=3, attention=attention).double()
    assert layer.bias.shape == (3, 6)  # mixes_bias: one bias per expert
    x = torch.randn(3, 4, hw, hw + 1, dtype=torch.float64, requires_grad=True)
    att = layer.attention(x)
    ref = []
    for b in range(3):
        kernel = sum(att["kernel"][b, k] * layer.weight[k] for k in range(3))
        y = F.conv2d(x[b : b + 1], kernel, None, 1, 1, 1, 2) * att["out_channel"][b][:, None, None]
        ref.append(y + (att["kernel"][b] @ layer.bias)[:, None, None])
    ref = torch.cat(ref)
    gy = torch.randn_like(ref)
    params = [x] + list(layer.parameters())
    ref_grads = torch.autograd.grad(ref, params, gy)
    for formulation in FORMULATIONS:
        layer.formulation = formulation
        out = layer(x)
        assert_close(out, ref, what=formulation)
        for g, gr in zip(torch.autograd.grad(out, params, gy), ref_grads):
            assert_close(g, gr, what=f"{formulation} gradient")


def test_kernel_mixture_checks_its_attention():
    with pytest.raises(ValueError, match=r"attention was built for num_experts=2, the layer has 3"):
        KernelMixtureConv2d(4, 4, 3, num_experts=3, attention=SoftmaxAttention(4, 2))
    with pytest.raises(ValueError, match=r"attention was built for in_channels=8, the layer has 4"):
        KernelMixtureConv2d(4, 4, 3, num_experts=2, attention=SoftmaxAttention(8, 2))
    with pytest.raises(TypeError, match="attention must be a MixtureAttention, got Linear"):
        KernelMixtureConv2d(4, 4, 3, attention=torch.nn.Linear(4, 4))
    layer = KernelMixtureConv2d(4, 4, 3, num_experts=2, attention=SoftmaxAttention(4, 2, temperature=5.0))
    assert float(layer.temperature) == 5.0
    assert dynconv.set_temperature(torch.nn.Sequential(layer), 2.0) == 1 and float(layer.temperature) == 2.0
    with pytest.raises(AttributeError):
        _ = dynconv.CondConv2d(4, 4, 3).temperature


def test_state_dict_keys_of_nested_layers():
    """Inside a model the attention's entries keep the flat names (``0.1.routing.weight``) and load strictly
    into a fresh model; the parameters themselves live in the attention module."""
    torch.manual_seed(0)

    def model():
        return torch.nn.Sequential(
            torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), dynconv.CondConv2d(4, 4, 3, num_experts=2)),
            dynconv.ODConv2d(4, 4, 3, num_experts=2),
        )

    a, b = model(), model()
    state = a.state_dict()
    assert not any("attention" in k for k in state)
    assert {"0.1.routing.weight", "1.temperature", "1.bn.running_mean", "1.kernel_fc.bias"} <= set(state)
    assert "0.1.attention.routing.weight" in dict(a.named_parameters())
    b.load_state_dict(state, strict=True)
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p, q), name
    del state["1.spatial_fc.weight"]
    with pytest.raises(RuntimeError, match=r"Missing key\(s\) in state_dict: \"1.attention.spatial_fc.weight\""):
        b.load_state_dict(state, strict=True)


# Runs in a fresh process (a heap corruption there fails this test instead of killing pytest): ODConv experts on
# a 3x3 layer, whose output used to come back in channels-last strides, then on a 1x1 stride-2 layer (ResNet's
# downsample); and the 1x1 stride-2 layer alone on a channels-last input. Writes the outputs and gradients.
_EXPERTS_CHANNELS_LAST_SCRIPT = """
import sys, torch, dynconv
torch.set_num_threads(1)
torch.manual_seed(0)
first = dynconv.ODConv2d(4, 4, 3, padding=1, formulation="experts").eval()
second = dynconv.ODConv2d(4, 8, 1, stride=2, formulation="experts").eval()
x = torch.randn(2, 4, 8, 8, requires_grad=True)
mid = first(x)
out = second(mid)
gy = torch.randn_like(out)
params = list(first.parameters()) + list(second.parameters())
grads = torch.autograd.grad(out, [x] + params, gy)
x_cl = torch.randn(2, 4, 8, 8).contiguous(memory_format=torch.channels_last).requires_grad_()
for _ in range(3):  # the corruption is not always caught at the first free
    out_cl = second(x_cl)
    grads_cl = torch.autograd.grad(out_cl, [x_cl] + list(second.parameters()), gy)
torch.save(dict(first=first.state_dict(), second=second.state_dict(), x=x.detach(), gy=gy, mid=mid.detach(),
                out=out.detach(), grads=grads, x_cl=x_cl.detach(), out_cl=out_cl.detach(), grads_cl=grads_cl),
           sys.argv[1])
"""


def test_odconv_experts_channels_last_1x1_stride_2_does_not_corrupt_the_heap(tmp_path):
    """The abort of the width-1/16 ResNet-18 with ODConv experts (docs/benchmarks.md, "mixture"): the experts
    3x3 layer returned a channels-last view, and the backward of the next 1x1 stride-2 convolution of a
    channels-last input with 4 channels (oneDNN, torch 2.13) wrote past its weight gradient. The fresh process
    must finish, and its outputs and gradients (also for a channels-last input) equal the explicit per-sample
    convolution's and the other formulations'."""
    import os
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    # MALLOC_CHECK_=3: glibc checks every block it frees and aborts on a corrupt one.
    env = dict(os.environ, MALLOC_CHECK_="3", PYTHONPATH=str(root) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    path = tmp_path / "experts.pt"
    proc = subprocess.run(
        [sys.executable, "-c", _EXPERTS_CHANNELS_LAST_SCRIPT, str(path)],
        env=env, cwd=root, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, f"exit status {proc.returncode}: {proc.stderr[-3000:]}"
    run = torch.load(path)
    assert run["mid"].is_contiguous(), "the experts output of an NCHW input must be NCHW, as F.conv2d's"
    first = dynconv.ODConv2d(4, 4, 3, padding=1).eval()
    second = dynconv.ODConv2d(4, 8, 1, stride=2).eval()
    first.load_state_dict(run["first"])
    second.load_state_dict(run["second"])
    params = list(first.parameters()) + list(second.parameters())
    names = (
        ["x"]
        + [f"first.{n}" for n, _ in first.named_parameters()]
        + [f"second.{n}" for n, _ in second.named_parameters()]
    )

    x = run["x"].clone().requires_grad_()
    ref = explicit_output(second, explicit_output(first, x))
    ref_grads = torch.autograd.grad(ref, [x] + params, run["gy"])
    assert_close(run["out"], ref, what="experts output")
    for g, gr, name in zip(run["grads"], ref_grads, names):
        assert_close(g, gr, what=f"experts grad {name}")
    for formulation in ("grouped", "chunked", "loop"):
        first.formulation = second.formulation = formulation
        out = second(first(x))
        assert_close(out, ref, what=f"{formulation} output")
        for g, gr, name in zip(torch.autograd.grad(out, [x] + params, run["gy"]), ref_grads, names):
            assert_close(g, gr, what=f"{formulation} grad {name}")

    x_cl = run["x_cl"].clone().requires_grad_()
    ref = explicit_output(second, x_cl.contiguous())
    ref_grads = torch.autograd.grad(ref, [x_cl] + list(second.parameters()), run["gy"])
    assert_close(run["out_cl"], ref, what="experts output, channels-last input")
    for g, gr, name in zip(run["grads_cl"], ref_grads, ["x"] + [n for n, _ in second.named_parameters()]):
        assert_close(g, gr, what=f"experts grad {name}, channels-last input")
