"""``dynconv bench mixture``: static vs CondConv vs DY-CNN vs ODConv (vs DyNet) on ResNet-18 and MobileNetV2.

For every (model, input size, batch) it measures, in one run (the candidates timed interleaved, one forward of
each per round; see :func:`dynconv.bench.timing.measure_interleaved`): parameters, forward FLOPs per image (counted
with ``torch.utils.flop_counter.FlopCounterMode``: convolutions, matmuls and einsums, i.e. the kernel mixing
too; elementwise attention ops are not counted), the median forward latency in eval mode under
``torch.no_grad()`` and the peak extra memory of one forward. Every ``nn.Conv2d`` is converted with
:func:`dynconv.convert` (``--experts`` experts each). For the kinds in ``--formulation-kinds`` it also times
each formulation of the mixture: ``grouped`` (per-sample kernels, batch folded into the groups), ``experts``
(K dense convolutions, then the weighted sum), ``chunked`` (a few samples per grouped convolution), ``loop``
(one ``F.conv2d`` per sample) and ``auto`` (the per-layer rule in :mod:`dynconv.nn.mixture`).

``--quick`` measures what fits in a few minutes on a small CPU: both models at 32x32 (batch 1 and 64) and
224x224 at batch 1, and skips 224x224 at batch 64 (it says so in the table).

Each row is printed as soon as it is measured; on CUDA the forward's time by CUDA-graph replay stands beside the
eager one, and the latency ratio uses it where both have it.
"""

from __future__ import annotations

import argparse
import copy
import functools

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

import dynconv
from dynconv.bench.report import Report, device_name, speedup, timing_note
from dynconv.bench.timing import measure_interleaved
from dynconv.models import mobilenet_v2, resnet18
from dynconv.nn.mixture import FORMULATIONS, KernelMixtureConv2d
from dynconv.recipes.args import nonnegative_int, positive_int

MODELS = {"resnet18": resnet18, "mobilenet_v2": mobilenet_v2}
LAYER_CLASSES = {
    "condconv": dynconv.CondConv2d,
    "dynamic": dynconv.DynamicConv2d,
    "odconv": dynconv.ODConv2d,
    "dynet": dynconv.DyNetConv2d,
}
LABELS = {"static": "static", "condconv": "CondConv", "dynamic": "DY-CNN", "odconv": "ODConv", "dynet": "DyNet"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--models", default="resnet18,mobilenet_v2")
    parser.add_argument("--sizes", default="32,224", help="input sizes (32 uses the CIFAR stems)")
    parser.add_argument("--batches", default="1,64")
    parser.add_argument("--kinds", default="static,condconv,dynamic,odconv", help="also: dynet")
    parser.add_argument("--experts", type=positive_int, default=4, help="experts per converted layer")
    parser.add_argument(
        "--formulation-kinds", default="dynamic", help="kinds whose formulations are all timed ('' for none)"
    )
    parser.add_argument("--skip", default="", help="'size,batch;...' combinations to skip")
    parser.add_argument(
        "--threads", type=nonnegative_int, default=0, help="torch.set_num_threads (0: leave the default)"
    )
    parser.add_argument("--quick", action="store_true", help="skip 224x224 at batch 64; 3 repeats")
    parser.add_argument(
        "--layers",
        default="",
        help="'C,HW;...': instead of the models, time one mixture layer (C, C, 3) on HWxHW maps per entry, every "
        "formulation against the static convolution (the calibration of the auto rule)",
    )
    parser.add_argument(
        "--layer-kind", default="dynamic", choices=["condconv", "dynamic", "odconv", "dynet"], help="for --layers"
    )


def count_flops(model: torch.nn.Module, x: torch.Tensor) -> int:
    """Forward FLOPs (2 per multiply-add) of ``model(x)`` as FlopCounterMode counts them."""
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(x)
    return counter.get_total_flops()


def _set_formulation(model: torch.nn.Module, formulation: str) -> None:
    for m in model.modules():
        if isinstance(m, KernelMixtureConv2d):
            m.formulation = formulation


def _forward(model: torch.nn.Module, x: torch.Tensor, formulation: str, dynamic: bool) -> torch.Tensor:
    if dynamic:
        _set_formulation(model, formulation)
    with torch.no_grad():
        return model(x)


def run_layers(args: argparse.Namespace, device: torch.device) -> str:
    """``--layers``: one ``--layer-kind`` layer ``(C, C, 3, padding=1)`` per entry (default ``DynamicConv2d``),
    each formulation vs the static convolution."""
    cuda = device.type == "cuda"
    header = ["C", "map", "batch", "C*9 / (K*H*W)", "formulation", "median ms"]
    header += ["graph ms"] if cuda else []
    header += ["vs static", "peak extra MB"]
    note = (
        f"layer={LAYER_CLASSES[args.layer_kind].__name__}, device={device_name(device)}, "
        f"torch threads={torch.get_num_threads()}, K={args.experts}, repeats={args.repeats}\n{timing_note(device)}"
    )
    report = Report.from_args(args, header, note)
    for item in (i for i in args.layers.split(";") if i):
        C, HW = (int(v) for v in item.split(","))
        torch.manual_seed(0)
        layer = LAYER_CLASSES[args.layer_kind](C, C, 3, padding=1, num_experts=args.experts).to(device).eval()
        with torch.no_grad():  # a non-uniform attention, as after training
            for m in layer.modules():
                if isinstance(m, torch.nn.Linear):
                    m.weight.normal_(0, m.in_features**-0.5)
        for batch in (int(b) for b in args.batches.split(",")):
            x = torch.randn(batch, C, HW, HW, device=device)
            static = layer.weight[0].detach()
            candidates = {"static": lambda x=x, w=static: F.conv2d(x, w, None, 1, 1)}
            for form in FORMULATIONS[1:]:  # every formulation but "auto", which the table marks instead
                candidates[form] = functools.partial(_forward, layer, x, form, True)
            timed = measure_interleaved(candidates, device, args.repeats)
            layer.formulation = "auto"
            auto = layer.choose_formulation(x)
            ratio = C * 9 / (args.experts * HW * HW)
            for form, m in timed.items():
                cells = [C, f"{HW}x{HW}", batch, ratio, form + (" (auto)" if form == auto else ""), m.median_ms]
                cells += [m.graph_ms] if cuda else []
                cells += [1 / speedup(timed["static"], m), m.peak_extra_mb]
                report.measured(cells, forward=m)
    return report.close()


def run(args: argparse.Namespace) -> str:
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if args.layers:
        return run_layers(args, device)
    repeats = min(args.repeats, 3) if args.quick else args.repeats
    skip = {tuple(int(v) for v in item.split(",")) for item in args.skip.split(";") if item}
    if args.quick:
        skip.add((224, 64))
    formulation_kinds = [k for k in args.formulation_kinds.split(",") if k]
    cuda = device.type == "cuda"
    header = [
        "model",
        "input",
        "batch",
        "layer",
        "formulation",
        "params (M)",
        "params vs static",
        "GFLOPs/img",
        "FLOPs vs static",
        "median ms",
        *(["graph ms"] if cuda else []),
        "latency vs static",
        "peak extra MB",
    ]
    note = (
        f"device={device_name(device)}, torch threads={torch.get_num_threads()}, experts per layer={args.experts}, "
        f"repeats={repeats}; every nn.Conv2d converted; FLOPs per image at the measured batch "
        f"(the 'auto' rows use the batch-1 count)\n{timing_note(device)}"
    )
    report = Report.from_args(args, header, note)
    skipped: list[str] = []
    for model_name in args.models.split(","):
        for size in (int(s) for s in args.sizes.split(",")):
            torch.manual_seed(0)
            small = size <= 64
            base = MODELS[model_name](num_classes=10 if small else 1000, small_input=small).to(device).eval()
            variants: dict[str, torch.nn.Module] = {}
            for kind in args.kinds.split(","):
                if kind == "static":
                    variants[kind] = base
                else:
                    variants[kind] = dynconv.convert(copy.deepcopy(base), kind, num_experts=args.experts).eval()
            one = torch.randn(1, 3, size, size, device=device)
            stats = {k: (sum(p.numel() for p in m.parameters()), count_flops(m, one)) for k, m in variants.items()}
            base_params, base_flops = stats.get("static", next(iter(stats.values())))
            for batch in (int(b) for b in args.batches.split(",")):
                if (size, batch) in skip:
                    skipped.append(f"{model_name} {size}x{size} batch {batch}")
                    continue
                x = torch.randn(batch, 3, size, size, device=device)
                candidates = {}
                for kind, model in variants.items():
                    forms = list(FORMULATIONS) if kind in formulation_kinds else ["auto"]
                    for form in forms:
                        candidates[(kind, form)] = functools.partial(_forward, model, x, form, kind != "static")
                timed = measure_interleaved(candidates, device, repeats)
                static = timed.get(("static", "auto"))
                for (kind, form), m in timed.items():
                    model = variants[kind]
                    params, flops = stats[kind]
                    if form == "auto" or m.error:
                        flops_form = flops
                    else:
                        _set_formulation(model, form)
                        flops_form = count_flops(model, one if batch == 1 else x) / batch
                        _set_formulation(model, "auto")
                    cells = [
                        model_name,
                        f"{size}x{size}",
                        batch,
                        LABELS.get(kind, kind),
                        "-" if kind == "static" else form,
                        params / 1e6,
                        params / base_params,
                        flops_form / 1e9,
                        flops_form / base_flops,
                        m.median_ms,
                        *([m.graph_ms] if cuda else []),
                        1 / speedup(static, m) if static else float("nan"),
                        m.peak_extra_mb,
                    ]
                    report.measured(cells, forward=m)
    if skipped:
        report.footnote("skipped: " + ", ".join(skipped))
    return report.close()
