"""warp (flow warping): the torch backend and the Triton kernels (dynconv/kernels/warp.py) against the reference.

The Triton tests (mark ``triton``; on CUDA, else in the interpreter: see tests/triton_setup.py) keep to the tiny
``CASES``; the tests over the ``backend`` fixture run the torch backend on them too.
"""

import pytest
import torch
from triton_setup import INTERPRET, TRITON_DEVICE

import dynconv
from dynconv.backends import choose_backend
from dynconv.testing import (
    assert_close,
    assert_close_lowp,
    deterministic_algorithms,
    record_last_argument,
    run_without_interpreter,
)

DEVICE = TRITON_DEVICE


# ---------------------------------------------------------------------------------------------- torch

WARP_MODES = [(m, p) for m in ("bilinear", "nearest") for p in ("zeros", "border", "reflection")]


@pytest.mark.parametrize("mode, padding_mode", WARP_MODES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_warp_torch_matches_reference(mode, padding_mode, dtype):
    x = torch.randn(2, 3, 7, 9, dtype=dtype).requires_grad_()
    flow = (4 * torch.randn(2, 2, 7, 9, dtype=dtype)).requires_grad_()  # many samples fall outside
    out = dynconv.warp(x, flow, mode, padding_mode, backend="torch")
    gy = torch.randn_like(out)
    # "nearest" does not depend on the flow differentiably: its gradient is zero (None from the reference).
    got = torch.autograd.grad(out, (x, flow), gy, allow_unused=True, materialize_grads=True)
    ref = dynconv.warp(x, flow, mode, padding_mode, backend="reference")
    expected = torch.autograd.grad(ref, (x, flow), gy, allow_unused=True, materialize_grads=True)
    assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert_close(got[0], expected[0], rtol=1e-5, atol=1e-5, what="grad x")
    assert_close(got[1], expected[1], rtol=1e-4, atol=1e-4, what="grad flow")


def test_warp_zero_flow_is_identity_and_integer_flow_is_a_shift():
    x = torch.randn(2, 3, 6, 8)
    for backend in ("reference", "torch"):
        assert_close(dynconv.warp(x, torch.zeros(2, 2, 6, 8), backend=backend), x)
        flow = torch.zeros(2, 2, 6, 8)
        flow[:, 0], flow[:, 1] = 2.0, -1.0  # read from (h - 1, w + 2)
        out = dynconv.warp(x, flow, backend=backend)
        assert_close(out[..., 1:, :-2], x[..., :-1, 2:])
        # grid_sample's normalised coordinates round to within ~1e-7 pixel, so "outside" is zero to 1e-5 there.
        assert out[..., 0, :].abs().max() < 1e-5 and out[..., :, -2:].abs().max() < 1e-5
        border = dynconv.warp(x, flow, padding_mode="border", backend=backend)
        assert_close(border[..., 0, :-2], x[..., 0, 2:])  # the row above the image is the first row


def test_warp_definition_by_hand():
    """One output pixel, computed by hand: flow (dx, dy) = (0.25, 1.5) at (0, 0) reads rows 1-2, columns 0-1."""
    x = torch.arange(12.0, dtype=torch.float64).view(1, 1, 3, 4)
    flow = torch.zeros(1, 2, 3, 4, dtype=torch.float64)
    flow[0, 0, 0, 0], flow[0, 1, 0, 0] = 0.25, 1.5
    expected = 0.5 * (0.75 * x[0, 0, 1, 0] + 0.25 * x[0, 0, 1, 1]) + 0.5 * (0.75 * x[0, 0, 2, 0] + 0.25 * x[0, 0, 2, 1])
    for backend in ("reference", "torch"):
        assert dynconv.warp(x, flow, backend=backend)[0, 0, 0, 0].item() == pytest.approx(expected.item())


@pytest.mark.parametrize("padding_mode", ["zeros", "border", "reflection"])
@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_warp_gradcheck(padding_mode, backend):
    x = torch.randn(1, 2, 5, 6, dtype=torch.float64, requires_grad=True)
    flow = (2 * torch.randn(1, 2, 5, 6, dtype=torch.float64)).requires_grad_()
    assert torch.autograd.gradcheck(
        lambda x, f: dynconv.warp(x, f, padding_mode=padding_mode, backend=backend), (x, flow)
    )


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_warp_low_precision(dtype):
    x, flow = torch.randn(2, 3, 9, 10), 3 * torch.randn(2, 2, 9, 10)
    out = dynconv.warp(x.to(dtype), flow.to(dtype), backend="torch")
    assert out.dtype == dtype
    ref32 = dynconv.warp(x.to(dtype).float(), flow.to(dtype).float(), backend="reference")
    ref_lowp = dynconv.warp(x.to(dtype), flow.to(dtype), backend="reference")
    assert_close_lowp(out, ref_lowp, ref32)


def test_warp_axis_of_length_one():
    x, flow = torch.randn(1, 2, 1, 5), torch.randn(1, 2, 1, 5)
    flow[:, 1] = 0.3  # 0.7 of the only row
    assert_close(dynconv.warp(x, flow), dynconv.warp(x, flow, backend="reference"))
    assert_close(dynconv.warp(x, torch.zeros_like(flow)), x)


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        (dict(flow=torch.randn(2, 3, 6, 8)), ValueError, r"flow must have shape \[B, 2, H, W\] = \[2, 2, 6, 8\]"),
        (dict(flow=torch.randn(2, 2, 6, 7)), ValueError, r"flow must have shape .*got \[2, 2, 6, 7\]"),
        (dict(x=torch.randn(3, 6, 8)), ValueError, r"x must be a 4-D tensor"),
        (dict(flow=torch.randn(2, 2, 6, 8).double()), TypeError, r"flow must have the dtype of x"),
        (dict(mode="bicubic"), ValueError, r"mode must be one of \('bilinear', 'nearest'\), got 'bicubic'"),
        (dict(padding_mode="circular"), ValueError, r"padding_mode must be one of"),
        (dict(flow=torch.randn(2, 2, 6, 8, device="meta")), ValueError, r"flow must be on the device of x"),
    ],
)
def test_warp_bad_input(kwargs, exc, match):
    args = dict(x=torch.randn(2, 3, 6, 8), flow=torch.randn(2, 2, 6, 8))
    args.update(kwargs)
    with pytest.raises(exc, match=match):
        dynconv.warp(**args)


# ------------------------------------------------------------------------- Triton: on CUDA or in the interpreter

MODES = ["bilinear", "nearest"]
PADDING_MODES = ["zeros", "border", "reflection"]
# (B, C, H, W, layout of x): tiny, for the interpreter
CASES = [(2, 5, 7, 9, "strided"), (1, 3, 4, 11, "channels_last"), (2, 2, 1, 6, "contiguous")]


def make(case, dtype, spread=4.0, device=DEVICE):
    B, C, H, W, layout = case
    gen = torch.Generator().manual_seed(B * 1000 + C * 100 + H * 10 + W)
    if layout == "strided":
        x = torch.randn(B, C, H, 2 * W, generator=gen)[..., ::2]
    else:
        x = torch.randn(B, C, H, W, generator=gen)
    flow = spread * torch.randn(B, H, W, 2, generator=gen).permute(0, 3, 1, 2)  # non-contiguous, pushes outside
    x, flow = x.to(device, dtype), flow.to(device, dtype)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    return x, flow


def run(x, flow, mode, padding_mode, backend, grad_out=None, **kw):
    x, flow = x.detach().clone().requires_grad_(), flow.detach().clone().requires_grad_()
    out = dynconv.warp(x, flow, mode, padding_mode, backend=backend, **kw)
    grad_out = torch.randn_like(out) if grad_out is None else grad_out
    gx, gflow = torch.autograd.grad(out, (x, flow), grad_out, allow_unused=True)
    gflow = torch.zeros_like(flow) if gflow is None else gflow  # the reference's nearest never uses the flow
    return out, (gx, gflow), grad_out


@pytest.mark.parametrize("deterministic", [False, True])
@pytest.mark.parametrize("padding_mode", PADDING_MODES)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", CASES, ids=lambda c: "x".join(map(str, c[:4])) + c[4])
def test_tiny_cases_match_reference(backend, case, mode, padding_mode, deterministic, monkeypatch):
    device = "cpu"
    if backend == "triton":
        from dynconv.kernels import warp as kernels

        monkeypatch.setitem(kernels.CONFIG, "BLOCK_C", 2)  # several channel blocks, the last one partial
        monkeypatch.setitem(kernels.CONFIG, "BLOCK_P", 32)  # several pixel blocks, the last one partial
        device = DEVICE
    x, flow = make(case, torch.float32, device=device)
    out, got, gy = run(x, flow, mode, padding_mode, backend, deterministic=deterministic)
    ref, expected, _ = run(x, flow, mode, padding_mode, "reference", gy)
    assert out.shape == x.shape and out.dtype == x.dtype
    assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert_close(got[0], expected[0], rtol=1e-5, atol=1e-5, what="grad x")
    assert_close(got[1], expected[1], rtol=1e-5, atol=1e-4, what="grad flow")
    if mode == "nearest":
        assert torch.count_nonzero(got[1]) == 0


@pytest.mark.triton
@pytest.mark.skipif(DEVICE != "cpu", reason="views over 8 GB of address space: a CPU check")
@pytest.mark.parametrize("deterministic", [False, True])
@pytest.mark.parametrize("mode", MODES)
def test_triton_past_int32_offsets_through_strides(mode, deterministic):
    """x and flow with elements past 2**31 through their strides (views over a lazily allocated storage):
    offsets into them must be int64. Output and both gradients against the reference."""
    from dynconv.testing import huge_strided, output_and_grads

    x, flow = make((3, 3, 5, 6, "contiguous"), torch.float32)
    # channel c of x and image b of flow at element c * 2**30 or b * 2**30 of their storage
    huge = (huge_strided(x, 1), huge_strided(flow.contiguous(), 0))
    results = {}
    for backend, tensors in (("triton", huge), ("reference", [t.contiguous() for t in huge])):
        kw = {"deterministic": deterministic} if backend == "triton" else {}
        results[backend] = output_and_grads(lambda x, f: dynconv.warp(x, f, mode, backend=backend, **kw), tensors)
    for name, a, e in zip(("output", "grad x", "grad flow"), *results.values()):
        assert_close(a, e, what=name)


@pytest.mark.triton
def test_triton_integer_flow_is_an_exact_shift():
    x = torch.randn(2, 3, 6, 8, device=DEVICE)
    flow = torch.zeros(2, 2, 6, 8, device=DEVICE)
    flow[:, 0], flow[:, 1] = 2.0, -1.0  # read 2 columns right, 1 row up
    out = dynconv.warp(x, flow, backend="triton")
    assert torch.equal(out[:, :, 1:, :6], x[:, :, :5, 2:])
    assert torch.count_nonzero(out[:, :, 0]) == 0 and torch.count_nonzero(out[:, :, :, 6:]) == 0
    assert torch.equal(dynconv.warp(x, torch.zeros_like(flow), backend="triton"), x)


@pytest.mark.triton
def test_triton_deterministic_flag_follows_torch(monkeypatch):
    """Under torch.use_deterministic_algorithms(True) the backward takes the two-pass path: bitwise repeatable."""
    from dynconv.kernels import warp as kernels

    calls = record_last_argument(monkeypatch, kernels)
    x, flow = make(CASES[0], torch.float32)
    with deterministic_algorithms(True):
        first = run(x, flow, "bilinear", "zeros", "triton")
        second = run(x, flow, "bilinear", "zeros", "triton", first[2])
    with deterministic_algorithms(False):
        run(x, flow, "bilinear", "zeros", "triton")
    assert calls == [True, True, False]
    for a, b in zip(first[1], second[1]):
        assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("padding_mode", PADDING_MODES)
def test_tiny_case_low_precision(backend, dtype, padding_mode):
    x, flow = make(CASES[0], dtype, spread=2.0, device=DEVICE if backend == "triton" else "cpu")
    out, got, gy = run(x, flow, "bilinear", padding_mode, backend)
    assert out.dtype == dtype and got[0].dtype == dtype and got[1].dtype == dtype
    ref_lowp, expected_lowp, _ = run(x, flow, "bilinear", padding_mode, "reference", gy)
    ref32, expected32, _ = run(x.float(), flow.float(), "bilinear", padding_mode, "reference", gy.float())
    if backend == "triton" and INTERPRET and dtype == torch.bfloat16:
        # The interpreter converts fp32 -> bf16 in the kernel by truncation (toward zero; measured: 1.12356 ->
        # 1.1171875 where torch and the GPU give 1.125), so the output may be one bf16 ulp (2**-7 relative) off.
        assert_close(out.float(), ref32, rtol=2**-7 + 2**-9, atol=1e-3)
    else:
        assert_close_lowp(out, ref_lowp, ref32)
    assert_close_lowp(got[0], expected_lowp[0], expected32[0], what="grad x")
    assert_close_lowp(got[1], expected_lowp[1], expected32[1], atol=2e-2, what="grad flow")


@pytest.mark.triton
def test_triton_opcheck():
    """Schema, fake (meta) kernel and autograd registration of the Triton custom op."""
    x, flow = make(CASES[0], torch.float32)
    args = (x.requires_grad_(), flow.requires_grad_(), "bilinear", "reflection", False)
    torch.library.opcheck(torch.ops.dynconv.warp_triton.default, args)


@pytest.mark.triton
def test_triton_under_torch_compile():
    x, flow = make(CASES[0], torch.float32)
    fn = torch.compile(
        lambda a, b: dynconv.warp(a, b, padding_mode="border", backend="triton"), fullgraph=True, backend="aot_eager"
    )
    out, got, gy = run(x, flow, "bilinear", "border", "triton")
    xc, fc = x.clone().requires_grad_(), flow.clone().requires_grad_()
    compiled = fn(xc, fc)
    assert_close(compiled, out)
    for g, e in zip(torch.autograd.grad(compiled, (xc, fc), gy), got):
        assert_close(g, e)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_cuda_realistic_sizes(dtype):
    """Deep Feature Flow sizes (ResNet-101 conv5 features of a 1024x2048 frame: 1024 channels at 64x128)."""
    x, flow = make((2, 1024, 64, 128, "contiguous"), dtype, spread=6.0, device="cuda")
    assert choose_backend("warp", x, flow) == "triton"
    out, got, gy = run(x, flow, "bilinear", "zeros", "triton")
    ref_lowp, expected_lowp, _ = run(x, flow, "bilinear", "zeros", "reference", gy)
    ref32, expected32, _ = run(x.float(), flow.float(), "bilinear", "zeros", "reference", gy.float())
    if dtype == torch.float32:
        # The flash-attention rule one precision up (the flow gradient sums 1024 channels: a fixed tolerance
        # would assume small sizes).
        ref64, expected64, _ = run(x.double(), flow.double(), "bilinear", "zeros", "reference", gy.double())
        assert_close_lowp(out, ref32, ref64, atol=1e-5)
        assert_close_lowp(got[0], expected32[0], expected64[0], atol=1e-5, what="grad x")
        assert_close_lowp(got[1], expected32[1], expected64[1], atol=1e-4, what="grad flow")
    else:
        assert_close_lowp(out, ref_lowp, ref32)
        assert_close_lowp(got[0], expected_lowp[0], expected32[0], what="grad x")


_COMPILE_SCRIPT = r"""
import triton.language as tl

import dynconv.kernels._sampling as S
import dynconv.kernels.warp as K
from dynconv.testing import compile_ptx


def flags(mode, pad, **kw):
    meta = dict(K._rule(mode, pad).meta, KH=1, KW=1, KR=1, P=1, HAS_MASK=False, ACC=tl.float32, INT64=False)
    return dict(meta, BLOCK_R=64, BLOCK_C=32, **kw)


# One forward and one backward: every mode, padding, dtype and path is compiled by `dynconv check-kernels`
# (`make test`), with registers and spills.
variants = [
    (S.forward_kernel, "bf16", flags("bilinear", "reflection")),
    (S.backward_kernel, "fp32", flags("bilinear", "zeros", NEED_X=True, ATOMIC=False, NEED_OFFSET=1, NEED_MASK=0)),
]
fp32 = ("gx_ptr", "goff_ptr", "gm_ptr", "scale_ptr")
print("compiled", compile_ptx(variants, {"idx_ptr": "*i64", **{n: "*fp32" for n in fp32}}))
"""


@pytest.mark.triton
@pytest.mark.slow
def test_kernels_compile_for_sm90_without_a_gpu():
    """The interpreter never runs Triton's compiler: compile to PTX for sm_90 (no GPU needed)."""
    assert "compiled 2" in run_without_interpreter(_COMPILE_SCRIPT)


@pytest.mark.triton  # both: the reference failed on a GPU too
@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_bfloat16_zero_flow_is_identity_past_256_pixels(backend):
    """With zero flow the warp is the identity, exactly, in any dtype. The reference computed the gather index
    row * W + col in the positions' dtype: bf16 rounds integers past 256, so on a 20x20 image it read the wrong
    pixels, and at realistic sizes past the last one (``test_triton_cuda_realistic_sizes[bfloat16]`` failed
    with an index out of bounds on an H200)."""
    x = torch.randn(1, 3, 20, 20, device=DEVICE).to(torch.bfloat16).requires_grad_()
    flow = torch.zeros(1, 2, 20, 20, device=DEVICE, dtype=torch.bfloat16, requires_grad=True)
    out = dynconv.warp(x, flow, "bilinear", "zeros", backend=backend)
    gy = torch.randn_like(out)
    (gx,) = torch.autograd.grad(out, (x,), gy)
    assert torch.equal(out, x.detach())
    assert torch.equal(gx, gy)
