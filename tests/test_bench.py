"""The benchmarks (``dynconv bench NAME``): the interleaved timer every benchmark uses; tables that survive a cut
(rows printed and written as they are measured, a candidate that raises becomes a row saying why, the CUDA-graph
kernel time and the bandwidth derived from it, the shared ``--shapes`` words); each bench's columns and ratios
(local_filter, deform, dcnv, warp, mixture) on tiny shapes, Triton in the interpreter without a GPU."""

import argparse
import io
import math
import re
import sys
import time
import types

import pytest
import torch
from triton_setup import TRITON_DEVICE

import dynconv
from dynconv import cli
from dynconv.bench import dcnv as bench_dcnv
from dynconv.bench import deform as bench_deform
from dynconv.bench import local_filter as bench_local_filter
from dynconv.bench import mixture, report, timing
from dynconv.bench import warp as bench_warp
from dynconv.errors import UserError
from dynconv.testing import assert_close

pytestmark = pytest.mark.usefixtures("one_thread")


class StampedStream:
    """A console that remembers when each line was printed."""

    def __init__(self):
        self.lines: list[tuple[float, str]] = []
        self._partial = ""

    def write(self, text: str) -> int:
        self._partial += text
        while "\n" in self._partial:
            line, self._partial = self._partial.split("\n", 1)
            self.lines.append((time.monotonic(), line))
        return len(text)

    def flush(self) -> None:
        pass


def _table(lines: list[str]) -> tuple[dict[str, int], list[list[str]]]:
    """The column index by name and the cells of every row of a markdown table given as its lines."""
    table = [line for line in lines if line.startswith("|")]
    header = [h.strip() for h in table[0].strip("|").split("|")]
    rows = [[v.strip() for v in line[1:-1].split(" | ")] for line in table[2:]]
    return {name: i for i, name in enumerate(header)}, rows


def _bench_args(module, argv, **extra):
    parser = argparse.ArgumentParser()
    module.add_arguments(parser)
    args = parser.parse_args(argv)
    args.device, args.repeats = "cpu", 1
    for key, value in extra.items():
        setattr(args, key, value)
    return args


def test_report_prints_and_appends_each_row_as_it_comes(tmp_path):
    out = tmp_path / "table.md"
    out.write_text("left over from an earlier run\n")
    stream = io.StringIO()
    rep = report.Report(["shape", "impl", "ms"], "device: cpu", stream, str(out))
    head = "device: cpu\n\n| shape | impl | ms | note |\n|---|---|---|---|\n"
    assert out.read_text() == head == stream.getvalue()  # emptied, then the header at once
    rep.row(["(1, 2)", "torch", 0.012345])
    assert out.read_text() == head + "| (1, 2) | torch | 0.0123 |  |\n"  # an empty note
    rep.row(["(1, 2)", "a|b", math.nan], note="line one\nline two")  # nan: not measured; a message stays one cell
    assert out.read_text().splitlines()[-1] == "| (1, 2) | a\\|b | - | line one line two |"
    rep.failed(["(3, 4)", "official"], "ImportError: no module named X")
    assert out.read_text().splitlines()[-1] == "| (3, 4) | official | - | not run: ImportError: no module named X |"
    rep.footnote("a footnote")
    text = rep.close()
    assert out.read_text() == stream.getvalue() == text + "\n"
    assert text.endswith("|\n\na footnote")
    with pytest.raises(ValueError, match="a row of 2 cells for 4 columns"):
        rep.row(["too few"])


def test_bandwidth_and_speedups_come_from_the_kernel_time_where_measured():
    eager_only = timing.Measurement(median_s=2e-3, peak_extra_bytes=0.0)
    graphed = timing.Measurement(median_s=2e-3, peak_extra_bytes=0.0, graph_s=5e-4)
    nbytes = 3e6
    assert timing.gbs(nbytes, graphed) == pytest.approx(3e6 / 5e-4 / 1e9)  # 6 GB/s over the graph replay time
    assert timing.gbs(nbytes, graphed, kernel=False) == pytest.approx(1.5)  # over the eager per-call time
    assert timing.gbs(nbytes, eager_only) == pytest.approx(1.5)  # no graph time (CPU, capture failed): eager
    base = timing.Measurement(median_s=4e-3, peak_extra_bytes=0.0, graph_s=1e-3)
    assert report.speedup(base, graphed) == pytest.approx(2.0)  # graph vs graph
    assert report.speedup(base, eager_only) == pytest.approx(2.0)  # 4 ms / 2 ms: eager vs eager, never mixed
    assert math.isnan(report.speedup(timing.failed("X"), graphed))
    assert math.isnan(timing.gbs(nbytes, timing.failed("X")))
    assert timing.tensor_bytes(torch.zeros(2, 3), torch.zeros(5, dtype=torch.bfloat16)) == 6 * 4 + 5 * 2
    # calls per graph: about 2 ms per replay, at least one call, at most 100
    assert [timing.graph_calls(t) for t in (1e-6, 1e-4, 3e-4, 5e-3, math.nan)] == [100, 20, 7, 1, 100]
    fallback = timing.Measurement(1e-3, 0.0, graph_error="CUDA-graph capture failed: RuntimeError: sync")
    assert report.row_note(fwd=fallback, both=graphed) == (
        "fwd: CUDA-graph capture failed: RuntimeError: sync; eager time used"
    )
    assert report.row_note(fwd=timing.failed("E: x"), both=timing.failed("E: x")) == "not run: E: x"
    assert report.row_note(fwd=graphed, both=timing.failed("E: y")) == "fwd+bwd not run: E: y"


def test_bench_row_survives_a_raising_candidate_and_rows_stream_before_the_end(monkeypatch, tmp_path):
    """A stub backend that raises and one that sleeps: the other rows are printed, the failing one says why,
    and the first shape's rows are on the console and in --output while the second shape is being measured."""
    real_warp = bench_warp.warp
    output = tmp_path / "warp.md"
    seen_during_run = []

    def stub(x, flow, padding_mode, backend, deterministic):
        if backend == "broken":
            raise NotImplementedError("\"grid_sampler\" not implemented for 'BFloat16'\nsecond line of the message")
        if backend == "slow":
            if x.shape[-1] == 6:  # the second shape: look at what the bench has written so far
                seen_during_run.append((time.monotonic(), output.read_text()))
            time.sleep(0.02)
        return real_warp(x, flow, padding_mode=padding_mode, backend="torch")

    monkeypatch.setattr(bench_warp, "warp", stub)
    stream = StampedStream()
    args = _bench_args(
        bench_warp,
        ["--shapes", "1,2,4,5;1,2,4,6", "--backends", "torch,broken,slow"],
        stream=stream,
        output=str(output),
    )
    text = bench_warp.run(args)
    col, rows = _table([line for _, line in stream.lines])
    assert [(r[0], r[2]) for r in rows] == [
        (shape, impl) for shape in ("(1, 2, 4, 5)", "(1, 2, 4, 6)") for impl in ("torch", "broken", "slow")
    ]
    for row in rows:
        if row[2] == "broken":
            assert row[col["note"]] == "not run: NotImplementedError: \"grid_sampler\" not implemented for 'BFloat16'"
            assert {row[i] for i in range(3, len(row) - 1)} == {"-"}
        else:
            assert row[col["note"]] == "" and float(row[col["fwd ms"]]) > 0 and float(row[col["fwd GB/s"]]) > 0
    assert float(rows[2][col["fwd ms"]]) >= 20  # the sleeping one was timed, not skipped
    # while the second shape was measured, the first shape's three rows were already in --output ...
    first_seen, written = seen_during_run[0]
    assert [r[:3] for r in _table(written.splitlines())[1]] == [r[:3] for r in rows[:3]]
    # ... and on the console, printed before that moment; the second shape's rows only after it
    stamps = [stamp for stamp, line in stream.lines if line.startswith("| (1, 2, 4, ")]
    assert max(stamps[:3]) < first_seen < min(stamps[3:])
    assert output.read_text() == text + "\n" == "\n".join(line for _, line in stream.lines) + "\n"


def test_deform_bench_torchvision_without_a_bf16_kernel_is_a_row(monkeypatch):
    """torchvision's CUDA deform_conv2d raises NotImplementedError for bfloat16: the table goes on."""

    def torchvision_like(x, offset, weight, bias, padding, mask):
        if x.dtype == torch.bfloat16:
            raise NotImplementedError("\"deformable_im2col\" not implemented for 'BFloat16'")
        return bench_deform.deform_conv2d(x, offset, weight, bias, padding=padding, mask=mask, backend="reference")

    monkeypatch.setattr(bench_deform, "_torchvision_op", lambda: (torchvision_like, None))
    args = _bench_args(bench_deform, ["--shapes", "1,2,5,4", "--dtypes", "float32,bfloat16", "--backends", "torch"])
    col, rows = _table(bench_deform.run(args).splitlines())
    got = {(r[1], r[2]): r for r in rows}
    assert list(got) == [(d, impl) for d in ("float32", "bfloat16") for impl in ("torchvision", "torch")]
    assert got["bfloat16", "torchvision"][col["note"]].startswith('not run: NotImplementedError: "deformable_im2col')
    bf16 = got["bfloat16", "torch"]
    assert float(bf16[col["fwd ms"]]) > 0 and bf16[col["note"]] == ""
    assert bf16[col["fwd speed-up vs torchvision"]] == "-"  # its baseline did not run
    assert float(bf16[col["fwd speed-up vs torch"]]) == 1.0
    fp32 = got["float32", "torch"]
    expected = float(got["float32", "torchvision"][col["fwd ms"]]) / float(fp32[col["fwd ms"]])
    assert float(fp32[col["fwd speed-up vs torchvision"]]) == pytest.approx(expected, rel=0.02)


def test_interleaved_timer_keeps_going_after_a_candidate_raises():
    calls = {"ok": 0, "flaky": 0}

    def ok():
        calls["ok"] += 1

    def flaky():
        calls["flaky"] += 1
        if calls["flaky"] == 3:  # fails in the second timed round
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    result = timing.measure_interleaved({"flaky": flaky, "ok": ok}, "cpu", repeats=4, warmup=1)
    assert result["ok"].runs == 4 and result["ok"].error is None and calls["ok"] == 1 + 4 + 1
    assert result["flaky"].error == "OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB"
    assert calls["flaky"] == 3 and result["flaky"].runs == 0 and math.isnan(result["flaky"].median_s)


@pytest.mark.parametrize(
    "module, named",
    [
        (bench_local_filter, {"small": "SMALL_SHAPES", "issue": "GPU_SHAPES", "default": "DEFAULT_SHAPES"}),
        (bench_deform, {"small": "DCNV2_SMALL_SHAPES", "issue": "DCNV2_SHAPES", "default": "DCNV2_SHAPES"}),
        (bench_warp, {"small": "SMALL_SHAPES", "issue": "SHAPES", "default": "SHAPES"}),
        (bench_dcnv, {"small": "SMALL_SHAPES", "issue": "FULL_SHAPES", "default": "FULL_SHAPES"}),
    ],
)
def test_every_bench_takes_the_same_shapes_words(module, named):
    arity = len(getattr(module, named["small"])[0])
    explicit = ";".join(",".join(str(v + i) for v in range(1, arity + 1)) for i in range(2))

    def parse(text):
        if module is bench_dcnv:
            return module._parse_shapes(argparse.Namespace(shapes=text, quick=False))
        if module is bench_local_filter:
            return module._parse_shapes(text, torch.device("cpu"))
        return module._parse_shapes(text)

    for word, attr in named.items():
        assert parse(word) == getattr(module, attr)
    assert parse(explicit) == [tuple(range(1, arity + 1)), tuple(range(2, arity + 2))]
    for bad in ("1,2", "x," * (arity - 1) + "x", ",".join(["0"] * arity), "tiny", ";"):
        with pytest.raises(UserError, match="--shapes: expected one of 'default', .*'small'"):
            parse(bad)


def test_dcnv_shapes_keep_their_old_names():
    assert bench_dcnv._parse_shapes(argparse.Namespace(shapes=None, quick=False)) == bench_dcnv.FULL_SHAPES
    assert bench_dcnv._parse_shapes(argparse.Namespace(shapes=None, quick=True)) == bench_dcnv.QUICK_SHAPES
    assert bench_dcnv._parse_shapes(argparse.Namespace(shapes="full", quick=True)) == bench_dcnv.FULL_SHAPES
    assert bench_dcnv._parse_shapes(argparse.Namespace(shapes="quick", quick=False)) == bench_dcnv.QUICK_SHAPES


def test_cli_bench_dcnv_small_streams_to_console_and_output(tmp_path, capsys):
    out = tmp_path / "dcnv.md"
    argv = ["bench", "dcnv", "--shapes", "small", "--ops", "dcnv4", "--backends", "torch", "--repeats", "1"]
    assert cli.main(argv + ["--output", str(out)]) == 0
    printed = capsys.readouterr().out
    assert printed == out.read_text()
    col, rows = _table(printed.splitlines())
    assert [(r[0], r[3]) for r in rows] == [("(2, 14, 14, 4, 16)", "torch"), ("(1, 20, 24, 2, 32)", "torch")]
    # value, offset_mask (padded to a multiple of 8) and the output once: B*H*W * (64 + 112 + 64) fp32 values
    fwd_bytes = 2 * 14 * 14 * (64 + 112 + 64) * 4
    row = rows[0]
    assert float(row[col["fwd GB/s"]]) == pytest.approx(fwd_bytes / float(row[col["fwd ms"]]) / 1e6, rel=0.02)


@pytest.mark.parametrize(
    "argv, message",
    [
        (
            ["bench", "dcnv", "--shapes", "huge"],
            "--shapes: expected one of 'default', 'full', 'issue', 'quick', 'small'",
        ),
        (["bench", "warp", "--shapes", "1,2,3"], "--shapes: expected one of 'default', 'small', 'issue' or 'B,C,H,W"),
        (["bench", "deform", "--dtypes", "float32,half"], "--dtypes: expected a comma-separated list of float32"),
        (["bench", "dcnv", "--ops", "dcnv5"], "--ops: expected a comma-separated list of dcnv3, dcnv4"),
    ],
)
def test_cli_bench_bad_words_are_one_line_errors(argv, message, capsys):
    assert cli.main(argv + ["--repeats", "1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("dynconv: error: " + message) and err.count("\n") == 1


def test_cli_bench_output_in_a_missing_folder_is_a_one_line_error(tmp_path, capsys):
    missing = tmp_path / "no" / "t.md"
    assert cli.main(["bench", "warp", "--shapes", "1,1,2,2", "--repeats", "1", "--output", str(missing)]) == 2
    err = capsys.readouterr().err
    assert err == f"dynconv: error: --output {missing}: cannot write it (No such file or directory)\n"


def test_cli_bench_repeats_must_be_positive(capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(["bench", "warp", "--repeats", "0"])
    assert info.value.code == 2 and "--repeats: expected an integer >= 1" in capsys.readouterr().err


@pytest.mark.cuda
def test_graph_replay_times_the_kernel_and_a_capture_failure_falls_back():
    """On CUDA: a copy's graph time is below its eager time and gives a plausible bandwidth; a candidate that
    synchronises with the host cannot be captured, says why, and does not disturb the candidates after it."""
    x = torch.randn(64, 2**20, device="cuda")  # 256 MiB: larger than any L2 cache
    y = torch.empty_like(x)

    def copy():
        y.copy_(x)

    def syncs():
        return (x[0, 0] + 1).item()

    result = timing.measure_interleaved({"copy": copy, "syncs": syncs, "copy again": copy}, "cuda", repeats=5)
    for name in ("copy", "copy again"):
        m = result[name]
        assert m.graph_error is None and 0 < m.graph_s <= m.median_s * 1.1
        bandwidth = timing.gbs(2 * x.numel() * 4, m)  # read x, write y
        assert 50 < bandwidth < 10_000, bandwidth
    assert math.isnan(result["syncs"].graph_s) and result["syncs"].median_s > 0
    assert result["syncs"].graph_error.startswith("CUDA-graph capture failed: ")
    assert torch.equal(y, x)  # the device still works after the failed capture


@pytest.mark.cuda
def test_dcnv_bench_on_cuda_says_the_official_op_is_missing(monkeypatch):
    monkeypatch.setattr(bench_dcnv, "official_dcnv4", lambda group: None)
    args = _bench_args(bench_dcnv, ["--shapes", "1,6,7,2,8", "--ops", "dcnv4", "--backends", "torch"], device="cuda")
    col, rows = _table(bench_dcnv.run(args).splitlines())
    assert [r[3] for r in rows] == ["torch", bench_dcnv.OFFICIAL]
    assert float(rows[0][col["fwd graph ms"]]) > 0
    assert rows[1][col["note"]].startswith("not run: the DCNv4 package does not import")


def test_graph_times_join_the_measurements_of_the_candidates_that_ran(monkeypatch):
    """The plumbing of the CUDA-graph path, on the CPU: only candidates that ran are captured, a capture failure
    stays beside the eager time, and the kernel time is the graph time where there is one."""
    captured = []

    def fake_graphs(candidates, device, repeats):
        captured.append(sorted(candidates))
        return {"graphed": 1e-6, "uncapturable": "CUDA-graph capture failed: RuntimeError: a sync"}

    def broken():
        raise NotImplementedError("no kernel")

    monkeypatch.setattr(timing, "measure_graphs", fake_graphs)
    monkeypatch.setattr(timing, "GRAPH_MAX_S", 0.01)
    cands = {"graphed": lambda: None, "uncapturable": lambda: None, "broken": broken, "slow": lambda: time.sleep(0.02)}
    result = timing.measure_interleaved(cands, "cpu", repeats=2, graphs=True)
    assert captured == [["graphed", "uncapturable"]]  # not the one that failed, nor the slow one
    assert re.match(r"not captured: \d+ ms per eager call", result["slow"].graph_error)
    assert result["slow"].kernel_s >= 0.02
    assert result["graphed"].graph_s == 1e-6 and result["graphed"].kernel_s == 1e-6
    assert result["uncapturable"].graph_error.endswith("a sync") and math.isnan(result["uncapturable"].graph_s)
    assert result["uncapturable"].kernel_s == result["uncapturable"].median_s > 0
    assert result["broken"].error == "NotImplementedError: no kernel"
    timing.measure_interleaved(cands, "cpu", repeats=1)  # graphs default to CUDA only: not called on the CPU
    assert len(captured) == 1


# -------------------------------------------------------------------------------------------------------- timing


class FakeClock:
    """``time.perf_counter`` that only moves when a candidate says how long it took."""

    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def _candidates(clock, calls, costs):
    def make(name):
        def fn():
            calls[name] += 1
            clock.now += costs[name][min(calls[name], len(costs[name])) - 1]

        return fn

    return {name: make(name) for name in costs}


def test_median_over_rounds_and_slow_candidate_capped(monkeypatch):
    clock = FakeClock()
    monkeypatch.setattr(timing.time, "perf_counter", clock)
    calls = {"fast": 0, "slow": 0}
    # per call: warm-up first, then the timed runs (the fast one has an outlier), then peak_memory's call
    costs = {"fast": [9.0, 1.0, 3.0, 2.0, 15.0, 2.0, 2.0], "slow": [99.0, 10.0, 12.0, 11.0, 10.0, 10.0, 10.0]}
    result = timing.measure_interleaved(_candidates(clock, calls, costs), "cpu", repeats=5, time_cap_s=25.0)
    # the fast one: median of 1, 3, 2, 15, 2 (they add up to 23, under the cap); the warm-up is not timed
    assert result["fast"].runs == 5 and result["fast"].median_s == 2.0
    # 10 + 12 = 22 <= 25, so a third run (11) happens; 33 > 25, so the slow one sits out rounds 4 and 5
    assert result["slow"].runs == 3 and result["slow"].median_s == 11.0
    assert calls == {"fast": 1 + 5 + 1, "slow": 1 + 3 + 1}  # + the untimed peak-memory call each


def test_no_cap_runs_every_round(monkeypatch):
    clock = FakeClock()
    monkeypatch.setattr(timing.time, "perf_counter", clock)
    calls = {"slow": 0}
    result = timing.measure_interleaved(_candidates(clock, calls, {"slow": [100.0]}), "cpu", 4, time_cap_s=None)
    assert result["slow"].runs == 4 and result["slow"].median_s == 100.0


def test_a_candidate_over_the_cap_still_gets_one_timed_run(monkeypatch):
    clock = FakeClock()
    monkeypatch.setattr(timing.time, "perf_counter", clock)
    calls = {"slow": 0}
    result = timing.measure_interleaved(_candidates(clock, calls, {"slow": [500.0]}), "cpu", 5, time_cap_s=1.0)
    assert result["slow"].runs == 1 and result["slow"].median_s == 500.0


def test_repeats_must_be_positive():
    with pytest.raises(ValueError, match="repeats must be at least 1"):
        timing.measure_interleaved({"f": lambda: None}, "cpu", 0)


# -------------------------------------------------------------------------------------------------- local_filter


@pytest.mark.triton
def test_bench_reports_bandwidth_and_ratios():
    """`dynconv bench local_filter --backends torch,triton` runs and its derived columns follow from the times."""
    from dynconv.bench import local_filter as bench

    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    args = parser.parse_args(["--shapes", "1,2,5,6,3,1", "--backends", "torch,triton", "--peak-gbs", "100"])
    args.device, args.repeats = TRITON_DEVICE, 1
    text = bench.run(args)
    lines = [line for line in text.splitlines() if line.startswith("|")]
    header = [h.strip() for h in lines[0].strip("|").split("|")]
    rows = {r[2]: r for r in ([v.strip() for v in line.strip("|").split("|")] for line in lines[2:])}
    assert set(rows) == {"unfold", "torch", "triton"}
    col = {name: header.index(name) for name in header}
    for row in rows.values():
        # on CUDA the bandwidth is over the kernel time by CUDA-graph replay (the eager time where capture failed)
        graph = row[col["fwd graph ms"]] if "fwd graph ms" in col else "-"
        fwd_ms, fwd_gbs = float(row[col["fwd ms"]] if graph == "-" else graph), float(row[col["fwd GB/s"]])
        # bytes of x, filters and y once: (2 * 60 + 270) fp32 values
        assert fwd_gbs == pytest.approx(
            (2 * 60 + 270) * 4 / (fwd_ms * 1e-3) / 1e9, rel=0.02
        )  # the table rounds to 3 digits
        assert float(row[col["fwd frac. of peak BW"]]) == pytest.approx(fwd_gbs / 100, rel=0.02)
    assert float(rows["torch"][col["fwd+bwd speed-up vs torch"]]) == 1.0
    assert float(rows["unfold"][col["fwd speed-up vs unfold"]]) == 1.0
    if TRITON_DEVICE == "cpu":  # no known peak bandwidth: the fraction columns are left out rather than printed as nan
        args = parser.parse_args(["--shapes", "1,2,5,6,3,1", "--backends", "torch"])
        args.device, args.repeats = TRITON_DEVICE, 1
        text = bench.run(args)
        assert "fwd GB/s" in text and "frac. of peak" not in text and "nan" not in text


# -------------------------------------------------------------------------------------------------------- deform


def test_bench_deform_runs_and_ratios_are_against_the_baseline():
    from dynconv.bench import deform as bench

    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    args = parser.parse_args(["--shapes", "1,4,7,6", "--no-torchvision"])
    args.device, args.repeats = "cpu", 1
    lines = [line for line in bench.run(args).splitlines() if line.startswith("|")]
    header = [h.strip() for h in lines[0].strip("|").split("|")]
    col = {name: header.index(name) for name in header}
    rows = {r[2]: r for r in ([v.strip() for v in line.strip("|").split("|")] for line in lines[2:])}
    assert sorted(rows) == ["reference", "torch"] and rows["torch"][0] == "DCNv2 (1, 4, 7, 6)"
    torch_row, ref = rows["torch"], rows["reference"]
    # the baseline against itself (no torchvision)
    assert float(torch_row[col["fwd speed-up vs torch"]]) == float(torch_row[col["fwd+bwd speed-up vs torch"]]) == 1.0
    # speed-up = baseline ms / own ms
    expected = float(torch_row[col["fwd ms"]]) / float(ref[col["fwd ms"]])
    assert float(ref[col["fwd speed-up vs torch"]]) == pytest.approx(expected, rel=0.02)
    # bytes of x, offset, mask, weight, bias and y once: 168 + 756 + 378 + 144 + 4 + 168 fp32 values
    fwd_bytes = (168 + 756 + 378 + 144 + 4 + 168) * 4
    assert float(ref[col["fwd GB/s"]]) == pytest.approx(fwd_bytes / float(ref[col["fwd ms"]]) / 1e6, rel=0.02)
    assert float(ref[col["fwd+bwd GB/s"]]) == pytest.approx(
        2 * fwd_bytes / float(ref[col["fwd+bwd ms"]]) / 1e6, rel=0.02
    )


# ---------------------------------------------------------------------------------------------------------- dcnv


def test_bench_baseline_matches_dcnv3_and_bench_runs():
    from dynconv.bench import dcnv as bench

    g = torch.Generator().manual_seed(0)
    v = torch.randn(2, 5, 6, 8, generator=g, dtype=torch.float64)
    off = 2 * torch.randn(2, 5, 6, 2 * 9 * 2, generator=g, dtype=torch.float64)
    m = torch.randn(2, 5, 6, 2 * 9, generator=g, dtype=torch.float64)
    assert_close(bench.grid_sample_all_points(v, off, m, 2), dynconv.dcnv3(v, off, m, 3, group=2, backend="reference"))
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    args = parser.parse_args(["--shapes", "1,4,5,2,2"])
    args.device, args.repeats = "cpu", 1
    table = bench.run(args)
    assert table.count("| (1, 4, 5, 2, 2) |") == 5  # dcnv3: torch, reference, grid_sample; dcnv4: torch, reference


def _fake_official_dcnv4_package(monkeypatch, calls):
    """A stand-in for the official ``DCNv4`` package (its CUDA kernels cannot be built here): ``DCNv4Function``
    with the official argument order and checks, computing through our reference."""

    class DCNv4Function:
        @staticmethod
        def apply(value, offset_mask, kh, kw, sh, sw, ph, pw, dh, dw, group, group_channels, offset_scale, step, rc):
            assert value.is_contiguous() and offset_mask.is_contiguous()  # the official op asserts both
            assert value.shape[-1] == group * group_channels
            assert value.shape[0] % min(value.shape[0], step) == 0
            calls.append((kh, kw, sh, sw, ph, pw, dh, dw, group, group_channels, offset_scale, step, rc))
            return dynconv.dcnv4(
                value, offset_mask, (kh, kw), (sh, sw), (ph, pw), (dh, dw), group, offset_scale, bool(rc),
                backend="reference",
            )  # fmt: skip

    package, functions = types.ModuleType("DCNv4"), types.ModuleType("DCNv4.functions")
    functions.DCNv4Function = DCNv4Function
    package.functions = functions
    monkeypatch.setitem(sys.modules, "DCNv4", package)
    monkeypatch.setitem(sys.modules, "DCNv4.functions", functions)


def test_bench_official_dcnv4_candidate(monkeypatch):
    """The bench calls the official op with its argument order and layout, on the bench's geometry."""
    from dynconv.bench import dcnv as bench

    monkeypatch.delitem(sys.modules, "DCNv4", raising=False)
    assert bench.official_dcnv4(2) is None  # not installed here
    assert bench.OFFICIAL not in bench._candidates("dcnv4", ["torch"], 2, True, with_official=True)
    calls = []
    _fake_official_dcnv4_package(monkeypatch, calls)
    g = torch.Generator().manual_seed(0)
    value = torch.randn(2, 5, 6, 32, generator=g, dtype=torch.float64)
    offset_mask = torch.randn(2, 5, 6, 56, generator=g, dtype=torch.float64)  # ceil(3 * 2 * 9 / 8) * 8
    candidates = bench._candidates("dcnv4", ["torch"], 2, True, with_official=True)
    assert list(candidates) == ["torch", bench.OFFICIAL]
    assert_close(candidates[bench.OFFICIAL](value, offset_mask), candidates["torch"](value, offset_mask))
    assert calls == [(3, 3, 1, 1, 1, 1, 1, 1, 2, 16, 1.0, 256, False)]
    assert bench.OFFICIAL not in bench._candidates("dcnv3", ["torch"], 2, True, with_official=True)
    assert bench.OFFICIAL not in bench._candidates("dcnv4", ["torch"], 2, True)  # CPU runs leave it out


# ---------------------------------------------------------------------------------------------------------- warp


@pytest.mark.triton
def test_bench_warp_reports_every_backend_and_consistent_ratios():
    from dynconv.bench import warp as bench

    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    args = parser.parse_args(["--shapes", "1,3,5,6", "--backends", "torch,triton", "--deterministic"])
    args.device, args.repeats = TRITON_DEVICE, 1
    lines = [line for line in bench.run(args).splitlines() if line.startswith("|")]
    header = [h.strip() for h in lines[0].strip("|").split("|")]
    rows = {r[2]: r for r in ([v.strip() for v in line.strip("|").split("|")] for line in lines[2:])}
    assert set(rows) == {"torch", "triton", "triton deterministic"}
    col = {name: header.index(name) for name in header}
    assert float(rows["torch"][col["fwd speed-up vs torch"]]) == 1.0
    for row in rows.values():
        # on CUDA the bandwidth is over the kernel time by CUDA-graph replay (the eager time where capture failed)
        graph = row[col["fwd graph ms"]] if "fwd graph ms" in col else "-"
        fwd_ms, gbs = float(row[col["fwd ms"]] if graph == "-" else graph), float(row[col["fwd GB/s"]])
        assert gbs == pytest.approx((2 * 90 + 60) * 4 / (fwd_ms * 1e-3) / 1e9, rel=0.02)


# ------------------------------------------------------------------------------------------------------- mixture


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
