"""Recipes and the command line never give a silently wrong answer (issue 18, items 1-11, and the same classes of
defect found elsewhere): data read as it is meant, held-out test sets, one test set per table, user errors as
one line with exit status 2, flags checked when parsed, run folders that survive kills and resumes.

Kept fast: tiny frames, the ``squares`` digits (no CSV to parse), checkpoints of untrained models written
directly, and at most a few training steps; one subprocess, for the real exit status.
"""

import dataclasses
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

from dynconv.cli import main
from dynconv.data.frame_folder import FrameFolderVideo, natural_key
from dynconv.data.moving_mnist import load_mnist_test_seq, to_unit_range
from dynconv.errors import UserError
from dynconv.recipes import run_dir
from dynconv.recipes import video_prediction as vp
from dynconv.recipes.checkpoint import load_checkpoint, save_checkpoint

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

pytestmark = pytest.mark.usefixtures("one_thread")


def cli(capsys, *argv):
    """``dynconv ARGV`` in this process: (exit status, stdout, stderr)."""
    capsys.readouterr()
    try:
        rc = main(list(argv))
    except SystemExit as exc:  # argparse's own errors exit 2 after printing usage and the message
        rc = exc.code
    out, err = capsys.readouterr()
    return rc, out, err


def one_line_error(capsys, *argv) -> str:
    """Run a command that must fail as a user error: exit 2, one line ``dynconv: error: ...`` and no traceback."""
    rc, _, err = cli(capsys, *argv)
    lines = err.strip().splitlines()
    assert rc == 2, err
    assert len(lines) == 1 and lines[0].startswith("dynconv: error: "), err
    return lines[0]


def tiny_checkpoint(path, model="baseline", channels=1, seed=0, **config):
    """A checkpoint of an untrained model, as a training run writes it (weights, step, config, channels)."""
    cfg = vp.Config(**{**dict(digits="squares", frames=4, observed=2, test_sequences=2), **config, "model": model})
    torch.manual_seed(seed)
    state = {"model": vp.build_model(model, channels).state_dict(), "step": 1, "channels": channels}
    save_checkpoint(str(path), {**state, "config": dataclasses.asdict(cfg)})
    return str(path)


def png_frames(folder, values, size=(8, 8), name="{}.png"):
    """Grayscale frames whose every pixel is ``value``, one per value, named by ``name.format(i)``."""
    from PIL import Image

    os.makedirs(folder, exist_ok=True)
    for i, value in enumerate(values):
        Image.fromarray(np.full(size, value, np.uint8)).save(os.path.join(folder, name.format(i)))


TINY = ["--digits", "squares", "--frames", "3", "--observed", "2", "--batch-size", "1", "--test-sequences", "1"]


# ------------------------------------------------------------------- 1. the scale of --test-npy comes from the data


def test_unit_range_is_decided_from_dtype_and_range():
    frames = np.random.default_rng(0).integers(0, 256, (3, 4, 4), dtype=np.uint8)
    frames[0, 0, :2] = 0, 255  # the whole range
    expected = frames.astype(np.float32) / 255
    assert np.array_equal(to_unit_range(frames, "x"), expected)  # uint8: 0..255
    assert np.array_equal(to_unit_range(expected, "x"), expected)  # float in [0, 1]: as it is
    assert np.allclose(to_unit_range(frames.astype(np.float64), "x"), expected)  # whole floats up to 255
    assert np.array_equal(to_unit_range(frames > 128, "x"), (frames > 128).astype(np.float32))  # bool
    for bad, match in [
        (frames.astype(np.float32) / 100, "neither in \\[0, 1\\] nor whole numbers"),  # 0 .. 2.55
        ((frames > 128).astype(np.uint8), "only 0 and 1 are ambiguous"),
        (frames.astype(np.int16) - 1, "values from -1"),
        (frames.astype(np.int32) + 1, "to 256"),
        (np.full((2, 2), np.nan, np.float32), "NaN"),
        (np.array([["a"]]), "numeric array"),
    ]:
        with pytest.raises(UserError, match=match):
            to_unit_range(bad, "x")


def test_eval_test_npy_float_in_unit_range_is_not_divided_again(tmp_path, capsys):
    """The same frames stored as uint8 0..255 and as float in [0, 1] give the same table (the float file used to
    be divided by 255 a second time: BCE/frame 5.9 instead of 328 on the standard file)."""
    ckpt = tiny_checkpoint(tmp_path / "c.pt")
    frames = np.random.default_rng(1).integers(0, 256, (4, 2, 16, 16), dtype=np.uint8)
    np.save(tmp_path / "u8.npy", frames)
    np.save(tmp_path / "f32.npy", frames.astype(np.float32) / 255)
    tables = []
    for name in ("u8.npy", "f32.npy"):
        rc, out, _ = cli(capsys, "eval", "video-prediction", "--checkpoint", ckpt, "--test-npy", str(tmp_path / name))
        assert rc == 0
        tables.append(out.split("\n\n", 1)[1])
    assert tables[0] == tables[1]
    assert torch.allclose(load_mnist_test_seq(str(tmp_path / "f32.npy")), load_mnist_test_seq(str(tmp_path / "u8.npy")))


# ------------------------------------------------------------------- 2. frames in natural order


def test_frames_load_in_natural_order(tmp_path):
    png_frames(tmp_path / "seq", [10 * i for i in range(12)], name="{}.png")  # 0.png .. 11.png: 10.png after 9.png
    clip = FrameFolderVideo(str(tmp_path / "seq"), clip_length=12, grayscale=True)[0]
    assert clip[:, 0, 0, 0].mul(255).round().tolist() == [10.0 * i for i in range(12)]
    assert sorted(["f10.png", "f2.png", "f1.png", "g.png"], key=natural_key) == ["f1.png", "f2.png", "f10.png", "g.png"]
    # sequence folders too: seq2 before seq10
    for s in (2, 10):
        png_frames(tmp_path / "root" / f"seq{s}", [s] * 3)
    data = FrameFolderVideo(str(tmp_path / "root"), clip_length=3, grayscale=True)
    assert [d.split(os.sep)[-2] for d in (data.sequences[0][0], data.sequences[1][0])] == ["seq2", "seq10"]


# ------------------------------------------------------------------- 3. frame-folder runs are tested on held-out clips


def test_frame_folder_split_holds_out_whole_sequences_or_the_end_of_one(tmp_path):
    for s in range(10):
        png_frames(tmp_path / "many" / f"s{s}", [s] * 4)
    train = FrameFolderVideo(str(tmp_path / "many"), 2, grayscale=True, split="train")
    test = FrameFolderVideo(str(tmp_path / "many"), 2, grayscale=True, split="test")
    names = lambda d: {os.path.basename(os.path.dirname(s[0])) for s in d.sequences}  # noqa: E731
    assert names(test) == {"s5"} and names(train) == {f"s{s}" for s in range(10)} - {"s5"}  # floor(0.5 * 10 / 1)
    png_frames(tmp_path / "one", list(range(30)))
    train = FrameFolderVideo(str(tmp_path / "one"), 2, grayscale=True, split="train")
    test = FrameFolderVideo(str(tmp_path / "one"), 2, grayscale=True, split="test")
    assert len(train.sequences[0]) == 27 and len(test.sequences[0]) == 3  # ceil(0.1 * 30) frames held out
    assert set(train.sequences[0]).isdisjoint(test.sequences[0])
    with pytest.raises(UserError, match="too short to split"):
        FrameFolderVideo(str(tmp_path / "one"), 16, split="test")


def test_frame_folder_run_is_evaluated_on_clips_it_never_trained_on(tmp_path):
    for s in range(4):
        png_frames(tmp_path / "frames" / f"s{s}", [40 * s + 10 * t for t in range(3)])
    cfg = vp.Config(frames_dir=str(tmp_path / "frames"), frames=3, observed=2, frame_size=8, batch_size=8)
    train = vp.TrainBatches(cfg, 0, 1)
    train_clips = {tuple(c.flatten().tolist()) for c in train(0)}  # 8 draws from the 3 training clips
    test_clips = {tuple(c.flatten().tolist()) for c in vp.test_set(cfg)}
    assert len(test_clips) == 1 and train_clips and train_clips.isdisjoint(test_clips)
    # a test folder, when given, is the test set
    png_frames(tmp_path / "test" / "t", [200, 210, 220])
    cfg = dataclasses.replace(cfg, test_frames_dir=str(tmp_path / "test"))
    assert vp.test_set(cfg)[0, :, 0, 0, 0].mul(255).round().tolist() == [200, 210, 220]
    assert (
        "frame folder" in vp.test_set_spec(cfg)["source"] and str(tmp_path / "test") in vp.test_set_spec(cfg)["source"]
    )


# ------------------------------------------------------------------- 4. one test set per table


def test_eval_of_several_checkpoints_uses_one_test_set_or_refuses(tmp_path, capsys):
    a = tiny_checkpoint(tmp_path / "a.pt", test_sequences=3)
    b = tiny_checkpoint(tmp_path / "b.pt", test_sequences=2, seed=1)
    msg = one_line_error(capsys, "eval", "video-prediction", "--checkpoint", a, b)
    assert "ask for [2, 3] test sequences: give --num-sequences" in msg
    rc, out, _ = cli(capsys, "eval", "video-prediction", "--checkpoint", a, b, "--num-sequences", "2")
    assert rc == 0 and out.startswith("2 test sequences (Moving MNIST generated from the squares test digits")
    # every row, the copy-last one included, is the evaluation on those same 2 sequences
    cfg = vp.load_model(a)[1]
    seqs = vp.test_set(cfg, n=2)
    rows = {line.split(" | ")[0]: line for line in out.splitlines() if line.startswith("| ")}
    for name, model in (("| baseline (" + b + ")", vp.load_model(b)[0]), ("| copy last frame", vp.CopyLastFrame())):
        assert f"{vp.evaluate(model, seqs, 2)['bce_per_frame']:.4g}" == rows[name].split(" | ")[1]
    c = tiny_checkpoint(tmp_path / "c.pt", test_sequences=2, frames=5)
    msg = one_line_error(capsys, "eval", "video-prediction", "--checkpoint", a, c, "--num-sequences", "2")
    assert "different test sets (frames 4 vs 5)" in msg
    d = tiny_checkpoint(tmp_path / "d.pt", test_sequences=2, digits="embedded")
    assert "different test sets (source" in one_line_error(capsys, "eval", "video-prediction", "--checkpoint", b, d)
    rgb = tiny_checkpoint(tmp_path / "rgb.pt", channels=3, test_sequences=2)
    assert "channels 1 vs 3" in one_line_error(capsys, "eval", "video-prediction", "--checkpoint", b, rgb)


# ------------------------------------------------------------------- 5. an .npy with too few frames is refused


def test_eval_refuses_an_npy_with_fewer_frames_and_cuts_a_longer_one(tmp_path, capsys):
    ckpt = tiny_checkpoint(tmp_path / "c.pt", frames=4)
    frames = np.random.default_rng(2).integers(0, 256, (6, 2, 16, 16), dtype=np.uint8)
    np.save(tmp_path / "short.npy", frames[:3])
    msg = one_line_error(
        capsys, "eval", "video-prediction", "--checkpoint", ckpt, "--test-npy", str(tmp_path / "short.npy")
    )
    assert "holds sequences of 3 frames (array [T, N, H, W] = [3, 2, 16, 16]); the model needs 4" in msg
    np.save(tmp_path / "long.npy", frames)
    np.save(tmp_path / "exact.npy", frames[:4])
    outs = [
        cli(capsys, "eval", "video-prediction", "--checkpoint", ckpt, "--test-npy", str(tmp_path / n))[1].split("\n\n")[
            1
        ]
        for n in ("long.npy", "exact.npy")
    ]
    assert outs[0] == outs[1]  # the first 4 frames of the longer file, not a mean over 4 predicted frames
    np.save(tmp_path / "odd.npy", frames[:, :, :15])
    assert "multiples of 2, got 15x16" in one_line_error(
        capsys, "eval", "video-prediction", "--checkpoint", ckpt, "--test-npy", str(tmp_path / "odd.npy")
    )


# ------------------------------------------------------------------- 6. unreadable frames are named at once


def test_unreadable_frames_are_named_when_the_data_set_is_opened(tmp_path, capsys):
    png_frames(tmp_path / "f" / "a", [0, 50, 100, 150])
    bad = tmp_path / "f" / "a" / "2.png"
    bad.write_bytes(bad.read_bytes()[:-20])  # cut short, as an interrupted copy leaves it
    with pytest.raises(UserError, match=re.escape(f"frame {bad} is cut short")):
        FrameFolderVideo(str(tmp_path / "f"), clip_length=2)
    bad.write_bytes(b"not an image")
    with pytest.raises(UserError, match=re.escape(f"frame {bad} is not a readable image")):
        FrameFolderVideo(str(tmp_path / "f"), clip_length=2)
    # through the command line: refused before any step (no log), naming the file
    flags = ["--frames-dir", str(tmp_path / "f"), "--frames", "2", "--observed", "1", "--frame-size", "8"]
    msg = one_line_error(capsys, "train", "video-prediction", "--run-dir", str(tmp_path / "run"), *flags)
    assert str(bad) in msg and not os.path.exists(tmp_path / "run" / "log.jsonl")
    png_frames(tmp_path / "sizes" / "a", [0, 1], size=(8, 8))
    png_frames(tmp_path / "sizes" / "a", [0], size=(8, 6), name="{}b.png")
    with pytest.raises(UserError, match="frames differ in size"):
        FrameFolderVideo(str(tmp_path / "sizes"), clip_length=2)
    assert FrameFolderVideo(str(tmp_path / "sizes"), clip_length=2, size=(4, 4))[0].shape == (2, 3, 4, 4)


def test_other_frame_folder_and_digit_file_errors(tmp_path):
    from PIL import Image

    png_frames(tmp_path / "mixed", [0, 1])
    png_frames(tmp_path / "mixed" / "seq", [0, 1])
    with pytest.raises(UserError, match="holds frames and also sequence folders"):
        FrameFolderVideo(str(tmp_path / "mixed"), 2)
    with pytest.raises(UserError, match="does not exist"):
        FrameFolderVideo(str(tmp_path / "nowhere"), 2)
    # damaged inside, its header and end intact: named when the clip is decoded
    png = tmp_path / "damaged" / "0.png"
    os.makedirs(png.parent)
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32), dtype=np.uint8)).save(png)
    data = bytearray(png.read_bytes())
    data[len(data) // 2 : len(data) // 2 + 40] = bytes(40)
    png.write_bytes(bytes(data))
    with pytest.raises(UserError, match=re.escape(f"frame {png} cannot be decoded")):
        FrameFolderVideo(str(png.parent), 1)[0]
    from dynconv.data.moving_mnist import load_digits

    (tmp_path / "train-images-idx3-ubyte").write_bytes(b"\x00\x00\x08\x01" + bytes(12))
    with pytest.raises(UserError, match="is not an MNIST IDX image file \\(magic 2049, expected 2051\\)"):
        load_digits("idx", "train", str(tmp_path))
    header = (2051).to_bytes(4, "big") + (3).to_bytes(4, "big") + (28).to_bytes(4, "big") * 2
    (tmp_path / "train-images-idx3-ubyte").write_bytes(header + bytes(28 * 28 * 2))
    with pytest.raises(UserError, match="the header says 3 images of 28x28 .* the file holds 1568 bytes"):
        load_digits("idx", "train", str(tmp_path))
    with pytest.raises(UserError, match="--digits squares uses none"):
        load_digits("squares", "train", str(tmp_path))


def test_demo_and_interrupt_errors(tmp_path, capsys, monkeypatch):
    (tmp_path / "file").write_text("")
    assert "--out " in one_line_error(capsys, "demo", "--out", str(tmp_path / "file"))

    def interrupted(command, argv):
        raise KeyboardInterrupt

    monkeypatch.setattr(vp, "main", interrupted)
    rc, _, err = cli(capsys, "eval", "video-prediction")
    assert rc == 130 and err.strip() == "dynconv: interrupted"


# ------------------------------------------------------------------- 7. --resume needs a checkpoint


def test_resume_without_a_checkpoint_is_refused_unless_asked_to_start(tmp_path, capsys):
    # (tiny settings: without the check, the mistake would start a run, and this test should not train for long)
    small = ["--resume", "--max-steps", "1", *TINY]
    msg = one_line_error(capsys, "train", "video-prediction", "--run-dir", str(tmp_path / "typo"), *small)
    assert "--resume: nothing to resume in --run-dir" in msg and "the folder does not exist" in msg
    assert not os.path.exists(tmp_path / "typo")
    os.makedirs(tmp_path / "empty")
    assert "holds no last.pt" in one_line_error(
        capsys, "train", "video-prediction", "--run-dir", str(tmp_path / "empty"), *small
    )
    assert run_dir.resume_from(str(tmp_path / "empty"), resume=False, resume_if_exists=True) is None
    tiny_checkpoint(tmp_path / "empty" / "last.pt")
    assert run_dir.resume_from(str(tmp_path / "empty"), resume=True) == str(tmp_path / "empty" / "last.pt")
    assert run_dir.resume_from(str(tmp_path / "empty"), False, resume_if_exists=True) == str(
        tmp_path / "empty" / "last.pt"
    )
    with pytest.raises(UserError, match="exists: pass --resume"):
        run_dir.resume_from(str(tmp_path / "empty"), resume=False)
    with pytest.raises(UserError, match="--run-dir .* is a file; give a folder"):
        run_dir.resume_from(str(tmp_path / "empty" / "last.pt"), resume=False)


# ------------------------------------------------------------------- 8. numeric flags checked when parsed


@pytest.mark.parametrize(
    "flag, value, message",
    [
        ("--save-every", "0", "expected an integer >= 1"),
        ("--lr-halve-every", "0", "expected an integer >= 1"),
        ("--batch-size", "0", "expected an integer >= 1"),
        ("--max-steps", "0", "expected an integer >= 1"),
        ("--epochs", "0", "expected an integer >= 1"),
        ("--steps-per-epoch", "0", "expected an integer >= 1"),
        ("--test-sequences", "0", "expected an integer >= 1"),
        ("--frame-size", "0", "expected an integer >= 1"),
        ("--threads", "0", "expected an integer >= 1"),
        ("--frames", "2.5", "expected an integer, got '2.5'"),
        ("--lr", "nan", "expected a finite number"),
        ("--lr", "0", "expected a number > 0"),
        ("--time-limit", "-1", "expected a number >= 0"),
        ("--warmup-steps", "-1", "expected an integer >= 0"),
        ("--device", "gpu", "expected a device"),
        ("--frames-dir", "/no/such/folder", "'/no/such/folder' does not exist"),
    ],
)
def test_train_flags_are_checked_when_parsed(tmp_path, capsys, flag, value, message):
    rc, _, err = cli(capsys, "train", "video-prediction", "--run-dir", str(tmp_path / "run"), flag, value)
    assert rc == 2 and f"argument {flag}: {message}" in err
    assert not os.path.exists(tmp_path / "run")  # refused before anything was written or trained


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--frame-size", "32"], "--frame-size 32: Moving MNIST frames are 64x64"),
        (["--observed", "20"], "--observed 20 must be at least 1 and less than --frames 20"),
        (["--eps", "0.5"], "--eps 0.5: expected a number in (0, 0.5)"),
        (["--test-frames-dir", "."], "--test-frames-dir is the test set of --frames-dir"),
        (["--frames-dir", ".", "--digits", "idx"], "--frames-dir replaces Moving MNIST"),
        (["--model", "seed", "--frames-dir", ".", "--frame-size", "30"], "multiples of 4, got 30x30"),
        (["--digits", "idx"], "--digits idx needs --mnist-dir"),
        (["--mnist-dir", "."], "--mnist-dir .: no train-images-idx3-ubyte[.gz] there"),
    ],
)
def test_settings_that_cannot_work_together_are_refused_before_training(tmp_path, capsys, argv, message):
    msg = one_line_error(capsys, "train", "video-prediction", "--run-dir", str(tmp_path / "run"), *argv)
    assert message in msg
    assert not os.path.exists(tmp_path / "run" / "log.jsonl")


@pytest.mark.parametrize(
    "argv, message",
    [
        (["eval", "video-prediction", "--checkpoint", "x.pt", "--num-sequences", "0"], "argument --num-sequences"),
        (["eval", "video-prediction", "--checkpoint", "x.pt", "--threads", "0"], "argument --threads"),
        (["predict", "video-prediction", "--checkpoint", "x.pt", "--index", "-1"], "argument --index"),
        (["demo", "--steps", "0"], "argument --steps"),
        (["bench", "local_filter", "--repeats", "0"], "argument --repeats"),
        (["eval", "video-prediction", "--checkpoint", "x.pt", "--test-npy", "/no/file.npy"], "'/no/file.npy' does not"),
        (["predict", "video-prediction", "--checkpoint", "x.pt", "--input", "/no/file.npy"], "'/no/file.npy' does not"),
    ],
)
def test_other_flags_are_checked_when_parsed(capsys, argv, message):
    rc, _, err = cli(capsys, *argv)
    assert rc == 2 and message in err


# ------------------------------------------------------------------- 9. user errors: one line, exit 2


def test_user_errors_are_one_line_with_exit_status_2(tmp_path):
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"\x80\x02not really a checkpoint")
    env = dict(os.environ, PYTHONPATH=REPO, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "dynconv", "eval", "video-prediction", "--checkpoint", str(garbage)]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"dynconv: error: checkpoint {str(garbage)!r} cannot be read: it is truncated, corrupted or not a torch "
        "file; it is not a dynconv checkpoint"
    ]


def test_debug_shows_the_traceback_of_a_user_error(tmp_path, capsys):
    (tmp_path / "garbage.pt").write_bytes(b"garbage")
    rc, _, err = cli(capsys, "eval", "video-prediction", "--checkpoint", str(tmp_path / "garbage.pt"), "--debug")
    assert rc == 2 and "Traceback" in err and "CheckpointError" in err
    assert err.strip().splitlines()[-1].startswith("dynconv: error: checkpoint")


class _Thing:
    """Any class: a file that pickles one needs code to load."""


def test_a_pickle_with_objects_is_refused_without_torchs_unsafe_advice(tmp_path, capsys):
    torch.save({"model": _Thing()}, tmp_path / "objects.pt")
    msg = one_line_error(capsys, "predict", "video-prediction", "--checkpoint", str(tmp_path / "objects.pt"))
    assert "holds pickled Python objects besides tensors" in msg and "weights_only" not in msg


def test_train_help_lists_the_tasks(capsys):
    rc, out, _ = cli(capsys, "train", "--help")
    assert rc == 0 and "video-prediction" in out and "Dynamic Filter Networks" in out
    rc, _, err = cli(capsys, "eval")
    assert rc == 2 and "video-prediction" in err
    rc, out, _ = cli(capsys, "train", "video-prediction", "--help")
    assert rc == 0 and "--resume-if-exists" in out and "steps between checkpoints" in out


def test_a_task_not_implemented_is_a_user_error(capsys, monkeypatch):
    from dynconv import cli as cli_module

    monkeypatch.setitem(cli_module.RECIPES, "nowhere", "dynconv.recipes.nowhere")
    assert one_line_error(capsys, "train", "nowhere") == "dynconv: error: the recipe 'nowhere' is not implemented yet"


@pytest.mark.parametrize(
    "case, message",
    [
        ("missing", "checkpoint 'missing.pt' is neither a file nor a shipped checkpoint"),
        ("folder", "is a folder; give the file"),
        ("foreign", "is not a dynconv checkpoint"),
        ("other-recipe", "is another recipe's checkpoint, not a video-prediction run's"),
        ("npz", "is an .npz archive"),
        ("not-npy", "cannot be read as a .npy array"),
        ("npy-3d", "expected an array [T, N, H, W] as mnist_test_seq.npy, got (4, 8, 8)"),
        ("too-many", "--num-sequences 3: --test-npy"),
        ("npy-rgb", "holds 1-channel frames; "),
        ("output-folder", "--output"),
    ],
)
def test_eval_user_errors(tmp_path, capsys, monkeypatch, case, message):
    monkeypatch.chdir(tmp_path)
    ckpt, extra = tiny_checkpoint(tmp_path / "c.pt"), []
    if case == "missing":
        ckpt = "missing.pt"
    elif case == "folder":
        ckpt = str(tmp_path)
    elif case == "foreign":
        torch.save({"weights": torch.zeros(1)}, tmp_path / "f.pt")
        ckpt = str(tmp_path / "f.pt")
    elif case == "other-recipe":
        save_checkpoint(str(tmp_path / "o.pt"), {"model": {}, "step": 1, "config": {"model": "resnet", "width": 2}})
        ckpt = str(tmp_path / "o.pt")
    elif case == "npz":
        np.savez(tmp_path / "t.npz", a=np.zeros(3))
        extra = ["--test-npy", str(tmp_path / "t.npz")]
    elif case == "not-npy":
        (tmp_path / "t.npy").write_text("frames")
        extra = ["--test-npy", str(tmp_path / "t.npy")]
    elif case == "npy-3d":
        np.save(tmp_path / "t.npy", np.full((4, 8, 8), 200, np.uint8))
        extra = ["--test-npy", str(tmp_path / "t.npy")]
    elif case == "too-many":
        np.save(tmp_path / "t.npy", np.full((4, 2, 8, 8), 200, np.uint8))
        extra = ["--test-npy", str(tmp_path / "t.npy"), "--num-sequences", "3"]
    elif case == "npy-rgb":
        ckpt = tiny_checkpoint(tmp_path / "rgb.pt", channels=3)
        np.save(tmp_path / "t.npy", np.full((4, 2, 8, 8), 200, np.uint8))
        extra = ["--test-npy", str(tmp_path / "t.npy")]
    elif case == "output-folder":
        extra = ["--output", str(tmp_path)]
    assert message in one_line_error(capsys, "eval", "video-prediction", "--checkpoint", ckpt, *extra)


def test_predict_user_errors_and_inputs(tmp_path, capsys):
    ckpt = tiny_checkpoint(tmp_path / "c.pt")
    seq = np.random.default_rng(3).integers(0, 256, (5, 2, 16, 16), dtype=np.uint8)
    np.save(tmp_path / "in.npy", seq)
    argv = ["predict", "video-prediction", "--checkpoint", ckpt, "--input", str(tmp_path / "in.npy")]
    assert "--index 2: --input" in one_line_error(capsys, *argv, "--index", "2")
    assert "--output" in one_line_error(capsys, *argv, "--output", str(tmp_path))
    np.save(tmp_path / "float255.npy", seq.astype(np.float32))  # whole numbers up to 255: the 0..255 scale
    loaded = vp.load_input(str(tmp_path / "float255.npy"), vp.load_model(ckpt)[1], 1)
    assert loaded.shape == (4, 1, 16, 16) and torch.allclose(loaded[:, 0], torch.from_numpy(seq[:4, 1] / 255).float())
    rc, out, _ = cli(capsys, *argv, "--index", "1", "--output", str(tmp_path / "o" / "p.gif"))
    assert rc == 0 and os.path.exists(tmp_path / "o" / "p.png")
    np.save(tmp_path / "short.npy", seq[:3])
    argv[-1] = str(tmp_path / "short.npy")
    assert "sequences of 3 frames (shape (3, 2, 16, 16)); the model needs 4" in one_line_error(capsys, *argv)
    argv[3] = tiny_checkpoint(tmp_path / "rgb.pt", channels=3)
    assert "an .npy holds grayscale frames; this model predicts 3 channels" in one_line_error(capsys, *argv)
    png_frames(tmp_path / "folder", [0, 1, 2, 3], size=(16, 16))
    argv[-1] = str(tmp_path / "folder")
    assert "--index 1: --input" in one_line_error(capsys, *argv, "--index", "1")  # one clip of 4 frames


def test_resume_refuses_a_new_init_from(tmp_path, capsys):
    tiny_checkpoint(tmp_path / "run" / "last.pt")
    argv = ["train", "video-prediction", "--run-dir", str(tmp_path / "run"), "--resume", "--init-from", "x.pt"]
    assert "--init-from starts a new run" in one_line_error(capsys, *argv)


# ------------------------------------------------------------------- 10. --time-limit skips the evaluation; progress


def test_time_limit_skips_the_evaluation_and_removes_a_stale_metrics_file(tmp_path, capsys):
    run = tmp_path / "run"
    os.makedirs(run)
    (run / "metrics.json").write_text('{"step": 0}')  # from an earlier finished stage of the run
    rc, _, err = cli(
        capsys, "train", "video-prediction", "--run-dir", str(run), "--max-steps", "3", "--time-limit", "0", *TINY
    )
    assert rc == 0 and "evaluation skipped: the run is at step 1 of 3" in err
    assert not os.path.exists(run / "metrics.json") and load_checkpoint(str(run / "last.pt"))["step"] == 1
    assert "evaluating" not in err


def test_progress_shows_the_time_left_and_evaluation_shows_progress(capsys):
    clock = iter([0.0, 10.0, 20.0])  # start, then 10 s per step
    p = vp.Progress(total=5, start=0, enabled=True, seconds=0.0, clock=lambda: next(clock))
    p.update(0, 0.5, 2)
    p.update(1, 0.4, 2)
    lines = capsys.readouterr().err.splitlines()
    assert lines[0].endswith("step 1/5 loss 0.5000 0.2 seq/s ETA 0:00:40")  # 4 steps left at 10 s each
    assert lines[1].endswith("ETA 0:00:30")
    seqs = torch.rand(5, 3, 1, 8, 8)
    vp.evaluate(vp.CopyLastFrame(), seqs, 2, batch_size=2, progress=True)
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 3 and "evaluation batch 3/3" in lines[-1] and "ETA" in lines[-1]


# ------------------------------------------------------------------- 11. run folders survive kills and resumes


def test_resume_cleans_temporaries_keeps_each_step_once_and_a_finished_run_keeps_its_loss(tmp_path, capsys):
    run = tmp_path / "run"
    base = ["train", "video-prediction", "--run-dir", str(run), "--save-every", "1"]
    assert cli(capsys, *base, "--max-steps", "2", *TINY)[0] == 0
    # as a kill leaves the folder: a temporary checkpoint, log rows past the checkpoint, a half-written line
    (run / ".tmp-x1y2.pt").write_bytes(b"half a checkpoint")
    with open(run / "log.jsonl", "a") as fh:
        fh.write('{"step": 3, "loss": 9.0, "lr": 0.001}\n{"step": 4, "lo')
    rc, _, err = cli(capsys, *base[:4], "--resume", "--max-steps", "3")
    assert rc == 0 and "removed" in err and ".tmp-x1y2.pt" in err
    assert not list(run.glob(".tmp-*"))
    log = [json.loads(line) for line in open(run / "log.jsonl")]
    assert [r["step"] for r in log] == [1, 2, 3] and log[2]["loss"] != 9.0
    first = json.load(open(run / "metrics.json"))
    assert first["final_train_loss"] == log[2]["loss"] and first["step"] == 3
    # resuming the finished run trains nothing and keeps the last loss (it used to write null)
    rc, _, err = cli(capsys, *base[:4], "--resume")
    assert rc == 0 and "nothing to train" in err
    again = json.load(open(run / "metrics.json"))
    assert again["final_train_loss"] == log[2]["loss"] and again["bce_per_frame"] == first["bce_per_frame"]
    assert [json.loads(line)["step"] for line in open(run / "log.jsonl")] == [1, 2, 3]


def test_a_new_run_in_a_folder_without_checkpoint_starts_a_fresh_log(tmp_path):
    path = str(tmp_path / "log.jsonl")
    with open(path, "w") as fh:
        fh.write('{"step": 1, "loss": 5.0}\n{"step": 2, "loss": 4.0}\n')
    log = run_dir.TrainingLog(path, start=0)
    log.write({"step": 1, "loss": 1.0})
    log.close()
    assert run_dir.read_log(path) == [{"step": 1, "loss": 1.0}]
    resumed = run_dir.TrainingLog(path, start=1)
    resumed.close()
    assert resumed.last("loss") == 1.0


def test_output_files_are_written_atomically(tmp_path, monkeypatch):
    path = str(tmp_path / "m.json")
    run_dir.write_json(path, {"a": 1})

    def broken(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(run_dir.os, "replace", broken)
    with pytest.raises(UserError, match="cannot write .*m.json: No space left on device"):
        run_dir.write_json(path, {"a": 2})
    monkeypatch.undo()
    assert json.load(open(path)) == {"a": 1} and os.listdir(tmp_path) == ["m.json"]


def test_incomplete_torchrun_variables_are_a_user_error(monkeypatch):
    from dynconv.recipes.distributed import init_distributed

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv("RANK", raising=False)
    with pytest.raises(UserError, match="WORLD_SIZE='2' with RANK=None: .* launch with torchrun"):
        init_distributed("cpu")
