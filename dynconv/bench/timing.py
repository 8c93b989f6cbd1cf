"""Timing and peak-memory measurement shared by the benchmarks.

Times are medians over repeated runs after warm-up (these machines are shared and noisy, so a ratio is
only meaningful between numbers measured in the same run). Peak memory is the growth over the memory in
use before the call: ``torch.cuda.max_memory_allocated`` on CUDA; on CPU the process's peak resident set
(``VmHWM``), reset before each measurement through ``/proc/self/clear_refs`` (Linux only; elsewhere the
memory column reads ``nan``).
"""

from __future__ import annotations

import ctypes
import functools
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass
class Measurement:
    median_s: float
    peak_extra_bytes: float
    runs: int = 1  # timed runs the median is over

    @property
    def median_ms(self) -> float:
        return self.median_s * 1e3

    @property
    def peak_extra_mb(self) -> float:
        return self.peak_extra_bytes / 2**20


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _rss_status(field: str) -> float:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return float(line.split()[1]) * 1024
    except OSError:
        pass
    return float("nan")


@functools.cache
def _glibc():
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3


def _reset_cpu_peak() -> bool:
    # While memory is measured, large blocks are mmapped and returned on free; otherwise freed memory stays
    # in glibc's heap and a later allocation does not show in the resident set. Timing runs outside this
    # window, with glibc's usual (heap-reusing) behaviour.
    libc = _glibc()
    if libc is not None:
        libc.mallopt(_M_MMAP_THRESHOLD, 128 * 1024)
        libc.mallopt(_M_TRIM_THRESHOLD, 128 * 1024)
        libc.malloc_trim(0)
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def _restore_glibc() -> None:
    libc = _glibc()
    if libc is not None:  # the values glibc's dynamic threshold grows to on 64-bit
        libc.mallopt(_M_MMAP_THRESHOLD, 32 * 2**20)
        libc.mallopt(_M_TRIM_THRESHOLD, 64 * 2**20)


def peak_memory(fn: Callable[[], object], device: torch.device) -> float:
    """Bytes of memory ``fn`` needs above what was in use before it ran (its outputs are freed after)."""
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn()
        _sync(device)
        return float(torch.cuda.max_memory_allocated(device) - before)
    if not _reset_cpu_peak():
        return float("nan")
    try:
        before = _rss_status("VmRSS")
        fn()
        return max(0.0, _rss_status("VmHWM") - before)
    finally:
        _restore_glibc()


def measure_interleaved(
    candidates: dict[str, Callable[[], object]],
    device: torch.device | str,
    repeats: int,
    warmup: int = 1,
    time_cap_s: float | None = 60.0,
) -> dict[str, Measurement]:
    """Median wall time of each candidate over ``repeats`` rounds that call every candidate once, and its peak
    memory. On a shared machine a burst of someone else's load then slows every candidate alike instead of
    one of them (timed back to back, the same forward varied 88-592 ms between consecutive runs here).

    A candidate whose timed runs add up to more than ``time_cap_s`` seconds sits out the remaining rounds
    (its median is over the runs it had, at least one; ``Measurement.runs`` says how many), so one slow
    baseline such as a reference backend does not multiply the cost of the whole table. ``None``: no cap.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be at least 1, got {repeats}")
    device = torch.device(device)
    times: dict[str, list[float]] = {name: [] for name in candidates}
    for round_ in range(warmup + repeats):
        for name, fn in candidates.items():
            if time_cap_s is not None and sum(times[name]) > time_cap_s:
                continue
            _sync(device)
            t0 = time.perf_counter()
            fn()
            _sync(device)
            if round_ >= warmup:
                times[name].append(time.perf_counter() - t0)
    return {
        name: Measurement(statistics.median(times[name]), peak_memory(fn, device), len(times[name]))
        for name, fn in candidates.items()
    }


def no_grad_call(fn: Callable, *args: object) -> object:
    """``fn(*args)`` under ``torch.no_grad()``: the forward-only candidate of a benchmark."""
    with torch.no_grad():
        return fn(*args)


def fwd_bwd_columns(fwd: Measurement, both: Measurement, base_fwd: Measurement, base_both: Measurement) -> list:
    """The columns every forward / forward+backward table shares: ms, speed-up over the baseline, peak MB."""
    return [
        fwd.median_ms,
        both.median_ms,
        base_fwd.median_s / fwd.median_s,
        base_both.median_s / both.median_s,
        fwd.peak_extra_mb,
        both.peak_extra_mb,
    ]


def markdown_table(header: list[str], rows: list[list[object]]) -> str:
    def fmt(v: object) -> str:
        if isinstance(v, float):
            return "nan" if v != v else (f"{v:.3g}" if abs(v) < 100 else f"{v:.0f}")
        return str(v)

    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)
