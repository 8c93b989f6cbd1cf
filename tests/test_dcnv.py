"""DCNv3/DCNv4 (dynconv.dcnv3, dynconv.dcnv4, DCNv3, DCNv4): the torch backend and the Triton kernels
(dynconv/kernels/dcnv.py) against the bilinear reference.

The Triton tests (mark ``triton``; on CUDA, else in the interpreter: see tests/triton_setup.py) keep to the tiny
``TRITON_CASES`` (one program per (sample, group)); the tests over the ``backend`` fixture run the torch backend on
them too.
"""

import functools
import random

import pytest
import torch
import torch.nn.functional as F
from triton_setup import TRITON_DEVICE

import dynconv
from dynconv import reference
from dynconv.testing import assert_close, assert_close_lowp, deterministic_algorithms, run_without_interpreter


def _pair(v):
    return (v, v) if isinstance(v, int) else tuple(v)


def make_case(seed):
    """A random configuration: odd sizes, groups, kernel 1/3/5, stride, dilation, padding, large offsets."""
    rng = random.Random(seed)
    k = rng.choice([3, 3, 5, 1, (3, 5)])
    kh, kw = _pair(k)
    stride = rng.choice([1, 2, (1, 2)])
    dilation = rng.choice([1, 2, (2, 1)])
    padding = rng.choice([None, 0, 1, (2, 0)])
    dh, dw = _pair(dilation)
    ph, pw = ((kh - 1) // 2 * dh, (kw - 1) // 2 * dw) if padding is None else _pair(padding)
    G = rng.choice([1, 2, 3])
    Cg = rng.choice([1, 2, 5])
    H = max(rng.choice([5, 7, 9]), dh * (kh - 1) + 1 - 2 * ph)
    W = max(rng.choice([4, 6, 11]), dw * (kw - 1) + 1 - 2 * pw)
    return dict(
        B=rng.choice([1, 2]),
        H=H,
        W=W,
        G=G,
        Cg=Cg,
        k=k,
        stride=stride,
        padding=padding,
        dilation=dilation,
        offset_scale=rng.choice([1.0, 0.5, 2.0]),
        remove_center=kh % 2 == 1 and kw % 2 == 1 and kh * kw > 1 and rng.random() < 0.3,
        # offsets of a few pixels push many samples of the border pixels out of the image
        offset_std=rng.choice([0.7, 3.0]),
        layout=rng.choice(["contiguous", "strided"]),
    )


CASES = [make_case(s) for s in range(24)]


def out_size(case):
    kh, kw = _pair(case["k"])
    (sh, sw), (dh, dw) = _pair(case["stride"]), _pair(case["dilation"])
    ph, pw = ((kh - 1) // 2 * dh, (kw - 1) // 2 * dw) if case["padding"] is None else _pair(case["padding"])
    Ho = (case["H"] + 2 * ph - dh * (kh - 1) - 1) // sh + 1
    Wo = (case["W"] + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    return Ho, Wo, kh * kw - int(case["remove_center"])


def make_inputs(case, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    B, H, W, G, Cg = case["B"], case["H"], case["W"], case["G"], case["Cg"]
    Ho, Wo, P = out_size(case)
    if case["layout"] == "strided":  # a channels-last view of an NCHW tensor: not contiguous
        x = torch.randn(B, G * Cg, H, W, generator=g, dtype=torch.float64).permute(0, 2, 3, 1)
    else:
        x = torch.randn(B, H, W, G * Cg, generator=g, dtype=torch.float64)
    offset = torch.randn(B, Ho, Wo, G * P * 2, generator=g, dtype=torch.float64) * case["offset_std"]
    mask = torch.randn(B, Ho, Wo, G * P, generator=g, dtype=torch.float64)
    return x.to(dtype), offset.to(dtype), mask.to(dtype)


def kwargs_of(case):
    keys = ("stride", "padding", "dilation", "offset_scale", "remove_center")
    return dict(kernel_size=case["k"], group=case["G"], **{k: case[k] for k in keys})


def run_with_grads(fn, inputs, grad_out=None):
    inputs = [t.detach().requires_grad_() for t in inputs]
    out = fn(*inputs)
    if grad_out is None:
        grad_out = torch.randn_like(out)
    grads = torch.autograd.grad(out, inputs, grad_out)
    return out, grads, grad_out


def naive_dcnv3(x, offset, mask, k, stride, padding, dilation, G, offset_scale):
    """A loop over output pixels, groups and kernel points, straight from the definition (float64, no removal)."""
    B, H, W, C = x.shape
    kh, kw = k
    _, Ho, Wo, _ = offset.shape
    P = kh * kw
    off = offset.view(B, Ho, Wo, G, P, 2)
    m = mask.view(B, Ho, Wo, G, P)
    out = torch.zeros(B, Ho, Wo, C, dtype=torch.float64)

    def pixel(b, y, xx, c0, c1):
        if 0 <= y < H and 0 <= xx < W:
            return x[b, y, xx, c0:c1].double()
        return torch.zeros(c1 - c0, dtype=torch.float64)

    for b in range(B):
        for ho in range(Ho):
            for wo in range(Wo):
                for g in range(G):
                    c0, c1 = g * C // G, (g + 1) * C // G
                    for ix in range(kw):  # x-major point order, as the official kernels
                        for iy in range(kh):
                            p = ix * kh + iy
                            gx = ix * dilation[1] - (dilation[1] * (kw - 1)) // 2
                            gy = iy * dilation[0] - (dilation[0] * (kh - 1)) // 2
                            px = wo * stride[1] - padding[1] + (dilation[1] * (kw - 1)) // 2
                            py = ho * stride[0] - padding[0] + (dilation[0] * (kh - 1)) // 2
                            px = px + (gx + float(off[b, ho, wo, g, p, 0])) * offset_scale
                            py = py + (gy + float(off[b, ho, wo, g, p, 1])) * offset_scale
                            x0, y0 = int(torch.tensor(px).floor()), int(torch.tensor(py).floor())
                            fx, fy = px - x0, py - y0
                            val = (
                                (1 - fy) * (1 - fx) * pixel(b, y0, x0, c0, c1)
                                + (1 - fy) * fx * pixel(b, y0, x0 + 1, c0, c1)
                                + fy * (1 - fx) * pixel(b, y0 + 1, x0, c0, c1)
                                + fy * fx * pixel(b, y0 + 1, x0 + 1, c0, c1)
                            )
                            out[b, ho, wo, c0:c1] += float(m[b, ho, wo, g, p]) * val
    return out


def test_reference_matches_definition():
    case = dict(make_case(5), B=1, H=5, W=6, G=2, Cg=2, k=3, stride=(1, 2), padding=1, dilation=(2, 1))
    case.update(offset_scale=0.5, remove_center=False, offset_std=2.0)
    x, off, m = make_inputs(case, torch.float64)
    expected = naive_dcnv3(x, off, m, (3, 3), (1, 2), (1, 1), (2, 1), 2, 0.5)
    assert_close(dynconv.dcnv3(x, off, m, backend="reference", **kwargs_of(case)), expected)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("case", CASES, ids=[f"case{i}" for i in range(len(CASES))])
def test_torch_matches_reference_forward_backward(case, dtype):
    inputs = make_inputs(case, dtype)
    kw = kwargs_of(case)
    out, grads, gy = run_with_grads(lambda *t: dynconv.dcnv3(*t, backend="torch", **kw), inputs)
    ref, ref_grads, _ = run_with_grads(lambda *t: dynconv.dcnv3(*t, backend="reference", **kw), inputs, gy)
    # fp32 positions are rounded before the floor/weights in both; the offset gradient is the least well
    # conditioned (a difference of neighbouring pixels), hence its looser bound.
    tol = {} if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-4)
    assert_close(out, ref, what="output", **tol)
    for name, a, e in zip(("input", "offset", "mask"), grads, ref_grads):
        assert_close(a, e, what=f"grad {name}", **tol)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("case", CASES[:4], ids=[f"case{i}" for i in range(4)])
def test_torch_low_precision(case, dtype):
    # Moderate offsets: a low-precision position rounds by up to 1/8 pixel near 30, which no rule can bound.
    case = dict(case, offset_std=0.7)
    inputs = make_inputs(case, dtype)
    kw = kwargs_of(case)
    out, grads, gy = run_with_grads(lambda *t: dynconv.dcnv3(*t, backend="torch", **kw), inputs)
    lowp, lowp_grads, _ = run_with_grads(lambda *t: dynconv.dcnv3(*t, backend="reference", **kw), inputs, gy)
    ref, ref_grads, _ = run_with_grads(
        lambda *t: dynconv.dcnv3(*t, backend="reference", **kw), [t.float() for t in inputs], gy.float()
    )
    assert out.dtype == dtype
    assert_close_lowp(out, lowp, ref, atol=2e-2, what="output")
    for name, a, lo, r in zip(("input", "mask"), (grads[0], grads[2]), (lowp_grads[0], lowp_grads[2]), ref_grads[::2]):
        assert_close_lowp(a, lo, r, atol=2e-2, what=f"grad {name}")


@pytest.mark.parametrize("backend", ["torch", "reference"])
def test_gradcheck(backend):
    case = dict(CASES[1], B=1, H=3, W=4, G=2, Cg=1, k=3, stride=1, padding=1, dilation=1)
    case.update(remove_center=False, offset_scale=0.7, offset_std=1.3, layout="contiguous")
    inputs = [t.requires_grad_() for t in make_inputs(case, torch.float64, seed=3)]
    kw = kwargs_of(case)
    # fast_mode checks random projections of the Jacobian: the reference's many small gathers make the full
    # check slow, and it is the torch backend's exact Jacobian that matters most.
    fn = lambda *t: dynconv.dcnv3(*t, backend=backend, **kw)  # noqa: E731
    assert torch.autograd.gradcheck(fn, inputs, fast_mode=backend == "reference")


def test_point_chunks_give_the_same_result(monkeypatch):
    # A tiny chunk budget: one kernel point per grid_sample call, as at the largest sizes.
    from dynconv.ops import dcnv as ops

    case = CASES[3]
    inputs = make_inputs(case, torch.float64)
    kw = kwargs_of(case)
    out, grads, gy = run_with_grads(lambda *t: dynconv.dcnv3(*t, backend="torch", **kw), inputs)
    monkeypatch.setattr(ops, "CHUNK_BYTES", 1)
    assert ops._chunks(9, 100) == [(k, k + 1) for k in range(9)]
    out1, grads1, _ = run_with_grads(lambda *t: dynconv.dcnv3(*t, backend="torch", **kw), inputs, gy)
    assert_close(out1, out)
    for a, e in zip(grads1, grads):
        assert_close(a, e)


def test_gradient_of_one_input_only():
    case = CASES[2]
    x, off, m = make_inputs(case, torch.float64)
    off.requires_grad_()
    kw = kwargs_of(case)
    (g,) = torch.autograd.grad(dynconv.dcnv3(x, off, m, backend="torch", **kw).sum(), (off,))
    (g_ref,) = torch.autograd.grad(dynconv.dcnv3(x, off, m, backend="reference", **kw).sum(), (off,))
    assert_close(g, g_ref)


def _depthwise_weight(mask_gp, C, G, kh, kw):
    """The F.conv2d depth-wise weight [C, 1, kh, kw] of a constant mask [G, P] (point ix*kh+iy is (iy, ix))."""
    weight = torch.empty(C, 1, kh, kw, dtype=mask_gp.dtype)
    for c in range(C):
        for iy in range(kh):
            for ix in range(kw):
                weight[c, 0, iy, ix] = mask_gp[c // (C // G), ix * kh + iy]
    return weight


@pytest.mark.parametrize("backend", ["torch", "reference"])
@pytest.mark.parametrize(
    "k, stride, padding, dilation", [(3, 1, 1, 1), (5, 2, 2, 1), ((3, 5), 1, (0, 3), (2, 1)), (3, (2, 1), 0, 2)]
)
def test_zero_offsets_are_a_depthwise_conv(backend, k, stride, padding, dilation):
    kh, kw = _pair(k)
    B, H, W, G, Cg = 2, 9, 10, 3, 2
    C = G * Cg
    x = torch.randn(B, H, W, C, dtype=torch.float64)
    mask_gp = torch.randn(G, kh * kw, dtype=torch.float64)
    expected = F.conv2d(
        x.permute(0, 3, 1, 2), _depthwise_weight(mask_gp, C, G, kh, kw), None, stride, padding, dilation, groups=C
    ).permute(0, 2, 3, 1)
    Ho, Wo = expected.shape[1:3]
    offset = torch.zeros(B, Ho, Wo, G * kh * kw * 2, dtype=torch.float64)
    mask = mask_gp.flatten().expand(B, Ho, Wo, -1)
    args = dict(kernel_size=k, stride=stride, padding=padding, dilation=dilation, group=G, backend=backend)
    assert_close(dynconv.dcnv3(x, offset, mask, **args), expected)
    # DCNv4 with the same numbers in its combined, 8-padded layout is the same conv.
    om = torch.cat([offset.unflatten(-1, (G, -1)), mask.unflatten(-1, (G, -1))], -1).flatten(-2)
    om = F.pad(om, (0, -om.shape[-1] % 8))
    assert_close(dynconv.dcnv4(x, om, **args), expected)


@pytest.mark.parametrize("backend", ["torch", "reference"])
def test_integer_offset_is_a_shift(backend):
    # kernel 1: one point; offset (x=2, y=-1) reads x[h - 1, w + 2], zero past the border.
    x = torch.randn(1, 6, 7, 4, dtype=torch.float64)
    offset = torch.tensor([2.0, -1.0], dtype=torch.float64).repeat(1, 6, 7, 2)
    mask = torch.ones(1, 6, 7, 2, dtype=torch.float64)
    out = dynconv.dcnv3(x, offset, mask, kernel_size=1, group=2, backend=backend)
    expected = torch.zeros_like(x)
    expected[:, 1:, :-2] = x[:, :-1, 2:]
    assert_close(out, expected)


def test_dcnv4_matches_dcnv3_on_split_layout_with_gradients():
    case = CASES[4]
    x, off, m = make_inputs(case, torch.float64)
    G, (_, _, P) = case["G"], out_size(case)
    om = torch.cat([off.unflatten(-1, (G, 2 * P)), m.unflatten(-1, (G, P))], -1).flatten(-2)
    om = F.pad(om, (0, -om.shape[-1] % 8)).requires_grad_()
    kw = kwargs_of(case)
    out = dynconv.dcnv4(x, om, backend="torch", **kw)
    assert_close(out, dynconv.dcnv3(x, off, m, backend="reference", **kw))
    (g,) = torch.autograd.grad(out, om, torch.ones_like(out))
    (g_ref,) = torch.autograd.grad(dynconv.dcnv4(x, om, backend="reference", **kw), om, torch.ones_like(out))
    assert_close(g, g_ref)
    assert torch.equal(g[..., 3 * G * P :], torch.zeros_like(g[..., 3 * G * P :]))  # the padding is unused


def test_opcheck():
    case = CASES[0]
    x, off, m = make_inputs(case, torch.float64)
    Ho, Wo, P = out_size(case)
    G = case["G"]
    kh, kw = _pair(case["k"])
    (dh, dw) = _pair(case["dilation"])
    padding = [(kh - 1) // 2 * dh, (kw - 1) // 2 * dw] if case["padding"] is None else list(_pair(case["padding"]))
    args = (
        x.contiguous().requires_grad_(),
        off.view(x.shape[0], Ho, Wo, G, P, 2).requires_grad_(),
        m.view(x.shape[0], Ho, Wo, G, P).requires_grad_(),
        [kh, kw],
        list(_pair(case["stride"])),
        padding,
        [dh, dw],
        case["offset_scale"],
        case["remove_center"],
        "torch",
    )
    torch.library.opcheck(torch.ops.dynconv.dcn_sample.default, args)


BASE = dict(kernel_size=3, group=2)


def _t(*shape, dtype=torch.float32):
    return torch.zeros(*shape, dtype=dtype)


@pytest.mark.parametrize(
    "call, exc, match",
    [
        (
            lambda: dynconv.dcnv3(_t(1, 4, 4), _t(1, 4, 4, 36), _t(1, 4, 4, 18), **BASE),
            ValueError,
            r"input must be a 4-D",
        ),
        (
            lambda: dynconv.dcnv3(_t(1, 4, 4, 5), _t(1, 4, 4, 36), _t(1, 4, 4, 18), **BASE),
            ValueError,
            r"divisible by group",
        ),
        (
            lambda: dynconv.dcnv3(_t(1, 4, 4, 4), _t(1, 4, 4, 35), _t(1, 4, 4, 18), **BASE),
            ValueError,
            r"offset must have shape .*\[1, 4, 4, 36\].*got \[1, 4, 4, 35\]",
        ),
        (
            lambda: dynconv.dcnv3(_t(1, 4, 4, 4), _t(1, 4, 4, 36), _t(1, 3, 4, 18), **BASE),
            ValueError,
            r"mask must have shape .*\[1, 4, 4, 18\].*got \[1, 3, 4, 18\]",
        ),
        (
            lambda: dynconv.dcnv3(_t(1, 4, 4, 4), _t(1, 4, 4, 36, dtype=torch.float64), _t(1, 4, 4, 18), **BASE),
            TypeError,
            r"offset must have the dtype of input",
        ),
        (
            lambda: dynconv.dcnv3(_t(1, 4, 4, 4, dtype=torch.int64), _t(1, 4, 4, 36), _t(1, 4, 4, 18), **BASE),
            TypeError,
            r"input must have a floating dtype",
        ),
        (
            lambda: dynconv.dcnv3(_t(1, 4, 4, 4), _t(1, 4, 4, 36), _t(1, 4, 4, 18), kernel_size=3, group=0),
            ValueError,
            r"group must be a positive int",
        ),
        (
            lambda: dynconv.dcnv3(
                _t(1, 4, 4, 4), _t(1, 4, 4, 36), _t(1, 4, 4, 18), kernel_size=2, group=2, remove_center=True
            ),
            ValueError,
            r"remove_center needs an odd",
        ),
        (
            lambda: dynconv.dcnv3(
                _t(1, 4, 4, 4), _t(1, 4, 4, 36), _t(1, 4, 4, 18), kernel_size=3, group=2, offset_scale="1"
            ),
            TypeError,
            r"offset_scale must be a float",
        ),
        (
            lambda: dynconv.dcnv3(_t(1, 2, 2, 4), _t(1, 4, 4, 36), _t(1, 4, 4, 18), kernel_size=5, padding=0, group=2),
            ValueError,
            r"too small",
        ),
        (
            lambda: dynconv.dcnv4(_t(1, 4, 4, 4), _t(1, 4, 4, 50), **BASE),
            ValueError,
            r"offset_mask must have shape .*\[1, 4, 4, 56\].*M = 3\*group\*P = 54.*got \[1, 4, 4, 50\]",
        ),
        (
            lambda: dynconv.dcnv4(_t(1, 4, 4, 4), _t(1, 4, 4, 56, dtype=torch.float16), **BASE),
            TypeError,
            r"offset_mask must have the dtype of input",
        ),
        (lambda: dynconv.DCNv3(6, group=4), ValueError, r"group must be a positive int dividing channels \(6\)"),
        (lambda: dynconv.DCNv3(8, group=2)(_t(1, 5, 5, 6)), ValueError, r"input must have shape \[B, H, W, 8\]"),
        (lambda: dynconv.DCNv4(8, kernel_size=3, pad=0, group=2)(_t(1, 5, 5, 8)), ValueError, r"offset predictor"),
    ],
)
def test_bad_input_raises_named_error(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


def test_device_mismatch_raises_on_meta():
    x = torch.zeros(1, 4, 4, 4)
    with pytest.raises(ValueError, match=r"offset must be on the device of input"):
        dynconv.dcnv3(x, torch.zeros(1, 4, 4, 36, device="meta"), torch.zeros(1, 4, 4, 18), **BASE)


def test_triton_on_cpu_says_why(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    x = torch.zeros(1, 4, 4, 4)
    with pytest.raises(dynconv.BackendError, match=r"dcnv3: the triton backend needs"):
        dynconv.dcnv3(x, torch.zeros(1, 4, 4, 36), torch.zeros(1, 4, 4, 18), backend="triton", **BASE)


def _box_conv(x, k, C):
    """Depth-wise k x k box filter with weights 1/k^2 (what a fresh DCNv3 samples), channels-last in and out."""
    weight = torch.full((C, 1, k, k), 1.0 / (k * k), dtype=x.dtype)
    return F.conv2d(x.permute(0, 3, 1, 2), weight, padding=k // 2, groups=C).permute(0, 2, 3, 1)


@pytest.mark.parametrize("k", [3, 5])
def test_fresh_dcnv3_is_projected_box_filter(k):
    torch.manual_seed(0)
    layer = dynconv.DCNv3(8, kernel_size=k, pad=k // 2, group=2).double()
    x = torch.randn(2, 7, 6, 8, dtype=torch.float64)
    expected = layer.output_proj(_box_conv(layer.input_proj(x), k, 8))
    assert_close(layer(x), expected)


def test_dcnv3_module_matches_its_definition_and_trains():
    torch.manual_seed(1)
    layer = dynconv.DCNv3(8, group=2, offset_scale=0.5).double()
    for p in (layer.offset.weight, layer.mask.weight, layer.offset.bias):
        torch.nn.init.normal_(p, std=0.5)
    x = torch.randn(2, 6, 7, 8, dtype=torch.float64)
    feat = F.gelu(F.layer_norm(layer.dw_conv(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1), (8,), eps=1e-6))
    mask = torch.softmax(layer.mask(feat).view(2, 6, 7, 2, 9), -1).flatten(-2)
    v = layer.input_proj(x)
    expected = layer.output_proj(
        reference.dcn_sample(
            v,
            layer.offset(feat).view(2, 6, 7, 2, 9, 2),
            mask.view(2, 6, 7, 2, 9),
            (3, 3),
            (1, 1),
            (1, 1),
            (1, 1),
            0.5,
            False,
        )
    )
    out = layer(x)
    assert_close(out, expected)
    out.square().mean().backward()
    for name, p in layer.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, f"no gradient reaches {name}"


@pytest.mark.parametrize("dw_kernel_size, stride", [(None, 1), (3, 1), (None, 2), (3, 2)])
def test_dcnv4_module_matches_its_definition(dw_kernel_size, stride):
    torch.manual_seed(2)
    layer = dynconv.DCNv4(8, stride=stride, group=2, dw_kernel_size=dw_kernel_size, remove_center=True).double()
    torch.nn.init.normal_(layer.offset_mask.weight, std=0.5)
    assert layer.offset_mask.out_features == 48  # 3 * 2 groups * 8 points = 48, already a multiple of 8
    x = torch.randn(2, 7, 6, 8, dtype=torch.float64)
    if dw_kernel_size is None:
        feat = x[:, ::stride, ::stride]
    else:
        feat = layer.offset_mask_dw(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
    om = layer.offset_mask(feat).unflatten(-1, (2, 24))  # no softmax: the mask is used as predicted
    Ho, Wo = om.shape[1:3]
    off, mask = om[..., :16].unflatten(-1, (8, 2)), om[..., 16:]
    v = layer.value_proj(x)
    expected = layer.output_proj(reference.dcn_sample(v, off, mask, (3, 3), (stride,) * 2, (1, 1), (1, 1), 1.0, True))
    out = layer(x)
    assert out.shape == (2, Ho, Wo, 8)
    assert_close(out, expected)


def test_fresh_dcnv4_outputs_the_output_bias():
    # Zero-initialised modulation (no softmax) aggregates nothing, as in the official module.
    layer = dynconv.DCNv4(16, group=4)
    torch.nn.init.normal_(layer.output_proj.bias)
    out = layer(torch.randn(1, 5, 5, 16))
    assert_close(out, layer.output_proj.bias.expand_as(out))
    assert layer.offset_mask.out_features == 112  # ceil(3 * 4 * 9 / 8) * 8


@pytest.mark.parametrize("backend", ["torch", "reference"])
def test_batch_of_zero(backend):
    """An empty batch gives an empty output (as F.conv2d and torchvision's deform_conv2d do), empty gradients."""
    value = torch.randn(0, 6, 6, 8, requires_grad=True)
    offset = torch.randn(0, 6, 6, 2 * 9 * 2, requires_grad=True)
    mask = torch.randn(0, 6, 6, 2 * 9, requires_grad=True)
    out = dynconv.dcnv3(value, offset, mask, 3, group=2, backend=backend)
    assert out.shape == (0, 6, 6, 8)
    out.sum().backward()
    assert value.grad.shape == value.shape and offset.grad.shape == offset.shape and mask.grad.shape == mask.shape
    offset_mask = torch.randn(0, 3, 3, 2 * 9 * 3, requires_grad=True)
    out = dynconv.dcnv4(value, offset_mask, 3, stride=2, group=2, backend=backend)
    assert out.shape == (0, 3, 3, 8)
    out.sum().backward()
    assert offset_mask.grad.shape == offset_mask.shape


# ------------------------------------------------------------------------- Triton: on CUDA or in the interpreter

# (B, H, W, G, C/G, k, stride, dilation, padding, offset_scale, remove_center)
TRITON_CASES = [
    (1, 6, 7, 2, 3, 3, 1, 1, None, 0.8, False),
    (2, 5, 4, 1, 4, 3, 2, 1, 0, 1.0, True),
    (1, 7, 5, 2, 2, (3, 5), (1, 2), (2, 1), None, 2.0, False),
]


def make_tiny(case, dtype, seed=0, device=TRITON_DEVICE):
    B, H, W, G, Cg, k, stride, dilation, padding, scale, rc = case
    kh, kw = (k, k) if isinstance(k, int) else k
    sh, sw = (stride, stride) if isinstance(stride, int) else stride
    dh, dw = (dilation, dilation) if isinstance(dilation, int) else dilation
    ph, pw = ((kh - 1) // 2 * dh, (kw - 1) // 2 * dw) if padding is None else (padding, padding)
    Ho, Wo = (H + 2 * ph - dh * (kh - 1) - 1) // sh + 1, (W + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    P = kh * kw - int(rc)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, H, W, G * Cg, generator=g, dtype=torch.float64)
    off = 2.5 * torch.randn(B, Ho, Wo, G * P * 2, generator=g, dtype=torch.float64)  # many samples fall outside
    m = torch.randn(B, Ho, Wo, G * P, generator=g, dtype=torch.float64)
    kwargs = dict(kernel_size=k, stride=stride, dilation=dilation, padding=padding, group=G, offset_scale=scale)
    return [t.to(device, dtype) for t in (x, off, m)], dict(kwargs, remove_center=rc)


def fwd_bwd(backend, inputs, kwargs, grad_out=None):
    return run_with_grads(functools.partial(dynconv.dcnv3, backend=backend, **kwargs), inputs, grad_out)


@pytest.mark.parametrize(
    "case, dtype",
    [(TRITON_CASES[0], torch.float64), (TRITON_CASES[1], torch.float32), (TRITON_CASES[2], torch.float64)],
    ids=["k3-fp64", "stride2-remove-center-fp32", "k3x5-dilated-fp64"],
)
def test_tiny_cases_match_reference(backend, case, dtype):
    inputs, kwargs = make_tiny(case, dtype, device=TRITON_DEVICE if backend == "triton" else "cpu")
    out, grads, gy = fwd_bwd(backend, inputs, kwargs)
    ref, ref_grads, _ = fwd_bwd("reference", inputs, kwargs, gy)
    tol = {} if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-4)
    assert_close(out, ref, what="output", **tol)
    for name, a, e in zip(("input", "offset", "mask"), grads, ref_grads):
        assert_close(a, e, what=f"grad {name}", **tol)


@pytest.mark.triton
def test_triton_deterministic_mode_matches_and_repeats():
    inputs, kwargs = make_tiny(TRITON_CASES[0], torch.float32, seed=1)
    _, ref_grads, gy = fwd_bwd("reference", inputs, kwargs)
    with deterministic_algorithms(True):
        _, first, _ = fwd_bwd("triton", inputs, kwargs, gy)
        _, second, _ = fwd_bwd("triton", inputs, kwargs, gy)
    for a, b, e in zip(first, second, ref_grads):
        assert torch.equal(a, b)
        assert_close(a, e, rtol=1e-4, atol=1e-4)


@pytest.mark.triton
def test_triton_bfloat16_and_dcnv4_layout():
    inputs, kwargs = make_tiny(TRITON_CASES[0], torch.bfloat16, seed=2)
    x, off, m = inputs
    G, P = kwargs["group"], 9
    om = torch.cat([off.unflatten(-1, (G, 2 * P)), m.unflatten(-1, (G, P))], -1).flatten(-2)
    om = torch.nn.functional.pad(om, (0, -om.shape[-1] % 8))
    out = dynconv.dcnv4(x, om, backend="triton", **kwargs)
    lowp = dynconv.dcnv4(x, om, backend="reference", **kwargs)
    ref = dynconv.dcnv4(x.float(), om.float(), backend="reference", **kwargs)
    assert out.dtype == torch.bfloat16
    assert_close_lowp(out, lowp, ref, atol=2e-2)


@pytest.mark.cuda
@pytest.mark.slow
def test_triton_cuda_past_int32_offsets():
    """value of 2 * 1025 * 1024 * 1024 > 2**31 elements (bf16; ~35 GB with the gradients): the second sample,
    reached only through int64 offsets, equals the same sample run alone (offsets that fit in int32)."""
    if TRITON_DEVICE != "cuda":
        pytest.skip("needs a CUDA device with ~40 GB free")
    B, H, W, G, Cg, P = 2, 1025, 1024, 32, 32, 9
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(B, H, W, G * Cg, generator=g, device="cuda", dtype=torch.bfloat16)
    off = torch.rand(B, H, W, G * P * 2, generator=g, device="cuda", dtype=torch.bfloat16) * 2 - 1
    m = torch.rand(B, H, W, G * P, generator=g, device="cuda", dtype=torch.bfloat16)
    assert x.numel() > 2**31
    kwargs = dict(kernel_size=3, group=G)
    inputs = [t.requires_grad_() for t in (x, off, m)]
    out = dynconv.dcnv3(*inputs, backend="triton", **kwargs)
    gy = torch.ones_like(out)
    grads = torch.autograd.grad(out, inputs, gy)
    tail = [t.detach()[1:].clone().requires_grad_() for t in (x, off, m)]
    out_tail = dynconv.dcnv3(*tail, backend="triton", **kwargs)
    grads_tail = torch.autograd.grad(out_tail, tail, gy[1:])
    assert torch.equal(out[1:], out_tail)
    for name, a, e in zip(("input", "offset", "mask"), grads, grads_tail):
        assert_close(a[1:].float(), e.float(), rtol=1e-2, atol=1e-2, what=f"grad {name} of the second sample")


_COMPILE_SCRIPT = r"""
import triton.language as tl

import dynconv.kernels._sampling as S
import dynconv.kernels.dcnv as K
from dynconv.testing import compile_ptx

geometry = dict(K.META, REMOVE_CENTER=True, KH=3, KW=3, KR=1, P=8, HAS_MASK=True, INT64=False)
geometry.update(ACC=tl.float32, BLOCK_R=16, BLOCK_C=32)
backward = dict(geometry, NEED_X=True, NEED_OFFSET=True, NEED_MASK=True)
variants = [
    (S.forward_kernel, "bf16", dict(geometry)),
    (S.backward_kernel, "fp32", dict(backward, ATOMIC=True)),
    (S.backward_kernel, "fp16", dict(backward, ATOMIC=False)),
]
fp32 = ("gx_ptr", "goff_ptr", "gm_ptr", "scale_ptr")
print("compiled", compile_ptx(variants, {"idx_ptr": "*i64", **{n: "*fp32" for n in fp32}}))
"""


@pytest.mark.triton
@pytest.mark.slow
def test_kernels_compile_for_sm90_without_a_gpu():
    """The interpreter never runs Triton's compiler: compile the kernels to PTX/cubin for sm_90 (no GPU needed)."""
    assert "compiled 3" in run_without_interpreter(_COMPILE_SCRIPT)


@pytest.mark.triton
def test_no_python_float_reaches_the_kernels(monkeypatch):
    """Triton passes a Python float argument as fp32 on a GPU but keeps it fp64 in the interpreter: offset_scale
    passed that way cost the fp64 kernels 8 digits on an H200 (``test_tiny_cases_match_reference[triton-k3-fp64]``,
    scale 0.8, failed there and passed here). Every float must reach the kernels as a tensor of the accumulation
    dtype."""

    seen = []

    class Spy:
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            def launch(*args, **meta):
                seen.append([type(a).__name__ for a in args if isinstance(a, float)])
                return self.kernel[grid](*args, **meta)

            return launch

    from dynconv.kernels import _sampling

    for name in ("forward_kernel", "backward_kernel"):
        monkeypatch.setattr(_sampling, name, Spy(getattr(_sampling, name)))
    inputs, kwargs = make_tiny(TRITON_CASES[0], torch.float64)
    out, grads, gy = fwd_bwd("triton", inputs, kwargs)
    assert seen == [[], []]  # forward and backward launched, neither with a float argument
    ref, ref_grads, _ = fwd_bwd("reference", inputs, kwargs, gy)
    assert_close(out, ref)
