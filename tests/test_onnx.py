"""ONNX export (dynconv.onnx): every custom op's translation, run by ONNX Runtime, against the eager model.

Each model is exported with its batch (and, where the op allows, its spatial size) dynamic, then run at the
traced size and at another one, so a translation that bakes a traced size into the graph fails.
"""

import logging
import warnings

import pytest
import torch
from torch import nn

import dynconv
from dynconv.models import resnet18

pytest.importorskip("onnxscript", reason="ONNX export needs the optional package onnxscript (dynconv[onnx])")
ort = pytest.importorskip("onnxruntime", reason="running the exported graphs needs onnxruntime (dynconv[onnx])")

import dynconv.onnx  # noqa: E402


@pytest.fixture(autouse=True)
def _quiet_exporter():
    # The exporter logs its progress and warns that torchvision (not a dependency) is missing.
    logging.disable(logging.WARNING)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield
    logging.disable(logging.NOTSET)


class Fn(nn.Module):
    """A module that calls ``fn(*inputs, **kwargs)``, to export a bare op."""

    def __init__(self, fn, **kwargs):
        super().__init__()
        self.fn, self.kwargs = fn, kwargs

    def forward(self, *inputs):
        return self.fn(*inputs, **self.kwargs)


def export_and_compare(model, inputs, dynamic_shapes=None, other_inputs=(), expected=None, atol=1e-5, rtol=1e-4):
    """Export ``model``, run the graph in ONNX Runtime on ``inputs`` and each of ``other_inputs``, and compare
    with ``expected(*inputs)`` (default: the model itself) in eager mode."""
    model = model.eval()
    if isinstance(model, Fn) and dynamic_shapes is not None:
        dynamic_shapes = (tuple(dynamic_shapes),)  # Fn.forward takes *inputs: one argument, a tuple
    program = dynconv.onnx.export(model, tuple(inputs), dynamic_shapes=dynamic_shapes, verbose=False)
    session = ort.InferenceSession(program.model_proto.SerializeToString(), providers=["CPUExecutionProvider"])
    expected = expected or model
    for feed in (inputs, *other_inputs):
        names = [i.name for i in session.get_inputs()]
        got = session.run(None, {n: t.detach().numpy() for n, t in zip(names, feed)})
        with torch.no_grad():
            want = expected(*feed)
        want = list(want) if isinstance(want, tuple) else [want]
        assert len(got) == len(want)
        for g, w in zip(got, want):
            torch.testing.assert_close(torch.from_numpy(g), w, atol=atol, rtol=rtol)
    return program


def _randomise(module: nn.Module, std: float) -> nn.Module:
    """Give the zero-initialised offset/modulation predictors random weights, so offsets are not zero."""
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if any(key in name for key in ("offset", "mask")):
                p.copy_(torch.randn(p.shape, generator=gen) * std)
    return module


batch = torch.export.Dim("batch", min=1, max=64)
height = torch.export.Dim("height", min=4, max=256)
width = torch.export.Dim("width", min=4, max=256)


@pytest.mark.parametrize(
    "kernel_size, stride, padding, dilation, groups",
    [(3, 1, None, 1, 1), (5, 2, 1, 1, 2), ((3, 5), (2, 1), (0, 2), (1, 2), 3), (9, 1, None, 1, 6)],
)
def test_local_filter2d(kernel_size, stride, padding, dilation, groups):
    torch.manual_seed(0)
    kh, kw = (kernel_size, kernel_size) if isinstance(kernel_size, int) else kernel_size
    model = Fn(dynconv.local_filter2d, kernel_size=kernel_size, stride=stride, padding=padding, dilation=dilation)

    def make(B, H, W):
        x = torch.randn(B, 6, H, W)
        sh, sw = (stride, stride) if isinstance(stride, int) else stride
        dh, dw = (dilation, dilation) if isinstance(dilation, int) else dilation
        if padding is None:
            ph, pw = (kh - 1) // 2 * dh, (kw - 1) // 2 * dw
        else:
            ph, pw = (padding, padding) if isinstance(padding, int) else padding
        Ho, Wo = (H + 2 * ph - dh * (kh - 1) - 1) // sh + 1, (W + 2 * pw - dw * (kw - 1) - 1) // sw + 1
        return x, torch.randn(B, groups, kh * kw, Ho, Wo)

    export_and_compare(model, make(2, 11, 13), ({0: batch}, {0: batch}), other_inputs=[make(3, 11, 13)])


def test_local_filter2d_dynamic_spatial_size_and_half_precision():
    # "same" geometry: the filters' spatial size is the input's, so one pair of Dims serves both.
    model = dynconv.DynamicLocalFilter2d(5)
    torch.manual_seed(0)
    x, f = torch.randn(2, 3, 12, 10), torch.randn(2, 1, 25, 12, 10).softmax(2)
    dims = ({0: batch, 2: height, 3: width}, {0: batch, 3: height, 4: width})
    other = (torch.randn(1, 3, 17, 23), torch.randn(1, 1, 25, 17, 23).softmax(2))
    export_and_compare(model, (x, f), dims, other_inputs=[other])
    # fp16 in, fp16 out, computed in fp32 inside the graph as the op accumulates.
    program = export_and_compare(model, (x.half(), f.half()), dims, atol=2e-3, rtol=2e-3,
                                 expected=lambda a, b: model(a.float(), b.float()).half())  # fmt: skip
    assert program.model_proto.graph.output[0].type.tensor_type.elem_type == 10  # FLOAT16


def test_shipped_dfn_step():
    # One recurrent step of the shipped DFN video predictor (9x9 filters): what a deployment would export.
    from dynconv.recipes.video_prediction import load_model

    class Step(nn.Module):
        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, frame, hidden):
            prediction, hidden, _ = self.model.step(frame, hidden)
            return prediction, hidden

    model, _ = load_model("dfn-moving-mnist")
    torch.manual_seed(0)
    frame, hidden = torch.rand(2, 1, 64, 64), torch.randn(2, 128, 32, 32)
    other = (torch.rand(3, 1, 64, 64), torch.randn(3, 128, 32, 32))
    export_and_compare(Step(model), (frame, hidden), ({0: batch}, {0: batch}), other_inputs=[other], atol=1e-4)


def test_involution_model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), dynconv.Involution2d(32, 7, group_channels=8), nn.ReLU())
    x = torch.randn(2, 3, 16, 16)
    export_and_compare(model, (x,), ({0: batch, 2: height, 3: width},), other_inputs=[(torch.randn(3, 3, 9, 20),)])


@pytest.mark.parametrize("modulated", [False, True])
@pytest.mark.parametrize(
    "kwargs",
    [
        dict(kernel_size=3, padding=1),
        dict(kernel_size=3, stride=2, padding=1, groups=2, offset_groups=4),
        dict(kernel_size=(3, 5), padding=(2, 1), dilation=(2, 1), offset_groups=2, bias=False),
    ],
)
def test_deform_conv2d_modules(modulated, kwargs):
    cls = dynconv.ModulatedDeformConv2d if modulated else dynconv.DeformConv2d
    torch.manual_seed(0)
    model = _randomise(cls(8, 12, **kwargs), std=0.2)
    x = torch.randn(2, 8, 11, 13)
    export_and_compare(model, (x,), ({0: batch, 2: height, 3: width},), other_inputs=[(torch.randn(3, 8, 14, 9),)])


def test_deform_conv2d_functional_with_given_offsets_and_mask():
    torch.manual_seed(0)
    x, weight, bias = torch.randn(2, 4, 9, 10), torch.randn(6, 2, 3, 3), torch.randn(6)
    offset, mask = torch.randn(2, 2 * 2 * 9, 9, 10) * 3, torch.rand(2, 2 * 9, 9, 10)  # 2 offset groups
    model = Fn(
        lambda x, offset, weight, bias, mask: dynconv.deform_conv2d(x, offset, weight, bias, padding=1, mask=mask)
    )
    export_and_compare(model, (x, offset, weight, bias, mask), ({0: batch}, {0: batch}, None, None, {0: batch}))


@pytest.mark.parametrize("version", ["v3", "v4"])
@pytest.mark.parametrize(
    "kwargs", [dict(group=4), dict(group=2, kernel_size=5, pad=2, offset_scale=0.5), dict(group=4, remove_center=True)]
)
def test_dcnv3_dcnv4_modules(version, kwargs):
    torch.manual_seed(0)
    cls = dynconv.DCNv3 if version == "v3" else dynconv.DCNv4
    if version == "v4" and kwargs.get("kernel_size") == 5:
        kwargs = dict(kwargs, dw_kernel_size=3)
    model = _randomise(cls(channels=16, **kwargs), std=0.5)
    x = torch.randn(2, 9, 10, 16)  # channels-last
    dims = ({0: batch, 1: height, 2: width},)
    export_and_compare(model, (x,), dims, other_inputs=[(torch.randn(3, 12, 7, 16),)], atol=2e-5)


@pytest.mark.parametrize("mode", ["bilinear", "nearest"])
@pytest.mark.parametrize("padding_mode", ["zeros", "border", "reflection"])
def test_warp_triton_op_translation(mode, padding_mode):
    # The Triton backend's custom op (what a CUDA model traces to); the torch backend is grid_sample itself.
    torch.manual_seed(0)
    x, flow = torch.randn(2, 5, 9, 12), torch.randn(2, 2, 9, 12) * 4
    if mode == "nearest":  # keep positions away from the .5 ties, where rounding rules may differ
        flow = flow.round() + 0.25
    model = Fn(lambda x, flow: torch.ops.dynconv.warp_triton(x, flow, mode, padding_mode, False))
    reference = Fn(dynconv.warp, mode=mode, padding_mode=padding_mode, backend="reference")
    dims = {0: batch, 2: height, 3: width}
    other = (torch.randn(1, 5, 6, 17), torch.randn(1, 2, 6, 17) * 4)
    export_and_compare(model, (x, flow), (dims, dims), other_inputs=[other], expected=reference)


def test_warp_torch_backend_exports_natively():
    torch.manual_seed(0)
    x, flow = torch.randn(2, 5, 9, 12), torch.randn(2, 2, 9, 12) * 4
    export_and_compare(Fn(dynconv.warp, backend="torch"), (x, flow), ({0: batch}, {0: batch}))


def _randomise_attention(model: nn.Module) -> nn.Module:
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Linear):  # attention layers start at zero (uniform mixture): make them matter
                m.weight.normal_(0, 0.3)
            if isinstance(m, nn.BatchNorm2d):  # non-trivial running statistics
                m.running_mean.uniform_(-0.1, 0.1)
    return model


@pytest.mark.parametrize("kind", ["condconv", "dynamic", "odconv", "dynet"])
def test_converted_model_dynamic_batch_and_size(kind):
    # Under torch.export the mixtures run "grouped" and sample_conv2d traces as unfold + matmul: no Conv whose
    # group count is the batch, so batch and image size stay dynamic.
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, stride=2, padding=1, groups=2),
        nn.BatchNorm2d(32), nn.ReLU(), nn.Conv2d(32, 8, 1),
    )  # fmt: skip
    _randomise_attention(dynconv.convert(model, kind, num_experts=3))
    x = torch.randn(2, 3, 12, 11)
    dims = ({0: batch, 2: height, 3: width},)
    export_and_compare(model, (x,), dims, other_inputs=[(torch.randn(5, 3, 9, 16),)])


def test_converted_resnet18_dynamic_batch_and_size():
    torch.manual_seed(0)
    model = _randomise_attention(dynconv.convert(resnet18(num_classes=10), "dynamic", num_experts=2))
    dims = ({0: batch, 2: height, 3: width},)
    other = [(torch.randn(5, 3, 40, 24),)]
    export_and_compare(model, (torch.randn(2, 3, 32, 32),), dims, other_inputs=other, atol=1e-3, rtol=1e-3)


def test_sample_conv2d_and_condinst_mask_head_dynamic_instances():
    # CondInst's "batch" is the number of detected instances: it must stay dynamic in a deployed graph.
    torch.manual_seed(0)
    model = Fn(lambda x, w, b: dynconv.sample_conv2d(x, w, b, stride=(2, 1), padding=(1, 2), dilation=(1, 2), groups=2))
    x, w, b = torch.randn(3, 4, 9, 9), torch.randn(3, 6, 2, 3, 3), torch.randn(3, 6)
    other = (torch.randn(5, 4, 13, 9), torch.randn(5, 6, 2, 3, 3), torch.randn(5, 6))
    instances = torch.export.Dim("instances", min=1, max=512)
    export_and_compare(model, (x, w, b), ({0: instances, 2: height}, {0: instances}, {0: instances}), [other])
    head = dynconv.DynamicMaskHead()
    feats, params = torch.randn(4, 10, 16, 20), torch.randn(4, head.num_params) * 0.3
    other = (torch.randn(7, 10, 16, 20), torch.randn(7, head.num_params) * 0.3)
    export_and_compare(head, (feats, params), ({0: instances}, {0: instances}), other_inputs=[other])


def test_experts_formulation_exports_a_dynamic_batch():
    torch.manual_seed(0)
    model = nn.Sequential(
        dynconv.CondConv2d(8, 16, 3, padding=1, num_experts=3, formulation="experts"),
        dynconv.DynamicConv2d(16, 8, 3, stride=2, padding=1, formulation="experts"),
    )
    x = torch.randn(2, 8, 12, 12)
    export_and_compare(model, (x,), ({0: batch},), other_inputs=[(torch.randn(5, 8, 12, 12),)])


def test_export_rejects_old_opsets_and_the_torchscript_exporter():
    model = dynconv.DeformConv2d(4, 4, 3, padding=1)
    with pytest.raises(ValueError, match="opset_version must be >= 19"):
        dynconv.onnx.export(model, (torch.randn(1, 4, 8, 8),), opset_version=17)
    with pytest.raises(ValueError, match="dynamo=False"):
        dynconv.onnx.export(model, (torch.randn(1, 4, 8, 8),), dynamo=False)


def test_translation_table_covers_every_forward_custom_op():
    # A new custom op without a translation would make models that use it unexportable.
    forward_ops = {
        getattr(torch.ops.dynconv, name).default
        for name in dir(torch.ops.dynconv)
        if isinstance(getattr(torch.ops.dynconv, name), torch._ops.OpOverloadPacket) and "backward" not in name
    }
    assert forward_ops and forward_ops == set(dynconv.onnx.translation_table())


def test_missing_onnxscript_gives_an_install_hint(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "onnxscript", None)  # what an environment without the package imports
    with pytest.raises(ImportError, match=r"pip install 'dynconv\[onnx\]'"):
        dynconv.onnx.translation_table()
