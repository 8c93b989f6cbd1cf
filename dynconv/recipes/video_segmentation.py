"""Video semantic segmentation with Deep Feature Flow (Zhu, Xiong, Dai, Yuan, Wei, CVPR 2017).

    dynconv train video-segmentation --run-dir runs/dff                  # per-frame stage, then DFF end to end
    dynconv eval video-segmentation --checkpoint runs/dff/last.pt        # mIoU vs speed-up table and plot
    dynconv eval video-segmentation --checkpoint runs/dff/last.pt --flow-check FRAMES_DIR
    dynconv train video-segmentation --run-dir runs/dff --resume --dff-steps 800 --flow-frames-dir OTHER_FRAMES
    dynconv predict video-segmentation --checkpoint runs/dff/last.pt --output seg.gif --interval 5
    torchrun --standalone --nproc_per_node=2 -m dynconv train video-segmentation ...   # the same, in DDP

Data: the embedded synthetic set (``dynconv.data.synthetic_segmentation``: textured shapes moving and scaling
over a moving textured background, 4 classes, exact ground-truth flow), generated on the fly, or
``--data cityscapes --cityscapes-dir ROOT`` (``leftImg8bit_sequence`` + ``gtFine``; 19 classes, 255 ignored).

Training has two stages in one run, one step counter: ``--perframe-steps`` of the feature and task networks on
single frames (the per-frame baseline), then ``--dff-steps`` of DFF: per sample a key frame ``I_k`` and a
current frame ``I_i`` with ``0 <= i - k <= --max-distance``, the features of ``I_k`` propagated to ``I_i``
through the flow network, :func:`dynconv.warp` and the scale function, and the cross-entropy on the current
frame's labels only; the flow network trains end to end through the warp, plus ``--flow-loss-weight`` times
the end-point error against the ground-truth flow where the data has it (the synthetic set; there the flow
network also trains on it beside the per-frame stage, ``--flow-pretrain``, as the paper pretrains FlowNet on
Flying Chairs). The flow network is FlowNetS-style, refining a Lucas-Kanade start (``--no-flow-init``: from
zero; ``--flow-net c``: FlowNetC-style). The feature network is frozen in the DFF stage unless
``--finetune-features``. Adam with a cosine learning rate per stage.
``--flow-frames-dir DIR`` (optional, self-supervised, no labels): every step also warps pairs of DIR's frames
(resized to ``--flow-frames-height`` pixels, 0 to ``--max-distance`` frames apart) with the flow network's flow
and adds ``--photometric-weight`` times their photometric error (mean absolute difference, the measure of
``--flow-check``) to the loss: the synthetic set alone does not teach the flow network a real camera's images
(flat areas, sensor noise, hard edges), on which its correction to the start was noise. Given with ``--resume``
and more ``--dff-steps``, it fine-tunes a finished run; keep the frames it sees apart from those you check.
Every ``--save-every`` steps the run folder gets an atomically written ``last.pt``; ``--resume`` continues it
exactly with the run's own config (flags given again change it); ``--time-limit SECONDS`` stops after a
checkpoint and skips the final evaluation.

Evaluation (``eval``, and at the end of ``train``): mIoU of the per-frame baseline and of DFF at key intervals
``l`` in 1, 2, 3, 5, 7, 10 and at propagation distances 1, 5, 9; the per-frame runtime of the feature network,
flow network, warp and task network (batch 1); frames per second of each schedule and the speed-up against the
per-frame baseline, measured in the same run (on one CPU thread, by the thread's CPU time); a plot of mIoU
against speed-up; on the synthetic set also DFF with the exact flow in place of the network's.
``--flow-check FRAMES_DIR`` measures, on a real video without labels, the photometric error of frame t against
frame t-1 warped with the trained flow, against frame t-1 itself and against frame t-1 warped with the
Lucas-Kanade start alone (``--flow-check-step N``: frames t - N and t, larger motion).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import statistics
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from dynconv.data import synthetic_segmentation as synthetic
from dynconv.data.frame_folder import natural_key
from dynconv.errors import UserError
from dynconv.functional import warp
from dynconv.models.dff import DeepFeatureFlow, lucas_kanade
from dynconv.recipes import run_dir
from dynconv.recipes.args import (
    config_from,
    device,
    nonnegative_float,
    nonnegative_int,
    positive_float,
    positive_int,
    recipe_parser,
)
from dynconv.recipes.checkpoint import load_checkpoint, save_checkpoint
from dynconv.recipes.distributed import all_reduce_mean, cleanup, init_distributed, time_limit_reached
from dynconv.recipes.progress import Progress

TEST_SEED = 1_000_003  # the fixed seed of the generated test set (training uses --seed)
TRAIN_FRAMES = 30  # synthetic training clips: key and current frames are drawn from frames 0..29
INTERVALS = (1, 2, 3, 5, 7, 10)  # key intervals evaluated (1 = per-frame)
DISTANCES = (1, 5, 9)  # propagation distances evaluated
FRAME_EXTENSIONS = (".png", ".jpg", ".jpeg", ".pgm", ".ppm", ".bmp")


@dataclasses.dataclass
class Config:
    run_dir: str = "runs/video-segmentation"
    data: str = "synthetic"
    cityscapes_dir: str | None = None
    frame_size: int = 64
    width: int = 32
    blocks: str = "2,3,4,2"
    output_stride: int = 4
    flow_net: str = "s"
    flow_width: int = 16
    flow_init: bool = True
    flow_pretrain: bool = True
    perframe_steps: int = 600
    dff_steps: int = 600
    max_steps: int | None = None
    batch_size: int = 8
    lr: float = 2e-3
    max_distance: int = 9
    flow_loss_weight: float = 1.0
    finetune_features: bool = False
    flow_frames_dir: str | None = None
    flow_frames_height: int = 96
    photometric_weight: float = 10.0
    seed: int = 0
    save_every: int = 50
    test_sequences: int = 32
    test_frames: int = 30
    device: str = "cpu"
    threads: int | None = None
    time_limit: float | None = None

    @property
    def total_steps(self) -> int:
        steps = self.perframe_steps + self.dff_steps
        return min(steps, self.max_steps) if self.max_steps is not None else steps

    @property
    def num_classes(self) -> int:
        return synthetic.NUM_CLASSES if self.data == "synthetic" else 19

    @property
    def image_size(self) -> tuple[int, int]:
        """``(H, W)`` of the frames: square synthetic frames, 1:2 Cityscapes frames."""
        return (self.frame_size, (1 if self.data == "synthetic" else 2) * self.frame_size)


# Every numeric flag is checked at parse time (dynconv.recipes.args); None means "not set" for the optional ones.
_FLAG_TYPES = {
    "device": device,
    "frame_size": positive_int, "width": positive_int, "output_stride": positive_int, "flow_width": positive_int,
    "perframe_steps": nonnegative_int, "dff_steps": nonnegative_int, "max_steps": positive_int,
    "batch_size": positive_int, "lr": positive_float, "max_distance": nonnegative_int,
    "flow_loss_weight": nonnegative_float, "flow_frames_height": positive_int,
    "photometric_weight": nonnegative_float, "seed": nonnegative_int, "save_every": positive_int,
    "test_sequences": positive_int, "test_frames": positive_int, "threads": positive_int,
    "time_limit": positive_float,
}  # fmt: skip


_FLAG_HELP = {
    "flow_frames_dir": "unlabelled frames (a video, sorted by name) for a self-supervised photometric loss of the "
    "flow network, every step",
    "flow_frames_height": "the --flow-frames-dir frames are resized to this height (aspect kept)",
    "photometric_weight": "weight of the --flow-frames-dir photometric loss (mean |I_t - warp(I_k)| in [0, 1] units)",
}


def parse_blocks(text: str) -> tuple[int, ...]:
    try:
        blocks = tuple(int(b) for b in text.split(","))
    except ValueError:
        blocks = ()
    if not blocks or min(blocks) < 1:
        raise UserError(f"--blocks: expected comma-separated integers >= 1 (blocks per stage), got {text!r}")
    return blocks


def build_model(cfg: Config) -> DeepFeatureFlow:
    if cfg.output_stride not in (4, 8, 16, 32):
        raise UserError(f"--output-stride must be 4, 8, 16 or 32, got {cfg.output_stride}")
    if cfg.width < 2:
        raise UserError(f"--width must be >= 2, got {cfg.width}")
    return DeepFeatureFlow(cfg.num_classes, 3, cfg.width, parse_blocks(cfg.blocks), cfg.output_stride, cfg.flow_width)


def check_config(cfg: Config) -> None:
    if cfg.data not in ("synthetic", "cityscapes"):
        raise UserError(f"--data must be 'synthetic' or 'cityscapes', got {cfg.data!r}")
    if cfg.data == "cityscapes" and not cfg.cityscapes_dir:
        raise UserError("--data cityscapes needs --cityscapes-dir ROOT (holding leftImg8bit_sequence and gtFine)")
    if cfg.data == "synthetic" and cfg.max_distance >= TRAIN_FRAMES:
        raise UserError(f"--max-distance must be < {TRAIN_FRAMES} for the synthetic set, got {cfg.max_distance}")
    if cfg.frame_size < 16:
        raise UserError(f"--frame-size must be >= 16, got {cfg.frame_size}")
    if cfg.flow_frames_height < 16:  # the photometric error leaves out 4 pixels at each border
        raise UserError(f"--flow-frames-height must be >= 16, got {cfg.flow_frames_height}")
    parse_blocks(cfg.blocks)


# ------------------------------------------------------------------------------------------------ data


class TrainBatches:
    """Training batch ``step`` on rank ``rank``: a pure function of (seed, step, rank), so resuming is exact.

    Per-frame stage: ``{"current", "labels"}``; DFF stage: also ``"key"`` and (synthetic) ``"flow"``, the exact
    flow from the current to the key frame at the feature stride, in feature pixels. With ``flow_frames_dir``,
    every step also ``"real_key"``, ``"real_current"``: pairs of unlabelled frames of that folder, ``0 ..
    max_distance`` frames apart, for the photometric loss of the flow network.
    """

    def __init__(self, cfg: Config, rank: int, world: int):
        self.cfg, self.rank, self.world = cfg, rank, world
        self.real = None
        if cfg.flow_frames_dir:
            self.real = read_frames(cfg.flow_frames_dir, 10**9, cfg.flow_frames_height, "--flow-frames-dir")
        if cfg.data == "synthetic":
            self.data = synthetic.SyntheticSegmentationVideo(2**62, TRAIN_FRAMES, cfg.frame_size, seed=cfg.seed)
        else:
            from dynconv.data.cityscapes import CityscapesVideo

            self.data = CityscapesVideo(cfg.cityscapes_dir, "train", cfg.max_distance, cfg.image_size)

    def __call__(self, step: int, pairs: bool) -> dict[str, torch.Tensor]:
        cfg, B = self.cfg, self.cfg.batch_size
        # flow pretraining in the per-frame stage: pairs with their exact flow (the paper pretrains its FlowNet on
        # Flying Chairs; the synthetic set's flow plays that part)
        pairs = pairs or (cfg.flow_pretrain and cfg.data == "synthetic")
        rng = np.random.default_rng([cfg.seed, step, self.rank])
        out = {"current": [], "labels": [], "key": [], "flow": []}
        for b in range(B):
            distance = int(rng.integers(0, cfg.max_distance + 1)) if pairs else 0
            if cfg.data == "synthetic":
                index = (step * self.world + self.rank) * B + b
                key = int(rng.integers(0, TRAIN_FRAMES - distance))
                image, labels = self.data.render(index, key + distance)
                if pairs:
                    out["key"].append(self.data.render(index, key)[0])
                    flow = self.data.flow(index, key + distance, key)
                    s = cfg.output_stride
                    out["flow"].append(F.avg_pool2d(flow[None], s, ceil_mode=True)[0] / s)
            else:
                index = int(rng.integers(0, len(self.data)))
                image, labels = self.data.frame(index, 0), self.data.label(index)
                if pairs:
                    out["key"].append(self.data.frame(index, distance))
            out["current"].append(image)
            out["labels"].append(labels)
        if self.real is not None:  # an rng of its own: the synthetic draws stay those of a run without real frames
            rng = np.random.default_rng([cfg.seed, step, self.rank, 1])
            T = len(self.real)
            distance = rng.integers(0, min(cfg.max_distance, T - 1) + 1, B)
            first = (rng.random(B) * (T - distance)).astype(np.int64)
            out["real_key"], out["real_current"] = list(self.real[first]), list(self.real[first + distance])
        return {k: torch.stack(v) for k, v in out.items() if v}


def test_clips(cfg: Config, n: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The synthetic test set: ``(frames [N, T, 3, H, W], labels [N, T, H, W])`` with the fixed test seed."""
    n = cfg.test_sequences if n is None else n
    data = synthetic.SyntheticSegmentationVideo(n, cfg.test_frames, cfg.frame_size, seed=TEST_SEED)
    frames, labels = zip(*(data[i] for i in range(n)))
    return torch.stack(frames), torch.stack(labels)


# ------------------------------------------------------------------------------------------------ training


def learning_rate(cfg: Config, step: int) -> float:
    """Cosine from ``lr`` to 5% of it within each stage (the DFF stage restarts it: new parameters start)."""
    if step < cfg.perframe_steps:
        position, length = step, cfg.perframe_steps
    else:
        position, length = step - cfg.perframe_steps, cfg.dff_steps
    return cfg.lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * position / max(length, 1))))


def _epe(flow: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean end-point error ``|flow - target|`` over the pixels; ``[B, 2, h, w]`` each."""
    return (flow - target).square().sum(1).add(1e-8).sqrt().mean()


def photometric_error(flow_net: nn.Module, key: torch.Tensor, current: torch.Tensor, margin: int = 4) -> torch.Tensor:
    """``[B]``: mean ``|current - warp(key, flow)|`` per pair over the pixels ``margin`` or more from the border, with
    the flow network's flow (feature pixels on the feature grid) scaled to image pixels and upsampled bilinearly;
    frames ``[B, C, H, W]`` in [0, 1]. The training loss of ``--flow-frames-dir`` and the measure of
    ``--flow-check``."""
    H, W = current.shape[-2:]
    flow = flow_net(key, current)[0] * flow_net.feature_stride
    warped = warp(key, F.interpolate(flow, size=(H, W), mode="bilinear", align_corners=False), padding_mode="border")
    return (warped - current)[..., margin : H - margin, margin : W - margin].abs().mean((1, 2, 3))


class _Step(nn.Module):
    """``forward`` = one training step's loss, so DistributedDataParallel sees one forward per step."""

    def __init__(self, model: DeepFeatureFlow, cfg: Config):
        super().__init__()
        self.model, self.cfg = model, cfg

    def forward(self, batch: dict[str, torch.Tensor], pairs: bool) -> tuple[torch.Tensor, dict[str, float]]:
        loss, parts = self._supervised(batch, pairs)
        if "real_key" in batch:  # self-supervised: the flow network on unlabelled frames of --flow-frames-dir
            photometric = photometric_error(self.model.flow, batch["real_key"], batch["real_current"]).mean()
            parts["photometric"] = photometric.item()
            loss = loss + self.cfg.photometric_weight * photometric
        return loss, parts

    def _supervised(self, batch: dict[str, torch.Tensor], pairs: bool) -> tuple[torch.Tensor, dict[str, float]]:
        model, cfg = self.model, self.cfg
        ignore = synthetic.IGNORE_INDEX
        if not pairs:
            logits = model.segment(batch["current"])
            loss = F.cross_entropy(logits, batch["labels"], ignore_index=ignore)
            parts = {"ce": loss.item()}
            if "flow" in batch:  # flow pretraining beside the per-frame stage
                epe = _epe(model.flow(batch["key"], batch["current"])[0], batch["flow"])
                parts["epe"] = epe.item()
                loss = loss + cfg.flow_loss_weight * epe
            return loss, parts
        if cfg.finetune_features:
            key_features = model.features(batch["key"])
        else:
            with torch.no_grad():
                key_features = model.features(batch["key"])
        logits, flow = model(batch["key"], batch["current"], key_features)
        ce = F.cross_entropy(logits, batch["labels"], ignore_index=ignore)
        parts = {"ce": ce.item()}
        loss = ce
        if "flow" in batch and cfg.flow_loss_weight > 0:
            epe = _epe(flow, batch["flow"])
            parts["epe"] = epe.item()
            loss = loss + cfg.flow_loss_weight * epe
        return loss, parts


def train(cfg: Config) -> dict:
    """Train (or continue) the run in ``cfg.run_dir``. Returns ``{"losses", "step", "finished"}``."""
    check_config(cfg)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    info = init_distributed(cfg.device)
    device = torch.device(f"cuda:{info.local_rank}" if cfg.device.startswith("cuda") else cfg.device)
    try:
        batches = TrainBatches(cfg, info.rank, info.world_size)
        torch.manual_seed(cfg.seed)
        model = build_model(cfg).to(device)
        opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
        ckpt_path = os.path.join(cfg.run_dir, "last.pt")
        log_path = os.path.join(cfg.run_dir, "log.jsonl")
        start = 0
        if os.path.exists(ckpt_path):
            state = load_checkpoint(ckpt_path, map_location=device)
            model.load_state_dict(state["model"])
            opt.load_state_dict(state["optimizer"])
            start = state["step"]
            if info.is_main:
                print(f"resumed {ckpt_path} at step {start}", file=sys.stderr)
        net = _Step(model, cfg)
        if info.enabled:  # the flow net is unused in the per-frame stage, the frozen backbone in the DFF stage
            net = nn.parallel.DistributedDataParallel(
                net, device_ids=[device.index] if device.type == "cuda" else None, find_unused_parameters=True
            )
        if info.is_main:
            for path in run_dir.remove_stale_temporaries(cfg.run_dir):
                print(f"removed {path}, left by a process killed while saving", file=sys.stderr)
            run_dir.write_json(os.path.join(cfg.run_dir, "config.json"), dataclasses.asdict(cfg))
            count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
            print(
                f"DFF: feature net {count(model.features):,}, flow net {count(model.flow):,}, task net "
                f"{count(model.task):,} parameters; {cfg.perframe_steps} per-frame + {cfg.dff_steps} DFF steps "
                f"(run to {cfg.total_steps}) of {cfg.batch_size} x {info.world_size}",
                file=sys.stderr,
            )
        progress = Progress(cfg.total_steps, start, info.is_main, unit="clip")
        log = run_dir.TrainingLog(log_path, start, enabled=info.is_main)
        losses, done, out_of_time = [], start, False
        started = time.monotonic()
        for step in range(start, cfg.total_steps):
            pairs = step >= cfg.perframe_steps
            # the frozen backbone keeps its BatchNorm statistics in the DFF stage
            model.train()
            if pairs and not cfg.finetune_features:
                model.features.eval()
            batch = {k: v.to(device) for k, v in batches(step, pairs).items()}
            lr = learning_rate(cfg, step)
            for group in opt.param_groups:
                group["lr"] = lr
            loss, parts = net(batch, pairs)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            value = all_reduce_mean(loss.item(), info)
            losses.append(value)
            stage = "dff" if pairs else "per-frame"
            progress.update(step, value, cfg.batch_size * info.world_size, stage)
            log.write({"step": step + 1, "stage": stage, "loss": value, **parts, "lr": lr})
            done = step + 1
            # --time-limit: every rank stops at the same step (rank 0's clock decides), after a checkpoint.
            out_of_time = time_limit_reached(cfg.time_limit, started, info)
            if info.is_main and (done % cfg.save_every == 0 or done == cfg.total_steps or out_of_time):
                log.flush()  # before the checkpoint: a resume keeps the rows up to its step
                state = {"model": model.state_dict(), "optimizer": opt.state_dict(), "step": done}
                save_checkpoint(ckpt_path, {**state, "config": dataclasses.asdict(cfg)})
            if out_of_time and done < cfg.total_steps:
                if info.is_main:
                    print(f"time limit of {cfg.time_limit:g} s reached at step {done}: saved {ckpt_path}; "
                          "continue with --resume", file=sys.stderr)  # fmt: skip
                break
        log.close()
        return {"losses": losses, "step": done, "finished": done >= cfg.total_steps}
    finally:
        cleanup(info)


# ------------------------------------------------------------------------------------------------ eval


def load_model(path: str, device: str = "cpu") -> tuple[DeepFeatureFlow, Config]:
    """The model and training config of a checkpoint file."""
    state = load_checkpoint(path, map_location=device)
    cfg = Config(**state["config"])
    model = build_model(cfg)
    model.load_state_dict(state["model"])
    return model.to(device).eval(), cfg


def confusion(pred: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """``[classes, classes]`` counts (rows: truth, columns: prediction), pixels labelled 255 left out."""
    keep = labels != synthetic.IGNORE_INDEX
    index = labels[keep] * num_classes + pred[keep]
    return torch.bincount(index, minlength=num_classes**2).reshape(num_classes, num_classes)


def mean_iou(conf: torch.Tensor) -> float:
    """Mean over the classes present (in truth or prediction) of TP / (TP + FP + FN), in percent."""
    conf = conf.double()
    tp = conf.diag()
    union = conf.sum(0) + conf.sum(1) - tp
    present = union > 0
    return float((tp[present] / union[present]).mean() * 100) if present.any() else float("nan")


@torch.no_grad()
def accuracy(model: DeepFeatureFlow, frames: torch.Tensor, labels: torch.Tensor, batch_size: int = 8) -> dict:
    """mIoU of every schedule on clips ``frames [N, T, 3, H, W]``, ``labels [N, T, H, W]``.

    ``interval_l``: DFF with a key frame every ``l`` frames over whole clips (``l = 1`` is the per-frame
    baseline). ``distance_d``: every frame ``t >= d`` propagated from the key frame ``t - d``, beside
    ``perframe_at_distance_d``, the per-frame baseline on the same frames.
    """
    C = model.task.classifier.out_channels
    T = frames.shape[1]
    confs = {f"interval_{l}": torch.zeros(C, C, dtype=torch.long) for l in INTERVALS}
    for d in DISTANCES:
        if d < T:
            confs[f"distance_{d}"] = torch.zeros(C, C, dtype=torch.long)
            confs[f"perframe_at_distance_{d}"] = torch.zeros(C, C, dtype=torch.long)
    device = next(model.parameters()).device
    for i in range(0, len(frames), batch_size):
        clip, truth = frames[i : i + batch_size].to(device), labels[i : i + batch_size]
        for l in INTERVALS:
            pred = model.segment_video(clip, l)[0].argmax(2).cpu()
            confs[f"interval_{l}"] += confusion(pred, truth, C)
        flat = clip.flatten(0, 1)
        feats = model.features(flat).unflatten(0, clip.shape[:2])
        perframe = model.task(feats.flatten(0, 1), clip.shape[-2:]).argmax(1).unflatten(0, clip.shape[:2]).cpu()
        for d in DISTANCES:
            if d >= T:
                continue
            key, cur = clip[:, :-d].flatten(0, 1), clip[:, d:].flatten(0, 1)
            logits = model(key, cur, feats[:, :-d].flatten(0, 1))[0]
            pred = logits.argmax(1).unflatten(0, (clip.shape[0], T - d)).cpu()
            confs[f"distance_{d}"] += confusion(pred, truth[:, d:], C)
            confs[f"perframe_at_distance_{d}"] += confusion(perframe[:, d:], truth[:, d:], C)
    return {f"miou_{k}": mean_iou(v) for k, v in confs.items()}


def _clock(device: torch.device):
    """The clock of the timings: on a CPU with one torch thread, this thread's CPU time, which other processes
    sharing the cores do not inflate (wall-clock medians of a 2 ms call there were 3-5x its CPU time under a
    load of 7 on 2 cores); otherwise the wall clock, after a CUDA synchronisation."""
    if device.type == "cpu" and torch.get_num_threads() == 1:
        return "thread CPU time", time.thread_time, lambda: None
    return "wall clock", time.perf_counter, (torch.cuda.synchronize if device.type == "cuda" else lambda: None)


@torch.no_grad()
def speed(model: DeepFeatureFlow, clip: torch.Tensor, repeats: int = 5) -> dict:
    """Per-frame runtimes at batch 1 on ``clip [T, 3, H, W]``: each component (median of ``10 * repeats``
    calls), and each schedule's whole-clip time per frame (median of ``repeats``; the schedules interleaved
    within each repeat so that a change of machine load hits all of them alike), with the wall clock beside;
    speed-up = per-frame time / DFF time, both from the same run."""
    device = next(model.parameters()).device
    clip = clip.to(device)
    clock_name, clock, sync = _clock(device)

    def median_ms(fn, n):
        times = []
        for _ in range(n):
            t = clock()
            fn()
            sync()
            times.append(clock() - t)
        return statistics.median(times) * 1e3

    key, cur = clip[:1], clip[1:2]
    feats = model.features(key)
    flow, scale = model.flow(key, cur)
    model.segment_video(clip, 5)  # warm-up (first calls allocate)
    out = {
        "clock": clock_name,
        "threads": torch.get_num_threads(),
        "ms_feature_net": median_ms(lambda: model.features(cur), 10 * repeats),
        "ms_flow_net": median_ms(lambda: model.flow(key, cur), 10 * repeats),
        "ms_warp": median_ms(lambda: warp(feats, flow, padding_mode="border") * scale, 10 * repeats),
        "ms_task_net": median_ms(lambda: model.task(feats, clip.shape[-2:]), 10 * repeats),
    }
    cpu, wall = {l: [] for l in INTERVALS}, {l: [] for l in INTERVALS}
    for _ in range(repeats):
        for l in INTERVALS:
            t, w = clock(), time.perf_counter()
            model.segment_video(clip, l)
            sync()
            cpu[l].append((clock() - t) * 1e3 / len(clip))
            wall[l].append((time.perf_counter() - w) * 1e3 / len(clip))
    ms = {l: statistics.median(v) for l, v in cpu.items()}
    wall_ms = {l: statistics.median(v) for l, v in wall.items()}
    for l in INTERVALS:
        out[f"ms_per_frame_interval_{l}"] = ms[l]
        out[f"fps_interval_{l}"] = 1e3 / ms[l]
        out[f"speedup_interval_{l}"] = ms[1] / ms[l]
        out[f"wall_ms_per_frame_interval_{l}"] = wall_ms[l]
        out[f"wall_speedup_interval_{l}"] = wall_ms[1] / wall_ms[l]
    return out


@torch.no_grad()
def accuracy_with_true_flow(model: DeepFeatureFlow, cfg: Config, n: int) -> dict:
    """Diagnostic on the synthetic test set: DFF at distances 1, 5, 9 with the exact flow (block-averaged to the
    feature grid) in place of the flow network's, and the scale field of the network: what a perfect flow
    network would reach, so the table separates the flow network's error from what warping features loses."""
    data = synthetic.SyntheticSegmentationVideo(n, cfg.test_frames, cfg.frame_size, seed=TEST_SEED)
    C, s, T = model.task.classifier.out_channels, cfg.output_stride, cfg.test_frames
    device = next(model.parameters()).device
    out = {}
    for d in DISTANCES:
        if d >= T:
            continue
        conf = torch.zeros(C, C, dtype=torch.long)
        for i in range(n):
            frames, labels = data[i]
            frames = frames.to(device)
            flow = torch.stack([data.flow(i, t, t - d) for t in range(d, T)]).to(device)
            flow = F.avg_pool2d(flow, s, ceil_mode=True) / s
            scale = model.flow(frames[:-d], frames[d:])[1]
            features = warp(model.features(frames[:-d]), flow, padding_mode="border") * scale
            pred = model.task(features, frames.shape[-2:]).argmax(1).cpu()
            conf += confusion(pred, labels[d:], C)
        out[f"miou_distance_{d}_true_flow"] = mean_iou(conf)
    return out


def evaluate(model: DeepFeatureFlow, cfg: Config, n: int | None = None, repeats: int = 5) -> dict:
    """Accuracy and speed on the synthetic test set (or the Cityscapes val split)."""
    if cfg.data == "cityscapes":
        return evaluate_cityscapes(model, cfg) | speed(model, _cityscapes_clip(cfg), repeats)
    frames, labels = test_clips(cfg, n)
    return (
        {"test_sequences": len(frames), "test_frames": frames.shape[1]}
        | accuracy(model, frames, labels)
        | accuracy_with_true_flow(model, cfg, len(frames))
        | speed(model, frames[0], repeats)
    )


def _cityscapes_clip(cfg: Config) -> torch.Tensor:
    from dynconv.data.cityscapes import CityscapesVideo

    return CityscapesVideo(cfg.cityscapes_dir, "val", cfg.max_distance, cfg.image_size)[0][0]


@torch.no_grad()
def evaluate_cityscapes(model: DeepFeatureFlow, cfg: Config) -> dict:
    """Cityscapes val: only the 20th frame of a snippet is labelled, so DFF at distance ``d`` propagates from the
    frame ``d`` before it, and interval ``l`` averages distances ``0 .. l-1`` (the labelled frame equally likely
    at any position after its key)."""
    from dynconv.data.cityscapes import NUM_CLASSES, CityscapesVideo

    data = CityscapesVideo(cfg.cityscapes_dir, "val", cfg.max_distance, cfg.image_size)
    device = next(model.parameters()).device
    reach = cfg.max_distance
    confs = {d: torch.zeros(NUM_CLASSES, NUM_CLASSES, dtype=torch.long) for d in range(reach + 1)}
    for i in range(len(data)):
        frames, label = data[i]
        frames = frames.to(device)
        cur = frames[-1:]
        for d in range(reach + 1):
            key = frames[-1 - d : len(frames) - d]
            pred = model(key, cur)[0].argmax(1)[0].cpu() if d else model.segment(cur).argmax(1)[0].cpu()
            confs[d] += confusion(pred, label, NUM_CLASSES)
    out = {"test_sequences": len(data)}
    for l in INTERVALS:
        if l - 1 <= reach:
            out[f"miou_interval_{l}"] = mean_iou(sum(confs[d] for d in range(l)))
    for d in DISTANCES:
        if d <= reach:
            out[f"miou_distance_{d}"] = mean_iou(confs[d])
            out[f"miou_perframe_at_distance_{d}"] = mean_iou(confs[0])
    return out


def markdown(m: dict) -> str:
    lines = [
        "| schedule | mIoU (%) | ms per frame | fps | speed-up |",
        "|---|---:|---:|---:|---:|",
    ]
    for l in INTERVALS:
        if f"ms_per_frame_interval_{l}" not in m:
            continue
        name = "per-frame (l = 1)" if l == 1 else f"DFF, key interval l = {l}"
        miou = f"{m[f'miou_interval_{l}']:.2f}" if f"miou_interval_{l}" in m else "-"
        lines.append(
            f"| {name} | {miou} | {m[f'ms_per_frame_interval_{l}']:.2f} | "
            f"{m[f'fps_interval_{l}']:.1f} | {m[f'speedup_interval_{l}']:.2f}x |"
        )
    lines += [
        "",
        "| propagation distance d | DFF mIoU (%) | per-frame mIoU, same frames (%) | DFF with the exact flow (%) |",
        "|---:|---:|---:|---:|",
    ]
    for d in DISTANCES:
        if f"miou_distance_{d}" in m:
            true = m.get(f"miou_distance_{d}_true_flow")
            lines.append(
                f"| {d} | {m[f'miou_distance_{d}']:.2f} | {m[f'miou_perframe_at_distance_{d}']:.2f} | "
                + ("-" if true is None else f"{true:.2f}")
                + " |"
            )
    lines += [
        "",
        f"| component (batch 1; {m.get('clock', 'wall clock')}) | ms |",
        "|---|---:|",
        *(f"| {k} | {m['ms_' + k]:.3f} |" for k in ("feature_net", "flow_net", "warp", "task_net")),
    ]
    return "\n".join(lines)


def plot(m: dict, path: str, title: str = "") -> str:
    """mIoU against measured speed-up, one point per key interval; returns ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ls = [l for l in INTERVALS if f"miou_interval_{l}" in m]
    x = [m[f"speedup_interval_{l}"] for l in ls]
    y = [m[f"miou_interval_{l}"] for l in ls]
    fig, ax = plt.subplots(figsize=(4.2, 3.2), dpi=100)
    ax.plot(x, y, "o-")
    for l, xi, yi in zip(ls, x, y):
        ax.annotate(f"l={l}", (xi, yi), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.axhline(y[0] - 2, color="grey", ls=":", lw=1, label="per-frame - 2 points")
    ax.axvline(3, color="grey", ls="--", lw=1, label="3x")
    ax.set_xlabel("speed-up vs per-frame")
    ax.set_ylabel("mIoU (%)")
    ax.set_title(title or "Deep Feature Flow", fontsize=9)
    ax.legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


# ------------------------------------------------------------------------------------------------ flow check


def read_frames(folder: str, limit: int, height: int, flag: str = "--flow-check", step: int = 1) -> torch.Tensor:
    """The first ``limit`` frames of a folder (sorted by name; every ``step``-th) as RGB ``[T, 3, height, W]`` in
    [0, 1] (grey frames repeated over three channels; the aspect ratio kept)."""
    from PIL import Image

    if not os.path.isdir(folder):
        raise UserError(f"{flag}: {folder} is not a folder; expected a folder of frames {FRAME_EXTENSIONS}")
    names = sorted((n for n in os.listdir(folder) if n.lower().endswith(FRAME_EXTENSIONS)), key=natural_key)
    names = names[::step][:limit]  # natural order: frame_2 before frame_10, as the frames of a video are numbered
    if len(names) < 2:
        raise UserError(
            f"{flag}: {folder} holds {len(names)} frame(s); expected at least 2 files with the extensions "
            f"{FRAME_EXTENSIONS}, in temporal order by name"
        )
    frames = []
    for n in names:
        try:
            with Image.open(os.path.join(folder, n)) as im:
                im = im.convert("RGB")
                width = max(1, round(im.width * height / im.height))
                frames.append(np.asarray(im.resize((width, height), Image.BILINEAR), np.float32) / 255.0)
        except OSError as exc:  # PIL's UnidentifiedImageError and a truncated file are OSErrors
            raise UserError(f"{flag}: {os.path.join(folder, n)} is not a readable image: {exc}") from None
    if len({f.shape for f in frames}) > 1:
        raise UserError(f"{flag}: the frames in {folder} differ in size; expected one video's frames")
    return torch.from_numpy(np.stack(frames)).permute(0, 3, 1, 2).contiguous()


@torch.no_grad()
def flow_check(model: DeepFeatureFlow, frames: torch.Tensor, margin: int = 4) -> dict:
    """Photometric error of frame t against frame t-1 warped to it with the trained flow, against frame t-1
    unwarped (zero flow) and (FlowNetS with ``init="lk"``) warped with the Lucas-Kanade start alone: mean absolute
    difference in [0, 1] units over the pixels ``margin`` or more from the border, averaged over the pairs, and the
    number of pairs where a warp beats no warp. ``frames``: ``[T, 3, H, W]``."""
    H, W = frames.shape[-2:]
    warped_err, identity_err, lk_err, better, lk_better = [], [], [], 0, 0
    uses_lk = getattr(model.flow, "init", None) == "lk"
    inner = (slice(None), slice(None), slice(margin, H - margin), slice(margin, W - margin))
    for t in range(1, len(frames)):
        key, cur = frames[t - 1 : t], frames[t : t + 1]
        e_w = photometric_error(model.flow, key, cur, margin).item()
        e_i = (key - cur)[inner].abs().mean().item()
        warped_err.append(e_w)
        identity_err.append(e_i)
        better += e_w < e_i
        if uses_lk:  # the parameter-free start alone, on the half-resolution pair as the network computes it
            half = F.avg_pool2d(torch.cat([key, cur]), 2, ceil_mode=True)
            start = 2 * F.interpolate(lucas_kanade(*half.chunk(2), windows=(4, 2)), size=(H, W), mode="bilinear")
            lk_err.append((warp(key, start, padding_mode="border") - cur)[inner].abs().mean().item())
            lk_better += lk_err[-1] < e_i
    lk = {}
    if uses_lk:
        lk = {
            "photometric_error_lucas_kanade_start": float(np.mean(lk_err)),
            "pairs_improved_lucas_kanade_start": lk_better,
        }
    return {
        "pairs": len(warped_err),
        "frame_size": [H, W],
        "photometric_error_warped": float(np.mean(warped_err)),
        "photometric_error_identity": float(np.mean(identity_err)),
        "pairs_improved": better,
    } | lk


# ------------------------------------------------------------------------------------------------ pictures


_PALETTE = np.array([[40, 40, 40], [230, 60, 50], [60, 200, 80], [70, 90, 240]], np.uint8)


def colourize(labels: torch.Tensor) -> np.ndarray:
    """``[H, W]`` class ids -> ``[H, W, 3]`` uint8 (classes past the palette cycle it; 255 is white)."""
    a = labels.cpu().numpy()
    out = _PALETTE[a % len(_PALETTE)]
    out[a == synthetic.IGNORE_INDEX] = 255
    return out


def write_pictures(frames: torch.Tensor, pred: torch.Tensor, labels: torch.Tensor | None, keys: list[int],
                   out: str) -> list[str]:  # fmt: skip
    """GIF (frame | prediction | ground truth; a white bar over key frames) and a PNG of every 3rd frame (one
    column per frame: frame, prediction, ground truth from top to bottom)."""
    from PIL import Image

    rows, columns = [], []
    for t in range(len(frames)):
        image = (frames[t].permute(1, 2, 0).clamp(0, 1).cpu().numpy() * 255).astype(np.uint8)
        panels = [image, colourize(pred[t])] + ([colourize(labels[t])] if labels is not None else [])
        if t in keys:
            for panel in panels:
                panel[:2] = 255
        rows.append(np.concatenate(panels, 1))
        columns.append(np.pad(np.concatenate(panels, 0), ((0, 0), (0, 2), (0, 0)), constant_values=255))
    base = os.path.splitext(out)[0]
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    scale = max(1, 192 // frames.shape[-2])
    pics = [Image.fromarray(r).resize((r.shape[1] * scale, r.shape[0] * scale), Image.NEAREST) for r in rows]
    pics[0].save(base + ".gif", save_all=True, append_images=pics[1:], duration=150, loop=0)
    Image.fromarray(np.concatenate(columns[::3], 1)).save(base + ".png")
    return [base + ".gif", base + ".png"]


# ------------------------------------------------------------------------------------------------ CLI


def _add_config_arguments(p: argparse.ArgumentParser, defaults: bool = True) -> None:
    """One flag per :class:`Config` field; ``defaults=False`` leaves a flag not given out of the namespace."""
    for f in dataclasses.fields(Config):
        flag = "--" + f.name.replace("_", "-")
        default = f.default if defaults else argparse.SUPPRESS
        if f.name in _FLAG_HELP:
            kind = {"type": _FLAG_TYPES[f.name]} if f.name in _FLAG_TYPES else {}
            p.add_argument(flag, default=default, help=_FLAG_HELP[f.name], **kind)
        elif f.name == "data":
            p.add_argument(flag, default=default, choices=("synthetic", "cityscapes"))
        elif f.name == "output_stride":
            p.add_argument(flag, default=default, type=int, choices=(4, 8, 16, 32))
        elif f.name == "flow_net":
            p.add_argument(flag, default=default, choices=("s", "c"))
        elif f.name in ("finetune_features", "flow_pretrain", "flow_init"):
            p.add_argument(flag, default=default, action=argparse.BooleanOptionalAction)
        elif f.name in _FLAG_TYPES:
            p.add_argument(flag, type=_FLAG_TYPES[f.name], default=default)
        else:
            p.add_argument(flag, default=default)


def _resumed_config(ckpt_path: str, given: Config, argv: list[str]) -> Config:
    """The run's own config (saved in its checkpoint) with the flags given on this command line changed."""
    saved = load_checkpoint(ckpt_path, map_location="cpu").get("config") or {}
    explicit = run_dir.flags_given(_add_config_arguments, argv)
    architecture = ("data", "width", "blocks", "output_stride", "flow_net", "flow_width", "flow_init", "frame_size")
    for k in architecture:
        if k in explicit and k in saved and saved[k] != explicit[k]:
            raise UserError(f"--{k.replace('_', '-')} {explicit[k]}: {ckpt_path} holds a run with {saved[k]!r}")
    return run_dir.resumed_config(given, saved, explicit)


def main(command: str, argv: list[str]) -> int:
    p = recipe_parser(command, "video-segmentation", __doc__)
    if command == "train":
        _add_config_arguments(p)
        p.add_argument("--resume", action="store_true", help="continue from RUN_DIR/last.pt (required if it exists)")
        p.add_argument("--eval-repeats", type=positive_int, default=5, help="timing repeats of the final evaluation")
        args = p.parse_args(argv)
        cfg = config_from(Config, args)
        check_config(cfg)
        ckpt_path = os.path.join(cfg.run_dir, run_dir.CHECKPOINT)
        if run_dir.resume_from(cfg.run_dir, args.resume):
            cfg = _resumed_config(ckpt_path, cfg, argv)
        metrics_path = os.path.join(cfg.run_dir, "metrics.json")
        result = train(cfg)
        if int(os.environ.get("RANK", "0")) != 0:
            return 0
        if not result["finished"]:
            print("stopped by --time-limit: the final evaluation is skipped; continue with --resume", file=sys.stderr)
            return 0
        if not result["losses"] and os.path.isfile(metrics_path):
            print(f"the run had already finished at step {result['step']}; its metrics: {metrics_path}")
            return 0
        model = load_model(ckpt_path, "cuda" if cfg.device.startswith("cuda") else cfg.device)[0]
        m = evaluate(model, cfg, repeats=args.eval_repeats)
        logged = [row["loss"] for row in run_dir.read_log(os.path.join(cfg.run_dir, run_dir.LOG)) if "loss" in row]
        m["final_train_loss"] = logged[-1] if logged else None
        m["step"] = result["step"]
        run_dir.write_json(metrics_path, m)
        plot(m, os.path.join(cfg.run_dir, "miou_vs_speedup.png"))
        print(markdown(m))
        return 0
    if command == "eval":
        p.add_argument("--checkpoint", required=True, help="a checkpoint file (RUN_DIR/last.pt)")
        p.add_argument("--num-sequences", type=positive_int, default=None, help="default: the training config's")
        p.add_argument("--repeats", type=positive_int, default=5, help="timing repeats (medians)")
        p.add_argument("--device", type=device, default="cpu", help="where the model runs (cpu, cuda)")
        p.add_argument("--threads", type=positive_int, default=None, help="torch threads (the timings depend on it)")
        p.add_argument("--output", help="also write the metrics JSON here (and the plot beside it, .png)")
        p.add_argument(
            "--speed-size",
            type=positive_int,
            metavar="H",
            help="instead: time the schedules only, on synthetic frames of H x H (x 2H for Cityscapes runs) pixels "
            "(on a GPU, small frames measure launch overhead rather than the networks)",
        )
        p.add_argument(
            "--flow-check",
            metavar="FRAMES_DIR",
            help="instead: photometric check of the flow on a video (frames sorted by name), against no warp",
        )
        p.add_argument(
            "--flow-check-frames", type=positive_int, default=100, help="frames of FRAMES_DIR to read (after the step)"
        )
        p.add_argument("--flow-check-height", type=positive_int, default=96, help="frames resized to this height")
        p.add_argument("--flow-check-step", type=positive_int, default=1, help="every N-th frame (larger motion)")
        args = p.parse_args(argv)
        if args.threads:
            torch.set_num_threads(args.threads)
        model, cfg = load_model(args.checkpoint, args.device)
        if args.flow_check:
            frames = read_frames(
                args.flow_check, args.flow_check_frames, args.flow_check_height, step=args.flow_check_step
            ).to(args.device)
            m = flow_check(model, frames)
            print(
                f"{m['pairs']} frame pairs at {m['frame_size'][0]}x{m['frame_size'][1]}: photometric error "
                f"(mean |I_t - warp(I_t-1)|) {m['photometric_error_warped']:.5f} with the trained flow vs "
                f"{m['photometric_error_identity']:.5f} unwarped; {m['pairs_improved']} pairs improved"
                + (
                    f"; the Lucas-Kanade start alone: {m['photometric_error_lucas_kanade_start']:.5f}, "
                    f"{m['pairs_improved_lucas_kanade_start']} pairs improved"
                    if "photometric_error_lucas_kanade_start" in m
                    else ""
                )
            )
        elif args.speed_size:
            size = dataclasses.replace(cfg, frame_size=args.speed_size).image_size
            clip = synthetic.SyntheticSegmentationVideo(1, cfg.test_frames, args.speed_size, TEST_SEED)[0][0]
            clip = F.interpolate(clip, size=size, mode="bilinear", align_corners=False)
            m = {"frame_size": list(size), "device": args.device} | speed(model, clip.to(args.device), args.repeats)
            print(f"frames {size[0]}x{size[1]}, {args.device}\n\n" + markdown(m))
        else:
            m = evaluate(model, cfg, args.num_sequences, args.repeats)
            print(markdown(m))
        if args.output:
            run_dir.write_json(args.output, m)
            if not (args.flow_check or args.speed_size):
                print("plot: " + plot(m, os.path.splitext(args.output)[0] + ".png"))
        return 0
    if command == "predict":
        p.add_argument("--checkpoint", required=True, help="a checkpoint file (RUN_DIR/last.pt)")
        p.add_argument("--frames-dir", help="a folder of frames to segment (default: a synthetic test sequence)")
        p.add_argument("--index", type=nonnegative_int, default=0, help="which synthetic test sequence")
        p.add_argument("--interval", type=positive_int, default=5, help="key frame interval l")
        p.add_argument(
            "--adaptive",
            type=positive_float,
            default=None,
            metavar="THRESHOLD",
            help="adaptive key frames: a new key when the mean flow exceeds THRESHOLD feature pixels",
        )
        p.add_argument("--output", default="segmentation.gif")
        args = p.parse_args(argv)
        model, cfg = load_model(args.checkpoint)
        if args.frames_dir:
            frames, labels = read_frames(args.frames_dir, 60, cfg.image_size[0], "--frames-dir"), None
        else:
            data = synthetic.SyntheticSegmentationVideo(args.index + 1, cfg.test_frames, cfg.frame_size, TEST_SEED)
            frames, labels = data[args.index]
        schedule = "fixed" if args.adaptive is None else "adaptive"
        logits, keys = model.segment_video(frames, args.interval, schedule, args.adaptive or 0.0)
        paths = write_pictures(frames, logits.argmax(1), labels, keys, args.output)
        print(f"key frames {keys}; written: " + ", ".join(paths))
        return 0
    raise UserError(f"unknown command {command!r}")
