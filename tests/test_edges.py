"""Ops and layers at the edges of what ``F.conv2d`` takes: fake and meta tensors, numpy integer sizes, NaN/Inf in
every input on every backend, and ``DYNCONV_BACKEND=triton`` for what Triton cannot run.

The rules for non-finite values (documented in :func:`dynconv.warp` and :func:`dynconv.deform_conv2d`):

- A NaN or infinite input value or weight propagates through the arithmetic, as in ``F.conv2d``. A bilinear sample
  reads the corners that lie inside the image (even at weight 0, as torchvision and ``grid_sample`` do) and nothing
  outside it, so a non-finite pixel reaches exactly the samples whose in-image corners include it.
- A NaN or infinite sampling position (offset, flow) makes its bilinear sample NaN (``grid_sample``'s CPU rule for
  ``zeros`` padding), never an out-of-range index. ``warp`` with ``nearest``/``border``/``reflection`` follows
  ``grid_sample`` on the CPU: zero, the clipped position (NaN -> the first pixel), the first pixel.

Oracles: ``F.conv2d`` (local filtering with the same filter at every pixel, sample-specific convolution, deformable
convolution with zero offsets), ``F.grid_sample`` with a grid written here (warp), and, for the deformable sampling
ops, the reference backend once its rule is checked against an independent footprint computation.
"""

from __future__ import annotations

import linecache
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch._subclasses import FakeTensorMode

import dynconv
from dynconv import backends
from dynconv.backends import BackendError, BackendFallbackWarning

pytestmark = [
    pytest.mark.usefixtures("one_thread"),
    # numpy's "invalid value encountered" inside the Triton interpreter on the NaN/Inf inputs these tests give it.
    pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning"),
    pytest.mark.filterwarnings("ignore:Using padding=.same. with even kernel lengths:UserWarning"),  # F.conv2d oracle
]

NAN, INF = float("nan"), float("inf")
BACKENDS = ("reference", "torch", "triton")


def _rand(*shape, dtype=torch.float64, device="cpu"):
    return torch.randn(*shape, dtype=dtype, device=device)


# Each op: a function of (tensors, backend, int type) and the tensors it takes, tiny so the Triton interpreter
# launches one or two programs. ``n`` converts every size argument (int or np.int64).
def _local_filter(t, backend, n=int):
    return dynconv.local_filter2d(t["x"], t["filters"], n(3), stride=n(2), padding=n(1), dilation=n(1), backend=backend)


def _sample_conv(t, backend, n=int):
    return dynconv.sample_conv2d(t["x"], t["weight"], t["bias"], n(2), n(1), n(1), groups=n(2), backend=backend)


def _deform(t, backend, n=int):
    return dynconv.deform_conv2d(
        t["x"], t["offset"], t["weight"], t["bias"], n(2), n(1), n(1), t["mask"], backend=backend
    )


def _dcnv3(t, backend, n=int):
    return dynconv.dcnv3(t["x"], t["offset"], t["mask"], n(3), n(2), n(1), n(1), group=n(2), backend=backend)


def _dcnv4(t, backend, n=int):
    return dynconv.dcnv4(t["x"], t["offset_mask"], n(3), n(2), n(1), n(1), group=n(2), backend=backend)


def _warp(t, backend, n=int):
    return dynconv.warp(t["x"], t["flow"], backend=backend)


def _tensors(op, dtype=torch.float64, device="cpu"):
    r = lambda *s: _rand(*s, dtype=dtype, device=device)  # noqa: E731
    return {
        "local_filter2d": lambda: {"x": r(1, 2, 5, 5), "filters": r(1, 1, 9, 3, 3)},
        "sample_conv2d": lambda: {"x": r(2, 2, 5, 5), "weight": r(2, 4, 1, 3, 3), "bias": r(2, 4)},
        "deform_conv2d": lambda: {
            "x": r(1, 2, 5, 5),
            "offset": r(1, 18, 3, 3),
            "weight": r(2, 2, 3, 3),
            "bias": r(2),
            "mask": r(1, 9, 3, 3),
        },
        "dcnv3": lambda: {"x": r(1, 5, 5, 4), "offset": r(1, 3, 3, 36), "mask": r(1, 3, 3, 18)},
        "dcnv4": lambda: {"x": r(1, 5, 5, 4), "offset_mask": r(1, 3, 3, 56)},
        "warp": lambda: {"x": r(1, 2, 4, 5), "flow": r(1, 2, 4, 5)},
        "warp_1px": lambda: {"x": r(1, 2, 1, 5), "flow": r(1, 2, 1, 5)},
    }[op]()


OPS = {
    "local_filter2d": _local_filter,
    "sample_conv2d": _sample_conv,
    "deform_conv2d": _deform,
    "dcnv3": _dcnv3,
    "dcnv4": _dcnv4,
    "warp": _warp,
    "warp_1px": _warp,
}
# sample_conv2d has no Triton kernel; warp's and deform_conv2d's Triton kernels take no float64.
TRITON_DTYPE = {"warp": torch.float32, "warp_1px": torch.float32, "deform_conv2d": torch.float32}


def _backends(op):
    return [b for b in BACKENDS if not (op == "sample_conv2d" and b == "triton")]


def _assert_same_values(actual, expected, what, rtol=1e-5, atol=1e-6):
    """Equal non-finite positions (NaN vs +-inf may differ: that depends on the order of summation, as between
    F.conv2d algorithms) and close finite values."""
    a, e = actual.detach().double(), expected.detach().double()
    bad = a.isfinite() != e.isfinite()
    assert not bad.any(), f"{what}: non-finite at {bad.nonzero().tolist()[:6]} differ ({int(bad.sum())} elements)"
    fin = e.isfinite()
    torch.testing.assert_close(a[fin], e[fin], rtol=rtol, atol=atol, msg=lambda m: f"{what}: {m}")


# ----------------------------------------------------------------------------------------- integer sizes


@pytest.mark.parametrize("op", [o for o in OPS if not o.startswith("warp")])
def test_numpy_integer_sizes_give_the_int_result(op):
    t = _tensors(op)
    assert torch.equal(OPS[op](t, "torch", np.int64), OPS[op](t, "torch", int))


@pytest.mark.parametrize(
    "value, accepted",
    [
        (np.int32(2), True),
        ((np.int64(2), 1), True),
        ([2, 1], True),
        ((2,), True),  # F.conv2d repeats a one-element sequence
        (torch.Size([2, 1]), True),
        (torch.tensor(2), True),
        (True, False),
        (2.0, False),
        (np.float64(2.0), False),
        (np.array([2, 1]), False),
        (torch.tensor([2, 1]), False),
        ((2, 1, 1), False),
        ("2", False),
    ],
    ids=repr,
)
def test_stride_accepted_and_refused_as_by_conv2d(value, accepted):
    x, w = _rand(1, 2, 5, 5), _rand(1, 2, 2, 3, 3)

    def conv():
        return F.conv2d(x, w[0], stride=value)

    def ours():
        return dynconv.sample_conv2d(x, w, stride=value)

    if accepted:
        assert torch.equal(ours(), conv())
    else:
        with pytest.raises((TypeError, RuntimeError)):
            conv()
        with pytest.raises(TypeError, match=r"stride must be an int or a pair of ints, got"):
            ours()


def test_numpy_groups_and_group_and_float32_offset_scale():
    t = _tensors("dcnv3")
    expected = dynconv.dcnv3(t["x"], t["offset"], t["mask"], 3, 2, 1, 1, group=2, offset_scale=0.5)
    got = dynconv.dcnv3(t["x"], t["offset"], t["mask"], 3, 2, 1, 1, group=np.int8(2), offset_scale=np.float32(0.5))
    assert torch.equal(got, expected)
    with pytest.raises(TypeError, match=r"groups must be an int, got True"):
        dynconv.sample_conv2d(_rand(1, 2, 5, 5), _rand(1, 2, 2, 3, 3), groups=True)


# ----------------------------------------------------------------------------------- fake and meta tensors


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", list(OPS))
def test_fake_tensors_propagate_shapes(op, backend):
    """Shape propagation without data, as torch.compile traces: the shape and dtype of the real call, and a
    backward; ``backend="triton"`` on the CPU is the interpreter's (the fake kernel runs, no kernel)."""
    dtype = TRITON_DTYPE.get(op, torch.float64) if backend == "triton" else torch.float64
    real = _tensors(op, dtype)
    if backend == "triton" and op == "sample_conv2d":
        with FakeTensorMode() as mode, pytest.raises(BackendError, match="no kernel for this op"):
            OPS[op]({k: mode.from_tensor(v) for k, v in real.items()}, backend)
        return
    expected = OPS[op](real, "torch")
    with FakeTensorMode() as mode:
        fake = {k: mode.from_tensor(v).requires_grad_() for k, v in real.items()}
        out = OPS[op](fake, backend)
        out.sum().backward()
    assert isinstance(out, torch._subclasses.FakeTensor)
    assert (out.shape, out.dtype) == (expected.shape, expected.dtype)
    assert all(v.grad.shape == v.shape for v in fake.values())


@pytest.mark.parametrize("backend", ["reference", "torch", None])
@pytest.mark.parametrize("op", list(OPS))
def test_meta_tensors_propagate_shapes(op, backend):
    """Meta tensors (a model built under ``torch.device("meta")``) run forward and backward; they failed in the
    autocast check before any op ran."""
    expected = OPS[op](_tensors(op), "torch")
    meta = {k: v.requires_grad_() for k, v in _tensors(op, device="meta").items()}
    out = OPS[op](meta, backend)
    out.sum().backward()
    assert out.device.type == "meta" and (out.shape, out.dtype) == (expected.shape, expected.dtype)
    assert all(v.grad.shape == v.shape for v in meta.values())


def test_meta_tensors_refuse_an_explicit_triton_backend_with_the_reason():
    with pytest.raises(BackendError, match=r"needs CUDA tensors .* got tensors on \['meta'\]"):
        _local_filter(_tensors("local_filter2d", device="meta"), "triton")


# ------------------------------------------------------------------------------------------ NaN and Inf


def _poison(t, name, value, index=4):
    t = {k: v.clone() for k, v in t.items()}
    t[name].view(-1)[index] = value
    return t


def _oracle(op, t):
    """The result by an independent formula: F.conv2d, F.grid_sample with a grid written here, or (for the
    deformable sampling ops, checked against a footprint in the tests below) the reference backend."""
    if op == "local_filter2d":  # the filters are one per pixel: F.conv2d per output pixel on the unfolded input
        cols = F.unfold(t["x"], 3, padding=1, stride=2).view(1, 2, 9, 3, 3)
        return (cols * t["filters"]).sum(2)  # plain products: 0 * NaN in the padding is NaN, as in F.conv2d
    if op == "sample_conv2d":
        return torch.cat([F.conv2d(t["x"][b : b + 1], t["weight"][b], t["bias"][b], 2, 1, 1, 2) for b in range(2)])
    if op == "warp":
        return _grid_sample_warp(t["x"], t["flow"], "bilinear", "zeros")
    return OPS[op](t, "reference")


def _grid_sample_warp(x, flow, mode, padding_mode):
    _, _, H, W = x.shape
    gx = (torch.arange(W, dtype=flow.dtype) + flow[:, 0]) * 2 / (W - 1) - 1
    gy = (torch.arange(H, dtype=flow.dtype).view(H, 1) + flow[:, 1]) * 2 / (H - 1) - 1
    return F.grid_sample(x, torch.stack((gx, gy), -1), mode=mode, padding_mode=padding_mode, align_corners=True)


NONFINITE_CASES = [
    (op, name, value, backend)
    for op in OPS
    for name in _tensors(op)
    if name != "bias"
    for value in (NAN, INF)
    if not (op == "local_filter2d" and name == "filters" and value == INF)  # covered by NaN: no new rule
    for backend in _backends(op)
    # dcnv4 runs dcnv3's kernel: on the (slow) interpreter only its own offset_mask layout is new.
    if not (op == "dcnv4" and backend == "triton" and (name, value) != ("offset_mask", NAN))
]


@pytest.mark.parametrize(
    "op, name, value, backend", NONFINITE_CASES, ids=["-".join(map(str, c)) for c in NONFINITE_CASES]
)
def test_nonfinite_inputs_propagate_on_every_backend(op, name, value, backend):
    """No crash (the reference backend of deform_conv2d and warp, and warp on a one-pixel-wide input, raised an
    int64-overflow index error on a NaN offset or flow) and the non-finite outputs of the oracle."""
    dtype = TRITON_DTYPE.get(op, torch.float64) if backend == "triton" else torch.float64
    t = _poison(_tensors(op, dtype), name, value)
    out = OPS[op](t, backend)
    expected = _oracle(op, {k: v.double() for k, v in t.items()})
    assert not expected.isfinite().all(), "the poisoned element must reach the output"
    _assert_same_values(out, expected.to(out.dtype), f"{op} {name}={value} {backend}")


@pytest.mark.parametrize("value", [NAN, INF, -INF])
def test_nonfinite_offset_poisons_only_its_output_pixel(value):
    """deform_conv2d's rule, from the definition: a non-finite offset of output pixel p gives NaN at p (all output
    channels: the weight mixes them) and changes no other output (reference, torch and Triton backends)."""
    t = _tensors("deform_conv2d", torch.float32)
    clean = _deform(t, "reference")
    bad = _poison(t, "offset", value, index=2 * 9 + 4)  # offset channel 2 (tap 1's dy) at output pixel (1, 1)
    for backend in BACKENDS:
        out = _deform(bad, backend)
        assert out[0, :, 1, 1].isnan().all(), backend
        keep = torch.ones_like(out, dtype=torch.bool)
        keep[0, :, 1, 1] = False
        torch.testing.assert_close(out[keep], clean[keep], msg=lambda m: f"{backend}: {m}")  # noqa: B023


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("pixel", [(0, 0), (2, 4), (4, 4), (2, 2)])
def test_nonfinite_pixel_reaches_the_bilinear_footprint_only(backend, pixel):
    """With zero offsets a tap samples pixel q exactly and reads its right, lower and lower-right neighbours at
    weight 0 (torchvision's rule: in-image corners only). So an infinite pixel p poisons the taps at p, p - (0, 1),
    p - (1, 0) and p - (1, 1); the footprint is F.conv2d of that indicator. Before, the reference and torch
    backends also read a clamped border pixel for corners outside the image (0 * inf = NaN)."""
    t = _tensors("deform_conv2d", torch.float32)
    t["offset"].zero_()
    t["mask"] = None
    t["x"][0, 1][pixel] = INF
    out = _deform(t, backend)
    poisoned = torch.zeros(1, 1, 5, 5)
    py, px = pixel
    for dy in (0, 1):
        for dx in (0, 1):
            if py - dy >= 0 and px - dx >= 0:
                poisoned[0, 0, py - dy, px - dx] = 1
    reach = F.conv2d(poisoned, torch.ones(1, 1, 3, 3), stride=2, padding=1)[0, 0] > 0
    assert torch.equal(~out[0].isfinite().all(0), reach), f"{backend}: {~out[0].isfinite()}"
    conv = F.conv2d(t["x"], t["weight"], t["bias"], 2, 1, 1)  # zero offsets: the same as F.conv2d where finite
    torch.testing.assert_close(out[0][:, ~reach], conv[0][:, ~reach])


def _far_sample(op, dtype):
    """Inputs of ``op`` with offsets/flow zero except one sample of output pixel (2, 2) moved ~7 pixels up-left,
    outside the image, and the output pixel (2, 2) of a run with x finite (what it must give)."""
    t = _tensors(op, dtype)
    if op == "deform_conv2d":
        t["offset"].zero_()
        t["offset"][0, 0:2, 2, 2] = -6.5  # tap 0 (dy, dx): position (4 - 1 - 6.5, ...) = (-3.5, -3.5)
    elif op == "dcnv3":
        t["offset"].zero_()
        t["offset"][0, 2, 2, 0:2] = -6.5  # group 0, point 0 (x, y): position (3 - 1 - 6.5, ...) = (-4.5, -4.5)
    else:
        t["flow"].zero_()
        t["flow"][0, :, 3, 4] = -7.5  # pixel (3, 4) reads (-4.5, -3.5)
    return t


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", ["deform_conv2d", "dcnv3", "warp"])
def test_sample_outside_the_image_reads_no_pixel(op, backend):
    """A bilinear sample whose four corners all lie outside the image contributes zero, whatever the border pixels
    hold (torchvision and grid_sample read no pixel for it). The reference backends, and the torch backend of
    deform_conv2d, read the corner clamped into the image times weight 0, so an infinite pixel at (0, 0) made it
    NaN."""
    dtype = TRITON_DTYPE.get(op, torch.float64) if backend == "triton" else torch.float64
    t = _far_sample(op, dtype)
    clean = OPS[op](t, backend)
    t["x"][0, 0, 0, 0] = INF  # pixel (0, 0), channel 0 (dcnv3 is channels-last)
    out = OPS[op](t, backend)
    pixel = {"warp": (0, slice(None), 3, 4), "dcnv3": (0, 2, 2)}.get(op, (0, slice(None), 2, 2))
    assert out[pixel].isfinite().all(), f"{op} {backend}: {out[pixel]}"
    torch.testing.assert_close(out[pixel], clean[pixel])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", ["bilinear", "nearest"])
@pytest.mark.parametrize("padding_mode", ["zeros", "border", "reflection"])
@pytest.mark.parametrize("value", [NAN, INF, -INF])
def test_nonfinite_flow_follows_grid_sample(backend, mode, padding_mode, value):
    """warp with a NaN or infinite flow gives what F.grid_sample gives on the CPU, in every mode."""
    x = torch.arange(40.0).view(1, 2, 4, 5)
    flow = torch.zeros(1, 2, 4, 5)
    flow[0, 0, 1, 1] = value  # dx of pixel (1, 1)
    flow[0, 1, 2, 3] = value  # dy of pixel (2, 3)
    out = dynconv.warp(x, flow, mode, padding_mode, backend=backend)
    _assert_same_values(out, _grid_sample_warp(x, flow, mode, padding_mode), f"{mode} {padding_mode} {value}")


@pytest.mark.parametrize("mode", ["bilinear", "nearest"])
@pytest.mark.parametrize("padding_mode", ["zeros", "border", "reflection"])
def test_nonfinite_flow_on_one_pixel_wide_input(mode, padding_mode):
    """The default (torch) backend runs the reference on a 1-pixel axis, which grid_sample cannot address: the
    same rule as along a wider axis (F.grid_sample on the input repeated to width 2 with the flow of the first
    column is the same warp)."""
    x = torch.arange(1.0, 9.0).view(1, 2, 4, 1)
    flow = torch.zeros(1, 2, 4, 1)
    flow[0, 1, 1, 0] = NAN  # dy
    flow[0, 1, 2, 0] = INF
    flow[0, 1, 3, 0] = 0.5
    out = dynconv.warp(x, flow, mode, padding_mode)
    expected = _grid_sample_warp(x.expand(1, 2, 4, 2), flow.expand(1, 2, 4, 2), mode, padding_mode)[..., :1]
    _assert_same_values(out, expected, f"{mode} {padding_mode}")


# ------------------------------------------------------------------------------ DYNCONV_BACKEND=triton


@pytest.fixture
def forget_fallback_warnings(monkeypatch):
    monkeypatch.setattr(backends, "_FALLBACK_WARNED", set())


FALLBACKS = [
    ("sample_conv2d", torch.float32, "1", r"sample_conv2d: the triton backend has no kernel for this op"),
    ("warp", torch.float64, "1", r"warp: the triton backend supports dtypes .* got \['torch.float64'\]"),
    ("local_filter2d", torch.float32, "0", r"local_filter2d: the triton backend needs CUDA tensors"),
]


@pytest.mark.usefixtures("forget_fallback_warnings")
@pytest.mark.parametrize("op, dtype, interpret, reason", FALLBACKS, ids=[f[0] for f in FALLBACKS])
def test_env_triton_falls_back_with_one_warning_per_op(monkeypatch, op, dtype, interpret, reason):
    """DYNCONV_BACKEND=triton is a preference for the whole program: an op Triton cannot run (no kernel, a dtype its
    kernels lack, CPU tensors without the interpreter) runs on the torch backend with one warning naming the reason;
    it raised before. ``backend="triton"`` still raises that reason."""
    # triton.jit reads TRITON_INTERPRET when it decorates, also Triton's own functions on its first import (which
    # torch may trigger in any op): import it before the variable changes.
    pytest.importorskip("triton.language")
    monkeypatch.setenv("TRITON_INTERPRET", interpret)
    t = _tensors(op, dtype)
    expected = OPS[op](t, "torch")
    monkeypatch.setenv("DYNCONV_BACKEND", "triton")
    with pytest.warns(BackendFallbackWarning, match=f"DYNCONV_BACKEND=triton: {reason}.*'torch' backend") as record:
        first = OPS[op](t, None)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a second call warns no more, whatever the warning filters
        second = OPS[op](t, None)
    assert len(record) == 1 and record[0].filename == __file__  # the caller's line, not dynconv's
    assert torch.equal(first, expected) and torch.equal(second, expected)
    with pytest.raises(BackendError, match=reason):
        OPS[op](t, "triton")


@pytest.mark.usefixtures("forget_fallback_warnings")
def test_env_triton_warns_once_per_op_and_runs_triton_where_it_can(monkeypatch):
    monkeypatch.setenv("DYNCONV_BACKEND", "triton")
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        _sample_conv(_tensors("sample_conv2d"), None)
        _warp(_tensors("warp"), None)  # float64: no Triton kernel
        _sample_conv(_tensors("sample_conv2d"), None)
        _warp(_tensors("warp", torch.float32), None)  # runs on Triton (the interpreter): nothing to warn about
    assert [str(w.message).split(":")[1].strip() for w in record] == ["sample_conv2d", "warp"]
    monkeypatch.setenv("DYNCONV_BACKEND", "bogus")
    with pytest.raises(ValueError, match=r"DYNCONV_BACKEND must be one of"):
        _warp(_tensors("warp"), None)


@pytest.mark.usefixtures("forget_fallback_warnings")
def test_env_triton_fallback_warning_points_at_the_line_calling_the_layer(monkeypatch):
    """Through a layer (nn.Module.__call__, the layer's forward, the op) the warning still names the user's line."""
    from dynconv import nn as dnn

    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setenv("DYNCONV_BACKEND", "triton")
    layer = dnn.DeformConv2d(2, 2, 3, padding=1)
    x = _rand(1, 2, 5, 5, dtype=torch.float32)
    with pytest.warns(BackendFallbackWarning, match="needs CUDA tensors") as record:
        layer(x)
    assert [(w.filename, w.lineno) for w in record] == [(__file__, record[0].lineno)]
    assert "layer(x)" in linecache.getline(__file__, record[0].lineno)


# ----------------------------------------------------------------------------------------------- layers


def _layers(n=int):
    """Every layer with a tiny geometry, its sizes built by ``n`` (int or np.int64), and a function making its
    inputs: ``(layer, inputs)``."""
    from dynconv import nn as dnn

    x = lambda *s: lambda: (_rand(*s, dtype=torch.float32),)  # noqa: E731
    return {
        "DynamicLocalFilter2d": (
            lambda: dnn.DynamicLocalFilter2d(n(3), n(1), n(1), n(1), normalize="softmax"),
            lambda: (_rand(1, 2, 5, 5, dtype=torch.float32), _rand(1, 1, 9, 5, 5, dtype=torch.float32)),
        ),
        "FilterGeneratingNetwork": (
            lambda: dnn.FilterGeneratingNetwork(n(2), n(3), n(1), (n(4),), stride=n(1)),
            x(1, 2, 5, 5),
        ),
        "Involution2d": (lambda: dnn.Involution2d(n(4), n(3), n(2), n(2), n(2)), x(1, 4, 6, 6)),
        "DynamicFilterLayer": (
            lambda: dnn.DynamicFilterLayer(n(2), n(4), n(3), n(1), n(1), n(1), n(2), hidden_channels=n(4)),
            x(2, 2, 5, 5),
        ),
        "DynamicMaskHead": (
            lambda: dnn.DynamicMaskHead(n(3), n(4), n(2), n(3), n(1)),
            lambda: (_rand(2, 3, 5, 5, dtype=torch.float32), _rand(2, 3 * 4 * 9 + 4 * 9 + 4 + 1, dtype=torch.float32)),
        ),
        "DynamicMultiScaleFilter": (lambda: dnn.DynamicMultiScaleFilter(n(2), n(2), (n(1), n(2))), x(2, 2, 5, 5)),
        "DynamicDilatedFilter": (
            lambda: dnn.DynamicDilatedFilter(n(4), n(2), None, n(3), (n(1), n(2)), n(2)),
            x(1, 4, 5, 5),
        ),
        "DeformConv2d": (lambda: dnn.DeformConv2d(n(2), n(4), n(3), n(2), n(1), n(1), n(2), n(2)), x(1, 2, 5, 5)),
        "ModulatedDeformConv2d": (lambda: dnn.ModulatedDeformConv2d(n(2), n(2), n(3), padding=n(1)), x(1, 2, 5, 5)),
        "DCNv3": (lambda: dnn.DCNv3(n(4), n(3), n(1), n(1), n(1), n(2)), x(1, 5, 5, 4)),
        "DCNv4": (lambda: dnn.DCNv4(n(4), n(3), n(1), n(1), n(1), n(2), dw_kernel_size=n(3)), x(1, 5, 5, 4)),
        "CondConv2d": (lambda: dnn.CondConv2d(n(2), n(4), n(3), n(1), n(1), num_experts=n(2)), x(2, 2, 5, 5)),
        "DynamicConv2d": (lambda: dnn.DynamicConv2d(n(2), n(4), n(3), n(1), n(1), num_experts=n(2)), x(2, 2, 5, 5)),
        "DyNetConv2d": (lambda: dnn.DyNetConv2d(n(2), n(4), n(3), n(1), n(1), num_experts=n(2)), x(2, 2, 5, 5)),
        "ODConv2d": (lambda: dnn.ODConv2d(n(2), n(4), n(3), n(1), n(1), num_experts=n(2)), x(2, 2, 5, 5)),
    }


LAYERS = list(_layers())


@pytest.mark.parametrize("name", LAYERS)
def test_layer_takes_numpy_integer_arguments(name):
    """np.int64 sizes (from a config read with numpy) build the same layer as ints: same output, same repr."""
    make_int, inputs = _layers(int)[name]
    make_np = _layers(np.int64)[name][0]
    torch.manual_seed(0)
    expected = make_int()
    torch.manual_seed(0)
    layer = make_np()
    assert repr(layer) == repr(expected)
    args = inputs()
    expected.eval(), layer.eval()
    torch.testing.assert_close(layer(*args), expected(*args), rtol=0, atol=0)


@pytest.mark.parametrize("name", LAYERS)
def test_layer_built_on_meta_then_materialised(name):
    """``torch.device("meta")`` construction (no memory, no initialisation cost) propagates shapes; ``to_empty`` +
    ``reset_parameters()`` then gives a working layer with every parameter and buffer initialised."""
    make, inputs = _layers()[name]
    args = inputs()
    expected = make().eval()(*args)
    with torch.device("meta"):
        layer = make().eval()
    out = layer(*(a.to("meta") for a in args))
    assert out.device.type == "meta" and out.shape == expected.shape
    layer.to_empty(device="cpu")
    with torch.no_grad():  # what to_empty leaves is arbitrary memory: make it NaN so a missed tensor shows
        for t in [*layer.parameters(), *layer.buffers()]:
            if t.is_floating_point():
                t.fill_(NAN)
    if hasattr(layer, "reset_parameters"):
        layer.reset_parameters()
    for what, t in [*layer.named_parameters(), *layer.named_buffers()]:
        assert t.is_floating_point() is False or t.isfinite().all(), f"{name}.{what} left uninitialised"
    assert layer(*args).isfinite().all()


@pytest.mark.parametrize("name", LAYERS)
def test_layer_under_fake_tensors(name):
    make, inputs = _layers()[name]
    layer = make()
    args = inputs()
    expected = layer(*args)
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        out = layer(*(mode.from_tensor(a).requires_grad_() for a in args))
        out.sum().backward()
    assert isinstance(out, torch._subclasses.FakeTensor) and out.shape == expected.shape


@pytest.mark.parametrize("name", LAYERS)
def test_layer_propagates_nan_without_crashing(name):
    make, inputs = _layers()[name]
    layer = make()
    args = inputs()
    args[0].view(-1)[3] = NAN
    out = layer(*args)
    assert out.isnan().any()


# ------------------------------------------------------------------------------------ padding strings


# Odd dilation * (k - 1) (k=2, or k=2 with dilation 3): F.conv2d pads one more row/column at the bottom/right.
PADDING_CASES = [
    (op, backend, k, dilation, padding)
    for op in ("local_filter2d", "sample_conv2d", "deform_conv2d")
    for backend in _backends(op)
    for k, dilation in [(2, 1), (3, 2), (2, 3)]
    for padding in ("same", "valid")
    # The interpreter costs ~1 s per call here: the Triton backends get one odd "same" and one "valid".
    if backend != "triton" or (k, dilation, padding) in [(2, 1, "same"), (3, 2, "valid")]
]


@pytest.mark.parametrize(
    "op, backend, k, dilation, padding", PADDING_CASES, ids=["-".join(map(str, c)) for c in PADDING_CASES]
)
def test_padding_strings_as_conv2d(op, backend, k, dilation, padding):
    """``padding="same"``/``"valid"`` as F.conv2d takes them (the odd extra row/column at the bottom/right); they
    raised a TypeError. Oracle: F.conv2d (the same filter at every pixel, per-sample weights, zero offsets)."""
    dtype = torch.float32 if backend == "triton" else torch.float64
    x = _rand(2, 2, 6, 7, dtype=dtype)
    if op == "local_filter2d":
        w = _rand(2, 1, k, k, dtype=dtype)
        expected = F.conv2d(x, w, None, 1, padding, dilation, 2)
        filters = w.view(1, 2, k * k, 1, 1).expand(2, 2, k * k, *expected.shape[-2:])
        out = dynconv.local_filter2d(x, filters, k, 1, padding, dilation, backend=backend)
    elif op == "sample_conv2d":
        w = _rand(2, 3, 2, k, k, dtype=dtype)
        expected = torch.cat([F.conv2d(x[b : b + 1], w[b], None, 1, padding, dilation) for b in range(2)])
        out = dynconv.sample_conv2d(x, w, None, 1, padding, dilation, backend=backend)
    else:
        w = _rand(3, 2, k, k, dtype=dtype)
        expected = F.conv2d(x, w, None, 1, padding, dilation)
        offset = torch.zeros(2, 2 * k * k, *expected.shape[-2:], dtype=dtype)
        out = dynconv.deform_conv2d(x, offset, w, None, 1, padding, dilation, backend=backend)
    torch.testing.assert_close(out, expected)


def test_padding_strings_refused_where_conv2d_refuses_them():
    x, w = _rand(1, 2, 5, 5), _rand(1, 2, 2, 3, 3)
    for padding, stride, message in [("same", 2, r"padding='same' needs stride 1"), ("full", 1, r"'valid' or 'same'")]:
        with pytest.raises(RuntimeError):
            F.conv2d(x, w[0], stride=stride, padding=padding)
        with pytest.raises(ValueError, match=message):
            dynconv.sample_conv2d(x, w, stride=stride, padding=padding)
        with pytest.raises(ValueError, match=message):
            dynconv.nn.DeformConv2d(2, 2, 3, stride=stride, padding=padding)


def test_layers_take_padding_strings():
    """A fresh DeformConv2d / DynamicFilterLayer is its static convolution, also with ``padding="same"`` and an even
    kernel (the offset predictor pads as nn.Conv2d, the op as F.conv2d: the same place)."""
    x = _rand(2, 2, 5, 6, dtype=torch.float32)
    deform = dynconv.nn.DeformConv2d(2, 3, 2, padding="same", dilation=1)
    torch.testing.assert_close(deform(x), F.conv2d(x, deform.weight, deform.bias, padding="same"))
    assert "padding='same'" in repr(deform)
    layer = dynconv.nn.DynamicFilterLayer(2, 3, 4, padding="same", dilation=1)
    assert layer(x).shape == (2, 3, 5, 6)
    local = dynconv.nn.DynamicLocalFilter2d(2, padding="same")
    assert local(x, _rand(2, 1, 4, 5, 6, dtype=torch.float32)).shape == x.shape


# Keyword arguments that build each layer; every size argument a layer has is then set to 0 and to -1 in turn.
_LAYER_KWARGS = {
    "DynamicLocalFilter2d": dict(kernel_size=3),
    "FilterGeneratingNetwork": dict(in_channels=2, kernel_size=3, hidden_channels=(4,)),
    "Involution2d": dict(channels=4, kernel_size=3, group_channels=2, reduction_ratio=2),
    "DynamicFilterLayer": dict(in_channels=2, out_channels=4, kernel_size=3, hidden_channels=4, cond_channels=3),
    "DynamicMaskHead": dict(in_channels=3, channels=4, num_layers=2, kernel_size=3, out_channels=1),
    "DynamicMultiScaleFilter": dict(in_channels=2, out_channels=2, kernel_sizes=(1, 3)),
    "DynamicDilatedFilter": dict(in_channels=4, out_channels=2, guide_channels=3, reduction=2),
    "DeformConv2d": dict(in_channels=2, out_channels=4, kernel_size=3, groups=2, offset_groups=2),
    "ModulatedDeformConv2d": dict(in_channels=2, out_channels=4, kernel_size=3, groups=2, offset_groups=2),
    "DCNv3": dict(channels=4, kernel_size=3, group=2, dw_kernel_size=3),
    "DCNv4": dict(channels=4, kernel_size=3, group=2, dw_kernel_size=3),
    "CondConv2d": dict(in_channels=2, out_channels=4, kernel_size=3, groups=2, num_experts=2),
    "DynamicConv2d": dict(in_channels=2, out_channels=4, kernel_size=3, num_experts=2, reduction=2, min_hidden=2),
    "DyNetConv2d": dict(in_channels=2, out_channels=4, kernel_size=3, num_experts=2, reduction=2, min_hidden=2),
    "ODConv2d": dict(in_channels=2, out_channels=4, kernel_size=3, num_experts=2, reduction=0.5, min_channels=2),
}
_SIZES = (
    "in_channels out_channels channels cond_channels guide_channels hidden_channels group_channels kernel_size "
    "stride dilation groups group offset_groups num_experts num_layers reduction reduction_ratio min_hidden "
    "min_channels dw_kernel_size"
).split()
_BAD_SIZES = [
    (name, arg, value)
    for name, kwargs in _LAYER_KWARGS.items()
    for arg in _SIZES
    if arg in kwargs or arg in ("stride", "dilation") and name not in ("DynamicMaskHead", "DynamicMultiScaleFilter")
    if not (arg == "dilation" and name in ("Involution2d", "FilterGeneratingNetwork", "DynamicDilatedFilter"))
    if not (arg == "stride" and name == "DynamicDilatedFilter")
    for value in (0, -1)
]


def test_every_layer_is_in_the_size_table():
    from dynconv import nn as dnn

    assert set(_LAYER_KWARGS) == set(LAYERS) <= set(dnn.__all__)


@pytest.mark.parametrize("name, arg, value", _BAD_SIZES, ids=[f"{n}-{a}={v}" for n, a, v in _BAD_SIZES])
def test_layer_refuses_a_size_below_one_naming_it(name, arg, value):
    """A channel count, kernel size, group count, expert count or ratio below 1 (ODConv's float ratio: <= 0) is
    refused at construction with a ValueError naming the argument, as ``nn.Conv2d`` does, instead of a
    ZeroDivisionError, a shape error deep inside, or a layer with no channels."""
    from dynconv import nn as dnn

    cls, kwargs = getattr(dnn, name), dict(_LAYER_KWARGS[name])
    kwargs[arg] = (value,) if isinstance(kwargs.get(arg), tuple) else value
    if name == "ODConv2d" and arg == "reduction":
        kwargs[arg] = float(value)
    cls(**_LAYER_KWARGS[name])  # the table's own arguments build the layer
    with pytest.raises(ValueError, match=rf"\b{arg}\b"):
        cls(**kwargs)
