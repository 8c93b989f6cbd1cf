"""Sample-specific layers: DFN DynamicFilterLayer, CondInst DynamicMaskHead, DMNet DynamicMultiScaleFilter and
HDFNet DynamicDilatedFilter, each against its definition written out with F.conv2d / the local-filter reference."""

import pytest
import torch
import torch.nn.functional as F

import dynconv
from dynconv import reference
from dynconv.testing import assert_close

pytestmark = pytest.mark.usefixtures("one_thread")


# ------------------------------------------------------------------------------------------- DFN


def test_dynamic_filter_layer_applies_generated_kernels_per_sample():
    layer = dynconv.DynamicFilterLayer(4, 6, 3, stride=2, padding=1, groups=2, cond_channels=5, hidden_channels=8)
    layer = layer.double()
    torch.nn.init.normal_(layer.head.weight, std=0.1)  # input-dependent filters
    x = torch.randn(3, 4, 9, 8, dtype=torch.float64)
    cond = torch.randn(3, 5, 6, 6, dtype=torch.float64)
    weight, bias = layer.generate(cond)
    assert tuple(weight.shape) == (3, 6, 2, 3, 3) and tuple(bias.shape) == (3, 6)
    assert (weight[0] - weight[1]).abs().max() > 1e-3
    out = layer(x, cond)
    for b in range(3):
        assert_close(out[b : b + 1], F.conv2d(x[b : b + 1], weight[b], bias[b], 2, 1, 1, 2))


def test_dynamic_filter_layer_starts_as_a_static_conv():
    layer = dynconv.DynamicFilterLayer(3, 5, 3, padding=1, hidden_channels=8).double()
    x = torch.randn(2, 3, 7, 7, dtype=torch.float64)
    P = 5 * 3 * 9
    static_w = layer.head.bias[:P].view(5, 3, 3, 3)
    assert_close(layer(x), F.conv2d(x, static_w, layer.head.bias[P:], padding=1))


def test_dynamic_filter_layer_gradcheck_and_errors():
    layer = dynconv.DynamicFilterLayer(2, 2, 3, padding=1, hidden_channels=4, bias=False).double()
    torch.nn.init.normal_(layer.head.weight, std=0.1)
    x = torch.randn(2, 2, 5, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(layer, (x,))
    with pytest.raises(ValueError, match=r"cond must have shape \[B, 2, H, W\]"):
        layer(x, torch.randn(2, 3, 5, 5, dtype=torch.float64))
    with pytest.raises(ValueError, match="cond has batch size 3 but x has 2"):
        layer(x, torch.randn(3, 2, 5, 5, dtype=torch.float64))
    assert "bias=False" in repr(layer)


# --------------------------------------------------------------------------------------- CondInst


def test_mask_head_has_169_parameters_per_instance():
    head = dynconv.DynamicMaskHead()
    assert head.num_params == 169
    assert head.weight_nums == [80, 64, 8] and head.bias_nums == [8, 8, 1]


def test_mask_head_equals_per_instance_conv_chain():
    head = dynconv.DynamicMaskHead(in_channels=5, channels=4, num_layers=3, kernel_size=3)
    N = 3
    params = torch.randn(N, head.num_params, dtype=torch.float64)
    feats = torch.randn(N, 5, 7, 6, dtype=torch.float64)
    out = head(feats, params)
    # CondInst layout, sliced by hand: weights of layers 0, 1, 2, then biases of layers 0, 1, 2.
    sizes = [(4, 5), (4, 4), (1, 4)]
    nw = [co * ci * 9 for co, ci in sizes]
    for n in range(N):
        p = params[n]
        offset, ws = 0, []
        for (co, ci), num in zip(sizes, nw):
            ws.append(p[offset : offset + num].view(co, ci, 3, 3))
            offset += num
        bs = []
        for co, _ in sizes:
            bs.append(p[offset : offset + co])
            offset += co
        assert offset == head.num_params
        y = feats[n : n + 1]
        for i in range(3):
            y = F.conv2d(y, ws[i], bs[i], padding=1)
            if i < 2:
                y = F.relu(y)
        assert_close(out[n : n + 1], y)


def test_mask_head_relative_coordinates_and_errors():
    coords = dynconv.DynamicMaskHead.relative_coordinates(
        torch.tensor([[12.0, 4.0]]), 2, 3, stride=8, size_of_interest=4
    )
    # locations are pixel centres 4, 12, 20 (x) and 4, 12 (y)
    assert_close(coords[0, 0], torch.tensor([[2.0, 0.0, -2.0], [2.0, 0.0, -2.0]]))
    assert_close(coords[0, 1], torch.tensor([[0.0, 0.0, 0.0], [-2.0, -2.0, -2.0]]))
    head = dynconv.DynamicMaskHead()
    with pytest.raises(ValueError, match=r"params must have shape \[N, 169\], got \(2, 168\)"):
        head(torch.randn(2, 10, 4, 4), torch.randn(2, 168))
    with pytest.raises(ValueError, match="params has 3 instances but features has 2"):
        head(torch.randn(2, 10, 4, 4), torch.randn(3, 169))
    with pytest.raises(ValueError, match=r"features must have shape \[N, 10, H, W\]"):
        head(torch.randn(2, 8, 4, 4), torch.randn(2, 169))
    with pytest.raises(ValueError, match="kernel_size must be a positive odd int"):
        dynconv.DynamicMaskHead(kernel_size=2)


# ------------------------------------------------------------------------------------------ DMNet


@pytest.mark.parametrize("k", [1, 2, 3, 5])
def test_dmnet_filtering_is_per_sample_depthwise_conv(k):
    x = torch.randn(2, 3, 7, 6, dtype=torch.float64)
    filters = torch.randn(2, 3, 1, k, k, dtype=torch.float64)
    out = dynconv.DynamicMultiScaleFilter.apply_filters(x, filters)
    assert out.shape == x.shape
    top = k // 2  # DMNet pads even kernels one more on the top/left
    for b in range(2):
        xp = F.pad(x[b : b + 1], (top, k - 1 - top, top, k - 1 - top))
        assert_close(out[b : b + 1], F.conv2d(xp, filters[b], groups=3))


def test_dmnet_module_composition_and_gradcheck():
    m = dynconv.DynamicMultiScaleFilter(4, 3, kernel_sizes=(1, 3), fusion=True).double().eval()
    x = torch.randn(2, 4, 6, 6, dtype=torch.float64, requires_grad=True)
    out = m(x)
    assert tuple(out.shape) == (2, 6, 6, 6)
    for i, k in enumerate((1, 3)):
        pooled = F.adaptive_avg_pool2d(x, k)
        filt = m.filter_generators[i](pooled)  # [B, 3, k, k]
        red = m.reducers[i](x)
        y = torch.cat([F.conv2d(red[b : b + 1], filt[b].unsqueeze(1), padding=k // 2, groups=3) for b in range(2)])
        assert_close(out[:, 3 * i : 3 * i + 3], m.fusions[i](m.post[i](y)))
    assert torch.autograd.gradcheck(m, (x,))
    with pytest.raises(ValueError, match="kernel_sizes must be a non-empty sequence"):
        dynconv.DynamicMultiScaleFilter(4, 3, kernel_sizes=())


# ----------------------------------------------------------------------------------------- HDFNet


def test_hdfnet_dilated_filtering_composition():
    m = dynconv.DynamicDilatedFilter(8, 5, guide_channels=3, dilations=(1, 2), reduction=4).double().eval()
    x = torch.randn(2, 8, 9, 7, dtype=torch.float64)
    guide = torch.randn(2, 3, 9, 7, dtype=torch.float64)
    out = m(x, guide)
    assert tuple(out.shape) == (2, 5, 9, 7)
    reduced = m.reduce(x)
    parts = [reduced]
    for i, d in enumerate((1, 2)):
        filters = m.generate(guide, i)
        assert tuple(filters.shape) == (2, 2, 9, 9, 7)  # depthwise: one 3x3 filter per channel and pixel
        parts.append(reference.local_filter2d(reduced, filters, (3, 3), (1, 1), (d, d), (d, d)))
    assert_close(out, m.fuse(torch.cat(parts, 1)))


def test_hdfnet_gradcheck_and_errors():
    m = dynconv.DynamicDilatedFilter(4, 2, dilations=(1, 3), reduction=2).double().eval()
    x = torch.randn(1, 4, 5, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(m, (x,))
    with pytest.raises(ValueError, match=r"guide must have shape \[B, 4, 5, 5\]"):
        m(x, torch.randn(1, 4, 4, 5, dtype=torch.float64))
    with pytest.raises(ValueError, match="dilations must be a non-empty sequence of positive ints"):
        dynconv.DynamicDilatedFilter(4, 2, dilations=(0,))
    assert "dilations=(1, 3)" in repr(m)


def test_mask_head_with_no_instances():
    """CondInst with no detected instance: empty masks, and the graph still backpropagates into the features."""
    head = dynconv.DynamicMaskHead()
    feats = torch.randn(0, head.in_channels, 8, 8, requires_grad=True)
    params = torch.randn(0, head.num_params, requires_grad=True)
    masks = head(feats, params)
    assert masks.shape == (0, 1, 8, 8)
    masks.sum().backward()
    assert feats.grad.shape == feats.shape and params.grad.shape == params.shape
