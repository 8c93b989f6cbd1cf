"""Deep Feature Flow video segmentation: the synthetic set's exact flow, the DFF parts, the recipe and its CLI."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dynconv import warp
from dynconv.cli import main
from dynconv.data.cityscapes import CityscapesVideo
from dynconv.data.synthetic_segmentation import NUM_CLASSES, SyntheticSegmentationVideo
from dynconv.errors import UserError
from dynconv.models.dff import DeepFeatureFlow, FeatureNet, FlowNetC, FlowNetS, lucas_kanade
from dynconv.recipes import video_segmentation as vs
from dynconv.recipes.checkpoint import load_checkpoint

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = ["--width", "8", "--blocks", "1,1,1,1", "--frame-size", "32", "--batch-size", "2", "--threads", "1"]


def _tiny_cfg(run_dir, **kw) -> vs.Config:
    base = dict(run_dir=str(run_dir), width=8, blocks="1,1,1,1", frame_size=32, batch_size=2, threads=1)
    return vs.Config(**{**base, **kw})


def _log(run_dir) -> list[dict]:
    return [json.loads(line) for line in open(os.path.join(run_dir, "log.jsonl"))]


# ------------------------------------------------------------------------------------------------ data


def test_warp_with_ground_truth_flow_moves_key_labels_onto_current_labels():
    """Warping the key frame's one-hot labels with the exact current -> key flow lands them on the current frame's
    shapes: far more agreement than the unwarped key labels or the key labels warped with the flow shifted by 3
    pixels. Scored on the current frame's shape pixels: the background alone would flatter every method, and
    background uncovered since the key frame (disocclusion) has no counterpart to warp from."""
    data = SyntheticSegmentationVideo(6, frames=10, size=64, seed=3)
    warped_acc, identity_acc, shifted_acc = [], [], []
    for i in range(len(data)):
        key, current = 0, 6
        key_labels, current_labels = data.render(i, key)[1], data.render(i, current)[1]
        flow = data.flow(i, current, key)[None]
        one_hot = F.one_hot(key_labels, NUM_CLASSES).permute(2, 0, 1).float()[None]
        shapes = current_labels > 0
        acc = lambda pred: (pred[0] == current_labels)[shapes].float().mean().item()  # noqa: E731
        warped_acc.append(acc(warp(one_hot, flow, "nearest", "border").argmax(1)))
        identity_acc.append(acc(key_labels[None]))
        shifted_acc.append(acc(warp(one_hot, flow + 3.0, "nearest", "border").argmax(1)))
    assert np.mean(warped_acc) > 0.9
    assert np.mean(warped_acc) > np.mean(identity_acc) + 0.25
    assert np.mean(warped_acc) > np.mean(shifted_acc) + 0.2


def test_ground_truth_flow_moves_the_image_where_the_surface_is_visible_in_both():
    """Away from label boundaries (where a surface point may be hidden in the key frame), the warped key image
    equals the current image up to bilinear interpolation of the texture."""
    data = SyntheticSegmentationVideo(3, frames=10, size=64, seed=5)
    for i in range(3):
        key_image, key_labels = data.render(i, 2)
        image, labels = data.render(i, 5)
        flow = data.flow(i, 5, 2)[None]
        warped = warp(key_image[None], flow, padding_mode="border")[0]
        warped_labels = warp(F.one_hot(key_labels, NUM_CLASSES).permute(2, 0, 1).float()[None], flow)[0]
        # pixels whose warped label is pure (no boundary in the 2x2 neighbourhood) and equals the current label
        same = (warped_labels.amax(0) > 0.999) & (warped_labels.argmax(0) == labels)
        same &= F.max_pool2d((~same).float()[None, None], 3, 1, 1)[0, 0] == 0  # one pixel away from any mismatch
        target_x, target_y = torch.meshgrid(torch.arange(64.0), torch.arange(64.0), indexing="xy")
        inside = (target_x + flow[0, 0] > 1) & (target_x + flow[0, 0] < 62) & (target_y + flow[0, 1] > 1)
        inside &= target_y + flow[0, 1] < 62
        mask = same & inside
        assert mask.float().mean() > 0.5
        error = (warped - image).abs().amax(0)[mask]
        unwarped = (key_image - image).abs().amax(0)[mask]
        assert error.mean() < 0.04 and error.mean() < unwarped.mean() / 2


def test_synthetic_sequences_are_a_function_of_seed_and_index():
    a, b = SyntheticSegmentationVideo(2, 4, 32, seed=1), SyntheticSegmentationVideo(2, 4, 32, seed=2)
    frames, labels = a[1]
    assert frames.shape == (4, 3, 32, 32) and frames.dtype == torch.float32 and labels.shape == (4, 32, 32)
    assert 0 <= frames.min() and frames.max() <= 1 and set(labels.unique().tolist()) <= {0, 1, 2, 3}
    assert torch.equal(a[1][0], frames) and not torch.equal(b[1][0], frames)
    assert torch.equal(a.flow(0, 3, 3), torch.zeros(2, 32, 32))  # a frame to itself: no motion


def _write_png(path, array):
    from PIL import Image

    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(array).save(path)


def _cityscapes_tree(root, split: str) -> None:
    """One 30-frame snippet, ``bonn_000003_000000 .. 000029``, whose frame 000019 is annotated with labelIds:
    the top half road (id 7), the bottom left car (26), the bottom right an ignored id (3)."""
    for n in range(30):
        frame = np.full((8, 16, 3), n, np.uint8)  # the frame number, readable back from the pixels
        frame[4:, :8, 0] = 200  # the car is red
        _write_png(str(root / f"leftImg8bit_sequence/{split}/bonn/bonn_000003_{n:06d}_leftImg8bit.png"), frame)
    ids = np.zeros((8, 16), np.uint8)
    ids[:4], ids[4:, :8], ids[4:, 8:] = 7, 26, 3
    _write_png(str(root / f"gtFine/{split}/bonn/bonn_000003_000019_gtFine_labelIds.png"), ids)


def test_cityscapes_loader_reads_the_20th_frame_label_and_the_frames_before_it(tmp_path):
    """The official layout; label ids map to train ids (road 7 -> 0, car 26 -> 13) and everything else to 255."""
    root = tmp_path / "cs"
    _cityscapes_tree(root, "val")
    data = CityscapesVideo(str(root), "val", max_distance=9)
    assert len(data) == 1
    frames, label = data[0]
    assert frames.shape == (10, 3, 8, 16)
    assert [round(v * 255) for v in frames[:, 1, 0, 0].tolist()] == list(range(10, 20))
    assert round(data.frame(0, 5)[1, 0, 0].item() * 255) == 14
    assert (label[:4] == 0).all() and (label[4:, :8] == 13).all() and (label[4:, 8:] == 255).all()
    small = CityscapesVideo(str(root), "val", max_distance=2, size=(4, 8))
    assert small[0][0].shape == (3, 3, 4, 8) and small.label(0).shape == (4, 8)

    with pytest.raises(UserError, match=r"leftImg8bit_sequence/train is not a folder; expected .*_leftImg8bit.png"):
        CityscapesVideo(str(root), "train")
    os.makedirs(tmp_path / "cs2" / "leftImg8bit_sequence" / "val")
    with pytest.raises(UserError, match=r"gtFine/val is not a folder; expected .*_gtFine_labelTrainIds.png"):
        CityscapesVideo(str(tmp_path / "cs2"), "val")
    os.makedirs(tmp_path / "cs2" / "gtFine" / "val")
    with pytest.raises(UserError, match=r"no annotations under .*gtFine/val"):
        CityscapesVideo(str(tmp_path / "cs2"), "val")
    os.remove(root / "leftImg8bit_sequence/val/bonn/bonn_000003_000012_leftImg8bit.png")
    with pytest.raises(UserError, match=r"needs the 10 frames .* missing .*bonn_000003_000012_leftImg8bit.png"):
        CityscapesVideo(str(root), "val", max_distance=9)


def test_cityscapes_annotation_that_is_not_a_label_map_of_its_frame_is_refused(tmp_path):
    """A trainIds file holding other values (a labelIds file under the trainIds name), a colour annotation and
    one of another size than its frame would give wrong mIoU or fail deep inside the metric: each is refused,
    naming the file and what a label file holds."""
    root = tmp_path / "cs"
    _cityscapes_tree(root, "val")
    label_ids = root / "gtFine/val/bonn/bonn_000003_000019_gtFine_labelIds.png"
    train_ids = root / "gtFine/val/bonn/bonn_000003_000019_gtFine_labelTrainIds.png"
    os.rename(label_ids, train_ids)  # ids 3, 7, 26 under the trainIds name
    with pytest.raises(
        UserError, match=r"labelTrainIds.png holds label values \[26\]; a _labelTrainIds.png holds 0 to 18"
    ):
        CityscapesVideo(str(root), "val", max_distance=2).label(0)
    _write_png(str(train_ids), np.full((8, 16, 3), 255, np.uint8))
    with pytest.raises(UserError, match=r"labelTrainIds.png is a RGB image; expected one 8-bit channel"):
        CityscapesVideo(str(root), "val", max_distance=2)[0]
    _write_png(str(train_ids), np.zeros((4, 16), np.uint8))
    with pytest.raises(UserError, match=r"labelTrainIds.png is 16x4 but its frame .*_000019_leftImg8bit.png is 16x8"):
        CityscapesVideo(str(root), "val", max_distance=2).label(0)
    resized = CityscapesVideo(str(root), "val", max_distance=2, size=(4, 8))  # both resized: nothing to compare
    assert resized.label(0).shape == (4, 8)
    _write_png(str(train_ids), np.where(np.arange(16) < 8, 18, 255).astype(np.uint8)[None].repeat(8, 0))
    label = CityscapesVideo(str(root), "val", max_distance=2).label(0)  # the bounds themselves pass
    assert label[:, :8].eq(18).all() and label[:, 8:].eq(255).all()


def test_miou_on_a_hand_computed_case():
    labels = torch.tensor([[0, 0, 1, 1], [2, 2, 255, 255]])
    pred = torch.tensor([[0, 1, 1, 1], [2, 0, 0, 2]])
    conf = vs.confusion(pred, labels, 3)
    # class 0: tp 1, fp 1 (a 2 predicted 0), fn 1 -> 1/3; class 1: tp 2, fp 1 -> 2/3; class 2: tp 1, fn 1 -> 1/2
    assert conf.sum() == 6
    assert vs.mean_iou(conf) == pytest.approx(100 * (1 / 3 + 2 / 3 + 1 / 2) / 3)


# ------------------------------------------------------------------------------------------------ model


class _Counting(torch.nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner, self.calls = inner, 0

    def forward(self, x):
        self.calls += 1
        return self.inner(x)


def test_fixed_schedule_calls_the_feature_network_once_per_interval():
    torch.manual_seed(0)
    model = DeepFeatureFlow(4, width=8, blocks=(1, 1)).eval()
    model.features = _Counting(model.features)
    frames = torch.rand(23, 3, 32, 32)
    for interval, keys in ((1, list(range(23))), (5, [0, 5, 10, 15, 20]), (10, [0, 10, 20]), (30, [0])):
        model.features.calls = 0
        logits, got = model.segment_video(frames, interval)
        assert got == keys and model.features.calls == len(keys)
        assert logits.shape == (23, 4, 32, 32)
    # a batch of videos: one call per key frame for the whole batch
    model.features.calls = 0
    logits, got = model.segment_video(torch.rand(2, 11, 3, 32, 32), 5)
    assert got == [0, 5, 10] and model.features.calls == 3 and logits.shape == (2, 11, 4, 32, 32)


def test_adaptive_schedule_takes_a_key_frame_when_the_flow_is_large():
    torch.manual_seed(0)
    model = DeepFeatureFlow(4, width=8, blocks=(1, 1), flow_init=False).eval()
    frames = torch.rand(12, 3, 32, 32)
    # a fresh flow network predicts almost no flow: below the threshold, so only the interval forces key frames
    assert model.segment_video(frames, 5, "adaptive", threshold=0.5)[1] == [0, 5, 10]
    with torch.no_grad():  # flow (1, 1) feature pixel everywhere: |dx| + |dy| = 2
        for m in (model.flow.predict0, model.flow.predict1, model.flow.predict2):
            m.weight.zero_()
            m.bias.zero_()
        model.flow.predict0.bias.fill_(1.0)
    assert model.segment_video(frames, 5, "adaptive", threshold=1.5)[1] == list(range(12))
    assert model.segment_video(frames, 5, "adaptive", threshold=2.5)[1] == [0, 5, 10]
    with pytest.raises(ValueError, match="schedule"):
        model.segment_video(frames, 5, "sometimes")


@pytest.mark.parametrize("flow_net", ["s", "c"])
def test_scale_function_starts_as_identity(flow_net):
    """The scale field of a fresh flow network is exactly 1 whatever the input, so propagation is the warp alone."""
    torch.manual_seed(0)
    model = DeepFeatureFlow(4, width=8, blocks=(1, 1, 1), flow_net=flow_net).eval()
    key, current = torch.rand(3, 3, 48, 40), torch.rand(3, 3, 48, 40)
    flow, scale = model.flow(key, current)
    assert flow.shape == (3, 2, 6, 5) and scale.shape == (3, 32, 6, 5)
    assert torch.equal(scale, torch.ones_like(scale))
    features = model.features(key)
    assert features.shape == (3, 32, 6, 5)
    propagated, got_flow = model.propagate(features, key, current)
    torch.testing.assert_close(got_flow, flow)
    torch.testing.assert_close(propagated, warp(features, flow, padding_mode="border"), rtol=0, atol=1e-6)
    # the scale function multiplies: with bias 2 it doubles the warped features
    with torch.no_grad():
        model.flow.scale.bias.fill_(2.0)
    doubled = model.propagate(features, key, current)[0]
    torch.testing.assert_close(doubled, 2 * warp(features, flow, padding_mode="border"), rtol=0, atol=1e-5)


def test_lucas_kanade_recovers_a_known_flow_and_halves_the_error_on_the_synthetic_set():
    """A smooth image warped by a constant flow: the coarse-to-fine Lucas-Kanade estimate is that flow (same
    direction convention as warp); on synthetic pairs it removes much of the end-point error of zero flow."""
    torch.manual_seed(0)
    key = F.interpolate(torch.rand(2, 3, 8, 8), size=(32, 32), mode="bicubic", align_corners=False)
    true = torch.tensor([1.5, -0.75]).view(1, 2, 1, 1).expand(2, 2, 32, 32)
    current = warp(key, true.contiguous(), padding_mode="border")
    got = lucas_kanade(key, current)
    inner = got[:, :, 6:-6, 6:-6].mean((0, 2, 3))
    torch.testing.assert_close(inner, torch.tensor([1.5, -0.75]), atol=0.15, rtol=0)

    data = SyntheticSegmentationVideo(8, 10, 64, seed=4)
    epe, magnitude = [], []
    for i in range(8):
        key, current, flow = data.render(i, 0)[0], data.render(i, 6)[0], data.flow(i, 6, 0)
        half = F.avg_pool2d(torch.stack([key, current]), 2)
        estimate = 2 * F.interpolate(lucas_kanade(half[:1], half[1:]), size=(64, 64), mode="bilinear")
        epe.append((estimate[0] - flow).norm(dim=0).mean().item())
        magnitude.append(flow.norm(dim=0).mean().item())
    assert np.mean(epe) < 0.7 * np.mean(magnitude)


def _camera_pair(seed: int, shift: tuple[float, float], noise: float = 0.003, H: int = 48, W: int = 64):
    """Two grey frames like a camera's: a dark and a bright flat area with sharp-edged blobs, the second frame the
    first translated by ``shift`` = its flow ``(dx, dy)`` to the first (rendered 4x finer and box-filtered, so the
    sub-pixel motion is exact), each with its own sensor noise of ``noise``."""
    g, up = torch.Generator().manual_seed(seed), 4
    y, x = torch.meshgrid(torch.arange(H * up * 1.0), torch.arange(W * up * 1.0), indexing="ij")
    scene = torch.full((H * up, W * up), 0.25)
    scene[:, W * up // 2 :] = 0.8
    for _ in range(8):
        cx, cy, r = torch.rand(3, generator=g) * torch.tensor([W * up, H * up, 20.0]) + torch.tensor([0, 0, 8.0])
        scene[(x - cx) ** 2 + (y - cy) ** 2 < r * r] = torch.rand(1, generator=g).item()
    frames = []
    for dx, dy in ((0.0, 0.0), shift):
        flow = torch.tensor([dx * up, dy * up]).view(1, 2, 1, 1).expand(1, 2, H * up, W * up).contiguous()
        f = F.avg_pool2d(warp(scene[None, None], flow, padding_mode="border"), up)
        frames.append((f + noise * torch.randn(f.shape, generator=g)).expand(1, 3, H, W).contiguous())
    return frames


def test_lucas_kanade_ridge_keeps_camera_noise_out_of_zero_and_sub_pixel_motion():
    """The cause of the real-video check's failure on consecutive frames: plain Lucas-Kanade solves weakly
    textured blocks for noise over noise, so on still or barely moving camera frames its warp raises the
    photometric error above no warp at all; the ridge (the default) keeps those steps near zero and the warp then
    lowers the error."""

    def errors(shift, ridge):
        out = []
        for seed in range(4):
            key, cur = _camera_pair(seed, shift)
            e = lambda a: (a - cur)[..., 4:-4, 4:-4].abs().mean().item()  # noqa: E731
            lk = lucas_kanade(key, cur, (4, 2)) if ridge is None else lucas_kanade(key, cur, (4, 2), ridge=ridge)
            out.append((e(key), e(warp(key, lk, padding_mode="border"))))
        return np.mean(out, 0)

    identity, default = errors((0.0, 0.0), None)
    assert default < 1.03 * identity  # no motion: the warp changes almost nothing
    assert errors((0.0, 0.0), 0.0)[1] > 1.3 * identity  # plain Lucas-Kanade fits the noise (measured 1.6x)
    identity, default = errors((-0.05, 0.05), None)
    assert default < 0.85 * identity  # a twentieth of a pixel (measured 0.79x; plain Lucas-Kanade 0.99x)


def test_fresh_flownets_start_near_the_identity_warp_and_zeroed_predictors_give_it_exactly():
    torch.manual_seed(0)
    model = DeepFeatureFlow(4, width=8, blocks=(1, 1, 1), flow_init=False).eval()
    key, current = torch.rand(3, 3, 48, 40), torch.rand(3, 3, 48, 40)
    assert model.flow(key, current)[0].abs().max() < 0.1  # feature pixels
    with torch.no_grad():
        for m in (model.flow.predict0, model.flow.predict1, model.flow.predict2):
            m.weight.zero_()
            m.bias.zero_()
    features = model.features(key)
    torch.testing.assert_close(model.propagate(features, key, current)[0], features, rtol=0, atol=1e-6)


def test_flownetc_correlation_finds_a_known_shift():
    """The cost volume peaks at the displacement that maps the current frame back onto the key frame: for a
    current frame equal to the key shifted right by one feature pixel, ``flow = (dx, dy) = (-1, 0)``."""
    net = FlowNetC(3, 8, feature_stride=4, width=8)
    key = torch.randn(1, 8, 10, 12)
    current = torch.roll(key, 1, dims=-1)  # current(x) = key(x - 1)
    cost = net.correlation(F.normalize(key, dim=1), F.normalize(current, dim=1))
    best = net.displacements[:, cost[0, :, 5, 2:-2].argmax(0)]
    assert torch.equal(best, torch.tensor([[-1.0], [0.0]]).expand_as(best))


@pytest.mark.parametrize("stride", [4, 8, 16])
def test_feature_and_flow_networks_meet_at_the_feature_stride(stride):
    feat = FeatureNet(3, 8, (1, 1, 1, 1), stride)
    flow_s, flow_c = FlowNetS(3, 32, stride, 8), FlowNetC(3, 32, stride, 8)
    x = torch.rand(1, 3, 70, 50)
    expected = (-(-70 // stride), -(-50 // stride))
    assert feat(x).shape[-2:] == flow_s(x, x)[0].shape[-2:] == flow_c(x, x)[0].shape[-2:] == expected
    with pytest.raises(ValueError, match="output_stride"):
        FeatureNet(output_stride=6)


# ------------------------------------------------------------------------------------------------ training


def test_short_training_reduces_the_loss(tmp_path):
    cfg = _tiny_cfg(tmp_path / "run", perframe_steps=30, dff_steps=0, lr=5e-3, batch_size=4)
    losses = vs.train(cfg)["losses"]
    assert np.mean(losses[-5:]) < 0.8 * np.mean(losses[:5])


def test_resume_is_exact_across_the_stage_boundary_and_the_log_keeps_one_row_per_step(tmp_path):
    """An interrupted run resumed from its checkpoint logs the same losses as an uninterrupted one, across the
    per-frame -> DFF boundary; rows logged after the checkpoint by the interrupted process are replaced."""
    full = vs.train(_tiny_cfg(tmp_path / "a", perframe_steps=3, dff_steps=3))["losses"]
    part = _tiny_cfg(tmp_path / "b", perframe_steps=3, dff_steps=3, max_steps=2)
    vs.train(part)
    with open(tmp_path / "b" / "log.jsonl", "a") as fh:  # a step the killed process logged but did not save
        fh.write(json.dumps({"step": 3, "stage": "per-frame", "loss": 99.0}) + "\n")
    resumed = vs.train(_tiny_cfg(tmp_path / "b", perframe_steps=3, dff_steps=3))["losses"]
    assert len(full) == 6 and len(resumed) == 4
    assert resumed == pytest.approx(full[2:], rel=1e-6, abs=1e-7)
    rows = _log(tmp_path / "b")
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert [r["loss"] for r in rows] == pytest.approx(full, rel=1e-6, abs=1e-7)
    assert [r["stage"] for r in rows] == ["per-frame"] * 3 + ["dff"] * 3 and "epe" in rows[-1]


def test_cli_train_resume_eval_predict_and_flow_check(tmp_path, capsys):
    run = str(tmp_path / "run")
    small = ["--test-sequences", "2", "--test-frames", "11", "--eval-repeats", "1"]
    assert main(["train", "video-segmentation", "--run-dir", run, *TINY, *small, "--perframe-steps", "2",
                 "--dff-steps", "2"]) == 0  # fmt: skip
    out = capsys.readouterr().out
    assert "DFF, key interval l = 5" in out and "| 9 |" in out and "feature_net" in out
    metrics = json.load(open(os.path.join(run, "metrics.json")))
    assert metrics["step"] == 4 and metrics["final_train_loss"] == _log(run)[-1]["loss"]
    assert metrics["speedup_interval_1"] == 1.0 and 0 <= metrics["miou_interval_5"] <= 100
    assert os.path.isfile(os.path.join(run, "miou_vs_speedup.png"))
    before = open(os.path.join(run, "metrics.json")).read()

    # resuming a finished run neither trains nor overwrites the metrics
    assert main(["train", "video-segmentation", "--run-dir", run, "--resume"]) == 0
    assert "already finished" in capsys.readouterr().out
    assert open(os.path.join(run, "metrics.json")).read() == before
    # going on with more DFF steps keeps the run's config and logs each step once
    assert main(["train", "video-segmentation", "--run-dir", run, "--resume", "--dff-steps", "3"]) == 0
    assert [r["step"] for r in _log(run)] == [1, 2, 3, 4, 5]
    assert json.load(open(os.path.join(run, "metrics.json")))["step"] == 5
    capsys.readouterr()

    ckpt = os.path.join(run, "last.pt")
    out_json = str(tmp_path / "eval.json")
    assert main(["eval", "video-segmentation", "--checkpoint", ckpt, "--num-sequences", "1", "--repeats", "1",
                 "--output", out_json]) == 0  # fmt: skip
    assert json.load(open(out_json))["test_sequences"] == 1 and os.path.isfile(str(tmp_path / "eval.png"))
    assert main(["eval", "video-segmentation", "--checkpoint", ckpt, "--speed-size", "48", "--repeats", "1"]) == 0
    out = capsys.readouterr().out
    assert "frames 48x48" in out and "| DFF, key interval l = 10 | - |" in out
    assert main(["predict", "video-segmentation", "--checkpoint", ckpt, "--output", str(tmp_path / "seg.gif")]) == 0
    assert "key frames [0, 5, 10]" in capsys.readouterr().out and os.path.isfile(str(tmp_path / "seg.png"))

    frames_dir = tmp_path / "frames"
    clip = SyntheticSegmentationVideo(1, 4, 40, seed=9)[0][0]
    for t, frame in enumerate(clip):
        _write_png(str(frames_dir / f"{t:03d}.png"), (frame.permute(1, 2, 0).numpy() * 255).astype(np.uint8))
    assert main(["eval", "video-segmentation", "--checkpoint", ckpt, "--flow-check", str(frames_dir),
                 "--flow-check-height", "40", "--output", out_json]) == 0  # fmt: skip
    check = json.load(open(out_json))
    assert check["pairs"] == 3 and check["frame_size"] == [40, 40]
    assert check["photometric_error_lucas_kanade_start"] >= 0 and 0 <= check["pairs_improved_lucas_kanade_start"] <= 3
    assert not [n for n in os.listdir(run) + os.listdir(tmp_path) if n.startswith(".tmp-")]


def test_read_frames_in_the_video_order_of_their_numbers_and_refuses_a_broken_file(tmp_path):
    """``f2.png`` comes before ``f10.png`` (a plain sort put frame 10 second, and the flow check would have
    measured the warp between frames that are not neighbours); a file that is not an image is named."""
    folder = tmp_path / "video"
    for n in range(1, 13):
        _write_png(str(folder / f"f{n}.png"), np.full((4, 6), 20 * n, np.uint8))
    frames = vs.read_frames(str(folder), 100, 4)
    assert [round(v * 255) for v in frames[:, 0, 0, 0].tolist()] == [20 * n for n in range(1, 13)]
    every_third = vs.read_frames(str(folder), 3, 4, step=3)
    assert [round(v * 255) for v in every_third[:, 0, 0, 0].tolist()] == [20, 80, 140]
    (folder / "f13.png").write_bytes(b"not a png")
    with pytest.raises(UserError, match=r"--flow-check: .*f13.png is not a readable image"):
        vs.read_frames(str(folder), 100, 4)


def test_flow_check_measures_the_warp_with_the_flow_network_in_image_pixels():
    """With a flow network that returns the exact flow (at the feature stride, in feature pixels), the
    photometric check's warped error is far below the unwarped one; with zero flow they are equal."""
    data = SyntheticSegmentationVideo(1, 5, 64, seed=11)
    frames = data[0][0]

    class Oracle(torch.nn.Module):
        def __init__(self, exact: bool, stride: int):
            super().__init__()
            self.exact, self.feature_stride, self.t = exact, stride, 0

        def forward(self, key, current):
            self.t += 1
            flow = data.flow(0, self.t, self.t - 1)[None] if self.exact else torch.zeros(1, 2, 64, 64)
            return F.avg_pool2d(flow, self.feature_stride) / self.feature_stride, None

    model = DeepFeatureFlow(4, width=8, blocks=(1, 1))
    model.flow = Oracle(True, 8)
    good = vs.flow_check(model, frames)
    model.flow = Oracle(False, 8)
    zero = vs.flow_check(model, frames)
    assert zero["photometric_error_warped"] == pytest.approx(zero["photometric_error_identity"], abs=1e-6)
    assert good["photometric_error_identity"] == pytest.approx(zero["photometric_error_identity"])
    # block-averaged at stride 8 and upsampled, the flow is blurred across shape borders: about 60% of identity
    assert good["photometric_error_warped"] < 0.75 * good["photometric_error_identity"]
    assert good["pairs_improved"] == good["pairs"] == 4
    model.flow = Oracle(
        True, 1
    )  # the exact flow: texture interpolation (the checkerboard's edges) and disocclusion remain
    exact = vs.flow_check(model, frames)
    assert exact["photometric_error_warped"] < 0.55 * exact["photometric_error_identity"]


def test_real_frame_pairs_for_the_photometric_loss(tmp_path):
    """--flow-frames-dir: every step adds pairs of the folder's frames 0 .. max_distance apart, from an rng of their
    own (the synthetic batch is that of a run without them), a pure function of the step; the photometric loss is
    logged and added to the loss with its weight."""
    frames_dir = tmp_path / "frames"
    for t in range(12):  # frame t is uniformly 16 t grey levels: a pair's frames tell their indices
        _write_png(str(frames_dir / f"{t:03d}.png"), np.full((8, 12), 16 * t, np.uint8))
    cfg = _tiny_cfg(tmp_path / "run", frame_size=16, batch_size=16, max_distance=3)
    real = vs.TrainBatches(vs.Config(**{**cfg.__dict__, "flow_frames_dir": str(frames_dir), "flow_frames_height": 16}),
                           0, 1)  # fmt: skip
    plain = vs.TrainBatches(cfg, 0, 1)
    batch = real(5, pairs=True)
    assert batch["real_key"].shape == batch["real_current"].shape == (16, 3, 16, 24)
    first, second = ((batch[k][:, 0, 0, 0] * 255 / 16).round().long() for k in ("real_key", "real_current"))
    distance = second - first
    assert distance.min() >= 0 and distance.max() <= 3 and len(set(distance.tolist())) > 1
    assert (second <= 11).all()
    for k, v in plain(5, pairs=True).items():
        assert torch.equal(batch[k], v)
    assert torch.equal(real(5, pairs=True)["real_key"], batch["real_key"])
    assert not torch.equal(real(6, pairs=True)["real_key"], batch["real_key"])

    run = tmp_path / "run2"
    vs.train(_tiny_cfg(run, perframe_steps=0, dff_steps=2, flow_frames_dir=str(frames_dir), flow_frames_height=16))
    rows = _log(run)
    assert all(r["photometric"] >= 0 for r in rows)
    assert rows[0]["loss"] == pytest.approx(rows[0]["ce"] + rows[0]["epe"] + 10.0 * rows[0]["photometric"], rel=1e-5)


def test_photometric_loss_trains_the_flow_network_towards_the_motion():
    """The --flow-frames-dir loss reaches the flow network through the warp: a few Adam steps on it alone, on a
    camera-like pair moved by (1.5, -1) pixels, lower the photometric error well below that of the network's
    start, and the flow moves towards the true motion."""
    torch.manual_seed(0)
    net = FlowNetS(3, 16, feature_stride=4, width=8, init="zero")
    key, cur = _camera_pair(0, (1.5, -1.0), noise=0.0)
    opt = torch.optim.Adam(net.parameters(), lr=2e-3)
    errors = []
    for _ in range(40):
        loss = vs.photometric_error(net, key, cur).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        errors.append(loss.item())
    assert errors[-1] < 0.3 * errors[0]  # measured 0.11x
    with torch.no_grad():
        flow = net(key, cur)[0].mean((0, 2, 3)) * 4  # image pixels
    assert flow[0] > 0.9 and flow[1] < -0.5  # measured (1.21, -0.78)


def test_time_limit_stops_after_a_checkpoint_and_skips_the_final_evaluation(tmp_path, capsys):
    run = str(tmp_path / "run")
    args = ["train", "video-segmentation", "--run-dir", run, *TINY, "--perframe-steps", "3", "--dff-steps", "3"]
    assert main([*args, "--time-limit", "1e-6", "--save-every", "100"]) == 0
    assert "final evaluation is skipped" in capsys.readouterr().err
    assert not os.path.exists(os.path.join(run, "metrics.json"))
    assert torch.load(os.path.join(run, "last.pt"), weights_only=True)["step"] == 1
    assert not [n for n in os.listdir(run) if n.startswith(".tmp-")]
    # resumed without the limit (given again, flags change the run's config), it finishes and evaluates
    small = ["--test-sequences", "2", "--test-frames", "11", "--eval-repeats", "1"]
    assert main(["train", "video-segmentation", "--run-dir", run, "--resume", "--time-limit", "1e9", *small]) == 0
    assert [r["step"] for r in _log(run)] == [1, 2, 3, 4, 5, 6]
    assert json.load(open(os.path.join(run, "metrics.json")))["step"] == 6


def test_cli_trains_and_evaluates_on_a_cityscapes_tree(tmp_path, capsys):
    root = tmp_path / "cs"
    for split in ("train", "val"):
        _cityscapes_tree(root, split)
    run = str(tmp_path / "run")
    assert main(["train", "video-segmentation", "--run-dir", run, *TINY, "--frame-size", "16", "--data",
                 "cityscapes", "--cityscapes-dir", str(root), "--perframe-steps", "2", "--dff-steps", "2",
                 "--eval-repeats", "1"]) == 0  # fmt: skip
    metrics = json.load(open(os.path.join(run, "metrics.json")))
    assert metrics["test_sequences"] == 1 and 0 <= metrics["miou_distance_9"] <= 100
    assert "miou_interval_10" in metrics and "epe" not in _log(run)[-1]  # no ground-truth flow in Cityscapes
    assert vs.load_model(os.path.join(run, "last.pt"))[0].task.classifier.out_channels == 19


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--resume"], "holds no last.pt"),
        (["--blocks", "2,x"], "--blocks: expected comma-separated integers"),
        (["--data", "cityscapes"], "needs --cityscapes-dir"),
        (["--data", "cityscapes", "--cityscapes-dir", "/nonexistent"], "leftImg8bit_sequence/train is not a folder"),
        (["--flow-frames-dir", "/nonexistent"], "--flow-frames-dir: /nonexistent is not a folder"),
        (["--flow-frames-height", "8"], "--flow-frames-height must be >= 16"),
    ],
)
def test_cli_user_errors_are_one_line(tmp_path, capsys, argv, message):
    assert main(["train", "video-segmentation", "--run-dir", str(tmp_path / "r"), *TINY, *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("dynconv: error:") and message in err and "Traceback" not in err


@pytest.mark.parametrize("flag", ["--batch-size", "--perframe-steps", "--lr", "--time-limit", "--max-distance"])
def test_numeric_flags_are_checked_at_parse_time(tmp_path, capsys, flag):
    with pytest.raises(SystemExit) as exc:
        main(["train", "video-segmentation", "--run-dir", str(tmp_path / "r"), flag, "-1"])
    assert exc.value.code == 2 and flag in capsys.readouterr().err


@pytest.mark.parametrize("command, where", [("train", "--run-dir"), ("eval", "--checkpoint")])
def test_device_is_checked_at_parse_time(tmp_path, capsys, command, where):
    """A misspelt device is refused before any model is built (it was a torch traceback after set-up)."""
    with pytest.raises(SystemExit) as exc:
        main([command, "video-segmentation", where, str(tmp_path / "r"), "--device", "cudx"])
    assert exc.value.code == 2 and "argument --device" in capsys.readouterr().err


def test_frame_folder_errors_name_the_flag_and_the_folder(tmp_path, capsys):
    ckpt = tmp_path / "run" / "last.pt"
    vs.train(_tiny_cfg(tmp_path / "run", perframe_steps=1, dff_steps=0))
    (tmp_path / "one").mkdir()
    _write_png(str(tmp_path / "one" / "0.png"), np.zeros((8, 8, 3), np.uint8))
    for argv, message in (
        (["eval", "--flow-check", str(tmp_path / "none")], "--flow-check: .*none is not a folder"),
        (["eval", "--flow-check", str(tmp_path / "one")], "--flow-check: .*one holds 1 frame"),
        (["predict", "--frames-dir", str(tmp_path / "one")], "--frames-dir: .*one holds 1 frame"),
    ):
        assert main([argv[0], "video-segmentation", "--checkpoint", str(ckpt), *argv[1:]]) == 2
        assert re.search(message, capsys.readouterr().err)


def test_an_existing_run_needs_resume(tmp_path, capsys):
    run = str(tmp_path / "run")
    args = ["train", "video-segmentation", "--run-dir", run, *TINY, "--perframe-steps", "2", "--dff-steps", "0"]
    assert main([*args, "--time-limit", "1e-6"]) == 0  # stops at once, before any evaluation
    assert main(args) == 2
    assert "pass --resume" in capsys.readouterr().err


# A torchrun entry point: the dynconv command, each rank keeping its model (built by the recipe) for the test to read.
_DRIVER = """
import os, sys, torch
from dynconv.cli import main
from dynconv.recipes import video_segmentation as vs
built, build = [], vs.build_model
vs.build_model = lambda cfg: built.append(build(cfg)) or built[-1]
code = main(sys.argv[2:])
torch.save(built[0].state_dict(), os.path.join(sys.argv[1], "rank%s.pt" % os.environ["RANK"]))
sys.exit(code)
"""


@pytest.mark.slow
def test_torchrun_two_processes(tmp_path):
    """``dynconv train video-segmentation`` under torchrun, 2 processes (gloo): it finishes, writes last.pt at the
    last step and logs each step once; the two ranks draw disjoint clips (rank r of W: clips (step W + r) B ...),
    the logged first-step loss is the mean of the two ranks' losses of a fresh model on their batches (computed
    here in one process), and both ranks end with the same parameters and buffers, those of last.pt."""
    driver = tmp_path / "driver.py"
    driver.write_text(_DRIVER)
    run = tmp_path / "ddp"
    argv = ["train", "video-segmentation", "--run-dir", str(run), *TINY, "--perframe-steps", "2", "--dff-steps", "2",
            "--test-sequences", "1", "--test-frames", "11", "--eval-repeats", "1"]  # fmt: skip
    env = dict(os.environ, PYTHONPATH=REPO, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(driver),
           str(tmp_path), *argv]  # fmt: skip
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    state = load_checkpoint(str(run / "last.pt"))
    assert state["step"] == 4 and state["config"]["batch_size"] == 2
    rows = _log(run)
    assert [r["step"] for r in rows] == [1, 2, 3, 4] and [r["stage"] for r in rows] == ["per-frame"] * 2 + ["dff"] * 2
    assert json.load(open(run / "metrics.json"))["step"] == 4

    cfg = vs.Config(**state["config"])
    ranks = [vs.TrainBatches(cfg, r, 2) for r in (0, 1)]
    first = [b(0, pairs=False) for b in ranks]
    # disjoint clips: no frame of rank 0's batch is in rank 1's
    assert not any(torch.equal(a, b) for a in first[0]["current"] for b in first[1]["current"])
    torch.manual_seed(cfg.seed)
    model = vs.build_model(cfg).train()
    step = vs._Step(model, cfg)
    with torch.no_grad():
        expected = np.mean([step(batch, False)[0].item() for batch in first])
    assert rows[0]["loss"] == pytest.approx(expected, rel=1e-5)
    # one rank's batch alone does not give the logged loss (the test can tell the ranks apart)
    assert rows[0]["loss"] != pytest.approx(step(first[0], False)[0].item(), rel=1e-3)

    per_rank = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    torch.manual_seed(cfg.seed)
    fresh = vs.build_model(cfg).state_dict()  # both ranks' parameters at step 0
    for name, value in state["model"].items():
        assert torch.equal(per_rank[0][name], value) and torch.equal(per_rank[1][name], value), name
    assert not torch.equal(state["model"]["flow.predict0.weight"], fresh["flow.predict0.weight"])  # it trained
