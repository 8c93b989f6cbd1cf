"""The Triton backend of deform_conv2d against the reference: on CUDA when present, else under TRITON_INTERPRET=1.

The interpreter must be switched on before the kernels are defined (``triton.jit`` reads ``TRITON_INTERPRET`` when
it decorates), so on a machine without CUDA these tests run only in a process started with it;
``test_deform.py::test_triton_backend_under_interpreter`` starts that process when the suite runs without it.
"""

import os

import pytest
import torch

import dynconv
from dynconv.backends import triton_available
from dynconv.testing import assert_close, assert_close_lowp

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

pytestmark = pytest.mark.skipif(
    not triton_available() or not (INTERPRET or torch.cuda.is_available()),
    reason="needs Triton and either CUDA or TRITON_INTERPRET=1 (test_deform.py starts such a process)",
)

# (B, C, C_out, H, W, k, G_off, G_w, stride, padding, dilation, mask, bias): tiny, for the interpreter.
CASES = [
    (1, 4, 3, 5, 6, 3, 2, 1, 1, 1, 1, True, True),
    (2, 3, 2, 4, 5, (2, 3), 1, 1, (2, 1), (1, 0), 1, False, True),
    (1, 4, 4, 6, 5, 3, 1, 2, 1, 2, 2, True, False),
]


def make(case, dtype, spread=3.0):
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
    tensors = [t if t is None else t.to(DEVICE, dtype).requires_grad_() for t in (x, offset, weight, bias, mask)]
    return tensors, dict(stride=stride, padding=padding, dilation=dilation)


def run(tensors, geometry, backend, grad_out=None, **kw):
    leaves = [t.detach().clone().requires_grad_() if t is not None else None for t in tensors]
    x, offset, weight, bias, mask = leaves
    out = dynconv.deform_conv2d(x, offset, weight, bias, mask=mask, backend=backend, **geometry, **kw)
    grad_out = torch.randn_like(out) if grad_out is None else grad_out
    return out, torch.autograd.grad(out, [t for t in leaves if t is not None], grad_out), grad_out


@pytest.mark.parametrize("deterministic", [False, True])
@pytest.mark.parametrize("case", CASES, ids=range(len(CASES)))
def test_triton_matches_reference(case, deterministic, monkeypatch):
    from dynconv.kernels import deform as kernels

    monkeypatch.setitem(kernels.CONFIG, "BLOCK_C", 2)  # several channel blocks, the last one partial
    tensors, geometry = make(case, torch.float32)
    out, got, gy = run(tensors, geometry, "triton", deterministic=deterministic)
    ref, expected, _ = run(tensors, geometry, "reference", gy)
    assert_close(out, ref, rtol=1e-5, atol=1e-5)
    for g, e in zip(got, expected):
        assert_close(g, e, rtol=1e-5, atol=1e-4)


@pytest.mark.skipif(DEVICE != "cpu", reason="views over 8 GB of address space: a CPU check")
@pytest.mark.parametrize("deterministic", [False, True])
def test_triton_past_int32_offsets_through_strides(deterministic):
    """Input, offset and mask with elements past 2**31 through their strides (views over a lazily allocated
    storage): offsets into them must be int64. Forward and all gradients against the reference."""
    from dynconv.testing import huge_strided, output_and_grads

    tensors, geometry = make((3, 3, 4, 5, 6, 3, 1, 1, 1, 1, 1, True, True), torch.float32)
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


def test_triton_deterministic_flag_follows_torch(monkeypatch):
    """Under torch.use_deterministic_algorithms(True) the backward takes the sorted path: bitwise repeatable."""
    from dynconv.kernels import deform as kernels

    calls = []
    original = kernels.backward

    def spy(*args):
        calls.append(args[-1])
        return original(*args)

    monkeypatch.setattr(kernels, "backward", spy)
    tensors, geometry = make(CASES[0], torch.float32)
    torch.use_deterministic_algorithms(True)
    try:
        first = run(tensors, geometry, "triton")
        second = run(tensors, geometry, "triton", first[2])
    finally:
        torch.use_deterministic_algorithms(False)
    run(tensors, geometry, "triton")
    assert calls == [True, True, False]
    for a, b in zip(first[1], second[1]):
        assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_triton_low_precision(dtype):
    tensors, geometry = make(CASES[0], dtype)
    out, got, gy = run(tensors, geometry, "triton")
    assert out.dtype == dtype
    ref_lowp, expected_lowp, _ = run(tensors, geometry, "reference", gy)
    ref32, expected32, _ = run(
        [t.float() if t is not None else None for t in tensors], geometry, "reference", gy.float()
    )
    assert_close_lowp(out, ref_lowp, ref32)
    for name, g, lo, e in zip(("x", "offset", "weight", "bias", "mask"), got, expected_lowp, expected32):
        assert_close_lowp(g, lo, e, atol=2e-2 if name == "offset" else 1e-3, what=name)


def test_triton_opcheck():
    """Schema, fake (meta) kernel and autograd registration of the custom op with the Triton backend."""
    tensors, geometry = make(CASES[0], torch.float32)
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


@pytest.mark.slow
def test_kernels_compile_for_sm90_without_a_gpu():
    """The interpreter never runs Triton's compiler: compile every kernel variant to PTX for sm_90 (no GPU needed)."""
    from dynconv.testing import run_without_interpreter

    assert "compiled 5" in run_without_interpreter(_COMPILE_SCRIPT)
