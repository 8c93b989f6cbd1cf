"""Every public op under ``torch.autocast``: the inputs are cast as ``F.conv2d`` (or, for ``warp``,
``F.grid_sample``) casts them, instead of failing the dtype check on a mix the user did not write."""

import pytest
import torch

import dynconv

LOW = torch.bfloat16


def _cases():
    """(name, op, inputs, widest): inputs in float32 with one of them already in bfloat16, the mix autocast
    produces when a conv's output (bf16) meets a float32 tensor."""
    g = torch.Generator().manual_seed(0)

    def r(*shape, dtype=torch.float32):
        return torch.randn(*shape, generator=g).to(dtype)

    B, C, H, W = 2, 4, 7, 6
    yield (
        "local_filter2d",
        lambda x, f: dynconv.local_filter2d(x, f, 3),
        [r(B, C, H, W), r(B, 2, 9, H, W, dtype=LOW)],
        False,
    )
    yield (
        "deform_conv2d",
        lambda x, o, w, b, m: dynconv.deform_conv2d(x, o, w, b, padding=1, mask=m),
        [r(B, C, H, W), r(B, 18, H, W, dtype=LOW), r(3, C, 3, 3), r(3), r(B, 9, H, W).sigmoid()],
        False,
    )
    yield (
        "sample_conv2d",
        lambda x, w, b: dynconv.sample_conv2d(x, w, b, padding=1),
        [r(B, C, H, W, dtype=LOW), r(B, 3, C, 3, 3), r(B, 3)],
        False,
    )
    yield (
        "dcnv3",
        lambda v, o, m: dynconv.dcnv3(v, o, m, 3, group=2),
        [r(B, H, W, C), r(B, H, W, 2 * 9 * 2, dtype=LOW), r(B, H, W, 2 * 9).softmax(-1)],
        False,
    )
    yield "dcnv4", lambda v, om: dynconv.dcnv4(v, om, 3, group=2), [r(B, H, W, C, dtype=LOW), r(B, H, W, 2 * 27)], False
    yield "warp", lambda x, fl: dynconv.warp(x, fl), [r(B, C, H, W), 2 * r(B, 2, H, W, dtype=LOW)], True


CASES = list(_cases())


@pytest.mark.parametrize("name,op,inputs,widest", CASES, ids=[c[0] for c in CASES])
def test_mixed_dtypes_fail_outside_autocast(name, op, inputs, widest):
    with pytest.raises(TypeError, match="must have the dtype of"):
        op(*inputs)


@pytest.mark.parametrize("name,op,inputs,widest", CASES, ids=[c[0] for c in CASES])
def test_autocast_casts_like_torch(name, op, inputs, widest):
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    with torch.autocast("cpu", dtype=LOW):
        out = op(*leaves)
    dtype = torch.float32 if widest else LOW
    assert out.dtype == dtype
    # The same op on inputs cast by hand, outside autocast: bit-for-bit equal.
    expected = op(*(t.detach().to(dtype) for t in inputs))
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    # Gradients reach every input in its own dtype.
    out.float().square().sum().backward()
    for t, leaf in zip(inputs, leaves):
        assert leaf.grad is not None and leaf.grad.dtype == t.dtype
        assert torch.isfinite(leaf.grad.float()).all()


def test_autocast_leaves_float64_alone():
    """Autocast never touches float64 (as in torch), so float64 mixed with bfloat16 still raises."""
    x = torch.randn(1, 2, 5, 5, dtype=torch.float64)
    f = torch.randn(1, 1, 9, 5, 5, dtype=torch.float32)
    with torch.autocast("cpu", dtype=LOW), pytest.raises(TypeError, match="filters must have the dtype of x"):
        dynconv.local_filter2d(x, f, 3)
    with torch.autocast("cpu", dtype=LOW):
        out = dynconv.local_filter2d(x, f.double(), 3)
    assert out.dtype == torch.float64


def test_modules_under_autocast():
    """A DFN-style model (a conv predicts bfloat16 filters that meet the float32 frame) and a DCNv2 layer run
    under autocast and stay close to their float32 results."""
    torch.manual_seed(0)
    x = torch.randn(2, 3, 9, 9)
    predictor = torch.nn.Conv2d(3, 25, 3, padding=1)
    layer = dynconv.DynamicLocalFilter2d(5, normalize="softmax")
    dcn = dynconv.ModulatedDeformConv2d(3, 5, 3, padding=1)
    for model in (lambda t: layer(t, predictor(t)), dcn):
        with torch.autocast("cpu", dtype=LOW):
            y = model(x)
        assert y.dtype == LOW
        torch.testing.assert_close(y.float(), model(x), rtol=0.05, atol=0.05)


def test_autocast_inside_torch_compile_fullgraph():
    torch._dynamo.reset()
    x, f = torch.randn(1, 2, 6, 6), torch.randn(1, 1, 9, 6, 6).to(LOW)

    def fn(x, f):
        with torch.autocast("cpu", dtype=LOW):
            return dynconv.local_filter2d(x, f, 3)

    compiled = torch.compile(fn, fullgraph=True, backend="eager")
    out = compiled(x, f)
    assert out.dtype == LOW
    torch.testing.assert_close(out, fn(x, f), rtol=0, atol=0)
