"""DCNv3/DCNv4: the Triton kernels (dynconv/kernels/dcnv.py) against the bilinear reference.

Without a GPU the kernels run in Triton's interpreter on CPU tensors (set before the kernel module is imported,
as tests/test_local_filter_triton.py explains). The interpreter costs ~60-90 ms per program instance, so the
shapes are tiny: one program per (sample, group). With CUDA the same cases run on the GPU.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import dynconv  # noqa: E402
from dynconv.backends import triton_interpret  # noqa: E402
from dynconv.testing import assert_close, assert_close_lowp, run_without_interpreter  # noqa: E402

pytest.importorskip("triton")

if triton_interpret():
    DEVICE = "cpu"
elif torch.cuda.is_available():
    DEVICE = "cuda"
else:
    pytest.skip("TRITON_INTERPRET is set to 0 and there is no CUDA device", allow_module_level=True)

kernels = pytest.importorskip("dynconv.kernels.dcnv")

# (B, H, W, G, C/G, k, stride, dilation, padding, offset_scale, remove_center)
CASES = [
    (1, 6, 7, 2, 3, 3, 1, 1, None, 0.8, False),
    (2, 5, 4, 1, 4, 3, 2, 1, 0, 1.0, True),
    (1, 7, 5, 2, 2, (3, 5), (1, 2), (2, 1), None, 2.0, False),
]


def make_inputs(case, dtype, seed=0):
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
    return [t.to(DEVICE, dtype) for t in (x, off, m)], dict(kwargs, remove_center=rc)


def fwd_bwd(backend, inputs, kwargs, grad_out=None):
    inputs = [t.detach().requires_grad_() for t in inputs]
    out = dynconv.dcnv3(*inputs, backend=backend, **kwargs)
    grad_out = torch.randn_like(out) if grad_out is None else grad_out
    return out, torch.autograd.grad(out, inputs, grad_out), grad_out


@pytest.mark.parametrize(
    "case, dtype",
    [(CASES[0], torch.float64), (CASES[1], torch.float32), (CASES[2], torch.float64)],
    ids=["k3-fp64", "stride2-remove-center-fp32", "k3x5-dilated-fp64"],
)
def test_triton_matches_reference(case, dtype):
    inputs, kwargs = make_inputs(case, dtype)
    out, grads, gy = fwd_bwd("triton", inputs, kwargs)
    ref, ref_grads, _ = fwd_bwd("reference", inputs, kwargs, gy)
    tol = {} if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-4)
    assert_close(out, ref, what="output", **tol)
    for name, a, e in zip(("input", "offset", "mask"), grads, ref_grads):
        assert_close(a, e, what=f"grad {name}", **tol)


def test_triton_deterministic_mode_matches_and_repeats():
    inputs, kwargs = make_inputs(CASES[0], torch.float32, seed=1)
    _, ref_grads, gy = fwd_bwd("reference", inputs, kwargs)
    torch.use_deterministic_algorithms(True)
    try:
        _, first, _ = fwd_bwd("triton", inputs, kwargs, gy)
        _, second, _ = fwd_bwd("triton", inputs, kwargs, gy)
    finally:
        torch.use_deterministic_algorithms(False)
    for a, b, e in zip(first, second, ref_grads):
        assert torch.equal(a, b)
        assert_close(a, e, rtol=1e-4, atol=1e-4)


def test_triton_bfloat16_and_dcnv4_layout():
    inputs, kwargs = make_inputs(CASES[0], torch.bfloat16, seed=2)
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
    if DEVICE != "cuda":
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


@pytest.mark.slow
def test_kernels_compile_for_sm90_without_a_gpu():
    """The interpreter never runs Triton's compiler: compile the kernels to PTX/cubin for sm_90 (no GPU needed)."""
    assert "compiled 3" in run_without_interpreter(_COMPILE_SCRIPT)


def test_no_python_float_reaches_the_kernels(monkeypatch):
    """Triton passes a Python float argument as fp32 on a GPU but keeps it fp64 in the interpreter: offset_scale
    passed that way cost the fp64 kernels 8 digits on an H200 (``test_triton_matches_reference[k3-fp64]``, scale
    0.8, failed there and passed here). Every float must reach the kernels as a tensor of the accumulation dtype."""
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
    inputs, kwargs = make_inputs(CASES[0], torch.float64)
    out, grads, gy = fwd_bwd("triton", inputs, kwargs)
    assert seen == [[], []]  # forward and backward launched, neither with a float argument
    ref, ref_grads, _ = fwd_bwd("reference", inputs, kwargs, gy)
    assert_close(out, ref)
