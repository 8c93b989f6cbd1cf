"""deform_conv2d (DCNv1/v2) and its modules: the torch backend and the Triton kernels (dynconv/kernels/deform.py)
against the reference and a pixel loop.

The Triton tests (mark ``triton``; on CUDA, else in the interpreter: see tests/triton_setup.py) keep to the tiny
``TRITON_CASES``; the tests over the ``backend`` fixture run the torch backend on them too.
"""

import importlib.util
import math
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from triton_setup import TRITON_DEVICE

import dynconv
from dynconv import _columns
from dynconv.backends import triton_available
from dynconv.testing import (
    assert_close,
    assert_close_lowp,
    deterministic_algorithms,
    record_last_argument,
    run_without_interpreter,
)

# ---------------------------------------------------------------------------------------------- oracles


def naive_bilinear(img, y, x):
    """torchvision's CPU ``bilinear_interpolate``, written out: zero unless -1 < y < H and -1 < x < W."""
    H, W = img.shape
    if y <= -1 or y >= H or x <= -1 or x >= W:
        return 0.0
    y0, x0 = math.floor(y), math.floor(x)
    ly, lx = y - y0, x - x0

    def value(r, c):
        return float(img[r, c]) if 0 <= r < H and 0 <= c < W else 0.0

    return (
        (1 - ly) * (1 - lx) * value(y0, x0)
        + (1 - ly) * lx * value(y0, x0 + 1)
        + ly * (1 - lx) * value(y0 + 1, x0)
        + ly * lx * value(y0 + 1, x0 + 1)
    )


def naive_deform_conv2d(x, offset, weight, bias, stride, padding, dilation, mask):
    """A loop over every sample, from the definition in torchvision's documentation (float64, ints only)."""
    B, C, H, W = x.shape
    Co, Cw, kh, kw = weight.shape
    K = kh * kw
    Ho, Wo = offset.shape[-2:]
    G_off = offset.shape[1] // (2 * K)
    cols = torch.zeros(B, C, K, Ho, Wo, dtype=torch.float64)
    for b in range(B):
        for c in range(C):
            g = c // (C // G_off)
            for i in range(kh):
                for j in range(kw):
                    k = i * kw + j
                    for ho in range(Ho):
                        for wo in range(Wo):
                            dy = float(offset[b, 2 * (g * K + k), ho, wo])
                            dx = float(offset[b, 2 * (g * K + k) + 1, ho, wo])
                            y = ho * stride - padding + i * dilation + dy
                            xx = wo * stride - padding + j * dilation + dx
                            m = 1.0 if mask is None else float(mask[b, g * K + k, ho, wo])
                            cols[b, c, k, ho, wo] = m * naive_bilinear(x[b, c], y, xx)
    G_w = C // Cw
    out = torch.zeros(B, Co, Ho, Wo, dtype=torch.float64)
    for o in range(Co):
        g = o // (Co // G_w)
        out[:, o] = torch.einsum("ck,bckhw->bhw", weight[o].reshape(Cw, K).double(), cols[:, g * Cw : (g + 1) * Cw])
        if bias is not None:
            out[:, o] += float(bias[o])
    return out


# ---------------------------------------------------------------------------------------------- cases


def _out(size, k, s, p, d):
    return (size + 2 * p - d * (k - 1) - 1) // s + 1


def make_case(seed):
    """Random odd shapes, k in {1, 2, 3, (3, 2)}, stride/dilation 1-2, weight and offset groups, mask, bias."""
    rng = random.Random(seed)
    kh, kw = rng.choice([(1, 1), (2, 2), (3, 3), (3, 3), (3, 2)])
    G_w = rng.choice([1, 1, 2])
    G_off = rng.choice([1, 1, 2, 4])
    C = math.lcm(G_w, G_off) * rng.choice([1, 2])
    Co = G_w * rng.choice([1, 3])
    stride, dilation, padding = rng.choice([1, 2]), rng.choice([1, 2]), rng.choice([0, 1, 2])
    H = max(rng.choice([5, 7, 8]), dilation * (kh - 1) + 1)
    W = max(rng.choice([4, 6, 9]), dilation * (kw - 1) + 1)
    return dict(
        B=rng.choice([1, 2]), C=C, Co=Co, H=H, W=W, kh=kh, kw=kw, G_w=G_w, G_off=G_off, stride=stride,
        padding=padding, dilation=dilation, mask=rng.random() < 0.6, bias=rng.random() < 0.7,
        spread=rng.choice([0.5, 2.0, 6.0]), layout=rng.choice(["contiguous", "channels_last", "strided"]),
    )  # fmt: skip


CASES = [make_case(s) for s in range(24)]


def make_inputs(case, dtype, requires_grad=True):
    B, C, Co, H, W, kh, kw = (case[n] for n in "B C Co H W kh kw".split())
    Ho = _out(H, kh, case["stride"], case["padding"], case["dilation"])
    Wo = _out(W, kw, case["stride"], case["padding"], case["dilation"])
    K = kh * kw
    gen = torch.Generator().manual_seed(hash(tuple(case.items())) % 2**31)
    x = torch.randn(B, C, H, W, generator=gen, dtype=torch.float64)
    if case["layout"] == "channels_last":
        x = x.to(memory_format=torch.channels_last)
    elif case["layout"] == "strided":
        x = torch.randn(B, C, H, 2 * W, generator=gen, dtype=torch.float64)[..., ::2]
    # A spread of 6 pixels pushes many samples past the border (and some fully outside the image).
    offset = case["spread"] * torch.randn(B, 2 * case["G_off"] * K, Ho, Wo, generator=gen, dtype=torch.float64)
    weight = torch.randn(Co, C // case["G_w"], kh, kw, generator=gen, dtype=torch.float64)
    bias = torch.randn(Co, generator=gen, dtype=torch.float64) if case["bias"] else None
    mask = torch.rand(B, case["G_off"] * K, Ho, Wo, generator=gen, dtype=torch.float64) if case["mask"] else None
    tensors = [t if t is None else t.to(dtype).requires_grad_(requires_grad) for t in (x, offset, weight, bias, mask)]
    return tensors


def call(tensors, case, backend, **kw):
    x, offset, weight, bias, mask = tensors
    return dynconv.deform_conv2d(
        x, offset, weight, bias, case["stride"], case["padding"], case["dilation"], mask, backend=backend, **kw
    )


def grads(tensors, case, backend, grad_out=None, **kw):
    """Output and the gradient of every tensor argument that is not None (``case``: a dict with the geometry)."""
    leaves = [t.detach().clone().requires_grad_() if t is not None else None for t in tensors]
    out = call(leaves, case, backend, **kw)
    grad_out = torch.randn_like(out) if grad_out is None else grad_out
    present = [t for t in leaves if t is not None]
    return out, torch.autograd.grad(out, present, grad_out), grad_out


NAMES = ("input", "offset", "weight", "bias", "mask")


def present_names(tensors):
    return [n for n, t in zip(NAMES, tensors) if t is not None]


# ---------------------------------------------------------------------------------------------- correctness


@pytest.mark.parametrize("seed", range(4))
def test_reference_matches_pixel_loop(seed):
    """The oracle itself against torchvision's per-sample definition written as a loop."""
    case = CASES[seed]
    tensors = make_inputs(case, torch.float64, requires_grad=False)
    expected = naive_deform_conv2d(*tensors[:4], case["stride"], case["padding"], case["dilation"], tensors[4])
    assert_close(call(tensors, case, "reference"), expected, what=str(case))
    assert_close(call(tensors, case, "torch"), expected, what=str(case))


@pytest.mark.parametrize("case", CASES, ids=[str(i) for i in range(len(CASES))])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_torch_matches_reference_forward_backward(case, dtype):
    tensors = make_inputs(case, dtype)
    out, got, gy = grads(tensors, case, "torch")
    ref, expected, _ = grads(tensors, case, "reference", gy)
    assert_close(out, ref, what=f"output {case}")
    for name, g, e in zip(present_names(tensors), got, expected):
        assert_close(g, e, what=f"grad {name} {case}")


@pytest.mark.parametrize("case", CASES[:6], ids=[str(i) for i in range(6)])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_torch_low_precision(case, dtype):
    """fp16/bf16 (fp32 accumulation) within twice the error the reference makes in that dtype, + 1e-3."""
    tensors = make_inputs(case, dtype)
    out, got, gy = grads(tensors, case, "torch")
    assert out.dtype == dtype and all(g.dtype == dtype for g in got)
    ref_lowp, expected_lowp, _ = grads(tensors, case, "reference", gy)
    t32 = [t.float() if t is not None else None for t in tensors]
    ref32, expected32, _ = grads(t32, case, "reference", gy.float())
    assert_close_lowp(out, ref_lowp, ref32, what="output")
    for name, g, lo, e in zip(present_names(tensors), got, expected_lowp, expected32):
        # Offset gradients differ by whole corner values when a low-precision position rounds across a pixel
        # boundary; the reference in the same dtype makes that error too, so the rule still applies.
        assert_close_lowp(g, lo, e, atol=2e-2 if name == "offset" else 1e-3, what=f"grad {name}")


@pytest.mark.parametrize("backend", ["reference", "torch"])
@pytest.mark.parametrize("with_mask", [False, True])
def test_gradcheck(backend, with_mask):
    case = dict(CASES[0], B=1, C=4, Co=2, H=4, W=5, kh=2, kw=2, G_w=2, G_off=2, stride=1, padding=1, dilation=1)
    case.update(mask=with_mask, bias=True, spread=1.5, layout="contiguous")
    tensors = make_inputs(case, torch.float64)
    present = [t for t in tensors if t is not None]

    def fn(*args):
        it = iter(args)
        return call([next(it) if t is not None else None for t in tensors], case, backend)

    # fast_mode checks random projections of the Jacobian: the full one of ~500 inputs takes minutes here.
    assert torch.autograd.gradcheck(fn, present, fast_mode=True)


@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_gradcheck_full_jacobian_tiny(backend):
    case = dict(CASES[0], B=1, C=2, Co=1, H=3, W=4, kh=2, kw=2, G_w=1, G_off=2, stride=1, padding=0, dilation=1)
    case.update(mask=True, bias=True, spread=1.0, layout="contiguous")
    tensors = make_inputs(case, torch.float64)
    assert torch.autograd.gradcheck(lambda *t: call(t, case, backend), tensors)


def test_gradient_of_some_inputs_only():
    case = CASES[2]
    x, offset, weight, bias, mask = make_inputs(case, torch.float64)
    for wanted in ([x], [offset], [weight], [offset, weight]):
        args = [
            t if (t is None or any(t is w for w in wanted)) else t.detach() for t in (x, offset, weight, bias, mask)
        ]
        got = torch.autograd.grad(call(args, case, "torch").sum(), wanted)
        expected = torch.autograd.grad(call(args, case, "reference").sum(), wanted)
        for g, e in zip(got, expected):
            assert_close(g, e)


@pytest.mark.parametrize("seed", [1, 5, 9])
def test_chunked_batch_matches_one_chunk(monkeypatch, seed):
    """A column budget of one image forces one chunk per image; results must not change."""
    case = dict(CASES[seed], B=3)
    tensors = make_inputs(case, torch.float64)
    out, expected, gy = grads(tensors, case, "torch")
    monkeypatch.setattr(_columns, "COLUMN_BUDGET_BYTES", 1)
    out_chunked, got, _ = grads(tensors, case, "torch", gy)
    assert_close(out, out_chunked)  # a different GEMM size may round differently
    for g, e in zip(got, expected):
        assert_close(g, e)


@pytest.mark.parametrize("groups, offset_groups", [(1, 1), (2, 1), (1, 2), (4, 2)])
@pytest.mark.parametrize("stride, padding, dilation", [(1, 1, 1), (2, 0, 1), (1, 2, 2)])
def test_zero_offset_unit_mask_is_conv2d(groups, offset_groups, stride, padding, dilation):
    x = torch.randn(2, 8, 9, 11)
    weight = torch.randn(4, 8 // groups, 3, 3)
    bias = torch.randn(4)
    expected = F.conv2d(x, weight, bias, stride, padding, dilation, groups)
    offset = torch.zeros(2, 2 * offset_groups * 9, *expected.shape[-2:])
    mask = torch.ones(2, offset_groups * 9, *expected.shape[-2:])
    for backend in ("reference", "torch"):
        assert_close(
            dynconv.deform_conv2d(x, offset, weight, bias, stride, padding, dilation, backend=backend), expected
        )
        assert_close(
            dynconv.deform_conv2d(x, offset, weight, bias, stride, padding, dilation, mask, backend=backend), expected
        )


@pytest.mark.parametrize("dy, dx", [(1, 0), (0, -2), (-1, 3), (2, 2)])
def test_integer_offset_is_a_shift(dy, dx):
    """The same integer offset at every tap samples a shifted image: conv2d of the zero-filled shift."""
    x = torch.randn(1, 3, 8, 10, dtype=torch.float64)
    weight, bias = torch.randn(5, 3, 3, 3, dtype=torch.float64), torch.randn(5, dtype=torch.float64)
    H, W = x.shape[-2:]
    # Tap (i, j) of pixel (h, w) reads x at (h - 1 + i + dy, w - 1 + j + dx), zero outside: an unpadded conv2d
    # of the window of the zero-extended image that starts at (dy - 1, dx - 1).
    P = 4
    extended = F.pad(x, (P, P, P, P))
    window = extended[..., P + dy - 1 : P + dy + H + 1, P + dx - 1 : P + dx + W + 1]
    expected = F.conv2d(window, weight, bias)
    offset = torch.tensor([float(dy), float(dx)], dtype=torch.float64).repeat(9).view(1, 18, 1, 1).expand(1, 18, H, W)
    for backend in ("reference", "torch"):
        assert_close(dynconv.deform_conv2d(x, offset, weight, bias, padding=1, backend=backend), expected)


def test_samples_beyond_the_border_see_only_in_image_corners():
    """A 1x1 kernel at y = -0.25 reads 0.75 of row 0; at y = -1 or y = H nothing; half-way past the edge."""
    x = torch.arange(1.0, 13.0, dtype=torch.float64).view(1, 1, 3, 4)
    weight = torch.ones(1, 1, 1, 1, dtype=torch.float64)
    offset = torch.zeros(1, 2, 3, 4, dtype=torch.float64)
    offset[0, 0, 0, 0] = -0.25  # y = -0.25 at pixel (0, 0)
    offset[0, 0, 0, 1] = -1.0  # y = -1: outside
    offset[0, 1, 2, 3] = 0.5  # x = 3.5 at the last pixel: half of it
    offset[0, 0, 1, 2] = 1.75  # y = 2.75: 0.25 of row 2
    for backend in ("reference", "torch"):
        out = dynconv.deform_conv2d(x, offset, weight, backend=backend)
        assert out[0, 0, 0, 0] == pytest.approx(0.75 * 1)
        assert out[0, 0, 0, 1] == 0
        assert out[0, 0, 2, 3] == pytest.approx(0.5 * 12)
        assert out[0, 0, 1, 2] == pytest.approx(0.25 * 11)


def test_offset_gradient_at_integer_position_is_right_sided():
    """torchvision's floor-based corners: d/dy at an integer y is x[y + 1] - x[y] (zero outside; also at y = -1
    and y = H - 1); the sample is row 1 + dy of the column [1, 4, 9]."""
    x = torch.tensor([[[[1.0], [4.0], [9.0]]]], dtype=torch.float64).expand(1, 1, 3, 2).contiguous()
    weight = torch.ones(1, 1, 1, 1, dtype=torch.float64)
    for backend in ("reference", "torch"):
        for dy, expected in ((0.0, 5.0), (-1.0, 3.0), (1.0, -9.0), (-2.0, 1.0), (-3.0, 0.0)):
            offset = torch.zeros(1, 2, 3, 2, dtype=torch.float64)
            offset[0, 0, 1, 0] = dy  # row 1 + dy
            offset.requires_grad_()
            out = dynconv.deform_conv2d(x, offset, weight, backend=backend)
            (g,) = torch.autograd.grad(out[0, 0, 1, 0], (offset,))
            assert g[0, 0, 1, 0].item() == expected, (backend, dy)


def test_nan_offset_gives_nan_where_it_is_used():
    x, weight = torch.randn(1, 2, 5, 5), torch.randn(3, 2, 1, 1)
    offset = torch.zeros(1, 2, 5, 5)
    offset[0, 0, 2, 3] = float("nan")
    out = dynconv.deform_conv2d(x, offset, weight, backend="torch")
    assert out[0, :, 2, 3].isnan().all()
    assert out.isnan().sum() == 3  # one pixel, three output channels
    assert_close(out[0, :, 0], F.conv2d(x, weight)[0, :, 0])


def test_batch_of_zero():
    x, offset, weight = torch.randn(0, 4, 6, 6), torch.randn(0, 18, 6, 6), torch.randn(3, 4, 3, 3)
    for backend in ("reference", "torch"):
        assert dynconv.deform_conv2d(x, offset, weight, padding=1, backend=backend).shape == (0, 3, 6, 6)


def test_opcheck():
    case = dict(CASES[3], mask=True, bias=True)
    x, offset, weight, bias, mask = make_inputs(case, torch.float64)
    s, p, d = ([case[n]] * 2 for n in ("stride", "padding", "dilation"))
    torch.library.opcheck(torch.ops.dynconv.deform_conv2d.default, (x, offset, weight, bias, mask, s, p, d, "torch"))
    torch.library.opcheck(torch.ops.dynconv.deform_conv2d.default, (x, offset, weight, None, None, s, p, d, "torch"))


@pytest.mark.slow
def test_torch_compile_fullgraph_matches_eager():
    torch._dynamo.reset()
    layer = dynconv.ModulatedDeformConv2d(4, 6, 3, padding=1)
    with torch.no_grad():
        layer.conv_offset.weight.normal_(0, 0.1)
    x = torch.randn(2, 4, 9, 9, requires_grad=True)
    eager = layer(x)
    (g_eager,) = torch.autograd.grad(eager.sum(), (x,))
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    out = compiled(x)
    (g_comp,) = torch.autograd.grad(out.sum(), (x,))
    assert_close(out, eager)
    assert_close(g_comp, g_eager)


@pytest.mark.skipif(
    importlib.util.find_spec("torchvision") is None, reason="torchvision is not installed (optional comparison)"
)
@pytest.mark.parametrize("seed", range(6))
def test_matches_torchvision(seed):
    try:
        from torchvision.ops import deform_conv2d as tv_deform_conv2d
    except Exception as exc:  # a torchvision built for another torch fails at import
        pytest.skip(f"torchvision is installed but does not import: {exc}")
    case = CASES[seed]
    tensors = make_inputs(case, torch.float32)
    out, got, gy = grads(tensors, case, "torch")
    leaves = [t.detach().clone().requires_grad_() if t is not None else None for t in tensors]
    x, offset, weight, bias, mask = leaves
    expected = tv_deform_conv2d(x, offset, weight, bias, case["stride"], case["padding"], case["dilation"], mask)
    expected_grads = torch.autograd.grad(expected, [t for t in leaves if t is not None], gy)
    assert_close(out, expected, rtol=1e-5, atol=1e-5)
    for name, g, e in zip(present_names(tensors), got, expected_grads):
        assert_close(g, e, rtol=1e-4, atol=1e-4, what=f"grad {name}")


# ---------------------------------------------------------------------------------------------- errors


def _args():
    return dict(
        input=torch.randn(2, 4, 8, 8), offset=torch.randn(2, 18, 8, 8), weight=torch.randn(6, 4, 3, 3), padding=1
    )


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        (dict(input=torch.randn(4, 8, 8)), ValueError, r"input must be a 4-D tensor .*got shape \(4, 8, 8\)"),
        (dict(input=[1.0]), TypeError, r"input must be a torch.Tensor, got list"),
        (dict(input=torch.zeros(2, 4, 8, 8, dtype=torch.int32)), TypeError, r"input must have a floating dtype"),
        (dict(offset=torch.randn(2, 18, 8, 8, dtype=torch.float64)), TypeError, r"offset must have the dtype of input"),
        (
            dict(weight=torch.randn(6, 3, 3, 3)),
            ValueError,
            r"input channels \(4\) must be divisible by weight.shape\[1\] \(3\)",
        ),
        (dict(weight=torch.randn(5, 2, 3, 3)), ValueError, r"output channels \(5\) by the resulting number of groups"),
        (
            dict(offset=torch.randn(2, 17, 8, 8)),
            ValueError,
            r"offset.shape\[1\] must be a positive multiple of 2\*kh\*kw = 18",
        ),
        (
            dict(offset=torch.randn(2, 54, 8, 8)),
            ValueError,
            r"input channels \(4\) must be divisible by the number of offset groups \(3\)",
        ),
        (
            dict(offset=torch.randn(2, 18, 7, 8)),
            ValueError,
            r"offset must have shape \[B, 2\*offset_groups\*kh\*kw, H_out, W_out\] = \[2, 18, 8, 8\]"
            r".*got \[2, 18, 7, 8\]",
        ),
        (dict(offset=torch.randn(3, 18, 8, 8)), ValueError, r"offset must have shape .* = \[2, 18, 8, 8\]"),
        (
            dict(mask=torch.randn(2, 18, 8, 8)),
            ValueError,
            r"mask must have shape \[B, offset_groups\*kh\*kw, H_out, W_out\] = \[2, 9, 8, 8\] \(offset_groups = 1",
        ),
        (dict(mask=torch.randn(2, 9, 8)), ValueError, r"mask must be a 4-D tensor"),
        (dict(mask=torch.randn(2, 9, 8, 8, dtype=torch.float16)), TypeError, r"mask must have the dtype of input"),
        (dict(bias=torch.randn(5)), ValueError, r"bias must have shape \[C_out\] = \[6\], got \[5\]"),
        (dict(stride=0), ValueError, r"stride must be >= 1, got 0"),
        (dict(padding=-1), ValueError, r"padding must be >= 0, got -1"),
        (dict(dilation=(1, 1, 1)), TypeError, r"dilation must be an int or a pair of ints"),
        (
            dict(input=torch.randn(2, 4, 2, 2), offset=torch.randn(2, 18, 1, 1), padding=0),
            ValueError,
            r"too small for kernel_size \(3, 3\)",
        ),
        (dict(backend="cuda"), ValueError, r"backend must be one of"),
    ],
)
def test_bad_input_raises_named_error(kwargs, exc, match):
    args = _args()
    args.update(kwargs)
    with pytest.raises(exc, match=match):
        dynconv.deform_conv2d(**args)


def test_device_mismatch_raises_on_meta():
    args = _args()
    args["offset"] = args["offset"].to("meta")
    with pytest.raises(ValueError, match=r"offset must be on the device of input \(cpu\), got meta"):
        dynconv.deform_conv2d(**args)


@pytest.mark.skipif(not triton_available(), reason="triton is not installed")
@pytest.mark.skipif(
    torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"),
    reason="the triton tests of this file run in this process (CUDA or TRITON_INTERPRET=1)",
)
def test_triton_backend_under_interpreter():
    """Runs the triton tests of this file in a fresh process with TRITON_INTERPRET=1: the interpreter must be on
    before the kernels are defined, which this process (where other tests may have imported them) cannot promise."""
    root = Path(__file__).resolve().parent.parent
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(root))
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "triton", str(Path(__file__))]
    proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert " passed" in proc.stdout and "skipped" not in proc.stdout, proc.stdout[-2000:]


def test_explicit_triton_backend_on_cpu_says_why(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(dynconv.BackendError, match="triton"):
        dynconv.deform_conv2d(**_args(), backend="triton")


# ---------------------------------------------------------------------------------------------- modules


@pytest.mark.parametrize("cls", [dynconv.DeformConv2d, dynconv.ModulatedDeformConv2d])
@pytest.mark.parametrize(
    "kwargs",
    [dict(padding=1), dict(stride=2, padding=1, groups=2, offset_groups=2), dict(dilation=2, padding=2, bias=False)],
)
def test_fresh_layer_is_a_plain_convolution(cls, kwargs):
    layer = cls(4, 6, 3, **kwargs)
    x = torch.randn(2, 4, 11, 10)
    conv = dict(stride=layer.stride, padding=layer.padding, dilation=layer.dilation, groups=layer.groups)
    assert_close(layer(x), F.conv2d(x, layer.weight, layer.bias, **conv))


@pytest.mark.parametrize("cls", [dynconv.DeformConv2d, dynconv.ModulatedDeformConv2d])
def test_layer_learns_offsets(cls):
    """From the zero initialisation, gradients reach the offset predictor and a few steps reduce the loss of
    matching a one-pixel shift that a 1x1 convolution cannot express."""
    torch.manual_seed(0)
    layer = cls(2, 2, 1)
    with torch.no_grad():
        layer.weight.copy_(torch.eye(2).view(2, 2, 1, 1))
        layer.bias.zero_()
    x = F.avg_pool2d(torch.randn(4, 2, 16, 16), 5, 1, 2)  # smooth, so the loss is smooth in the offsets
    target = torch.roll(x, 1, dims=3)[..., 2:-2, 2:-2]
    opt = torch.optim.Adam(layer.conv_offset.parameters(), 2e-2)
    losses = []
    for _ in range(40):
        loss = F.mse_loss(layer(x)[..., 2:-2, 2:-2], target)
        opt.zero_grad()
        loss.backward()
        losses.append(loss.item())
        opt.step()
    assert layer.conv_offset.bias.grad.abs().sum() > 0
    assert losses[-1] < 0.5 * losses[0]


def test_modulated_layer_mask_scale_and_repr():
    layer = dynconv.ModulatedDeformConv2d(4, 6, 3, padding=1, offset_groups=2, mask_scale=1.0)
    x = torch.randn(1, 4, 7, 7)
    plain = F.conv2d(x, layer.weight, None, padding=1)
    assert_close(layer(x) - layer.bias.view(1, -1, 1, 1), 0.5 * plain)  # DCNv2's sigmoid: half a conv at start
    assert layer.conv_offset.out_channels == 3 * 2 * 9
    text = repr(layer).splitlines()[1]  # the layer's own line, not its conv_offset's
    assert "padding=(1, 1)" in text and "offset_groups=2" in text and "mask_scale=1.0" in text and "stride" not in text


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(groups=3), r"must be divisible by groups \(3\)"),
        (dict(offset_groups=3), r"in_channels \(4\) must be divisible by offset_groups \(3\)"),
        (dict(in_channels=0), r"in_channels must be >= 1"),
    ],
)
def test_layer_bad_arguments(kwargs, match):
    args = dict(in_channels=4, out_channels=6, kernel_size=3)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        dynconv.DeformConv2d(**args)


# ------------------------------------------------------------------------- Triton: on CUDA or in the interpreter

DEVICE = TRITON_DEVICE

# (B, C, C_out, H, W, k, G_off, G_w, stride, padding, dilation, mask, bias): tiny, for the interpreter.
TRITON_CASES = [
    (1, 4, 3, 5, 6, 3, 2, 1, 1, 1, 1, True, True),
    (2, 3, 2, 4, 5, (2, 3), 1, 1, (2, 1), (1, 0), 1, False, True),
    (1, 4, 4, 6, 5, 3, 1, 2, 1, 2, 2, True, False),
]


def make_tiny(case, dtype, spread=3.0, device=TRITON_DEVICE):
    B, C, Co, H, W, k, G_off, G_w, stride, padding, dilation, use_mask, use_bias = case
    kh, kw = (k, k) if isinstance(k, int) else k
    sh, sw = (stride, stride) if isinstance(stride, int) else stride
    ph, pw = (padding, padding) if isinstance(padding, int) else padding
    Ho = (H + 2 * ph - dilation * (kh - 1) - 1) // sh + 1
    Wo = (W + 2 * pw - dilation * (kw - 1) - 1) // sw + 1
    gen = torch.Generator().manual_seed(B * 1000 + C * 100 + H)
    x = torch.randn(B, C, H, 2 * W, generator=gen)[..., ::2]  # strided: the kernel reads any layout
    offset = spread * torch.randn(B, 2 * G_off * kh * kw, Ho, Wo, generator=gen)
    weight = torch.randn(Co, C // G_w, kh, kw, generator=gen)
    bias = torch.randn(Co, generator=gen) if use_bias else None
    mask = torch.rand(B, G_off * kh * kw, Ho, Wo, generator=gen) if use_mask else None
    tensors = [t if t is None else t.to(device, dtype).requires_grad_() for t in (x, offset, weight, bias, mask)]
    return tensors, dict(stride=stride, padding=padding, dilation=dilation)


@pytest.mark.parametrize("deterministic", [False, True])
@pytest.mark.parametrize("case", TRITON_CASES, ids=range(len(TRITON_CASES)))
def test_tiny_cases_match_reference(backend, case, deterministic, monkeypatch):
    device = "cpu"
    if backend == "triton":
        from dynconv.kernels import deform as kernels

        monkeypatch.setitem(kernels.CONFIG, "BLOCK_C", 2)  # several channel blocks, the last one partial
        device = TRITON_DEVICE
    tensors, geometry = make_tiny(case, torch.float32, device=device)
    out, got, gy = grads(tensors, geometry, backend, deterministic=deterministic)
    ref, expected, _ = grads(tensors, geometry, "reference", gy)
    assert_close(out, ref, rtol=1e-5, atol=1e-5)
    for g, e in zip(got, expected):
        assert_close(g, e, rtol=1e-5, atol=1e-4)


@pytest.mark.triton
@pytest.mark.skipif(DEVICE != "cpu", reason="views over 8 GB of address space: a CPU check")
@pytest.mark.parametrize("deterministic", [False, True])
def test_triton_past_int32_offsets_through_strides(deterministic):
    """Input, offset and mask with elements past 2**31 through their strides (views over a lazily allocated
    storage): offsets into them must be int64. Forward and all gradients against the reference."""
    from dynconv.testing import huge_strided, output_and_grads

    tensors, geometry = make_tiny((3, 3, 4, 5, 6, 3, 1, 1, 1, 1, 1, True, True), torch.float32)
    x, offset, weight, bias, mask = (t.detach() for t in tensors)
    # channel c of x, and image b of offset and mask, at element c * 2**30 or b * 2**30 of their storage
    huge = [huge_strided(x, 1), huge_strided(offset, 0), weight, bias, huge_strided(mask, 0)]
    results = {}
    for backend, tensors in (("triton", huge), ("reference", [t.contiguous() for t in huge])):
        kw = {"deterministic": deterministic} if backend == "triton" else {}

        def op(x, offset, weight, bias, mask, backend=backend, kw=kw):
            return dynconv.deform_conv2d(x, offset, weight, bias, mask=mask, **geometry, backend=backend, **kw)

        results[backend] = output_and_grads(op, tensors)
    assert huge[0].stride(1) == 2**30 and huge[1].stride(0) == 2**30
    for name, a, e in zip(("output", "input", "offset", "weight", "bias", "mask"), *results.values()):
        assert_close(a, e, rtol=1e-5, atol=1e-4, what=name if name == "output" else f"grad {name}")


@pytest.mark.triton
def test_triton_deterministic_flag_follows_torch(monkeypatch):
    """Under torch.use_deterministic_algorithms(True) the backward takes the sorted path: bitwise repeatable."""
    from dynconv.kernels import deform as kernels

    calls = record_last_argument(monkeypatch, kernels)
    tensors, geometry = make_tiny(TRITON_CASES[0], torch.float32)
    with deterministic_algorithms(True):
        first = grads(tensors, geometry, "triton")
        second = grads(tensors, geometry, "triton", first[2])
    with deterministic_algorithms(False):
        grads(tensors, geometry, "triton")
    assert calls == [True, True, False]
    for a, b in zip(first[1], second[1]):
        assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_tiny_case_low_precision(backend, dtype):
    tensors, geometry = make_tiny(TRITON_CASES[0], dtype, device=TRITON_DEVICE if backend == "triton" else "cpu")
    out, got, gy = grads(tensors, geometry, backend)
    assert out.dtype == dtype
    ref_lowp, expected_lowp, _ = grads(tensors, geometry, "reference", gy)
    ref32, expected32, _ = grads(
        [t.float() if t is not None else None for t in tensors], geometry, "reference", gy.float()
    )
    assert_close_lowp(out, ref_lowp, ref32)
    for name, g, lo, e in zip(("x", "offset", "weight", "bias", "mask"), got, expected_lowp, expected32):
        assert_close_lowp(g, lo, e, atol=2e-2 if name == "offset" else 1e-3, what=name)


@pytest.mark.triton
def test_triton_opcheck():
    """Schema, fake (meta) kernel and autograd registration of the custom op with the Triton backend."""
    tensors, geometry = make_tiny(TRITON_CASES[0], torch.float32)
    x, offset, weight, bias, mask = (t.detach().requires_grad_() for t in tensors)
    args = (x, offset, weight, bias, mask, [1, 1], [1, 1], [1, 1], "triton", False)
    torch.library.opcheck(torch.ops.dynconv.deform_conv2d.default, args)


_COMPILE_SCRIPT = r"""
import triton.language as tl

import dynconv.kernels._sampling as S
import dynconv.kernels.deform as K
from dynconv.testing import compile_ptx

geometry = dict(K.META, KH=3, KW=3, KR=9, P=1, ACC=tl.float32, INT64=False, BLOCK_R=16, BLOCK_C=32)
backward = dict(geometry, NEED_X=True, NEED_OFFSET=True, NEED_MASK=True)
variants = [
    (S.forward_kernel, "bf16", dict(geometry, HAS_MASK=True)),
    (S.forward_kernel, "fp32", dict(geometry, HAS_MASK=False)),
    (S.backward_kernel, "fp16", dict(backward, HAS_MASK=True, ATOMIC=True)),
    (S.backward_kernel, "fp32", dict(backward, HAS_MASK=True, ATOMIC=False)),
    (S.backward_kernel, "bf16", dict(backward, HAS_MASK=False, ATOMIC=True, NEED_MASK=False)),
]
fp32 = ("y_ptr", "gy_ptr", "gx_ptr", "goff_ptr", "gm_ptr", "scale_ptr")
print("compiled", compile_ptx(variants, {"idx_ptr": "*i64", **{n: "*fp32" for n in fp32}}))
"""


@pytest.mark.triton
@pytest.mark.slow
def test_kernels_compile_for_sm90_without_a_gpu():
    """The interpreter never runs Triton's compiler: compile every kernel variant to PTX for sm_90 (no GPU needed)."""
    assert "compiled 5" in run_without_interpreter(_COMPILE_SCRIPT)
