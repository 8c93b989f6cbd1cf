"""DFN video prediction: the Moving MNIST protocol, the models, metrics, checkpoints, training and DDP."""

import json
import math
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

from dynconv import metrics
from dynconv.data import FrameFolderVideo, MovingMNIST, load_digits, load_mnist_test_seq
from dynconv.data import moving_mnist as mm
from dynconv.errors import UserError
from dynconv.models.dfn_seed import DFNSeedPredictor
from dynconv.models.dfn_video import ConvLSTMPredictor, CopyLastFrame, DFNVideoPredictor, rollout
from dynconv.recipes import video_prediction as vp
from dynconv.recipes.checkpoint import CheckpointError, load_checkpoint, save_checkpoint

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------------------------------------- data


def test_trajectories_follow_the_protocol():
    rng = np.random.default_rng(0)
    pos = mm.trajectories(rng, 500, frames=40)
    assert pos.shape == (40, 500, 2) and pos.min() >= 0 and pos.max() <= 36  # digits stay inside the canvas
    steps = np.abs(np.diff(pos, axis=0))
    assert steps.max() <= 4  # 0.1 * 36 = 3.6 px per frame, truncated positions
    # bounce: a coordinate that hits a border moves back the other way on the next frame
    bounced = 0
    for d in range(500):
        for axis in range(2):
            p = pos[:, d, axis]
            for t in range(1, 39):
                if p[t] == 36 and p[t - 1] < 36:
                    assert p[t + 1] <= p[t]
                    bounced += 1
                if p[t] == 0 and p[t - 1] > 0:
                    assert p[t + 1] >= p[t]
                    bounced += 1
    assert bounced > 50


def test_trajectory_matches_hand_computed_first_frames():
    """Move-then-bounce from the protocol, computed by hand from the same random draws."""
    rng = np.random.default_rng(7)
    y0, x0, theta = rng.random(1)[0], rng.random(1)[0], rng.random(1)[0] * 2 * math.pi
    pos = mm.trajectories(np.random.default_rng(7), 1, frames=3)
    for t in range(3):
        y, x = y0 + (t + 1) * 0.1 * math.sin(theta), x0 + (t + 1) * 0.1 * math.cos(theta)
        if 0 < y < 1 and 0 < x < 1:
            assert tuple(pos[t, 0]) == (int(36 * y), int(36 * x))


def test_sequences_are_seeded_shaped_and_composited_with_max():
    digits = load_digits("embedded", "train")
    data = MovingMNIST(digits, 10, seed=3)
    a, b = data[4], MovingMNIST(digits, 10, seed=3)[4]
    assert a.shape == (20, 1, 64, 64) and a.dtype == torch.float32
    assert torch.equal(a, b) and not torch.equal(a, data[5])
    assert a.min() >= 0 and a.max() <= 1
    rng = np.random.default_rng([3, 4])
    chosen = digits[rng.integers(0, len(digits), 2)]
    pos = mm.trajectories(rng, 2)
    frame = np.zeros((64, 64), np.float32)
    for d in range(2):
        r, c = pos[0, d]
        frame[r : r + 28, c : c + 28] = np.maximum(frame[r : r + 28, c : c + 28], chosen[d])
    assert np.array_equal(a[0, 0].numpy(), frame)


def test_embedded_digits_split_is_disjoint():
    train, test = load_digits("embedded", "train"), load_digits("embedded", "test")
    assert len(train) + len(test) == 5000 and len(test) == 1000
    train_set = {d.tobytes() for d in train}
    assert not any(d.tobytes() in train_set for d in test)
    assert load_digits("squares").shape == (1, 28, 28)


def test_idx_digits_and_test_seq_loader(tmp_path):
    import gzip
    import struct

    images = np.random.default_rng(0).integers(0, 256, (3, 28, 28), dtype=np.uint8)
    with gzip.open(tmp_path / "t10k-images-idx3-ubyte.gz", "wb") as fh:
        fh.write(struct.pack(">IIII", 2051, 3, 28, 28) + images.tobytes())
    loaded = load_digits("idx", "test", str(tmp_path))
    assert np.allclose(loaded, images / 255.0)
    with pytest.raises(UserError, match="train-images-idx3-ubyte"):
        load_digits("idx", "train", str(tmp_path))
    seq = np.random.default_rng(1).integers(0, 256, (20, 2, 64, 64), dtype=np.uint8)
    np.save(tmp_path / "mnist_test_seq.npy", seq)
    out = load_mnist_test_seq(str(tmp_path / "mnist_test_seq.npy"))
    assert out.shape == (2, 20, 1, 64, 64)
    assert torch.allclose(out[1, 5, 0], torch.from_numpy(seq[5, 1] / 255.0).float())


def test_frame_folder_clips(tmp_path):
    from PIL import Image

    for s, n in (("seq_a", 7), ("seq_b", 4)):
        os.makedirs(tmp_path / s)
        for i in range(n):
            Image.fromarray(np.full((10, 12, 3), i * 30, np.uint8)).save(tmp_path / s / f"{i:04d}.png")
    data = FrameFolderVideo(str(tmp_path), clip_length=3, stride=2, size=(8, 6))
    assert len(data) == 3 + 1  # seq_a starts 0, 2, 4; seq_b starts 0
    clip = data[1]
    assert clip.shape == (3, 3, 8, 6)
    assert torch.allclose(clip[:, 0, 0, 0], torch.tensor([60, 90, 120]) / 255.0)
    assert FrameFolderVideo(str(tmp_path), clip_length=2, frame_step=3, grayscale=True)[0].shape == (2, 1, 10, 12)
    with pytest.raises(UserError, match="no sequence"):
        FrameFolderVideo(str(tmp_path), clip_length=8)


# ---------------------------------------------------------------------------------------------- models


def _conv_params(cin, cout, k):
    return cin * cout * k * k + cout


def test_dfn_parameter_count_matches_the_architecture():
    layers = [
        (1, 32, 3),
        (32, 32, 3),
        (32, 64, 3),
        (64, 64, 3),
        (64, 128, 3),
        (128, 128, 3),
        (128, 128, 3),
        (128, 64, 3),
        (64, 64, 3),
        (64, 64, 3),
        (64, 64, 3),
        (64, 128, 1),
        (128, 81, 1),
    ]
    expected = sum(_conv_params(*layer) for layer in layers)
    assert sum(p.numel() for p in DFNVideoPredictor().parameters()) == expected == 637_361  # = the paper's count
    baseline = sum(_conv_params(*layer) for layer in layers[:-1]) + _conv_params(128, 1, 1)
    assert sum(p.numel() for p in DFNVideoPredictor(predict="pixels").parameters()) == baseline


def test_filters_are_convex_and_rollout_feeds_predictions_back():
    torch.manual_seed(0)
    model = DFNVideoPredictor()
    frames = torch.rand(2, 6, 1, 16, 16)
    pred, filters = rollout(model, frames, observed=3, return_filters=True)
    assert pred.shape == (2, 3, 1, 16, 16) and filters.shape == (2, 3, 81, 16, 16)
    assert torch.allclose(filters.sum(2), torch.ones(2, 3, 16, 16), atol=1e-5)
    assert (filters >= 0).all()
    # the frames after the observed ones are never read: changing them changes nothing
    other = frames.clone()
    other[:, 3:] = 0
    assert torch.equal(rollout(model, other, observed=3), pred)
    # the first prediction is the last observed frame filtered by the predicted filters
    from dynconv import reference

    first = reference.local_filter2d(frames[:, 2], filters[:, 0].unsqueeze(1), (9, 9), (1, 1), (4, 4), (1, 1))
    assert torch.allclose(pred[:, 0], first, atol=1e-5)
    assert ConvLSTMPredictor().step(frames[:, 0], None)[0].shape == (2, 1, 16, 16)
    assert torch.equal(rollout(CopyLastFrame(), frames, observed=3), frames[:, 2:3].expand(-1, 3, -1, -1, -1))


@pytest.mark.parametrize("name", ["baseline", "convlstm"])
def test_pixel_models_train_on_logits_so_a_saturated_sigmoid_keeps_its_gradient(name):
    torch.manual_seed(0)
    model = vp.build_model(name)
    frames = torch.rand(2, 5, 1, 8, 8)
    probs = rollout(model, frames, observed=3)
    out = rollout(model, frames, observed=3, logits=True)
    assert torch.allclose(torch.sigmoid(out), probs, atol=1e-6)
    last = model.head[1] if name == "baseline" else model.decoder[-1]
    with torch.no_grad():
        last.bias.fill_(-40.0)  # every output pixel saturated at 0: the clipped BCE has no gradient left
    cfg = vp.Config()
    target = torch.ones(2, 2, 1, 8, 8)
    clipped = vp.loss_fn(rollout(model, frames, observed=3), target, cfg)
    (g_clipped,) = torch.autograd.grad(clipped, last.bias)
    assert torch.count_nonzero(g_clipped) == 0
    with_logits = vp.loss_fn(rollout(model, frames, observed=3, logits=True), target, cfg, logits=True)
    (g_logits,) = torch.autograd.grad(with_logits, last.bias)
    assert g_logits.item() < -0.5  # d/db of BCE(sigmoid(b), 1) = sigmoid(b) - 1 = -1 at every pixel
    assert with_logits.item() > 30  # the unclipped BCE (logits near -40); the clip caps it at 16.1
    assert clipped.item() == pytest.approx(-math.log(cfg.eps), rel=1e-3)


def test_seed_model_filters_each_channel_and_starts_as_pure_filtering():
    """The RGB seed variant: one convex filter per pixel and channel, applied to the latest frame (channel c with
    its own filters); the refinement starts at zero; the generator reads the previous frame through ``hidden``."""
    from dynconv import reference

    torch.manual_seed(0)
    model = DFNSeedPredictor(channels=3, num_input=2, kernel_size=3, width=4, refine=2)
    frame = torch.rand(2, 3, 8, 12)
    out, hidden, filters = model.step(frame, None)
    assert out.shape == (2, 3, 8, 12) and filters.shape == (2, 27, 8, 12) and hidden.shape == (2, 1, 3, 8, 12)
    assert torch.equal(hidden[:, 0], frame)
    per_channel = filters.unflatten(1, (3, 9))
    assert torch.allclose(per_channel.sum(2), torch.ones(2, 3, 8, 12), atol=1e-5) and (per_channel >= 0).all()
    assert not torch.allclose(per_channel[:, 0], per_channel[:, 1])  # the channels have their own filters
    expected = reference.local_filter2d(frame, per_channel, (3, 3), (1, 1), (1, 1), (1, 1))
    assert torch.allclose(out, expected, atol=1e-6)
    # a trained refinement adds a correction, and the output stays an image
    with torch.no_grad():
        model.refine[-1].weight.normal_(0, 0.5)
    refined = model.step(frame, None)[0]
    assert not torch.allclose(refined, expected, atol=1e-3) and refined.min() >= 0 and refined.max() <= 1
    # the previous frame matters: the filters depend on the two-frame window
    other_past = model.step(frame, torch.zeros(2, 1, 3, 8, 12))[2]
    assert not torch.allclose(other_past, filters)
    pred, rolled = rollout(model, torch.rand(2, 5, 3, 8, 12), observed=3, return_filters=True)
    assert pred.shape == (2, 2, 3, 8, 12) and rolled.shape == (2, 2, 27, 8, 12)


@pytest.mark.parametrize(
    "build, frame, match",
    [
        (dict(), torch.rand(1, 3, 10, 12), r"multiples of 4, got 10x12"),
        (dict(), torch.rand(1, 1, 8, 8), r"frame must be \[B, 3, H, W\], got shape \(1, 1, 8, 8\)"),
        (dict(kernel_size=4), None, r"kernel_size must be a positive odd integer, got 4"),
        (dict(num_input=0), None, r"num_input must be an integer >= 1, got 0"),
    ],
)
def test_seed_model_errors(build, frame, match):
    with pytest.raises(ValueError, match=match):
        DFNSeedPredictor(**dict(dict(width=2, kernel_size=3), **build)).step(frame, None)


def _moving_square_folder(root, sequences=3, length=8, size=16):
    """RGB frame folders (KITTI layout): a coloured square moving one pixel right per frame."""
    from PIL import Image

    for s in range(sequences):
        os.makedirs(root / f"seq_{s}")
        for t in range(length):
            img = np.zeros((size, size, 3), np.uint8)
            x = 2 + s + t
            img[5:10, x : x + 5] = (255, 120 + 40 * s, 60)
            Image.fromarray(img).save(root / f"seq_{s}" / f"{t:03d}.png")


def test_seed_model_trains_on_rgb_frame_folders_and_predicts(tmp_path, capsys):
    """``--model seed --frames-dir ... --loss composite`` trains (the loss falls) and ``predict`` writes the GIF,
    the strip and the filter picture of an RGB folder."""
    from dynconv.cli import main

    _moving_square_folder(tmp_path / "frames")
    run = str(tmp_path / "run")
    args = ["--model", "seed", "--frames-dir", str(tmp_path / "frames"), "--frame-size", "16", "--loss", "composite"]
    args += ["--frames", "6", "--observed", "3", "--batch-size", "3", "--test-sequences", "3", "--lr", "2e-3"]
    assert main(["train", "video-prediction", "--run-dir", run, "--max-steps", "30"] + args) == 0
    losses = [json.loads(line)["loss"] for line in open(os.path.join(run, "log.jsonl"))]
    assert np.mean(losses[-5:]) < 0.8 * np.mean(losses[:5])
    gif = str(tmp_path / "out" / "p.gif")
    ckpt = os.path.join(run, "last.pt")
    assert (
        main(
            ["predict", "video-prediction", "--checkpoint", ckpt, "--input", str(tmp_path / "frames"), "--output", gif]
        )
        == 0
    )
    for suffix in (".gif", ".png", "_filters.png"):
        assert os.path.exists(gif[:-4] + suffix), suffix


# ---------------------------------------------------------------------------------------------- metrics


def test_ssim_in_chunks_equals_all_at_once():
    pred, target = torch.rand(3, 5, 1, 16, 16), torch.rand(3, 5, 1, 16, 16)
    whole = metrics.ssim_per_frame(pred, target, frames_per_chunk=10**6)
    assert whole.shape == (3, 5, 1)
    assert torch.equal(metrics.ssim_per_frame(pred, target, frames_per_chunk=4), whole)


def test_bce_standard_error_on_hand_computed_cases():
    """Two sequences of two 2x2 frames: one at p = 0.5 everywhere (4 ln 2 per frame), one at 0.5 in one frame and
    exact in the other (4 ln 2 and about 0): per-sequence means 4 ln 2 and 2 ln 2, mean 3 ln 2, and the
    standard error of two values is half their difference, ln 2."""
    target = torch.tensor([[1.0, 0.0], [0.0, 1.0]]).expand(2, 2, 1, 2, 2).clone()
    pred = torch.full_like(target, 0.5)
    pred[1, 1] = target[1, 1]
    m = metrics.summarize(pred, target)
    assert m["bce_per_frame"] == pytest.approx(3 * math.log(2), abs=1e-5)
    assert m["bce_per_frame_sem"] == pytest.approx(math.log(2), abs=1e-5)
    assert metrics.summarize(pred[:1], target[:1])["bce_per_frame_sem"] is None


def test_metrics_on_hand_computed_cases():
    pred = torch.tensor([[[0.5, 0.5], [0.5, 0.5]]])
    target = torch.tensor([[[1.0, 0.0], [1.0, 1.0]]])
    assert metrics.bce_per_frame(pred, target).item() == pytest.approx(4 * math.log(2))
    assert metrics.mse_per_frame(pred, target).item() == pytest.approx(0.25)
    assert metrics.mae_per_frame(pred, target).item() == pytest.approx(0.5)
    assert metrics.psnr_per_frame(pred, target).item() == pytest.approx(10 * math.log10(4))
    x = torch.rand(2, 16, 16)
    assert torch.allclose(metrics.ssim_per_frame(x, x), torch.ones(2, dtype=torch.float64))
    # SSIM of constant frames a and b: only the luminance term is left, (2ab + c1) / (a^2 + b^2 + c1)
    a, b, c1 = 0.2, 0.6, 0.01**2
    s = metrics.ssim_per_frame(torch.full((1, 16, 16), a), torch.full((1, 16, 16), b))
    assert s.item() == pytest.approx((2 * a * b + c1) / (a * a + b * b + c1), rel=1e-6)
    assert metrics.ssim_per_frame(x, 1 - x).mean() < 0.2


# ---------------------------------------------------------------------------------------------- checkpoints


def test_checkpoint_is_an_ordinary_readable_file(tmp_path):
    save_checkpoint(str(tmp_path / "c.pt"), {"step": 1})
    assert os.stat(tmp_path / "c.pt").st_mode & 0o777 == 0o644


def test_checkpoint_atomic_and_clear_errors(tmp_path, monkeypatch):
    path = str(tmp_path / "last.pt")
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(path)
    save_checkpoint(path, {"step": 1})
    assert load_checkpoint(path)["step"] == 1

    def broken_save(obj, fh):
        fh.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(path, {"step": 2})
    monkeypatch.undo()
    assert load_checkpoint(path)["step"] == 1  # the last good checkpoint is intact
    assert os.listdir(tmp_path) == ["last.pt"]  # and no temporary file is left
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="cannot be read: it is truncated, corrupted or not a torch file"):
        load_checkpoint(str(tmp_path / "bad.pt"))
    torch.save({"model": {}}, tmp_path / "foreign.pt")
    with pytest.raises(CheckpointError, match="not a dynconv checkpoint"):
        load_checkpoint(str(tmp_path / "foreign.pt"))


# ---------------------------------------------------------------------------------------------- training


def _cfg(tmp_path, **kw):
    base = dict(
        run_dir=str(tmp_path / "run"),
        frames=6,
        observed=3,
        batch_size=2,
        steps_per_epoch=4,
        epochs=1,
        save_every=2,
        lr=3e-3,
        test_sequences=4,
    )
    base.update(kw)
    return vp.Config(**base)


def test_training_reduces_the_loss(tmp_path):
    """A short run lowers the test-set BCE below that of the same model at initialisation."""
    cfg = _cfg(tmp_path, model="baseline", max_steps=10, steps_per_epoch=100, batch_size=4, lr=1e-3)
    torch.manual_seed(cfg.seed)
    before = vp.evaluate(vp.build_model("baseline"), vp.test_set(cfg), cfg.observed)["bce_per_frame"]
    losses = vp.train(cfg)["losses"]
    after = vp.evaluate(vp.load_model(os.path.join(cfg.run_dir, "last.pt"))[0], vp.test_set(cfg), cfg.observed)
    assert after["bce_per_frame"] < 0.7 * before
    assert np.mean(losses[-3:]) < np.mean(losses[:3])


def test_filter_picture_shows_the_filters_over_the_bright_pixels():
    """Each tile is the filter of one of the brightest pixels of the predicted frame: a filter that is one-hot at
    tap (2, 6) over the digit and at the centre elsewhere shows (2, 6) in every tile."""
    k, H, W = 9, 32, 32
    frame = torch.zeros(1, H, W)
    frame[0, 10:26, 6:22] = torch.rand(16, 16) * 0.5 + 0.5  # the "digit": 64 lattice pixels at least
    filters = torch.zeros(k * k, H, W)
    filters[4 * k + 4] = 1.0
    filters[:, 10:26, 6:22] = 0.0
    filters[2 * k + 6, 10:26, 6:22] = 1.0
    grid = vp._filter_grid(filters, frame, None)
    assert grid.shape == (8 * (k + 1), 8 * (k + 1))
    tiles = grid.reshape(8, k + 1, 8, k + 1).permute(0, 2, 1, 3)[:, :, :k, :k]
    assert torch.all(tiles[:, :, 2, 6] == 1.0) and torch.all(tiles.sum((-2, -1)) == 1.0)
    # three channel groups are averaged into one picture
    assert torch.equal(vp._filter_grid(filters.repeat(3, 1, 1), frame.repeat(3, 1, 1), k), grid)


def test_progress_lines_without_a_terminal(capsys):
    """Off a terminal: a line every 10% of the run, and at least one per ``seconds`` on slow runs."""
    p = vp.Progress(total=100, start=0, enabled=True, seconds=1e9)
    for step in range(100):
        p.update(step, 0.5, 8)
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 10 and "step 100/100" in lines[-1] and "seq/s" in lines[0]
    p = vp.Progress(total=100, start=0, enabled=True, seconds=0.0)
    for step in range(5):
        p.update(step, 0.5, 8)
    assert len(capsys.readouterr().err.splitlines()) == 5


def test_resume_continues_exactly(tmp_path):
    full = vp.train(_cfg(tmp_path / "a", max_steps=4))["losses"]
    vp.train(_cfg(tmp_path / "b", max_steps=2))
    resumed = vp.train(_cfg(tmp_path / "b", max_steps=4))["losses"]  # picks up b/run/last.pt at step 2
    assert len(resumed) == 2
    assert resumed == pytest.approx(full[2:], rel=1e-6, abs=1e-7)


def test_time_limit_stops_after_a_checkpoint_and_resume_continues_exactly(tmp_path):
    full = vp.train(_cfg(tmp_path / "a", max_steps=4, save_every=3))["losses"]
    # A limit of 0 s: stop after the first step, with a checkpoint although save_every is 3.
    first = vp.train(_cfg(tmp_path / "b", max_steps=4, save_every=3, time_limit=0.0))
    assert first["step"] == 1 and len(first["losses"]) == 1
    assert load_checkpoint(str(tmp_path / "b" / "run" / "last.pt"))["step"] == 1
    rest = vp.train(_cfg(tmp_path / "b", max_steps=4, save_every=3))
    assert rest["step"] == 4
    assert first["losses"] + rest["losses"] == pytest.approx(full, rel=1e-6, abs=1e-7)


def test_init_from_starts_from_the_weights_with_a_fresh_optimizer(tmp_path):
    src = _cfg(tmp_path / "src", max_steps=2)
    vp.train(src)
    src_path = os.path.join(src.run_dir, "last.pt")
    # lr 0: Adam leaves the weights where they started, so the run's checkpoint holds the loaded weights.
    vp.train(_cfg(tmp_path / "dst", max_steps=1, lr=0.0, seed=1, init_from=src_path))
    got = load_checkpoint(str(tmp_path / "dst" / "run" / "last.pt"))
    want = load_checkpoint(src_path)
    assert got["step"] == 1 and got["optimizer"]["state"][0]["step"] == 1  # a fresh optimizer
    for name, value in want["model"].items():
        assert torch.equal(got["model"][name], value), name
    with pytest.raises(UserError, match=r"init_from .* holds a 'dfn' model .* this run trains 'baseline'"):
        vp.train(_cfg(tmp_path / "other", model="baseline", max_steps=1, init_from=src_path))
    with pytest.raises(CheckpointError, match=r"init_from: checkpoint 'nowhere.pt' is neither a file nor a shipped"):
        vp.train(_cfg(tmp_path / "missing", max_steps=1, init_from="nowhere.pt"))


def test_cli_train_eval_predict(tmp_path, capsys):
    from dynconv.cli import main

    run = str(tmp_path / "run")
    common = ["--frames", "6", "--observed", "3", "--batch-size", "2", "--test-sequences", "3"]
    assert (
        main(["train", "video-prediction", "--run-dir", run, "--max-steps", "2", "--model", "baseline"] + common) == 0
    )
    metrics_json = json.load(open(os.path.join(run, "metrics.json")))
    assert metrics_json["bce_per_frame"] > 0
    capsys.readouterr()
    assert main(["train", "video-prediction", "--run-dir", run, "--max-steps", "2"]) == 2
    assert "pass --resume to continue that run" in capsys.readouterr().err
    assert main(["eval", "video-prediction", "--checkpoint", os.path.join(run, "last.pt")]) == 0
    out = capsys.readouterr().out
    assert "| baseline" in out and "| copy last frame" in out
    gif = str(tmp_path / "p.gif")
    assert main(["predict", "video-prediction", "--checkpoint", os.path.join(run, "last.pt"), "--output", gif]) == 0
    assert os.path.exists(gif) and os.path.exists(gif[:-4] + ".png")


def test_cli_resume_keeps_the_runs_config(tmp_path, capsys):
    """`--run-dir DIR --resume` alone continues the run with its own settings, not the flags' defaults (which
    differ here in batch size, learning rate, schedule and seed, so any one of them taken would change the
    losses); flags given again change the run (here --max-steps, to go on)."""
    from dynconv.cli import main

    flags = ["--frames", "6", "--observed", "3", "--batch-size", "3", "--test-sequences", "2", "--lr", "0.004"]
    flags += ["--steps-per-epoch", "1", "--lr-halve-every", "1", "--seed", "5", "--save-every", "1"]

    def train(run, *extra):
        assert main(["train", "video-prediction", "--run-dir", str(tmp_path / run), *extra]) == 0
        return [json.loads(line) for line in open(tmp_path / run / "log.jsonl")]

    full = train("full", *flags, "--max-steps", "4")
    train("part", *flags, "--max-steps", "2")
    capsys.readouterr()
    resumed = train("part", "--resume", "--max-steps", "4")
    assert "resuming with the run's config; changed: max_steps 2 -> 4" in capsys.readouterr().err
    assert [r["step"] for r in resumed] == [1, 2, 3, 4]
    assert [r["lr"] for r in resumed] == [r["lr"] for r in full] == [0.004 * 0.5**i for i in range(4)]
    assert [r["loss"] for r in resumed] == pytest.approx([r["loss"] for r in full], rel=1e-6, abs=1e-7)
    config = json.load(open(tmp_path / "part" / "config.json"))
    assert (config["batch_size"], config["seed"], config["max_steps"]) == (3, 5, 4)
    capsys.readouterr()
    argv = ["train", "video-prediction", "--run-dir", str(tmp_path / "part"), "--resume", "--model", "convlstm"]
    assert main(argv) == 2
    assert re.search(r"--model convlstm: .* holds a 'dfn' run", capsys.readouterr().err)
    os.rename(tmp_path / "part", tmp_path / "moved")  # a moved run folder continues there, and says so
    train("moved", "--resume", "--max-steps", "5")
    moved = f"run_dir {str(tmp_path / 'part')!r} -> {str(tmp_path / 'moved')!r}"
    assert f"resuming with the run's config; changed: {moved}, max_steps 4 -> 5" in capsys.readouterr().err


def test_export_and_load_a_shipped_checkpoint_by_name(tmp_path, monkeypatch):
    from dynconv import checkpoints

    cfg = _cfg(tmp_path, max_steps=3)
    vp.train(cfg)
    monkeypatch.setattr(checkpoints, "_HERE", str(tmp_path / "shipped"))
    monkeypatch.setitem(checkpoints.SHIPPED, "tiny-dfn", "a test checkpoint")
    assert "tiny-dfn" not in checkpoints.available()
    with pytest.raises(CheckpointError, match=r"'tiny-dfn' is neither a file nor a shipped checkpoint"):
        vp.load_model("tiny-dfn")
    record = vp.export_checkpoint(
        os.path.join(cfg.run_dir, "last.pt"), checkpoints.path_of("tiny-dfn"), {"device": "cpu"}
    )
    assert record["step"] == 3 and len(record["training_loss_per_step"]) == 3 and record["device"] == "cpu"
    assert json.load(open(tmp_path / "shipped" / "tiny-dfn.json"))["config"]["model"] == "dfn"
    assert "optimizer" not in load_checkpoint(checkpoints.path_of("tiny-dfn"))
    assert checkpoints.available() == ["tiny-dfn"]
    shipped, _ = vp.load_model("tiny-dfn")
    trained, _ = vp.load_model(os.path.join(cfg.run_dir, "last.pt"))
    frames = vp.test_set(cfg)
    assert torch.equal(rollout(shipped, frames, cfg.observed), rollout(trained, frames, cfg.observed))


@pytest.mark.slow
def test_torchrun_two_processes(tmp_path):
    env = dict(os.environ, PYTHONPATH=REPO, OMP_NUM_THREADS="1")
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        "-m",
        "dynconv",
        "train",
        "video-prediction",
        "--run-dir",
        str(tmp_path / "ddp"),
        "--max-steps",
        "3",
        "--frames",
        "6",
        "--observed",
        "3",
        "--batch-size",
        "2",
        "--test-sequences",
        "2",
        "--threads",
        "1",
    ]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    state = load_checkpoint(str(tmp_path / "ddp" / "last.pt"))
    assert state["step"] == 3
    log = [json.loads(line) for line in open(tmp_path / "ddp" / "log.jsonl")]
    assert [r["step"] for r in log] == [1, 2, 3]


def test_training_batches_split_across_ranks_like_one_process():
    """Under torchrun, rank r of W with batch B draws sequences (step*W + r)*B ...: the W ranks of a step together
    draw the batch W*B of one process, so a run can move between 1 and W processes (--resume) on the same data."""
    one = vp.TrainBatches(vp.Config(digits="squares", batch_size=4, frames=3), rank=0, world=1)
    two = [vp.TrainBatches(vp.Config(digits="squares", batch_size=2, frames=3), rank=r, world=2) for r in (0, 1)]
    for step in (0, 5):
        assert torch.equal(torch.cat([b(step) for b in two]), one(step))
    assert not torch.equal(one(0), one(1))
