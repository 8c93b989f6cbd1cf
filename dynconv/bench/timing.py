"""Timing and peak-memory measurement shared by the benchmarks.

Times are medians over repeated runs after warm-up (these machines are shared and noisy, so a ratio is only
meaningful between numbers measured in the same run). On CUDA each candidate is also timed by replaying a CUDA graph
of it (:func:`measure_graphs`): the eager per-call time of a small kernel there is mostly the launch overhead of
Python and the framework, the graph replay time is the kernel's. A candidate that raises is not a crash: its
:class:`Measurement` carries the reason (``error``), and the tables print it as a row. Peak memory is the growth
over the memory in use before the call: ``torch.cuda.max_memory_allocated`` on CUDA; on CPU the process's peak
resident set (``VmHWM``), reset before each measurement through ``/proc/self/clear_refs`` (Linux only; elsewhere the
memory column reads ``nan``).
"""

from __future__ import annotations

import ctypes
import functools
import math
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch


@dataclass
class Measurement:
    median_s: float
    peak_extra_bytes: float
    runs: int = 1  # timed runs the median is over
    graph_s: float = math.nan  # per-call time by CUDA-graph replay (CUDA only; nan where not measured)
    error: str | None = None  # why the candidate could not run (then the other fields are nan)
    graph_error: str | None = None  # why the CUDA-graph capture failed (the eager time stands)

    @property
    def median_ms(self) -> float:
        return self.median_s * 1e3

    @property
    def graph_ms(self) -> float:
        return self.graph_s * 1e3

    @property
    def kernel_s(self) -> float:
        """The time of the work itself: the CUDA-graph replay time where there is one, else the eager time."""
        return self.graph_s if math.isfinite(self.graph_s) else self.median_s

    @property
    def peak_extra_mb(self) -> float:
        return self.peak_extra_bytes / 2**20


def failed(reason: str) -> Measurement:
    """The measurement of a candidate that could not run."""
    return Measurement(math.nan, math.nan, 0, error=reason)


def describe(exc: BaseException, limit: int = 160) -> str:
    """``Type: first line of the message``, at most ``limit`` characters: what a table row says about a failure."""
    lines = str(exc).strip().splitlines()
    text = f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def gbs(nbytes: float, m: Measurement, kernel: bool = True) -> float:
    """Achieved bandwidth in GB/s: ``nbytes`` over the kernel time (:attr:`Measurement.kernel_s`, the CUDA-graph
    replay time where measured) or, with ``kernel=False``, over the eager per-call time."""
    return nbytes / (m.kernel_s if kernel else m.median_s) / 1e9


def tensor_bytes(*tensors: torch.Tensor) -> int:
    """Bytes of the tensors' elements, each counted once."""
    return sum(t.numel() * t.element_size() for t in tensors)


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


# A candidate slower than this per eager call is not captured in a CUDA graph: the launch overhead the graph
# removes (about 0.7 ms per call at most, measured on an H200) is then a small part of its time, and replaying
# a slow reference backend would only lengthen the run.
GRAPH_MAX_S = 0.05


def _recover(device: torch.device) -> None:
    """After a candidate raised: free what it left in the allocator's cache (an out-of-memory error among them)."""
    if device.type == "cuda":
        try:
            torch.cuda.synchronize(device)
        finally:
            torch.cuda.empty_cache()


def measure_interleaved(
    candidates: dict[str, Callable[[], object]],
    device: torch.device | str,
    repeats: int,
    warmup: int = 1,
    time_cap_s: float | None = 60.0,
    graphs: bool | None = None,
) -> dict[str, Measurement]:
    """Median wall time of each candidate over ``repeats`` rounds that call every candidate once, and its peak
    memory. On a shared machine a burst of someone else's load then slows every candidate alike instead of
    one of them (docs/benchmarks.md, "Notes behind code choices", has the spread of back-to-back timing).

    A candidate whose timed runs add up to more than ``time_cap_s`` seconds sits out the remaining rounds
    (its median is over the runs it had, at least one; ``Measurement.runs`` says how many), so one slow
    baseline such as a reference backend does not multiply the cost of the whole table. ``None``: no cap.

    A candidate that raises (an op without a kernel for this dtype, out of memory) sits out the rest and its
    measurement says why (``Measurement.error``); the others go on. ``graphs`` (default: on CUDA) also times
    every candidate that ran by CUDA-graph replay (:func:`measure_graphs`), interleaved too.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be at least 1, got {repeats}")
    device = torch.device(device)
    times: dict[str, list[float]] = {name: [] for name in candidates}
    errors: dict[str, str] = {}
    for round_ in range(warmup + repeats):
        for name, fn in candidates.items():
            if name in errors or (time_cap_s is not None and sum(times[name]) > time_cap_s):
                continue
            try:
                _sync(device)
                t0 = time.perf_counter()
                fn()
                _sync(device)
            except Exception as exc:  # reported in the candidate's row; the other candidates go on
                errors[name] = describe(exc)
                _recover(device)
                continue
            if round_ >= warmup:
                times[name].append(time.perf_counter() - t0)
    result = {}
    for name, fn in candidates.items():
        if name in errors:
            result[name] = failed(errors[name])
            continue
        try:
            peak = peak_memory(fn, device)
        except Exception:  # it ran in every round; a failure here is the allocator's state, not the candidate
            _recover(device)
            peak = math.nan
        result[name] = Measurement(statistics.median(times[name]), peak, len(times[name]))
    if graphs if graphs is not None else device.type == "cuda":
        ok = {}
        for name, fn in candidates.items():
            m = result[name]
            if m.error is None and m.median_s > GRAPH_MAX_S:
                m.graph_error = f"not captured: {m.median_ms:.0f} ms per eager call, launch overhead negligible"
            elif m.error is None:
                ok[name] = fn
        for name, value in measure_graphs(ok, device, repeats).items():
            if isinstance(value, str):
                result[name].graph_error = value
            else:
                result[name].graph_s = value
    return result


def _capture(fn: Callable[[], object], calls: int) -> torch.cuda.CUDAGraph:
    """A CUDA graph of ``calls`` calls of ``fn`` (after two calls on a side stream, as capturing a backward requires:
    autograd's gradient accumulation must have run outside the default stream once)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, capture_error_mode="thread_local"):
        for _ in range(calls):
            fn()
    torch.cuda.synchronize()
    return graph


def _replay_s(graph: torch.cuda.CUDAGraph) -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    graph.replay()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) * 1e-3


def graph_calls(one_call_s: float, target_s: float = 2e-3, most: int = 100) -> int:
    """How many calls one graph holds: enough for a replay of about ``target_s`` (the replay's own launch, a few
    microseconds, then weighs little), at most ``most`` (the graph keeps every call's outputs in its pool)."""
    if not math.isfinite(one_call_s) or one_call_s <= 0:
        return most
    return max(1, min(most, math.ceil(target_s / one_call_s)))


def measure_graphs(
    candidates: dict[str, Callable[[], object]], device: torch.device | str, repeats: int
) -> dict[str, float | str]:
    """Per-call time of each candidate by CUDA-graph replay: the candidate is captured (its Python, autograd and
    launch overhead paid once at capture), then the graphs are replayed interleaved, one replay of each per
    round, timed with CUDA events; the median over ``repeats`` rounds divided by the calls in a graph. Each
    value is seconds per call, or the reason the capture failed (a host synchronisation inside the candidate,
    an op that cannot be captured): the caller falls back to the eager time and says so.

    The candidates must have run eagerly first (compilation, autotuning and lazy initialisation happen
    outside the capture). The same inputs are reused, so inputs that fit in the L2 cache are timed from it.
    """
    device = torch.device(device)
    captured: dict[str, tuple[torch.cuda.CUDAGraph, int]] = {}
    out: dict[str, float | str] = {}
    with torch.cuda.device(device):
        for name, fn in candidates.items():
            try:
                graph = _capture(fn, 1)
                one = min(_replay_s(graph) for _ in range(3))
                calls = graph_calls(one)
                if calls > 1:
                    del graph
                    graph = _capture(fn, calls)
                captured[name] = (graph, calls)
            except Exception as exc:
                out[name] = "CUDA-graph capture failed: " + describe(exc)
                try:
                    _recover(device)
                except Exception:  # a capture error can surface again at the next synchronisation
                    pass
        times: dict[str, list[float]] = {name: [] for name in captured}
        for _ in range(repeats):
            for name, (graph, calls) in captured.items():
                times[name].append(_replay_s(graph) / calls)
    for name in captured:
        out[name] = statistics.median(times[name])
    del captured
    torch.cuda.empty_cache()
    return out


def no_grad_call(fn: Callable, *args: object) -> object:
    """``fn(*args)`` under ``torch.no_grad()``: the forward-only candidate of a benchmark."""
    with torch.no_grad():
        return fn(*args)


def fwd_bwd_call(
    fn: Callable, inputs: Sequence[torch.Tensor], grad_y: torch.Tensor | None = None
) -> Callable[[], None]:
    """The forward+backward candidate of a benchmark: a call that clears the gradients of ``inputs``, runs
    ``fn(*inputs)`` and backpropagates ``grad_y`` (``None``: the output's sum, a stride-0 gradient; pass a
    materialised one where the backward's reads of it should count as in training)."""

    def step() -> None:
        for t in inputs:
            t.grad = None
        y = fn(*inputs)
        if grad_y is None:
            y.sum().backward()
        else:
            y.backward(grad_y)

    return step


def measure_fwd_bwd(
    candidates: dict[str, Callable],
    inputs: Sequence[torch.Tensor],
    device: torch.device | str,
    repeats: int,
    warmup: int = 1,
    grad_y: torch.Tensor | None = None,
) -> dict[str, tuple[Measurement, Measurement]]:
    """The forward (:func:`no_grad_call`) and forward+backward (:func:`fwd_bwd_call`) of every candidate
    ``fn(*inputs)``, all timed interleaved by :func:`measure_interleaved`: ``{name: (fwd, both)}``."""
    calls = {}
    for name, fn in candidates.items():
        calls[name + " fwd"] = functools.partial(no_grad_call, fn, *inputs)
        calls[name + " both"] = fwd_bwd_call(fn, inputs, grad_y)
    timed = measure_interleaved(calls, device, repeats, warmup=warmup)
    return {name: (timed[name + " fwd"], timed[name + " both"]) for name in candidates}
