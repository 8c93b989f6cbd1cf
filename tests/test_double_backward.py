"""Double backward (a gradient of a gradient, as in a gradient penalty): the reference backends (and the ops built
on torch's own differentiable ops) give correct second derivatives, checked with gradgradcheck in float64; the
fast backends' hand-written backward ops refuse with an error that names the op and the backend to use."""

import pytest
import torch

import dynconv  # (without CUDA, tests/triton_setup.py has set TRITON_INTERPRET=1 before any test module is imported)

pytestmark = pytest.mark.usefixtures("one_thread")


def _inputs(op: str, dtype: torch.dtype = torch.float64):
    g = torch.Generator().manual_seed(0)
    r = lambda *s, scale=1.0: (torch.randn(*s, generator=g, dtype=dtype) * scale).requires_grad_()  # noqa: E731
    if op == "local_filter2d":
        return (r(1, 2, 5, 5), r(1, 1, 9, 5, 5)), dict(kernel_size=3, padding=1)
    if op == "sample_conv2d":
        return (r(2, 2, 5, 5), r(2, 3, 2, 3, 3)), dict(padding=1)
    if op == "deform_conv2d":
        return (r(1, 2, 3, 3), r(1, 18, 3, 3, scale=0.7), r(3, 2, 3, 3)), dict(padding=1)
    if op == "dcnv3":
        return (r(1, 3, 3, 2), r(1, 3, 3, 18, scale=0.7), r(1, 3, 3, 9)), dict(kernel_size=3, group=1)
    if op == "dcnv4":
        return (r(1, 3, 3, 2), r(1, 3, 3, 27, scale=0.7)), dict(kernel_size=3, group=1)
    if op == "warp":
        return (r(1, 2, 5, 5), r(1, 2, 5, 5, scale=1.3)), {}
    raise AssertionError(op)


SUPPORTED = [
    ("local_filter2d", "reference"),
    ("sample_conv2d", "reference"),
    ("sample_conv2d", "torch"),
    ("deform_conv2d", "reference"),
    ("dcnv3", "reference"),
    ("dcnv4", "reference"),
    ("warp", "reference"),
    ("warp", "torch"),
]
REFUSED = [
    ("local_filter2d", "torch", "'reference'"),
    ("local_filter2d", "triton", "'reference'"),
    ("deform_conv2d", "torch", "'reference'"),
    ("dcnv3", "torch", "'reference'"),
    ("dcnv4", "torch", "'reference'"),
    ("warp", "triton", "'torch' or 'reference'"),
]


@pytest.mark.parametrize("op, backend", SUPPORTED, ids=[f"{o}-{b}" for o, b in SUPPORTED])
def test_gradgradcheck(op, backend):
    inputs, kwargs = _inputs(op)
    fn = getattr(dynconv, op)
    assert torch.autograd.gradgradcheck(lambda *t: fn(*t, **kwargs, backend=backend), inputs, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("op, backend, instead", REFUSED, ids=[f"{o}-{b}" for o, b, _ in REFUSED])
def test_fast_backends_refuse_double_backward_by_name(op, backend, instead):
    if backend == "triton":
        pytest.importorskip("triton")
    inputs, kwargs = _inputs(op, torch.float32 if backend == "triton" else torch.float64)
    out = getattr(dynconv, op)(*inputs, **kwargs, backend=backend)
    grads = torch.autograd.grad(out.pow(2).sum(), inputs, create_graph=True)  # the first backward works
    penalty = sum(g.pow(2).sum() for g in grads)
    with pytest.raises(NotImplementedError, match=rf"dynconv\.\S*{op}.*no double backward.*backend={instead}"):
        penalty.backward()
