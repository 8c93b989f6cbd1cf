"""The torch backend's one sampler (dynconv/ops/_sampling.py) against the reference's one sampler, and the
keyword-only ``backend``/``deterministic`` arguments of the ops."""

from __future__ import annotations

import pytest
import torch

import dynconv
from dynconv import reference
from dynconv.ops import _sampling
from dynconv.testing import assert_close, deterministic_algorithms


def _positions(N, P, H, W, spread, gen, dtype=torch.float64):
    """Random positions covering the image and up to ``spread`` pixels beyond every border, none an integer."""
    py = torch.rand(N, P, generator=gen, dtype=dtype) * (H - 1 + 2 * spread) - spread
    px = torch.rand(N, P, generator=gen, dtype=dtype) * (W - 1 + 2 * spread) - spread
    return py, px


@pytest.mark.parametrize("H, W", [(5, 7), (1, 6), (4, 1), (1, 1)])
def test_grid_engine_matches_reference_values_and_gradients(H, W):
    gen = torch.Generator().manual_seed(H * 10 + W)
    N, C, P = 2, 3, 40
    x = torch.randn(N, C, H, W, generator=gen, dtype=torch.float64, requires_grad=True)
    py, px = _positions(N, P, H, W, 2.5, gen)
    py.requires_grad_()
    px.requires_grad_()
    expected = reference._sample(x, py, px)  # [N, C, P]
    grid = _sampling.pixel_grid(px.detach(), py.detach(), H, W).view(N, 1, P, 2)
    got = _sampling.sample(x.detach(), grid).view(N, C, P)
    assert_close(got, expected)
    gy = torch.randn(N, C, P, generator=gen, dtype=torch.float64)
    gx_ref, gpy_ref, gpx_ref = torch.autograd.grad(expected, (x, py, px), gy)
    gx, gpos = _sampling.sample_backward(gy.view(N, C, 1, P), x.detach(), grid, True, True)
    assert_close(gx, gx_ref)
    assert_close(gpos.view(N, P, 2)[..., 0], gpx_ref)
    assert_close(gpos.view(N, P, 2)[..., 1], gpy_ref)


def test_grid_engine_deterministic_scatter_matches_grid_sample():
    # The scatter that replaces grid_sample's atomics off the CPU, run here on the CPU against grid_sample.
    gen = torch.Generator().manual_seed(3)
    N, C, H, W, P = 3, 4, 6, 5, 50
    x = torch.randn(N, C, H, W, generator=gen, dtype=torch.float64)
    py, px = _positions(N, P, H, W, 2.0, gen)
    py[0, :3] = torch.tensor([float("nan"), float("inf"), -float("inf")], dtype=torch.float64)
    grid = _sampling.pixel_grid(px, py, H, W).view(N, 1, P, 2)
    gy = torch.randn(N, C, 1, P, generator=gen, dtype=torch.float64)
    expected, _ = _sampling.sample_backward(gy, x, grid, True, False)
    assert_close(_sampling._scatter_grid(gy, x.shape, grid), expected)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_row_table_engine_matches_reference(dtype):
    gen = torch.Generator().manual_seed(7)
    N, C, H, W, P = 2, 5, 6, 9, 60
    x = torch.randn(N, C, H, W, generator=gen).to(dtype)
    py, px = _positions(N, P, H, W, 2.0, gen, torch.float32)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    table = _sampling.input_table(x, 0, N, 1, acc)  # [N*H*W + 1, C]
    first = (torch.arange(N) * (H * W)).view(N, 1)
    corners = _sampling.sampling_corners(py.to(acc), px.to(acc), H, W, first, outside=N * H * W)
    columns, scratch = torch.empty(N * P, C, dtype=acc), torch.empty(N * P, C, dtype=acc)
    _sampling.gather_rows(table, corners, None, columns, scratch)
    expected = reference._sample(x.to(acc), py.to(acc), px.to(acc))  # the reference in the accumulation dtype
    assert_close(columns.view(N, P, C).permute(0, 2, 1), expected)


@pytest.mark.parametrize("mode", ["bilinear", "nearest"])
@pytest.mark.parametrize("padding_mode", ["zeros", "border", "reflection"])
@pytest.mark.parametrize("H, W", [(7, 9), (1, 8), (6, 1)])
def test_warp_torch_matches_reference_every_mode(mode, padding_mode, H, W):
    gen = torch.Generator().manual_seed(H + W)
    x = torch.randn(2, 3, H, W, generator=gen, dtype=torch.float64, requires_grad=True)
    flow = (4 * torch.randn(2, 2, H, W, generator=gen, dtype=torch.float64)).requires_grad_()
    if mode == "nearest":  # keep positions away from the .5 ties, where the grid's rounding may go either way
        flow = (flow.detach().round() + 0.25).requires_grad_()
    out = dynconv.warp(x, flow, mode, padding_mode, backend="torch")
    ref = dynconv.warp(x, flow, mode, padding_mode, backend="reference")
    assert_close(out, ref)
    gy = torch.randn_like(out)
    (gx,) = torch.autograd.grad(out, x, gy)
    (gx_ref,) = torch.autograd.grad(ref, x, gy)
    assert_close(gx, gx_ref)
    if mode == "bilinear":
        (gf,) = torch.autograd.grad(dynconv.warp(x, flow, mode, padding_mode, backend="torch"), flow, gy)
        (gf_ref,) = torch.autograd.grad(dynconv.warp(x, flow, mode, padding_mode, backend="reference"), flow, gy)
        assert_close(gf, gf_ref)


def _half_steps(*shape, reach=3):
    """Random multiples of 0.5 in ``[-reach, reach]``: added to pixel centres, positions on pixel centres, on the
    borders, half a pixel past them and beyond."""
    steps = torch.arange(-2 * reach, 2 * reach + 1) / 2
    return steps[torch.randint(0, len(steps), shape, generator=torch.Generator().manual_seed(len(shape)))]


def test_nan_free_at_the_borders():
    # Positions exactly on the image borders (and half a pixel past them) with finite inputs: no NaN anywhere.
    torch.manual_seed(0)
    x = torch.randn(2, 4, 5, 5, requires_grad=True)
    weight = torch.randn(3, 4, 3, 3, requires_grad=True)
    offset = _half_steps(2, 18, 5, 5).requires_grad_()
    mask = torch.rand(2, 9, 5, 5, requires_grad=True)
    out = dynconv.deform_conv2d(x, offset, weight, padding=1, mask=mask, backend="torch")
    grads = torch.autograd.grad(out.sum(), (x, offset, weight, mask))
    assert all(t.isfinite().all() for t in (out, *grads))

    value = torch.randn(1, 5, 5, 8, requires_grad=True)
    off = _half_steps(1, 5, 5, 2 * 9 * 2).requires_grad_()
    mask = torch.rand(1, 5, 5, 2 * 9, requires_grad=True)
    y = dynconv.dcnv3(value, off, mask, group=2, backend="torch")
    grads = torch.autograd.grad(y.sum(), (value, off, mask))
    assert all(t.isfinite().all() for t in (y, *grads))

    for padding_mode in ("zeros", "border", "reflection"):
        flow = _half_steps(1, 2, 4, 6, reach=7).requires_grad_()
        xw = torch.randn(1, 3, 4, 6, requires_grad=True)
        y = dynconv.warp(xw, flow, padding_mode=padding_mode, backend="torch")
        grads = torch.autograd.grad(y.sum(), (xw, flow))
        assert all(t.isfinite().all() for t in (y, *grads)), padding_mode


def test_deform_offset_gradient_at_integer_positions_is_right_sided():
    # Zero offsets (a fresh layer) put every tap on a pixel centre: the offset gradient is the right-sided
    # derivative there, as in torchvision; the row-table engine keeps it exact in every dtype.
    # 7 pixels: grid_sample's normalisation would round pixel 0 to just below 0 there (left-sided, and zero).
    x = torch.arange(49.0).view(1, 1, 7, 7) ** 2  # x[r, c] = (7 r + c)^2: the two one-sided slopes differ
    weight = torch.ones(1, 1, 1, 1)
    offset = torch.zeros(1, 2, 7, 7, requires_grad=True)
    (g,) = torch.autograd.grad(dynconv.deform_conv2d(x, offset, weight, backend="torch").sum(), offset)
    v = x[0, 0]
    right_y = torch.cat([v[1:] - v[:-1], -v[-1:]])  # x[r + 1, c] - x[r, c], x past the last row is 0
    right_x = torch.cat([v[:, 1:] - v[:, :-1], -v[:, -1:]], 1)
    assert_close(g[0, 0], right_y)
    assert_close(g[0, 1], right_x)


# ------------------------------------------------------------------------------------------------ keywords


def _local_filter_inputs():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, 7, 6, generator=gen, requires_grad=True)
    f = torch.randn(2, 2, 9, 7, 6, generator=gen, requires_grad=True)
    return x, f


def _sample_conv_inputs():
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(2, 4, 7, 6, generator=gen, requires_grad=True)
    w = torch.randn(2, 6, 2, 3, 3, generator=gen, requires_grad=True)
    b = torch.randn(2, 6, generator=gen, requires_grad=True)
    return x, w, b


def test_backend_is_keyword_only_everywhere():
    x, f = _local_filter_inputs()
    with pytest.raises(TypeError, match="positional argument"):
        dynconv.local_filter2d(x, f, 3, 1, 1, 1, "torch")
    x, w, b = _sample_conv_inputs()
    with pytest.raises(TypeError, match="positional argument"):
        dynconv.sample_conv2d(x, w, b, 1, 1, 1, 2, "torch")
    with pytest.raises(TypeError, match="positional argument"):
        dynconv.warp(torch.randn(1, 1, 3, 3), torch.zeros(1, 2, 3, 3), "bilinear", "zeros", "torch")
    with pytest.raises(TypeError, match="positional argument"):
        dynconv.deform_conv2d(x, torch.zeros(2, 18, 5, 4), w[0], None, 1, 0, 1, None, "torch")


@pytest.mark.parametrize("backend", ["torch", "reference"])
@pytest.mark.parametrize("deterministic", [None, True, False])
def test_deterministic_keyword_gives_bitwise_equal_runs(backend, deterministic):
    # Every backend of these two ops is deterministic already (gathers, F.conv2d on the CPU): the keyword is
    # accepted, changes nothing, and two runs agree bit for bit, outputs and gradients.
    def local_filter():
        x, f = _local_filter_inputs()
        out = dynconv.local_filter2d(x, f, 3, backend=backend, deterministic=deterministic)
        return (out, *torch.autograd.grad(out.square().sum(), (x, f)))

    def sample_conv():
        x, w, b = _sample_conv_inputs()
        out = dynconv.sample_conv2d(x, w, b, padding=1, groups=2, backend=backend, deterministic=deterministic)
        return (out, *torch.autograd.grad(out.square().sum(), (x, w, b)))

    for run in (local_filter, sample_conv):
        first, second = run(), run()
        assert all(torch.equal(a, b) for a, b in zip(first, second))
    x, f = _local_filter_inputs()
    plain = dynconv.local_filter2d(x, f, 3, backend=backend)
    assert torch.equal(dynconv.local_filter2d(x, f, 3, backend=backend, deterministic=deterministic), plain)


def test_deterministic_default_follows_torch_flag():
    x, w, b = _sample_conv_inputs()
    with deterministic_algorithms(True):
        out = dynconv.sample_conv2d(x, w, b, padding=1, groups=2, backend="torch")
        lf = dynconv.local_filter2d(*_local_filter_inputs(), 3, backend="torch")
    assert torch.equal(out, dynconv.sample_conv2d(x, w, b, padding=1, groups=2, backend="torch", deterministic=False))
    assert torch.equal(lf, dynconv.local_filter2d(*_local_filter_inputs(), 3, backend="torch", deterministic=False))


@pytest.mark.cuda
def test_cuda_deterministic_scatter_of_dcnv3_torch_backend():
    # On CUDA deterministic=True replaces grid_sample's atomic backward by the index_put_ scatter: the input
    # gradient equals the CPU's (deterministic there) and is bitwise equal across two runs.
    gen = torch.Generator().manual_seed(11)
    x = torch.randn(2, 7, 6, 8, generator=gen, dtype=torch.float64)
    off = 1.5 * torch.randn(2, 7, 6, 2 * 9 * 2, generator=gen, dtype=torch.float64)
    m = torch.randn(2, 7, 6, 2 * 9, generator=gen, dtype=torch.float64)

    def grad(device, **kw):
        t = x.to(device).requires_grad_()
        out = dynconv.dcnv3(t, off.to(device), m.to(device), kernel_size=3, group=2, backend="torch", **kw)
        (g,) = torch.autograd.grad(out, t, torch.ones_like(out))
        return g.cpu()

    first, second = grad("cuda", deterministic=True), grad("cuda", deterministic=True)
    assert torch.equal(first, second)
    assert_close(first, grad("cpu"))
