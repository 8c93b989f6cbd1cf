"""dynamic local filtering: the torch backend, the Triton kernels (dynconv/kernels/local_filter.py) and the custom
op against the unfold reference.

The Triton tests (mark ``triton``; on CUDA, else in the interpreter: see tests/triton_setup.py) keep to tiny shapes,
``TRITON_CASES``: the kernels then cover each (b, g) with one tile (see ``dynconv.kernels._launch.local_filter_tile``);
the ``cuda``-marked tests add realistic sizes on a GPU.

Tolerances: fp32 and fp64 use the dtype table of :mod:`dynconv.testing` (a different order of summation);
fp16/bf16 use ``assert_close_lowp`` (twice the error the reference makes in that dtype, + 1e-3).
"""

import functools
import json
import random

import pytest
import torch
import torch.nn.functional as F
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from triton_setup import TRITON_DEVICE

import dynconv
from dynconv import reference
from dynconv.backends import BackendError, can_run_triton, choose_backend
from dynconv.testing import assert_close, assert_close_lowp, run_without_interpreter


def naive_local_filter(x, filters, k, stride, padding, dilation):
    """A loop over output pixels and taps, straight from the definition in the issue (float64)."""
    B, C, H, W = x.shape
    _, G, K, Ho, Wo = filters.shape
    out = torch.zeros(B, C, Ho, Wo, dtype=torch.float64)
    for c in range(C):
        g = c // (C // G)
        for i in range(k):
            for j in range(k):
                for ho in range(Ho):
                    for wo in range(Wo):
                        h, w = ho * stride - padding + i * dilation, wo * stride - padding + j * dilation
                        if 0 <= h < H and 0 <= w < W:
                            out[:, c, ho, wo] += filters[:, g, i * k + j, ho, wo].double() * x[:, c, h, w].double()
    return out


def make_case(seed, tiny=False):
    """A random configuration: odd sizes, k in {1,3,5,9}, stride 1-2, dilation 1-2, groups 1..C, padding, layout.
    ``tiny``: k in {1,3,5} and smaller images, for the Triton interpreter."""
    rng = random.Random(seed)
    k = rng.choice([1, 3, 5] if tiny else [1, 3, 5, 9])
    stride, dilation = rng.choice([(1, 1), (2, 1), (1, 2), (2, 2), ((1, 2), 1), (1, (2, 1))])
    C = rng.choice([1, 3, 4, 6])
    G = rng.choice([g for g in range(1, C + 1) if C % g == 0])
    B = rng.choice([1, 2])
    padding = rng.choice([None, 0, 1, (2, 0), (0, 3)])
    dh, dw = (dilation, dilation) if isinstance(dilation, int) else dilation
    ph, pw = (
        ((k - 1) // 2 * dh, (k - 1) // 2 * dw)
        if padding is None
        else ((padding, padding) if isinstance(padding, int) else padding)
    )
    H = max(rng.choice([5, 7, 11] if tiny else [5, 7, 11, 13]), dh * (k - 1) + 1 - 2 * ph)
    W = max(rng.choice([6, 9, 13] if tiny else [6, 9, 12, 15]), dw * (k - 1) + 1 - 2 * pw)
    layout = rng.choice(["contiguous", "channels_last", "strided"])
    return dict(B=B, C=C, H=H, W=W, k=k, G=G, stride=stride, padding=padding, dilation=dilation, layout=layout)


CASES = [make_case(s) for s in range(40)]
TRITON_CASES = [make_case(s, tiny=True) for s in range(40)]
# More channels per group than one block of the grad-filters kernel (32): its loop over channel blocks.
WIDE = dict(B=1, C=40, H=6, W=7, k=3, G=1, stride=1, padding=None, dilation=1, layout="channels_last")


def _out_size(size, k, s, p, d):
    return (size + 2 * p - d * (k - 1) - 1) // s + 1


def make_inputs(case, dtype, requires_grad=True, device="cpu"):
    B, C, H, W, k, G = (case[n] for n in "B C H W k G".split())
    sh, sw = (case["stride"],) * 2 if isinstance(case["stride"], int) else case["stride"]
    dh, dw = (case["dilation"],) * 2 if isinstance(case["dilation"], int) else case["dilation"]
    p = case["padding"]
    ph, pw = ((k - 1) // 2 * dh, (k - 1) // 2 * dw) if p is None else ((p, p) if isinstance(p, int) else p)
    Ho, Wo = _out_size(H, k, sh, ph, dh), _out_size(W, k, sw, pw, dw)
    x = torch.randn(B, C, H, W, dtype=torch.float64)
    f = torch.randn(B, G, k * k, Ho, Wo, dtype=torch.float64)
    if case["layout"] == "channels_last":
        x = x.to(memory_format=torch.channels_last)
    elif case["layout"] == "strided":  # a non-contiguous view: every other column of a wider tensor
        x = torch.randn(B, C, H, 2 * W, dtype=torch.float64)[..., ::2]
        f = torch.randn(B, G, k * k, Ho, 2 * Wo, dtype=torch.float64)[..., 1::2]
    x, f = x.to(device, dtype), f.to(device, dtype)
    return x.requires_grad_(requires_grad), f.requires_grad_(requires_grad)


def call(x, f, case, backend):
    return dynconv.local_filter2d(x, f, case["k"], case["stride"], case["padding"], case["dilation"], backend=backend)


def run_both(x, f, gy, case, backend):
    """Output and both gradients of ``backend`` on fresh leaves copied from ``x`` and ``f``."""
    x, f = x.detach().clone().requires_grad_(), f.detach().clone().requires_grad_()
    out = call(x, f, case, backend)
    gx, gf = torch.autograd.grad(out, (x, f), gy)
    return out, gx, gf


def backend_case(backend, i):
    """Case ``i`` of the grid of ``backend`` (the tiny one for Triton) and the device its tensors go to."""
    return (CASES[i], "cpu") if backend == "torch" else (TRITON_CASES[i], TRITON_DEVICE)


def test_reference_matches_definition():
    """The oracle itself against a pixel loop written from the issue's definition."""
    for case in CASES[:6]:
        x, f = make_inputs(case, torch.float64, requires_grad=False)
        if not isinstance(case["stride"], int) or not isinstance(case["dilation"], int):
            continue
        if case["padding"] is not None and not isinstance(case["padding"], int):
            continue
        p = (case["k"] - 1) // 2 * case["dilation"] if case["padding"] is None else case["padding"]
        expected = naive_local_filter(x, f, case["k"], case["stride"], p, case["dilation"])
        assert_close(call(x, f, case, "reference"), expected, what=str(case))


@pytest.mark.parametrize("case", CASES, ids=[str(i) for i in range(len(CASES))])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_torch_matches_reference_forward_backward(case, dtype):
    x, f = make_inputs(case, dtype)
    out = call(x, f, case, "torch")
    gy = torch.randn_like(out)
    gx, gf = torch.autograd.grad(out, (x, f), gy)
    xr, fr = x.detach().clone().requires_grad_(), f.detach().clone().requires_grad_()
    ref = call(xr, fr, case, "reference")
    gxr, gfr = torch.autograd.grad(ref, (xr, fr), gy)
    assert_close(out, ref, what=f"output {case}")
    assert_close(gx, gxr, what=f"grad x {case}")
    assert_close(gf, gfr, what=f"grad filters {case}")


@pytest.mark.parametrize("i", range(12), ids=str)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision(backend, dtype, i):
    """fp16/bf16 (fp32 accumulation) within twice the error the reference makes in that dtype, + 1e-3."""
    case, device = backend_case(backend, i)
    x, f = make_inputs(case, dtype, device=device)
    gy = torch.randn(call(x, f, case, "reference").shape, dtype=dtype, device=device)
    out, gx, gf = run_both(x, f, gy, case, backend)
    assert out.dtype == gx.dtype == gf.dtype == dtype
    ref32, gx32, gf32 = run_both(x.float(), f.float(), gy.float(), case, "reference")
    ref_lowp, gxl, gfl = run_both(x, f, gy, case, "reference")
    assert_close_lowp(out, ref_lowp, ref32, what=f"output {case}")
    assert_close_lowp(gx, gxl, gx32, what=f"grad x {case}")
    assert_close_lowp(gf, gfl, gf32, what=f"grad filters {case}")


@pytest.mark.parametrize("backend", ["reference", "torch"])
@pytest.mark.parametrize("case", [CASES[i] for i in (0, 1, 2, 3, 5, 8)], ids=lambda c: f"k{c['k']}")
def test_gradcheck(case, backend):
    x, f = make_inputs(case, torch.float64)
    assert torch.autograd.gradcheck(lambda x, f: call(x, f, case, backend), (x, f))


def test_gradient_of_one_input_only(backend):
    case, device = backend_case(backend, 1)
    x, f = make_inputs(case, torch.float64 if backend == "torch" else torch.float32, device=device)
    (gx,) = torch.autograd.grad(call(x, f.detach(), case, backend).sum(), (x,))
    (gxr,) = torch.autograd.grad(call(x, f.detach(), case, "reference").sum(), (x,))
    assert_close(gx, gxr)
    (gf,) = torch.autograd.grad(call(x.detach(), f, case, backend).sum(), (f,))
    (gfr,) = torch.autograd.grad(call(x.detach(), f, case, "reference").sum(), (f,))
    assert_close(gf, gfr)
    if backend == "triton":  # the kernels' backward asked for neither gradient
        from dynconv.kernels import local_filter as kernels

        x, f = torch.randn(1, 2, 5, 6, device=device), torch.randn(1, 1, 9, 5, 6, device=device)
        ones = torch.ones(1, 2, 5, 6, device=device)
        grad_x, grad_f = kernels.backward(ones, x, f, [3, 3], [1, 1], [1, 1], [1, 1], 0, 0)
        assert grad_x.numel() == 0 and grad_f.numel() == 0


def test_flat_filter_layout_is_accepted():
    x = torch.randn(2, 6, 9, 9)
    f = torch.randn(2, 3, 9, 9, 9)
    assert_close(dynconv.local_filter2d(x, f.flatten(1, 2), 3), dynconv.local_filter2d(x, f, 3))


def test_one_hot_filter_is_a_shift():
    """A filter with all weight on tap (i, j) shifts the image by (i - 1, j - 1): checked with torch.roll."""
    x = torch.randn(1, 2, 8, 10)
    f = torch.zeros(1, 1, 9, 8, 10)
    f[:, :, 2 * 3 + 1] = 1.0  # tap (2, 1): reads x[h + 1, w]
    out = dynconv.local_filter2d(x, f, 3, backend="torch")
    assert_close(out[..., :-1, :], x[..., 1:, :])
    assert torch.equal(out[..., -1, :], torch.zeros_like(out[..., -1, :]))  # zero padding past the border


def test_opcheck():
    case = CASES[3]
    x, f = make_inputs(case, torch.float64)
    args = (
        x,
        f,
        [case["k"]] * 2,
        list(torch.nn.modules.utils._pair(case["stride"])),
        [0, 0],
        list(torch.nn.modules.utils._pair(case["dilation"])),
        "torch",
    )
    if case["padding"] is None:
        args = args[:4] + ([(case["k"] - 1) // 2 * d for d in args[5]],) + args[5:]
    else:
        args = args[:4] + (list(torch.nn.modules.utils._pair(case["padding"])),) + args[5:]
    torch.library.opcheck(torch.ops.dynconv.local_filter2d.default, args)


class _FilterNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.gen = dynconv.FilterGeneratingNetwork(3, 5, groups=1, hidden_channels=(8,))
        self.filt = dynconv.DynamicLocalFilter2d(5, normalize="softmax")

    def forward(self, x):
        return self.filt(x, self.gen(x))


@pytest.mark.slow
@pytest.mark.parametrize("compile_backend", ["aot_eager", "inductor"])
def test_torch_compile_fullgraph_matches_eager(compile_backend):
    torch._dynamo.reset()
    model = _FilterNet()
    x = torch.randn(2, 3, 12, 12, requires_grad=True)
    eager = model(x)
    (g_eager,) = torch.autograd.grad(eager.sum(), (x,))
    compiled = torch.compile(model, fullgraph=True, backend=compile_backend)
    out = compiled(x)
    (g_comp,) = torch.autograd.grad(out.sum(), (x,))
    assert_close(out, eager)
    assert_close(g_comp, g_eager)


# ---------------------------------------------------------------------------------------------- errors


def _x():
    return torch.randn(2, 4, 8, 8)


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        (dict(x=torch.randn(4, 8, 8)), ValueError, r"x must be a 4-D tensor .*got shape \(4, 8, 8\)"),
        (dict(filters=torch.randn(2, 9, 8)), ValueError, r"filters must be a 4-D or 5-D tensor"),
        (dict(x=[1.0]), TypeError, r"x must be a torch.Tensor, got list"),
        (dict(x=torch.zeros(2, 4, 8, 8, dtype=torch.int64)), TypeError, r"x must have a floating dtype"),
        (
            dict(filters=torch.randn(2, 1, 9, 8, 8, dtype=torch.float64)),
            TypeError,
            r"filters must have the dtype of x \(torch.float32\), got torch.float64",
        ),
        (dict(filters=torch.randn(2, 3, 9, 8, 8)), ValueError, r"x channels \(4\) must be divisible .* G \(3\)"),
        (
            dict(filters=torch.randn(2, 1, 9, 7, 8)),
            ValueError,
            r"filters must have shape \[B, G, kh\*kw, H_out, W_out\] = \[2, 1, 9, 8, 8\].*got \[2, 1, 9, 7, 8\]",
        ),
        (dict(filters=torch.randn(2, 1, 8, 8, 8)), ValueError, r"filters must have shape .* = \[2, 1, 9, 8, 8\]"),
        (dict(filters=torch.randn(2, 10, 8, 8)), ValueError, r"divisible by kh\*kw = 9"),
        (dict(filters=torch.randn(3, 1, 9, 8, 8)), ValueError, r"filters must have shape \[B, G, kh\*kw"),
        (dict(kernel_size=0), ValueError, r"kernel_size must be >= 1, got 0"),
        (dict(stride=-1), ValueError, r"stride must be >= 1, got -1"),
        (dict(dilation=(1, 0)), ValueError, r"dilation must be >= 1"),
        (dict(padding=-1), ValueError, r"padding must be >= 0, got -1"),
        (dict(kernel_size=2.5), TypeError, r"kernel_size must be an int or a pair of ints, got 2.5"),
        (dict(x=torch.randn(2, 0, 8, 8), filters=torch.randn(2, 1, 9, 8, 8)), ValueError, r"positive sizes"),
        (
            dict(x=torch.randn(2, 4, 2, 2), filters=torch.randn(2, 1, 81, 1, 1), kernel_size=9, padding=0),
            ValueError,
            r"too small for kernel_size",
        ),
        (dict(backend="cuda"), ValueError, r"backend must be one of \('reference', 'torch', 'triton'\)"),
    ],
)
def test_bad_input_raises_named_error(kwargs, exc, match):
    args = dict(x=_x(), filters=torch.randn(2, 1, 9, 8, 8), kernel_size=3)
    args.update(kwargs)
    with pytest.raises(exc, match=match):
        dynconv.local_filter2d(**args)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device to put tensors on two devices")
def test_device_mismatch_raises():
    with pytest.raises(ValueError, match="filters must be on the device of x"):
        dynconv.local_filter2d(_x(), torch.randn(2, 1, 9, 8, 8, device="cuda"), 3)


def test_device_mismatch_raises_on_meta():
    # Without a GPU, the meta device stands in for a second device.
    with pytest.raises(ValueError, match=r"filters must be on the device of x \(cpu\), got meta"):
        dynconv.local_filter2d(_x(), torch.randn(2, 1, 9, 8, 8, device="meta"), 3)


# ---------------------------------------------------------------------------------------------- dispatch


def test_dispatch_rules(monkeypatch):
    x, f = _x(), torch.randn(2, 1, 9, 8, 8)
    assert dynconv.choose_backend("local_filter2d", x, f) == "torch"
    monkeypatch.setenv("DYNCONV_BACKEND", "reference")
    assert dynconv.choose_backend("local_filter2d", x, f) == "reference"
    assert dynconv.choose_backend("local_filter2d", x, f, backend="torch") == "torch"  # explicit wins
    monkeypatch.setenv("DYNCONV_BACKEND", "bogus")
    with pytest.raises(ValueError, match="DYNCONV_BACKEND must be one of"):
        dynconv.choose_backend("local_filter2d", x, f)


def test_explicit_triton_backend_on_cpu_says_why(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(dynconv.BackendError, match="triton"):
        dynconv.local_filter2d(_x(), torch.randn(2, 1, 9, 8, 8), 3, backend="triton")


# ---------------------------------------------------------------------------------------------- modules


def test_softmax_filters_preserve_constant_image_inside():
    layer = dynconv.DynamicLocalFilter2d(5, normalize="softmax")
    x = torch.full((2, 3, 16, 16), 2.5)
    out = layer(x, torch.randn(2, 1, 25, 16, 16))
    assert_close(out[..., 2:-2, 2:-2], x[..., 2:-2, 2:-2])
    assert (out[..., 0, 0] < 2.5).all()  # the zero padding is part of the average at the border
    assert_close(layer(x, torch.randn(2, 25, 16, 16))[..., 2:-2, 2:-2], x[..., 2:-2, 2:-2])


def test_softmax_layer_matches_explicit_softmax():
    layer = dynconv.DynamicLocalFilter2d(3, stride=2, normalize="softmax")
    x, raw = torch.randn(1, 4, 9, 9), torch.randn(1, 2, 9, 5, 5)
    assert_close(layer(x, raw), reference.local_filter2d(x, raw.softmax(2), (3, 3), (2, 2), (1, 1), (1, 1)))
    assert "normalize='softmax'" in repr(layer) and "stride=(2, 2)" in repr(layer)


@pytest.mark.parametrize("stride", [1, 2])
def test_filter_generating_network_shapes_and_identity_init(stride):
    gen = dynconv.FilterGeneratingNetwork(3, 3, groups=2, hidden_channels=(8, 8), stride=stride, identity_init=True)
    cond = torch.randn(2, 3, 11, 11)
    filters = gen(cond)
    Ho = (11 + 2 - 3) // stride + 1
    assert filters.shape == (2, 2, 9, Ho, Ho)
    layer = dynconv.DynamicLocalFilter2d(3, stride=stride)
    x = torch.randn(2, 4, 11, 11)
    assert_close(layer(x, filters), x[..., ::stride, ::stride])
    gen.identity_init = False
    gen.reset_parameters()
    assert gen.head.weight.abs().sum() > 0


def test_module_trains():
    torch.manual_seed(0)
    model = _FilterNet()
    x = torch.randn(4, 3, 16, 16)
    target = F.avg_pool2d(x, 3, 1, 1)
    opt = torch.optim.Adam(model.parameters(), 1e-2)
    losses = []
    for _ in range(30):
        loss = F.mse_loss(model(x), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


@pytest.mark.parametrize("stride", [1, 2])
def test_involution_matches_its_definition(stride):
    layer = dynconv.Involution2d(32, kernel_size=5, stride=stride, group_channels=8).eval()
    x = torch.randn(2, 32, 11, 11)
    pooled = F.avg_pool2d(x, stride, stride, ceil_mode=True) if stride > 1 else x
    weight = layer.span.weight.flatten(1)
    hidden = F.relu(layer.reduce[1](F.conv2d(pooled, layer.reduce[0].weight)))
    filters = torch.einsum("oh,bhxy->boxy", weight, hidden) + layer.span.bias[:, None, None]
    filters = filters.unflatten(1, (4, 25))
    expected = reference.local_filter2d(x, filters, (5, 5), (stride, stride), (2, 2), (1, 1))
    assert layer(x).shape == (2, 32, 11 // stride + (11 % stride > 0), 11 // stride + (11 % stride > 0))
    assert_close(layer(x), expected, rtol=1e-4, atol=1e-5)
    assert "group_channels=8" in repr(layer)


def test_involution_rejects_bad_groups():
    with pytest.raises(ValueError, match=r"channels \(30\) must be a positive multiple of group_channels \(16\)"):
        dynconv.Involution2d(30)


@settings(max_examples=40, deadline=None)
@given(
    B=st.integers(1, 2),
    G=st.integers(1, 3),
    cg=st.integers(1, 2),
    H=st.integers(1, 10),
    W=st.integers(1, 10),
    kh=st.integers(1, 4),
    kw=st.integers(1, 4),
    sh=st.integers(1, 3),
    sw=st.integers(1, 3),
    dh=st.integers(1, 2),
    dw=st.integers(1, 2),
    ph=st.integers(0, 3),
    pw=st.integers(0, 3),
)
def test_torch_matches_reference_property(B, G, cg, H, W, kh, kw, sh, sw, dh, dw, ph, pw):
    """Any geometry that gives a non-empty output, including even and rectangular kernels."""
    Ho, Wo = _out_size(H, kh, sh, ph, dh), _out_size(W, kw, sw, pw, dw)
    assume(Ho >= 1 and Wo >= 1)
    x = torch.randn(B, G * cg, H, W, dtype=torch.float64, requires_grad=True)
    f = torch.randn(B, G, kh * kw, Ho, Wo, dtype=torch.float64, requires_grad=True)
    args = ((kh, kw), (sh, sw), (ph, pw), (dh, dw))
    out = dynconv.local_filter2d(x, f, *args, backend="torch")
    ref = dynconv.local_filter2d(x, f, *args, backend="reference")
    assert_close(out, ref)
    gy = torch.randn_like(out)
    for g, gr in zip(torch.autograd.grad(out, (x, f), gy), torch.autograd.grad(ref, (x, f), gy)):
        assert_close(g, gr)


@pytest.mark.parametrize("backend", ["torch", "reference"])
def test_batch_of_zero(backend):
    """An empty batch gives an empty output of the right shape (as F.conv2d), and empty gradients."""
    x = torch.randn(0, 4, 9, 9, requires_grad=True)
    filters = torch.randn(0, 2, 9, 5, 5, requires_grad=True)
    out = dynconv.local_filter2d(x, filters, 3, stride=2, padding=1, backend=backend)
    assert out.shape == (0, 4, 5, 5)
    out.sum().backward()
    assert x.grad.shape == x.shape and filters.grad.shape == filters.shape


# ------------------------------------------------------------------------- Triton: on CUDA or in the interpreter

DEVICE = TRITON_DEVICE


def check_fp32(case, dtype=torch.float32):
    x, f = make_inputs(case, dtype, device=DEVICE)
    out = call(x, f, case, "triton")
    assert out.is_contiguous() and out.dtype == dtype
    # A transposed view: the kernels read grad_y through its strides too.
    gy = torch.randn(tuple(reversed(out.shape)), dtype=dtype, device=DEVICE).permute(3, 2, 1, 0)
    gx, gf = torch.autograd.grad(out, (x, f), gy)
    assert gx.is_contiguous() and gf.is_contiguous()
    ref, gxr, gfr = run_both(x, f, gy, case, "reference")
    assert_close(out, ref, what=f"output {case}")
    assert_close(gx, gxr, what=f"grad x {case}")
    assert_close(gf, gfr, what=f"grad filters {case}")


@pytest.mark.triton
@pytest.mark.parametrize("case", TRITON_CASES, ids=[str(i) for i in range(len(TRITON_CASES))])
def test_triton_matches_reference_fp32(case):
    check_fp32(case)


@pytest.mark.triton
def test_triton_many_channels_per_group():
    check_fp32(WIDE)


@pytest.mark.triton
@pytest.mark.parametrize("case", [TRITON_CASES[i] for i in (0, 1, 3)], ids=lambda c: f"k{c['k']}s{c['stride']}")
def test_triton_gradcheck_fp64(case):
    """fp64 kernels (fp64 accumulation) against finite differences; fast mode keeps interpreter calls few."""
    x, f = make_inputs(case, torch.float64, device=DEVICE)
    assert torch.autograd.gradcheck(lambda x, f: call(x, f, case, "triton"), (x, f), fast_mode=True)


@pytest.mark.triton
def test_triton_int64_offsets(monkeypatch):
    """The int64 offset path (taken for tensors of >= 2**30 elements) gives the same results on small ones."""
    from dynconv.kernels import local_filter as kernels

    monkeypatch.setattr(kernels, "FORCE_INT64", True)
    check_fp32(TRITON_CASES[3])
    check_fp32(dict(TRITON_CASES[1], stride=2))


@pytest.mark.triton
@pytest.mark.skipif(DEVICE != "cpu", reason="views over 8 GB of address space: a CPU check")
def test_triton_past_int32_offsets_through_strides():
    """Inputs whose strides put elements past 2**31 (views over a lazily allocated storage, a few pages of it
    written): the kernels must decide on int64 offsets from the strides, not the element count, and read
    those elements right. Forward and both gradients against the reference on contiguous copies."""
    from dynconv.testing import huge_strided, output_and_grads

    g = torch.Generator().manual_seed(0)
    k, stride, dilation = 3, (1, 2), (2, 1)
    x = huge_strided(torch.randn(1, 3, 9, 11, generator=g), dim=1)  # channel c at element c * 2**30
    Ho, Wo = _out_size(9, k, 1, 2, 2), _out_size(11, k, 2, 1, 1)
    f = huge_strided(torch.randn(1, 3, k * k, Ho, Wo, generator=g), dim=1)  # one filter group per channel
    assert x.numel() < 2**10 and x.stride(1) * 2 >= 2**31
    gy = torch.randn(1, 3, Ho, Wo, generator=g)
    outs = {}
    for backend, tensors in (("triton", (x, f)), ("reference", (x.contiguous(), f.contiguous()))):
        geometry = dict(kernel_size=k, stride=stride, padding=(2, 1), dilation=dilation, backend=backend)
        outs[backend] = output_and_grads(functools.partial(dynconv.local_filter2d, **geometry), tensors, gy)
    for what, a, e in zip(("output", "grad x", "grad filters"), outs["triton"], outs["reference"]):
        assert_close(a, e, what=what)


@pytest.mark.triton
@pytest.mark.skipif(DEVICE != "cpu", reason="a stub timer: a CPU check of the launch path")
def test_opt_in_autotuned_launch_path(monkeypatch, tmp_path):
    """DYNCONV_AUTOTUNE=1 under the interpreter: a stub timer makes the last candidate tried win, so tiles other
    than the rule's run (and must still give the reference's values); the winners land in the on-disk cache, and
    a second call with the same shape times nothing."""
    from dynconv.kernels import _launch

    monkeypatch.setenv("DYNCONV_AUTOTUNE", "1")
    monkeypatch.setenv("DYNCONV_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(_launch, "_MEMO", {})
    tried = []

    def stub_timer(fn):
        fn()
        tried.append(1)
        return 1.0 / len(tried)

    monkeypatch.setattr(_launch, "_default_timer", stub_timer)
    case = dict(B=1, C=3, H=5, W=7, k=3, G=1, stride=(2, 1), padding=None, dilation=1, layout="channels_last")
    check_fp32(case)
    assert len(tried) >= 6  # each of the three kernels timed at least two candidates
    (cache,) = tmp_path.glob("autotune/*.json")
    entries = json.loads(cache.read_text())
    assert {e.split("|")[0] for e in entries} == {"_forward_kernel", "_grad_x_kernel", "_grad_filters_kernel"}
    n = len(tried)
    monkeypatch.setattr(_launch, "_MEMO", {})  # a new process: only the file remembers
    check_fp32(case)
    assert len(tried) == n


@pytest.mark.triton
def test_triton_opcheck():
    x, f = make_inputs(TRITON_CASES[0], torch.float32, device=DEVICE)
    args = (x, f, [TRITON_CASES[0]["k"]] * 2, [1, 1], [0, 0], [1, 1], "triton")
    x, f = make_inputs(dict(TRITON_CASES[0], padding=0, stride=1, dilation=1), torch.float32, device=DEVICE)
    torch.library.opcheck(torch.ops.dynconv.local_filter2d.default, (x, f) + args[2:])


@pytest.mark.triton
def test_triton_backend_under_torch_compile_fullgraph():
    """The custom op (fake kernel + autograd) traces with the triton backend: no graph break, same values."""
    torch._dynamo.reset()
    case = TRITON_CASES[5]
    x, f = make_inputs(case, torch.float32, device=DEVICE)
    out = torch.compile(lambda x, f: call(x, f, case, "triton"), fullgraph=True, backend="aot_eager")(x, f)
    gx, gf = torch.autograd.grad(out.square().sum(), (x, f))
    ref = call(x, f, case, "reference")
    gxr, gfr = torch.autograd.grad(ref.square().sum(), (x, f))
    assert_close(out, ref)
    assert_close(gx, gxr)
    assert_close(gf, gfr)


@pytest.mark.triton
def test_triton_dispatch_rule():
    x, f = make_inputs(TRITON_CASES[0], torch.float32, requires_grad=False, device=DEVICE)
    assert can_run_triton("local_filter2d", x, f)
    # An explicit backend="triton" is honoured; automatic dispatch picks triton only for CUDA tensors.
    assert choose_backend("local_filter2d", x, f, backend="triton") == "triton"
    assert choose_backend("local_filter2d", x, f) == ("triton" if DEVICE == "cuda" else "torch")
    if DEVICE == "cpu":
        with pytest.raises(BackendError, match=r"supports dtypes .* got \['torch.int32'\]"):
            choose_backend("local_filter2d", x, f, torch.zeros(1, dtype=torch.int32), backend="triton")


@pytest.mark.triton
def test_cpu_tensors_without_interpreter_raise(monkeypatch):
    from dynconv.kernels import local_filter as kernels

    monkeypatch.setattr(kernels, "INTERPRETED", False)
    x, f = torch.randn(1, 2, 5, 5), torch.randn(1, 1, 9, 5, 5)
    with pytest.raises(RuntimeError, match=r"imported without TRITON_INTERPRET=1"):
        kernels.forward(x, f, [3, 3], [1, 1], [1, 1], [1, 1])


# ---------------------------------------------------------------------------------- CUDA, realistic sizes

GPU_CASES = [
    dict(B=4, C=64, H=64, W=64, k=5, G=1, stride=1, padding=None, dilation=1, layout="contiguous"),
    dict(B=2, C=128, H=56, W=56, k=7, G=8, stride=1, padding=None, dilation=1, layout="channels_last"),
    dict(B=4, C=3, H=64, W=64, k=9, G=1, stride=2, padding=None, dilation=1, layout="strided"),
    dict(B=2, C=256, H=28, W=28, k=7, G=16, stride=1, padding=None, dilation=2, layout="contiguous"),
    dict(B=2, C=96, H=45, W=61, k=3, G=3, stride=(2, 1), padding=(0, 2), dilation=(1, 3), layout="channels_last"),
]


@pytest.mark.cuda
@pytest.mark.parametrize("case", GPU_CASES, ids=[str(i) for i in range(len(GPU_CASES))])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_triton_cuda_realistic_sizes(case, dtype):
    x, f = make_inputs(case, dtype, device="cuda")
    gy = torch.randn(call(x, f, case, "reference").shape, dtype=dtype, device="cuda")
    out, gx, gf = run_both(x, f, gy, case, "triton")
    ref32, gx32, gf32 = run_both(x.float(), f.float(), gy.float(), case, "reference")
    if dtype == torch.float32:
        # The flash-attention rule one precision up: no worse than twice the fp32 reference's own error against
        # fp64 (sums over up to 256 channels: a fixed tolerance would assume small sizes).
        ref64 = run_both(x.double(), f.double(), gy.double(), case, "reference")
        for a, e32, e64, what in zip((out, gx, gf), (ref32, gx32, gf32), ref64, ("output", "grad x", "grad filters")):
            assert_close_lowp(a, e32, e64, atol=1e-5, what=f"{what} {case}")
    else:
        ref_lowp, gxl, gfl = run_both(x, f, gy, case, "reference")
        assert_close_lowp(out, ref_lowp, ref32, what=f"output {case}")
        assert_close_lowp(gx, gxl, gx32, what=f"grad x {case}")
        assert_close_lowp(gf, gfl, gf32, what=f"grad filters {case}")


@pytest.mark.cuda
@pytest.mark.slow
def test_triton_cuda_past_int32_offsets():
    """x of 16 * 12000**2 > 2**31 elements (bf16, ~20 GB in all): the tail rows, reached only through int64
    offsets, against the reference on a crop."""
    B, C, H, W, k = 1, 16, 12000, 12000, 3
    x = torch.randn(B, C, H, W, dtype=torch.bfloat16, device="cuda").requires_grad_()
    f = torch.randn(B, 1, k * k, H, W, dtype=torch.bfloat16, device="cuda").requires_grad_()
    assert x.numel() > 2**31
    out = dynconv.local_filter2d(x, f, k, backend="triton")
    gy = torch.ones_like(out)
    gx, gf = torch.autograd.grad(out, (x, f), gy)
    rows = 4  # the last output rows; the crop starts one row above them, whose output sees a false border
    xc = x.detach()[:, :, H - rows - 1 :].float().requires_grad_()
    fc = f.detach()[..., H - rows - 1 :, :].float().requires_grad_()
    refc = dynconv.local_filter2d(xc, fc, k, backend="reference")
    gxc, gfc = torch.autograd.grad(refc, (xc, fc), torch.ones_like(refc))
    assert_close(out[:, :, H - rows :].float(), refc[:, :, 1:], rtol=1e-2, atol=1e-2, what="output tail")
    assert_close(gx[:, :, H - rows + 1 :].float(), gxc[:, :, 2:], rtol=1e-2, atol=2e-2, what="grad x tail")
    assert_close(gf[..., H - rows :, :].float(), gfc[..., 1:, :], rtol=2e-2, atol=5e-2, what="grad filters tail")


# ------------------------------------------------------------------------------ GPU compilation, no GPU

_COMPILE_SCRIPT = r"""
import dynconv.kernels.local_filter as K
from dynconv.testing import compile_ptx

geometry = dict(KH=3, KW=3, SH=2, SW=1, PH=1, PW=1, DH=1, DW=2, ACC_F64=False, BLOCK_H=4, BLOCK_W=64)
variants = [
    (K._forward_kernel, "fp32", dict(geometry, INT64=False, BLOCK_C=16)),
    (K._grad_x_kernel, "bf16", dict(geometry, INT64=True, BLOCK_C=16)),
    (K._grad_filters_kernel, "fp16", dict(geometry, INT64=False, SINGLE_C_BLOCK=False, BLOCK_C=32)),
]
print("compiled", compile_ptx(variants))
"""


@pytest.mark.triton
@pytest.mark.slow
def test_kernels_compile_for_sm90_without_a_gpu():
    """Compile one variant of each kernel to PTX for sm_90 (ptxas ships with Triton, no GPU needed)."""
    assert "compiled 3" in run_without_interpreter(_COMPILE_SCRIPT)


@pytest.mark.triton
def test_triton_batch_of_zero():
    x = torch.randn(0, 4, 9, 9, device=DEVICE, requires_grad=True)
    filters = torch.randn(0, 2, 9, 5, 5, device=DEVICE, requires_grad=True)
    out = dynconv.local_filter2d(x, filters, 3, stride=2, padding=1, backend="triton")
    assert out.shape == (0, 4, 5, 5)
    out.sum().backward()
    assert x.grad.shape == x.shape and filters.grad.shape == filters.shape
