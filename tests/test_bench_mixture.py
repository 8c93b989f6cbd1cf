"""The mixture benchmark: FLOP counting checked by hand, and one tiny end-to-end run of the table."""

import argparse

import pytest
import torch

import dynconv
from dynconv.bench import mixture

pytestmark = pytest.mark.usefixtures("one_thread")


def test_flop_count_of_static_and_mixed_conv():
    conv = torch.nn.Conv2d(3, 4, 3, padding=1, bias=False)
    x = torch.randn(1, 3, 8, 8)
    conv_flops = 2 * 4 * 3 * 9 * 64  # 2 per multiply-add, C_out * C_in * k*k per output pixel
    assert mixture.count_flops(conv, x) == conv_flops
    layer = dynconv.DynamicConv2d(3, 4, 3, padding=1, bias=False, num_experts=4, formulation="grouped")
    attention = 2 * 3 * 4 + 2 * 4 * 4  # fc1 (3 -> max(3 // 4, 4)) and fc2 (4 -> K)
    mixing = 2 * 4 * (4 * 3 * 9)  # [1, K] @ [K, P]
    assert mixture.count_flops(layer, x) == conv_flops + attention + mixing
    layer.formulation = "experts"
    assert mixture.count_flops(layer, x) == 4 * conv_flops + attention


def test_run_produces_table():
    parser = argparse.ArgumentParser()
    mixture.add_arguments(parser)
    args = parser.parse_args(["--models", "resnet18", "--sizes", "32", "--batches", "2", "--kinds", "static,dynamic"])
    args.device, args.repeats = "cpu", 1
    table = mixture.run(args)
    lines = [line for line in table.splitlines() if line.startswith("| resnet18")]
    assert len(lines) == 1 + 5  # static + DY-CNN auto/grouped/experts/chunked/loop
    assert [line.split(" | ")[4] for line in lines] == ["-", "auto", "grouped", "experts", "chunked", "loop"]
    assert "| resnet18 | 32x32 | 2 | static | - | 11.2 | 1 | " in lines[0]


def test_layers_sweep_times_every_formulation_and_marks_auto():
    parser = argparse.ArgumentParser()
    mixture.add_arguments(parser)
    args = parser.parse_args(["--layers", "16,6;64,2", "--batches", "3"])
    args.device, args.repeats = "cpu", 1
    lines = [line for line in mixture.run(args).splitlines() if line.startswith("| 16 ") or line.startswith("| 64 ")]
    forms = [line.split(" | ")[4] for line in lines]
    # 16*9 / (4*36) = 1 and 3 kernels of 9 KB under GROUPED_BYTES -> grouped on CPU; 64*9 / (4*4) = 36 > 32 -> experts
    assert forms == ["static", "grouped (auto)", "experts", "chunked", "loop"] + [
        "static", "grouped", "experts (auto)", "chunked", "loop"
    ]  # fmt: skip
    assert all(float(line.split(" | ")[6]) > 0 for line in lines)


def test_layers_sweep_odconv_offers_the_experts_formulation():
    parser = argparse.ArgumentParser()
    mixture.add_arguments(parser)
    args = parser.parse_args(["--layers", "64,2", "--batches", "3", "--layer-kind", "odconv"])
    args.device, args.repeats = "cpu", 1
    table = mixture.run(args)
    forms = [line.split(" | ")[4] for line in table.splitlines() if line.startswith("| 64 ")]
    assert forms == ["static", "grouped", "experts (auto)", "chunked", "loop"]  # 64*9 / (4*4) = 36 > 32
    assert "layer=ODConv2d" in table
