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
files), or ``--frames-dir`` with one folder of frames per sequence (KITTI layout). Training follows the
paper: Adam, learning rate 1e-3 halved every 20 epochs, batch 16, binary cross-entropy on outputs clipped to
``[eps, 1 - eps]``; optional warm-up and gradient clipping. Every ``--save-every`` steps the run folder gets
an atomically written ``last.pt``; ``--resume`` continues from it exactly, with the run's own config (saved
in the checkpoint; flags given again change it, e.g. ``--lr`` for a drop or ``--max-steps`` to go on;
training batches are a pure function of the seed and the step), and ``--time-limit SECONDS`` stops a run
cleanly after a checkpoint, for jobs with a wall-clock limit; ``--init-from`` starts a new run from the
weights of a checkpoint file or a shipped checkpoint's name, with a fresh optimizer (use another ``--seed``
to draw new batches). Evaluation reports the paper's BCE summed over the pixels of a frame, averaged over
the 10 predicted frames, and per-pixel BCE, MSE, MAE, PSNR and SSIM.
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
from dynconv.data.moving_mnist import MovingMNIST, load_digits, load_mnist_test_seq
from dynconv.models.dfn_seed import DFNSeedPredictor
from dynconv.models.dfn_video import ConvLSTMPredictor, CopyLastFrame, DFNVideoPredictor, rollout
from dynconv.recipes.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from dynconv.recipes.distributed import all_reduce_mean, cleanup, init_distributed

MODELS = ("dfn", "baseline", "convlstm", "seed")
TEST_SEED = 1_000_003  # the fixed seed of the generated test set (training uses --seed)


@dataclasses.dataclass
class Config:
    model: str = "dfn"
    run_dir: str = "runs/video-prediction"
    digits: str = "embedded"
    mnist_dir: str | None = None
    frames_dir: str | None = None
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
            from dynconv.data.frame_folder import FrameFolderVideo

            self.frames = FrameFolderVideo(cfg.frames_dir, cfg.frames, size=(cfg.frame_size, cfg.frame_size))
            self.mnist = None
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


def test_set(cfg: Config, test_npy: str | None = None, n: int | None = None) -> torch.Tensor:
    """``[N, T, C, H, W]``: the standard ``mnist_test_seq.npy`` if given, else the fixed generated test set."""
    n = cfg.test_sequences if n is None else n
    if test_npy:
        return load_mnist_test_seq(test_npy)[:n]
    if cfg.frames_dir:
        from dynconv.data.frame_folder import FrameFolderVideo

        data = FrameFolderVideo(cfg.frames_dir, cfg.frames, size=(cfg.frame_size, cfg.frame_size))
        return torch.stack([data[i] for i in range(min(n, len(data)))])
    data = MovingMNIST(load_digits(cfg.digits, "test", cfg.mnist_dir), n, seed=TEST_SEED, frames=cfg.frames)
    return torch.stack([data[i] for i in range(n)])


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


class Progress:
    """A one-line progress bar with loss and throughput: redrawn in place on a terminal; otherwise (a log file,
    a CI job) a line every 10% of the run or every ``seconds``, whichever comes first."""

    def __init__(self, total: int, start: int, enabled: bool, seconds: float = 60.0):
        self.total, self.start, self.enabled, self.seconds = total, start, enabled, seconds
        self.t0, self.tty = time.perf_counter(), sys.stderr.isatty()
        self.every = max(1, (total - start) // 10)
        self.last = self.t0

    def update(self, step: int, loss: float, sequences: int) -> None:
        if not self.enabled:
            return
        done, now = step + 1, time.perf_counter()
        rate = (done - self.start) * sequences / max(now - self.t0, 1e-9)
        filled = int(30 * done / self.total)
        line = f"[{'#' * filled}{'.' * (30 - filled)}] step {done}/{self.total} loss {loss:.4f} {rate:.1f} seq/s"
        if self.tty:
            print("\r" + line, end="" if done < self.total else "\n", file=sys.stderr, flush=True)
        elif (done - self.start) % self.every == 0 or done == self.total or now - self.last >= self.seconds:
            self.last = now
            print(line, file=sys.stderr, flush=True)


def train(cfg: Config) -> dict:
    if cfg.threads:
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
            os.makedirs(cfg.run_dir, exist_ok=True)
            with open(os.path.join(cfg.run_dir, "config.json"), "w") as fh:
                json.dump(dataclasses.asdict(cfg), fh, indent=2)
            print(
                f"{cfg.model}: {sum(p.numel() for p in model.parameters()):,} parameters; "
                f"{cfg.total_steps} steps of {cfg.batch_size} x {info.world_size} sequences",
                file=sys.stderr,
            )
        progress = Progress(cfg.total_steps, start, info.is_main)
        log = open(os.path.join(cfg.run_dir, "log.jsonl"), "a") if info.is_main else None
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
            if log is not None:
                log.write(json.dumps({"step": step + 1, "loss": value, "lr": learning_rate(cfg, step)}) + "\n")
            done = step + 1
            # --time-limit: every rank stops at the same step (rank 0's clock decides), after a checkpoint.
            out_of_time = (
                cfg.time_limit is not None
                and all_reduce_mean(float(info.is_main and time.monotonic() - started > cfg.time_limit), info) > 0
            )
            if info.is_main and (done % cfg.save_every == 0 or done == cfg.total_steps or out_of_time):
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
                log.flush()
            if out_of_time:
                if info.is_main:
                    print(f"time limit of {cfg.time_limit:g} s reached at step {done}: saved {ckpt_path}; "
                          "continue with --resume", file=sys.stderr)  # fmt: skip
                break
        if log is not None:
            log.close()
        return {"losses": losses, "step": done}
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
    src_model, src_channels = state["config"]["model"], state.get("channels", 1)
    if (src_model, src_channels) != (cfg.model, channels):
        raise ValueError(
            f"init_from {cfg.init_from!r} holds a {src_model!r} model for {src_channels}-channel frames; this run "
            f"trains {cfg.model!r} on {channels}-channel frames"
        )
    model.load_state_dict(state["model"])


# ------------------------------------------------------------------------------------------------ eval


def load_model(path: str, device: str = "cpu") -> tuple[nn.Module, Config]:
    """The model and training config of a checkpoint file, or of a checkpoint shipped in the package by name
    (:mod:`dynconv.checkpoints`)."""
    state = _load_state(path, device)
    cfg = Config(**state["config"])
    model = build_model(cfg.model, state.get("channels", 1))
    model.load_state_dict(state["model"])
    return model.to(device).eval(), cfg


@torch.no_grad()
def evaluate(model: nn.Module, sequences: torch.Tensor, observed: int = 10, batch_size: int | None = None) -> dict:
    device = next(model.parameters(), torch.empty(0)).device
    if batch_size is None:
        # CPU: at batch 64 the 64x64x64 activations (67 MB) exceed glibc's mmap threshold, so every one is a fresh
        # mmap that the kernel zero-fills: evaluating 64 sequences took 91 s wall, 33 s of it system time, against
        # 54 s and 8 s at batch 16 (same user time, same result). On a GPU larger batches mean fewer launches.
        batch_size = 16 if device.type == "cpu" else 128
    preds = torch.cat(
        [
            rollout(model, sequences[i : i + batch_size].to(device), observed).cpu()
            for i in range(0, len(sequences), batch_size)
        ]
    )
    return metrics.summarize(preds, sequences[:, observed:])


def export_checkpoint(src: str, dst: str, info: dict | None = None) -> dict:
    """Write the weights-only checkpoint of a training run (no optimizer state) to ``dst`` and its record to
    ``dst`` with ``.json``: the training config, the training log (``log.jsonl`` beside ``src``, when present)
    and ``info`` (device, budget, evaluation). This is how a checkpoint is prepared for :mod:`dynconv.checkpoints`.
    Returns the record."""
    state = load_checkpoint(src)
    slim = {k: state[k] for k in ("model", "step", "config", "channels") if k in state}
    save_checkpoint(dst, slim)
    log_path = os.path.join(os.path.dirname(os.path.abspath(src)), "log.jsonl")
    log = {}
    if os.path.isfile(log_path):
        for line in open(log_path):
            row = json.loads(line)
            log[row["step"]] = row["loss"]  # a resumed run rewrites the steps after its checkpoint: keep the last
    record = {"step": slim.get("step"), "config": slim["config"], **(info or {})}
    record["training_loss_per_step"] = [log[s] for s in sorted(log) if s <= slim.get("step", s)]
    with open(os.path.splitext(dst)[0] + ".json", "w") as fh:
        json.dump(record, fh, indent=1)
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


def load_input(path: str, cfg: Config, index: int) -> torch.Tensor:
    """One sequence ``[T, C, H, W]`` from an ``.npy`` (``mnist_test_seq`` layout ``[T, N, H, W]`` or ``[T, H, W]``)
    or a folder of frames."""
    if os.path.isdir(path):
        from dynconv.data.frame_folder import FrameFolderVideo

        data = FrameFolderVideo(
            path, cfg.frames, size=(cfg.frame_size, cfg.frame_size), grayscale=cfg.frames_dir is None
        )
        return data[index]
    array = np.load(path)
    if array.ndim == 3:
        array = array[:, None]
    if array.ndim != 4:
        raise ValueError(f"--input {path}: expected [T, N, H, W] or [T, H, W], got shape {array.shape}")
    seq = torch.from_numpy(array[:, index].astype(np.float32))
    return (seq / 255.0 if array.dtype == np.uint8 else seq)[:, None]


# ------------------------------------------------------------------------------------------------ CLI


def _add_config_arguments(p: argparse.ArgumentParser, defaults: bool = True) -> None:
    """One flag per :class:`Config` field; ``defaults=False`` leaves a flag not given out of the namespace."""
    for f in dataclasses.fields(Config):
        flag = "--" + f.name.replace("_", "-")
        default = f.default if defaults else argparse.SUPPRESS
        kind = {"int": int, "float": float}.get(str(f.type).split(" ")[0], str)  # "int | None" -> int
        if f.name == "model":
            p.add_argument(flag, default=default, choices=MODELS)
        elif f.name == "loss":
            p.add_argument(flag, default=default, choices=("bce", "composite"))
        else:
            p.add_argument(flag, type=kind, default=default)


def _resumed_config(ckpt_path: str, given: Config, argv: list[str]) -> Config:
    """The config a ``--resume`` continues with: the run's own (saved in its checkpoint), with the flags given on
    this command line changed (``--lr`` for a learning-rate drop, ``--max-steps`` to go on, ``--batch-size``
    with another process count, ...). Flags left out keep the run's values, not the defaults, so
    ``--run-dir DIR --resume`` alone continues the run as it was."""
    saved = load_checkpoint(ckpt_path, map_location="cpu").get("config") or {}
    names = {f.name for f in dataclasses.fields(Config)}
    flags = argparse.ArgumentParser(add_help=False)
    _add_config_arguments(flags, defaults=False)
    explicit = vars(flags.parse_known_args(argv)[0])
    if "model" in explicit and saved.get("model", explicit["model"]) != explicit["model"]:
        raise SystemExit(f"--model {explicit['model']}: {ckpt_path} holds a {saved['model']!r} run; resume it as one")
    values = {**dataclasses.asdict(given), **{k: v for k, v in saved.items() if k in names and k not in explicit}}
    values["run_dir"] = given.run_dir  # wherever the run folder is now
    changed = [
        f"{k} {saved[k]!r} -> {v!r}" for k, v in values.items() if k in saved and saved[k] != v and k != "run_dir"
    ]
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"resuming with the run's config{'; changed: ' + ', '.join(changed) if changed else ''}", file=sys.stderr)
    return Config(**values)


def main(command: str, argv: list[str]) -> int:
    p = argparse.ArgumentParser(
        prog=f"dynconv {command} video-prediction",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    if command == "train":
        _add_config_arguments(p)
        p.add_argument("--resume", action="store_true", help="continue from RUN_DIR/last.pt (required if it exists)")
        args = p.parse_args(argv)
        cfg = Config(**{f.name: getattr(args, f.name) for f in dataclasses.fields(Config)})
        ckpt_path = os.path.join(cfg.run_dir, "last.pt")
        if os.path.exists(ckpt_path) and not args.resume:
            raise SystemExit(f"{cfg.run_dir}/last.pt exists: pass --resume to continue it, or choose another --run-dir")
        if args.resume and os.path.exists(ckpt_path):
            cfg = _resumed_config(ckpt_path, cfg, argv)
        result = train(cfg)
        if int(os.environ.get("RANK", "0")) == 0:
            eval_device = "cuda" if cfg.device.startswith("cuda") else cfg.device
            model = load_model(os.path.join(cfg.run_dir, "last.pt"), eval_device)[0]
            m = evaluate(model, test_set(cfg), cfg.observed)
            m["final_train_loss"] = result["losses"][-1] if result["losses"] else None
            with open(os.path.join(cfg.run_dir, "metrics.json"), "w") as fh:
                json.dump(m, fh, indent=2)
            print(markdown([(cfg.model, m)]))
        return 0
    if command == "eval":
        p.add_argument("--checkpoint", nargs="+", required=True, help="checkpoint files or shipped names")
        p.add_argument("--test-npy", help="the standard mnist_test_seq.npy (else the generated test set)")
        p.add_argument("--num-sequences", type=int, default=None, help="default: the training config's")
        p.add_argument("--copy-last", action=argparse.BooleanOptionalAction, default=True)
        p.add_argument("--output", help="also write the markdown table here")
        p.add_argument("--device", default="cpu", help="where the models run (cpu, cuda)")
        args = p.parse_args(argv)
        rows, cfg = [], None
        for path in args.checkpoint:
            model, cfg = load_model(path, args.device)
            seqs = test_set(cfg, args.test_npy, args.num_sequences)
            rows.append((f"{cfg.model} ({path})", evaluate(model, seqs, cfg.observed)))
        if args.copy_last:
            rows.append(("copy last frame", evaluate(CopyLastFrame(), seqs, cfg.observed)))
        table = markdown(rows)
        print(f"{len(seqs)} test sequences\n\n{table}")
        if args.output:
            with open(args.output, "w") as fh:
                fh.write(table + "\n")
        return 0
    if command == "predict":
        p.add_argument("--checkpoint", required=True, help="a checkpoint file or a shipped name")
        p.add_argument(
            "--input",
            help="an .npy ([T, N, H, W] uint8 as mnist_test_seq, or [T, H, W]) or a folder of "
            "frames; default: the generated test set",
        )
        p.add_argument("--index", type=int, default=0, help="which sequence of the input")
        p.add_argument("--output", default="prediction.gif")
        args = p.parse_args(argv)
        model, cfg = load_model(args.checkpoint)
        seq = load_input(args.input, cfg, args.index) if args.input else test_set(cfg, n=args.index + 1)[args.index]
        with torch.no_grad():
            pred, filters = rollout(model, seq[None], cfg.observed, return_filters=True)
        paths = write_pictures(
            seq,
            pred[0],
            None if filters is None else filters[0],
            args.output,
            cfg.observed,
            getattr(model, "kernel_size", None),
        )
        print("written: " + ", ".join(paths))
        return 0
    raise SystemExit(f"unknown command {command!r}")
