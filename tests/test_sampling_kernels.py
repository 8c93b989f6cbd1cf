"""The sampling core shared by the deformable, DCNv3/DCNv4 and warp Triton kernels (dynconv/kernels/_sampling.py):
the deterministic scatter of DCNv3/DCNv4 and the one int64-offset rule of every kernel family. On CUDA when
present, else under TRITON_INTERPRET=1 (tests/triton_setup.py switches it on before triton is imported)."""

import pytest
import torch
from triton_setup import TRITON_DEVICE

import dynconv
from dynconv.kernels import _launch as L
from dynconv.testing import assert_close, deterministic_algorithms, record_last_argument

DEVICE = TRITON_DEVICE
# The Triton tests of this file: conftest.py skips them where Triton cannot run and marks them gpu.
needs_triton = pytest.mark.triton

# DCNv3 on (B, H, W, G*Cg) = (2, 5, 6, 2*3), 3x3, offsets spread so that many corners fall outside and several
# points share corners (their contributions to grad input collide: the case atomics reorder).
DCN = dict(kernel_size=3, group=2, offset_scale=0.7)


def _dcn_inputs(dtype):
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, 5, 6, 6, generator=gen, dtype=torch.float64)
    off = 2.0 * torch.randn(2, 5, 6, 2 * 9 * 2, generator=gen, dtype=torch.float64)
    m = torch.randn(2, 5, 6, 2 * 9, generator=gen, dtype=torch.float64)
    return [t.to(DEVICE, dtype) for t in (x, off, m)]


def _dcn_grads(op, inputs, gy, **kw):
    leaves = [t.detach().requires_grad_() for t in inputs]
    if op == "dcnv4":  # the same sampling through DCNv4's packed offset_mask
        G, P = DCN["group"], 9
        om = torch.cat([leaves[1].unflatten(-1, (G, 2 * P)), leaves[2].unflatten(-1, (G, P))], -1).flatten(-2)
        out = dynconv.dcnv4(leaves[0], om, **DCN, **kw)
    else:
        out = dynconv.dcnv3(*leaves, **DCN, **kw)
    return torch.autograd.grad(out, leaves, gy)


@needs_triton
@pytest.mark.parametrize("op, dtype", [("dcnv3", torch.float32), ("dcnv4", torch.float64)])
def test_dcnv_deterministic_backward_matches_atomic_and_reference_and_repeats(op, dtype):
    inputs = _dcn_inputs(dtype)
    gy = torch.randn(2, 5, 6, 6, device=DEVICE, dtype=dtype)
    reference = _dcn_grads(op, inputs, gy, backend="reference")
    atomic = _dcn_grads(op, inputs, gy, backend="triton", deterministic=False)
    first = _dcn_grads(op, inputs, gy, backend="triton", deterministic=True)
    second = _dcn_grads(op, inputs, gy, backend="triton", deterministic=True)
    tol = {} if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-4)
    for name, d1, d2, a, r in zip(("input", "offset", "mask"), first, second, atomic, reference):
        assert torch.equal(d1, d2), f"grad {name}: deterministic backward differs between two runs"
        assert_close(d1, r, what=f"grad {name} (deterministic vs reference)", **tol)
        assert_close(d1, a, what=f"grad {name} (deterministic vs atomic)", **tol)


@needs_triton
def test_dcnv_deterministic_none_follows_torch_and_reaches_the_kernel(monkeypatch):
    from dynconv.kernels import dcnv as kernels

    seen = record_last_argument(monkeypatch, kernels)
    inputs = _dcn_inputs(torch.float32)
    gy = torch.randn(2, 5, 6, 6, device=DEVICE)
    with deterministic_algorithms(True):
        _dcn_grads("dcnv3", inputs, gy, backend="triton")
        _dcn_grads("dcnv4", inputs, gy, backend="triton", deterministic=False)  # an explicit value wins
    with deterministic_algorithms(False):
        _dcn_grads("dcnv4", inputs, gy, backend="triton")
        _dcn_grads("dcnv3", inputs, gy, backend="triton", deterministic=True)
    assert seen == [True, False, False, True]
    # the torch and reference backends take the keyword and ignore it
    for backend in ("torch", "reference"):
        assert_close(_dcn_grads("dcnv3", inputs, gy, backend=backend, deterministic=True)[0],
                     _dcn_grads("dcnv3", inputs, gy, backend="reference")[0], rtol=1e-4, atol=1e-4)  # fmt: skip


# ------------------------------------------------------------------------------------------ int64 rule


def test_needs_int64_is_decided_by_the_extent_through_the_strides(monkeypatch):
    """Meta tensors: shapes and strides without memory."""
    monkeypatch.setattr(L, "INTERPRETER_INT64", False)
    small = torch.empty((4, 3, 64, 64), device="meta")
    assert not L.needs_int64(small)
    assert not L.needs_int64(torch.empty_strided((2, 3), (2**29, 1), device="meta"))  # extent 2**29 + 3
    assert L.needs_int64(small, torch.empty_strided((3, 3), (2**29, 1), device="meta"))  # extent 2**30 + 3
    assert L.needs_int64(torch.empty((2**15, 2**15), device="meta"))  # 2**30 elements
    assert not L.needs_int64(torch.empty((0, 2**31), device="meta"))  # an empty tensor has no offset
    assert L.needs_int64(small, limit=64 * 64)


def _warp(backend, x, flow):
    return dynconv.warp(x, flow, "bilinear", "reflection", backend=backend)


def _deform(backend, x, offset, weight, mask):
    return dynconv.deform_conv2d(x, offset, weight, None, mask=mask, padding=1, backend=backend)


def _dcnv3(backend, x, offset, mask):
    return dynconv.dcnv3(x, offset, mask, backend=backend, **DCN)


def _local_filter(backend, x, filters):
    return dynconv.local_filter2d(x, filters, 3, padding=1, backend=backend)


def _cases():
    gen = torch.Generator().manual_seed(5)

    def r(*shape, scale=1.0):
        return (scale * torch.randn(*shape, generator=gen)).to(DEVICE)

    return {
        "warp": (_warp, [r(2, 3, 5, 6), r(2, 2, 5, 6, scale=3.0)]),
        "deform": (_deform, [r(1, 4, 5, 6), r(1, 2 * 9, 5, 6, scale=2.0), r(3, 4, 3, 3), r(1, 9, 5, 6)]),
        "dcnv3": (_dcnv3, _dcn_inputs(torch.float32)),
        "local_filter": (_local_filter, [r(1, 4, 5, 6), r(1, 1, 9, 5, 6)]),
    }


@needs_triton
@pytest.mark.parametrize("int64", [False, True], ids=["int32", "int64"])
@pytest.mark.parametrize("family", ["warp", "deform", "dcnv3", "local_filter"])
def test_every_kernel_family_takes_the_one_int64_rule(family, int64, monkeypatch):
    """Every launch of every family takes its INT64 switch from ``_launch.needs_int64``: forcing the rule either way
    runs that index path on small tensors (forward and every gradient against the reference; the interpreter checks
    the int32 path's arithmetic for overflow)."""
    asked = []

    def rule(*tensors, limit=2**30):
        asked.append(len(tensors))
        return int64

    monkeypatch.setattr(L, "needs_int64", rule)
    op, tensors = _cases()[family]
    results = {}
    for backend in ("triton", "reference"):
        leaves = [t.detach().requires_grad_() for t in tensors]
        out = op(backend, *leaves)
        results[backend] = (out, *torch.autograd.grad(out, leaves, torch.ones_like(out)))
    assert len(asked) >= 2  # forward and backward launches (the reference asks nothing)
    for name, a, e in zip(("output", "grad 0", "grad 1", "grad 2", "grad 3"), *results.values()):
        assert_close(a, e, rtol=1e-4, atol=1e-4, what=f"{family} {name}")


def test_the_interpreter_takes_int64_indices(monkeypatch):
    small = torch.empty((2, 3), device="meta")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert L.needs_int64(small)
    monkeypatch.setattr(L, "INTERPRETER_INT64", False)
    assert not L.needs_int64(small)
