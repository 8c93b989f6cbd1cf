"""Sample-specific convolution: sample_conv2d, its grouped-convolution (torch) backend against the per-sample
F.conv2d loop (reference); and the layers of dynconv/nn/sample_conv.py built on it (DFN DynamicFilterLayer, CondInst
DynamicMaskHead, DMNet DynamicMultiScaleFilter, HDFNet DynamicDilatedFilter), each against its definition written
out with F.conv2d / the local-filter reference."""

import random

import pytest
import torch
import torch.nn.functional as F

import dynconv
from dynconv import reference
from dynconv.backends import BackendError
from dynconv.testing import assert_close, assert_close_lowp

pytestmark = pytest.mark.usefixtures("one_thread")


def make_case(seed):
    """Random geometry: odd sizes, non-square kernels, stride, dilation, groups, padding, batch 1..3, layouts."""
    rng = random.Random(seed)
    groups = rng.choice([1, 1, 2, 3])
    cin = groups * rng.choice([1, 2, 3])
    cout = groups * rng.choice([1, 2, 4])
    kh, kw = rng.choice([(1, 1), (3, 3), (5, 5), (3, 1), (2, 3)])
    stride = rng.choice([1, 2, (1, 2)])
    dilation = rng.choice([1, 2, (2, 1)])
    padding = rng.choice([0, 1, (2, 0)])
    return dict(
        B=rng.choice([1, 2, 3]),
        cin=cin,
        cout=cout,
        k=(kh, kw),
        H=rng.choice([7, 9, 11]),
        W=rng.choice([6, 9, 13]),
        stride=stride,
        padding=padding,
        dilation=dilation,
        groups=groups,
        bias=rng.random() < 0.6,
        layout=rng.choice(["contiguous", "channels_last", "strided"]),
    )


CASES = [make_case(s) for s in range(24)]


def make_inputs(case, dtype):
    B, cin, cout, (kh, kw), H, W = (case[n] for n in ("B", "cin", "cout", "k", "H", "W"))
    x = torch.randn(B, cin, H, W, dtype=torch.float64)
    w = torch.randn(B, cout, cin // case["groups"], kh, kw, dtype=torch.float64)
    if case["layout"] == "channels_last":
        x = x.to(memory_format=torch.channels_last)
    elif case["layout"] == "strided":
        x = torch.randn(B, cin, H, 2 * W, dtype=torch.float64)[..., ::2]
        w = torch.randn(B, cout, cin // case["groups"], kh, kw, 2, dtype=torch.float64)[..., 0]
    b = torch.randn(B, cout, dtype=torch.float64) if case["bias"] else None
    tensors = [t.to(dtype).requires_grad_() if t is not None else None for t in (x, w, b)]
    return tensors


def call(x, w, b, case, backend):
    return dynconv.sample_conv2d(
        x, w, b, case["stride"], case["padding"], case["dilation"], case["groups"], backend=backend
    )


def _grads(out, inputs, gy):
    present = [t for t in inputs if t is not None]
    return torch.autograd.grad(out, present, gy)


def test_reference_is_a_loop_of_conv2d():
    """The oracle against F.conv2d on each sample, written out here."""
    case = CASES[1]
    x, w, b = make_inputs(case, torch.float64)
    out = call(x, w, b, case, "reference")
    for n in range(case["B"]):
        expected = F.conv2d(
            x[n : n + 1], w[n], None if b is None else b[n], case["stride"], case["padding"], case["dilation"],
            case["groups"],
        )  # fmt: skip
        assert_close(out[n : n + 1], expected)


@pytest.mark.parametrize("case", CASES, ids=[str(i) for i in range(len(CASES))])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_torch_matches_reference_forward_backward(case, dtype):
    inputs = make_inputs(case, dtype)
    out = call(*inputs, case, "torch")
    gy = torch.randn_like(out)
    grads = _grads(out, inputs, gy)
    ref_inputs = [t.detach().clone().requires_grad_() if t is not None else None for t in inputs]
    ref = call(*ref_inputs, case, "reference")
    ref_grads = _grads(ref, ref_inputs, gy)
    assert_close(out, ref, what=f"output {case}")
    for name, g, gr in zip(("x", "weight", "bias"), grads, ref_grads):
        assert_close(g, gr, what=f"grad {name} {case}")


@pytest.mark.parametrize("case", CASES, ids=[str(i) for i in range(len(CASES))])
def test_export_formulation_matches_reference(case, monkeypatch):
    """What sample_conv2d traces to under torch.export (unfold + matmul, for ONNX graphs with a dynamic batch)."""
    import dynconv.functional

    monkeypatch.setattr(dynconv.functional, "is_exporting", lambda: True)
    inputs = make_inputs(case, torch.float64)
    out = call(*inputs, case, "torch")
    gy = torch.randn_like(out)
    grads = _grads(out, inputs, gy)
    ref_inputs = [t.detach().clone().requires_grad_() if t is not None else None for t in inputs]
    ref = call(*ref_inputs, case, "reference")
    assert_close(out, ref, what=f"output {case}")
    for name, g, gr in zip(("x", "weight", "bias"), grads, _grads(ref, ref_inputs, gy)):
        assert_close(g, gr, what=f"grad {name} {case}")


@pytest.mark.parametrize("case", CASES[:6], ids=[str(i) for i in range(6)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision(case, dtype):
    inputs = make_inputs(case, dtype)
    out = call(*inputs, case, "torch")
    assert out.dtype == dtype
    ref_lowp = call(*inputs, case, "reference")
    ref32 = call(*[t.detach().float() if t is not None else None for t in inputs], case, "reference")
    assert_close_lowp(out, ref_lowp, ref32, what=str(case))


GRADCHECK_CASES = [
    dict(B=2, cin=2, cout=2, k=(3, 3), H=5, W=6, stride=1, padding=1, dilation=1, groups=1, bias=True,
         layout="strided"),
    dict(B=2, cin=4, cout=2, k=(2, 3), H=5, W=5, stride=2, padding=(1, 0), dilation=(1, 2), groups=2, bias=False,
         layout="contiguous"),
    dict(B=1, cin=3, cout=3, k=(3, 3), H=6, W=5, stride=1, padding=2, dilation=2, groups=3, bias=True,
         layout="channels_last"),
]  # fmt: skip


@pytest.mark.parametrize("backend", ["reference", "torch"])
@pytest.mark.parametrize("case", GRADCHECK_CASES, ids=lambda c: f"g{c['groups']}k{c['k']}")
def test_gradcheck(case, backend):
    inputs = make_inputs(case, torch.float64)
    present = tuple(t for t in inputs if t is not None)

    def fn(*ts):
        return call(ts[0], ts[1], ts[2] if len(ts) == 3 else None, case, backend)

    assert torch.autograd.gradcheck(fn, present)


def test_samples_are_independent():
    """Changing sample 1's kernel changes only sample 1's output (the batch really is folded into groups)."""
    x = torch.randn(3, 4, 8, 8)
    w = torch.randn(3, 6, 4, 3, 3)
    out = dynconv.sample_conv2d(x, w, padding=1)
    w2 = w.clone()
    w2[1] += 1.0
    out2 = dynconv.sample_conv2d(x, w2, padding=1)
    assert torch.equal(out[0], out2[0]) and torch.equal(out[2], out2[2])
    assert not torch.allclose(out[1], out2[1])


def test_triton_backend_is_refused_with_reason():
    x, w = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 4, 3, 3)
    with pytest.raises(BackendError, match="sample_conv2d: the triton backend has no kernel"):
        dynconv.sample_conv2d(x, w, backend="triton")


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        (dict(x=torch.randn(4, 8, 8)), ValueError, r"x must be a 4-D tensor \[B, C_in, H, W\], got shape \(4, 8, 8\)"),
        (dict(weight=torch.randn(2, 4, 4, 3)), ValueError, r"weight must be a 5-D tensor"),
        (dict(x=[1.0]), TypeError, r"x must be a torch.Tensor, got list"),
        (dict(weight=torch.randn(2, 4, 4, 3, 3).double()), TypeError, r"weight must have the dtype of x"),
        (dict(bias=torch.randn(2, 4).half()), TypeError, r"bias must have the dtype of x"),
        (dict(bias=torch.randn(2, 5)), ValueError, r"bias must have shape \[B, C_out\] = \[2, 4\], got \[2, 5\]"),
        (dict(bias=torch.randn(8)), ValueError, r"bias must be a 2-D tensor"),
        (
            dict(weight=torch.randn(3, 4, 4, 3, 3)),
            ValueError,
            r"weight must have shape \[B, C_out, C_in/groups, kh, kw\] = .*got \[3, 4, 4, 3, 3\]",
        ),
        (dict(weight=torch.randn(2, 4, 3, 3, 3)), ValueError, r"= \[2, C_out, 4, kh, kw\]"),
        (
            dict(groups=3, weight=torch.randn(2, 3, 1, 3, 3)),
            ValueError,
            r"x channels \(4\) must be divisible by groups",
        ),
        (dict(groups=2, weight=torch.randn(2, 3, 2, 3, 3)), ValueError, r"C_out \(3\) must be divisible by groups"),
        (dict(groups=0), ValueError, r"groups must be >= 1, got 0"),
        (dict(groups=2.0), TypeError, r"groups must be an int, got 2.0"),
        (dict(stride=0), ValueError, r"stride must be >= 1, got 0"),
        (dict(padding=-1), ValueError, r"padding must be >= 0, got -1"),
        (dict(dilation=(1, 0)), ValueError, r"dilation must be >= 1"),
        (dict(weight=torch.randn(2, 4, 4, 9, 9)), ValueError, r"too small for kernel size \(9, 9\)"),
        (dict(x=torch.randn(2, 4, 8, 0), weight=torch.randn(2, 4, 4, 3, 3)), ValueError, r"positive sizes"),
        (dict(backend="cuda"), ValueError, r"backend must be one of"),
    ],
)
def test_bad_input_raises_named_error(kwargs, exc, match):
    args = dict(x=torch.randn(2, 4, 8, 8), weight=torch.randn(2, 4, 4, 3, 3), bias=None)
    args.update(kwargs)
    with pytest.raises(exc, match=match):
        dynconv.sample_conv2d(**args)


def test_reference_module_function_exists_and_matches():
    x, w = torch.randn(2, 3, 6, 6), torch.randn(2, 5, 3, 3, 3)
    assert_close(reference.sample_conv2d(x, w, None, (1, 1), (1, 1), (1, 1), 1), dynconv.sample_conv2d(x, w, padding=1))


@pytest.mark.parametrize("backend", ["torch", "reference"])
def test_batch_of_zero(backend):
    """An empty batch (CondInst with no instances) gives the empty output F.conv2d gives, and empty gradients."""
    x = torch.randn(0, 4, 8, 8, requires_grad=True)
    weight = torch.randn(0, 6, 2, 3, 3, requires_grad=True)
    bias = torch.randn(0, 6, requires_grad=True)
    out = dynconv.sample_conv2d(x, weight, bias, stride=2, padding=1, groups=2, backend=backend)
    assert out.shape == F.conv2d(x, torch.randn(6, 2, 3, 3), stride=2, padding=1, groups=2).shape == (0, 6, 4, 4)
    out.sum().backward()
    assert x.grad.shape == x.shape and weight.grad.shape == weight.shape and bias.grad.shape == bias.shape


# ------------------------------------------------------------------------------------------- DFN


def test_dynamic_filter_layer_applies_generated_kernels_per_sample():
    layer = dynconv.DynamicFilterLayer(4, 6, 3, stride=2, padding=1, groups=2, cond_channels=5, hidden_channels=8)
    layer = layer.double()
    torch.nn.init.normal_(layer.head.weight, std=0.1)  # input-dependent filters
    x = torch.randn(3, 4, 9, 8, dtype=torch.float64)
    cond = torch.randn(3, 5, 6, 6, dtype=torch.float64)
    weight, bias = layer.generate(cond)
    assert tuple(weight.shape) == (3, 6, 2, 3, 3) and tuple(bias.shape) == (3, 6)
    assert (weight[0] - weight[1]).abs().max() > 1e-3
    out = layer(x, cond)
    for b in range(3):
        assert_close(out[b : b + 1], F.conv2d(x[b : b + 1], weight[b], bias[b], 2, 1, 1, 2))


def test_dynamic_filter_layer_starts_as_a_static_conv():
    layer = dynconv.DynamicFilterLayer(3, 5, 3, padding=1, hidden_channels=8).double()
    x = torch.randn(2, 3, 7, 7, dtype=torch.float64)
    P = 5 * 3 * 9
    static_w = layer.head.bias[:P].view(5, 3, 3, 3)
    assert_close(layer(x), F.conv2d(x, static_w, layer.head.bias[P:], padding=1))


def test_dynamic_filter_layer_gradcheck_and_errors():
    layer = dynconv.DynamicFilterLayer(2, 2, 3, padding=1, hidden_channels=4, bias=False).double()
    torch.nn.init.normal_(layer.head.weight, std=0.1)
    x = torch.randn(2, 2, 5, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(layer, (x,))
    with pytest.raises(ValueError, match=r"cond must have shape \[B, 2, H, W\]"):
        layer(x, torch.randn(2, 3, 5, 5, dtype=torch.float64))
    with pytest.raises(ValueError, match="cond has batch size 3 but x has 2"):
        layer(x, torch.randn(3, 2, 5, 5, dtype=torch.float64))
    assert "bias=False" in repr(layer)


# --------------------------------------------------------------------------------------- CondInst


def test_mask_head_has_169_parameters_per_instance():
    head = dynconv.DynamicMaskHead()
    assert head.num_params == 169
    assert head.weight_nums == [80, 64, 8] and head.bias_nums == [8, 8, 1]


def test_mask_head_equals_per_instance_conv_chain():
    head = dynconv.DynamicMaskHead(in_channels=5, channels=4, num_layers=3, kernel_size=3)
    N = 3
    params = torch.randn(N, head.num_params, dtype=torch.float64)
    feats = torch.randn(N, 5, 7, 6, dtype=torch.float64)
    out = head(feats, params)
    # CondInst layout, sliced by hand: weights of layers 0, 1, 2, then biases of layers 0, 1, 2.
    sizes = [(4, 5), (4, 4), (1, 4)]
    nw = [co * ci * 9 for co, ci in sizes]
    for n in range(N):
        p = params[n]
        offset, ws = 0, []
        for (co, ci), num in zip(sizes, nw):
            ws.append(p[offset : offset + num].view(co, ci, 3, 3))
            offset += num
        bs = []
        for co, _ in sizes:
            bs.append(p[offset : offset + co])
            offset += co
        assert offset == head.num_params
        y = feats[n : n + 1]
        for i in range(3):
            y = F.conv2d(y, ws[i], bs[i], padding=1)
            if i < 2:
                y = F.relu(y)
        assert_close(out[n : n + 1], y)


def test_mask_head_relative_coordinates_and_errors():
    coords = dynconv.DynamicMaskHead.relative_coordinates(
        torch.tensor([[12.0, 4.0]]), 2, 3, stride=8, size_of_interest=4
    )
    # locations are pixel centres 4, 12, 20 (x) and 4, 12 (y)
    assert_close(coords[0, 0], torch.tensor([[2.0, 0.0, -2.0], [2.0, 0.0, -2.0]]))
    assert_close(coords[0, 1], torch.tensor([[0.0, 0.0, 0.0], [-2.0, -2.0, -2.0]]))
    head = dynconv.DynamicMaskHead()
    with pytest.raises(ValueError, match=r"params must have shape \[N, 169\], got \(2, 168\)"):
        head(torch.randn(2, 10, 4, 4), torch.randn(2, 168))
    with pytest.raises(ValueError, match="params has 3 instances but features has 2"):
        head(torch.randn(2, 10, 4, 4), torch.randn(3, 169))
    with pytest.raises(ValueError, match=r"features must have shape \[N, 10, H, W\]"):
        head(torch.randn(2, 8, 4, 4), torch.randn(2, 169))
    with pytest.raises(ValueError, match="kernel_size must be a positive odd int"):
        dynconv.DynamicMaskHead(kernel_size=2)


# ------------------------------------------------------------------------------------------ DMNet


@pytest.mark.parametrize("k", [1, 2, 3, 5])
def test_dmnet_filtering_is_per_sample_depthwise_conv(k):
    x = torch.randn(2, 3, 7, 6, dtype=torch.float64)
    filters = torch.randn(2, 3, 1, k, k, dtype=torch.float64)
    out = dynconv.DynamicMultiScaleFilter.apply_filters(x, filters)
    assert out.shape == x.shape
    top = k // 2  # DMNet pads even kernels one more on the top/left
    for b in range(2):
        xp = F.pad(x[b : b + 1], (top, k - 1 - top, top, k - 1 - top))
        assert_close(out[b : b + 1], F.conv2d(xp, filters[b], groups=3))


def test_dmnet_module_composition_and_gradcheck():
    m = dynconv.DynamicMultiScaleFilter(4, 3, kernel_sizes=(1, 3), fusion=True).double().eval()
    x = torch.randn(2, 4, 6, 6, dtype=torch.float64, requires_grad=True)
    out = m(x)
    assert tuple(out.shape) == (2, 6, 6, 6)
    for i, k in enumerate((1, 3)):
        pooled = F.adaptive_avg_pool2d(x, k)
        filt = m.filter_generators[i](pooled)  # [B, 3, k, k]
        red = m.reducers[i](x)
        y = torch.cat([F.conv2d(red[b : b + 1], filt[b].unsqueeze(1), padding=k // 2, groups=3) for b in range(2)])
        assert_close(out[:, 3 * i : 3 * i + 3], m.fusions[i](m.post[i](y)))
    assert torch.autograd.gradcheck(m, (x,))
    with pytest.raises(ValueError, match="kernel_sizes must be a non-empty sequence"):
        dynconv.DynamicMultiScaleFilter(4, 3, kernel_sizes=())


# ----------------------------------------------------------------------------------------- HDFNet


def test_hdfnet_dilated_filtering_composition():
    m = dynconv.DynamicDilatedFilter(8, 5, guide_channels=3, dilations=(1, 2), reduction=4).double().eval()
    x = torch.randn(2, 8, 9, 7, dtype=torch.float64)
    guide = torch.randn(2, 3, 9, 7, dtype=torch.float64)
    out = m(x, guide)
    assert tuple(out.shape) == (2, 5, 9, 7)
    reduced = m.reduce(x)
    parts = [reduced]
    for i, d in enumerate((1, 2)):
        filters = m.generate(guide, i)
        assert tuple(filters.shape) == (2, 2, 9, 9, 7)  # depthwise: one 3x3 filter per channel and pixel
        parts.append(reference.local_filter2d(reduced, filters, (3, 3), (1, 1), (d, d), (d, d)))
    assert_close(out, m.fuse(torch.cat(parts, 1)))


def test_hdfnet_gradcheck_and_errors():
    m = dynconv.DynamicDilatedFilter(4, 2, dilations=(1, 3), reduction=2).double().eval()
    x = torch.randn(1, 4, 5, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(m, (x,))
    with pytest.raises(ValueError, match=r"guide must have shape \[B, 4, 5, 5\]"):
        m(x, torch.randn(1, 4, 4, 5, dtype=torch.float64))
    with pytest.raises(ValueError, match="dilations must be a non-empty sequence of positive ints"):
        dynconv.DynamicDilatedFilter(4, 2, dilations=(0,))
    assert "dilations=(1, 3)" in repr(m)


def test_mask_head_with_no_instances():
    """CondInst with no detected instance: empty masks, and the graph still backpropagates into the features."""
    head = dynconv.DynamicMaskHead()
    feats = torch.randn(0, head.in_channels, 8, 8, requires_grad=True)
    params = torch.randn(0, head.num_params, requires_grad=True)
    masks = head(feats, params)
    assert masks.shape == (0, 1, 8, 8)
    masks.sum().backward()
    assert feats.grad.shape == feats.shape and params.grad.shape == params.shape
