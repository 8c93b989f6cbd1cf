"""Launch settings shared by dynconv's Triton kernels (the Liger-Kernel ``calculate_settings`` pattern).

**One configuration per kernel and shape, chosen by a rule.** Every kernel family takes its block sizes
and warps from a function of the shape below, so the first call on a new shape compiles exactly one
variant of each kernel it launches and times nothing. The rules bound the work one program keeps in
registers (the accumulator tile and the tiles loaded beside it), which is what decides spills:

* ``local_filter``: a tile of ``BLOCK_H x BLOCK_W`` output pixels times ``BLOCK_C`` channels (all of a small
  group, at most 16, or 32 for grad filters, and at most the budget over 32), rows of 64 pixels (coalesced NCHW
  loads along W; 32 for narrow images or when 64 would not fit), as many rows as fit
  :data:`LOCAL_FILTER_BUDGET` accumulator elements (half of it for fp64), at least one and at most 16 rows (8
  for more than one channel) and no more than the image has; 4 warps, 2 for a tile of at most 256 elements.
* the sampling core (``deform``, ``dcnv``, ``warp``; :mod:`dynconv.kernels._sampling`): ``BLOCK_R`` rows times
  ``BLOCK_C`` channels (all ``C/G`` channels of a group up to 32), ``BLOCK_R`` (at most 64; 32 in the backward
  of more than 2 channels) shrunk as ``BLOCK_C``
  grows so that ``BLOCK_R * BLOCK_C`` stays within :data:`SAMPLING_BUDGET` (the forward) or half of it (the
  backward), a quarter of that for fp64; 4 warps.

Under ``TRITON_INTERPRET=1`` the interpreter pays a large fixed cost per program instance and little per element,
so the rules give it few, large programs instead (one tile per small test image).

**Opt-in autotuning.** With ``DYNCONV_AUTOTUNE=1`` a kernel that has several candidate configurations
(only ``local_filter`` has) times them once per (device name, dtype, kernel, shape key) and keeps the
fastest in a JSON file under ``$DYNCONV_CACHE_DIR/autotune/`` (default ``~/.cache/dynconv/autotune/``),
one file per device name and Triton version, written atomically, so the search is paid once per machine.

**Checks.** ``dynconv check-kernels`` (:mod:`dynconv.check_kernels`) compiles every configuration these rules
can pick, in every dtype, for a GPU architecture without a GPU, and fails on spills or compile errors; the
budgets above are what it allowed on sm_90 with a margin (docs/benchmarks.md).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path

import torch

from dynconv._cache import cache_root

AUTOTUNE_ENV = "DYNCONV_AUTOTUNE"

# Accumulator elements a local_filter program holds (BLOCK_C * BLOCK_H * BLOCK_W): 8 fp32 values per thread at 4
# warps. The KW taps of a kernel row are unrolled and their loads issued together, so a thread holds several
# tiles of this size: at 16 values per thread sm_90 needed 246-255 registers and at 32 it spilled
# (dynconv check-kernels).
LOCAL_FILTER_BUDGET = 1024
# BLOCK_R * BLOCK_C of a sampling-core forward program: 4 fp32 values per thread at 4 warps. At 2048 a
# [rows, channels] forward spilled with int64 offsets (deform), DCNv3's (a loop over the points, software-pipelined)
# at 64 x 32, and warp's fp16 forward at 64 x 32 (dynconv check-kernels).
SAMPLING_BUDGET = 512


def next_power_of_2(n: int) -> int:
    return 1 if n <= 1 else 1 << (int(n) - 1).bit_length()


def triton_interpret() -> bool:
    """Whether Triton kernels run in the interpreter (``TRITON_INTERPRET=1``), which takes CPU tensors."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype products accumulate in, on every backend: fp64 for fp64 inputs (gradcheck sees full precision),
    fp32 for every other dtype (fp16/bf16 inputs are gathered and summed in fp32)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def acc_is_f64(dtype: torch.dtype) -> bool:
    """Whether :func:`acc_dtype` of ``dtype`` is fp64 (the kernels' ``ACC``/``ACC_F64`` switch)."""
    return acc_dtype(dtype) == torch.float64


# Under the interpreter every kernel takes the int64 path: the interpreter checks each int32 addition and
# multiplication for overflow (binary_op_sanitize_overflow_impl, ~6 ms an operation in the sampling kernels, which
# made an int32 warp forward 2x slower than the int64 one) and int64 ones not. Tests switch it off to run the
# int32 path there (overflow-checked).
INTERPRETER_INT64 = True


def needs_int64(*tensors: torch.Tensor, limit: int = 2**30) -> bool:
    """Whether an offset into one of ``tensors`` (through its strides) can reach ``limit`` elements; the default
    keeps a factor-2 margin below 2**31 for the masked lanes past the edges. Always under the interpreter (see
    :data:`INTERPRETER_INT64`).

    The one rule of every kernel family: their ``INT64`` switch, which promotes the program's indices (and with
    them every offset) to int64; below the limit they stay int32, cheaper on a GPU."""
    if INTERPRETER_INT64 and triton_interpret():
        return True
    for t in tensors:
        if t.numel() == 0:  # never indexed
            continue
        extent = 1 + sum((n - 1) * abs(s) for n, s in zip(t.shape, t.stride()) if n > 0)
        if extent >= limit or t.numel() >= limit:
            return True
    return False


def check_launchable(*tensors: torch.Tensor, interpreted: bool) -> None:
    """Refuse CPU tensors when the calling kernel module was imported without ``TRITON_INTERPRET=1``:
    ``triton.jit`` reads it at import, so setting it later cannot make a compiled kernel take host pointers."""
    if any(t.device.type == "cpu" for t in tensors) and not interpreted:
        raise RuntimeError(
            "dynconv's Triton kernels got CPU tensors, but dynconv.kernels was imported without "
            "TRITON_INTERPRET=1 (triton.jit reads it at import): set it before the first triton-backend call"
        )


def resolve_deterministic(deterministic: bool | None) -> bool:
    """``None`` follows ``torch.are_deterministic_algorithms_enabled()``: atomics in the backward kernels when it
    is off, a deterministic two-pass scatter when it is on."""
    return torch.are_deterministic_algorithms_enabled() if deterministic is None else bool(deterministic)


def on_device(t: torch.Tensor):
    """Triton launches on the current CUDA device: tensors on another GPU need it switched for the launch."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


# --------------------------------------------------------------------------------------------- the rules


def local_filter_block_c(channels_per_group: int, cap: int, f64: bool = False) -> int:
    """Channels per program: all of a small group (the filter tile is then read once), at most ``cap``, and at most
    what leaves room in the register budget for a row of 32 pixels."""
    return min(next_power_of_2(channels_per_group), cap, _lf_budget(f64) // 32)


def _lf_budget(f64: bool) -> int:
    return LOCAL_FILTER_BUDGET // (2 if f64 else 1)


def local_filter_tile(rows: int, cols: int, block_c: int, f64: bool, interpreted: bool = False) -> dict:
    """``{BLOCK_H, BLOCK_W, num_warps}`` of a local_filter kernel whose programs cover ``rows x cols`` pixels
    (output pixels, or one stride residue class of input pixels for grad x) times ``block_c`` channels."""
    if interpreted:
        return {"BLOCK_H": min(next_power_of_2(rows), 16), "BLOCK_W": min(next_power_of_2(cols), 32), "num_warps": 1}
    budget = _lf_budget(f64)
    block_w = 32 if cols <= 32 or block_c * 64 > budget else 64
    # 16 rows only for one channel: the fp16/bf16 grad x at 2 x 16 x 32 spilled 4 bytes at 128 registers with
    # Triton 3.6's ptxas 12.8 (the H200 image's; Triton 3.9's ptxas took 136 registers and no spill).
    block_h = max(1, min(16 if block_c == 1 else 8, next_power_of_2(rows), budget // (block_c * block_w)))
    num_warps = 2 if block_c * block_h * block_w <= 256 else 4
    return {"BLOCK_H": block_h, "BLOCK_W": block_w, "num_warps": num_warps}


# Candidate tiles for the opt-in autotuner: (BLOCK_H, BLOCK_W, num_warps). Rows of 32-128 pixels keep NCHW
# loads coalesced along W; taller tiles share more of the (k-1)-pixel halo between taps.
LOCAL_FILTER_CANDIDATES = [(1, 64, 2), (2, 64, 4), (4, 32, 4), (4, 64, 4), (8, 32, 4), (2, 128, 4), (8, 64, 8)]


def local_filter_candidates(rows: int, cols: int, block_c: int, f64: bool) -> list[dict]:
    """The rule's tile first, then the other candidates that fit the image and the register budget."""
    first = local_filter_tile(rows, cols, block_c, f64)
    budget = 2 * _lf_budget(f64)  # the autotuner may try up to twice the rule's tile
    out = [first]
    for bh, bw, nw in LOCAL_FILTER_CANDIDATES:
        cfg = {"BLOCK_H": bh, "BLOCK_W": bw, "num_warps": nw}
        fits = bw <= max(32, next_power_of_2(cols)) and bh <= next_power_of_2(rows) and block_c * bh * bw <= budget
        if fits and cfg not in out:
            out.append(cfg)
    return out


def sampling_config(channels_per_group: int, f64: bool, backward: bool, interpreted: bool = False) -> dict:
    """``{BLOCK_R, BLOCK_C, num_warps}`` of the sampling core's kernels for ``C/G`` channels per group."""
    # At least 4 channels in fp64: DCNv3's fp64 atomic backward at 2 x 32 rows spilled 4 bytes on sm_90 (at 4 x 16
    # it does not; dynconv check-kernels).
    block_c = min(max(next_power_of_2(channels_per_group), 4 if f64 else 2), 32)
    if interpreted:
        return {"BLOCK_R": 256, "BLOCK_C": block_c, "num_warps": 1}
    # The backward keeps grad_out, a corner and its contribution live: half the forward's (DCNv3's backward took
    # 231 registers at 512 elements, 127 at 256). fp64 a quarter: at half, DCNv3's fp64 atomic backward spilled.
    # At most 32 rows in the backward, except at 2 channels, where 64 rows are one element per thread: with Triton
    # 3.6's ptxas 12.8 (the H200 image's) the masked atomic DCNv3 backward at 64 x 4 spilled 4 bytes at 128
    # registers in every dtype (Triton 3.9's ptxas: 150, no spill), and the deterministic bf16/fp16 deformable
    # backward at 32 x 2, half a tile per thread, 4 bytes at 48 registers (at 64 x 2: 56, none).
    budget = SAMPLING_BUDGET // (2 if backward else 1) // (4 if f64 else 1)
    rows = 32 if backward and block_c > 2 else 64
    return {"BLOCK_R": max(1, min(rows, budget // block_c)), "BLOCK_C": block_c, "num_warps": 4}


def output_buffer(shape, like: torch.Tensor, interpreted: bool) -> torch.Tensor:
    """An empty result buffer of ``like``'s dtype and device. Triton 3.9's interpreter truncates fp32 -> bf16
    casts where the GPU rounds to nearest even (measured: 4 of 24 outputs one bf16 ulp off), so under the
    interpreter bf16 results are stored in fp32 and rounded by torch; the kernels are the same on both paths."""
    dtype = torch.float32 if interpreted and like.dtype == torch.bfloat16 else like.dtype
    return torch.empty(shape, dtype=dtype, device=like.device)


def launch_local_filter(kernel, grid, args, meta: dict, rows: int, cols: int, like, key: list, interpreted: bool):
    """Launch a local_filter ``kernel`` with the tile of the rule (or, with ``DYNCONV_AUTOTUNE=1``, the cached
    fastest, :func:`select` under ``key``) for programs covering ``rows x cols`` pixels; ``grid(tile)`` is the
    launch grid of a tile."""
    block_c, f64 = meta["BLOCK_C"], meta["ACC_F64"]
    tile = local_filter_tile(rows, cols, block_c, f64, interpreted=interpreted)
    candidates = [tile]
    if autotune_enabled():
        candidates += [c for c in local_filter_candidates(rows, cols, block_c, f64) if c != tile]

    def run(cfg):
        kernel[grid(cfg)](*args, **meta, **cfg)

    with on_device(like):
        if len(candidates) == 1:
            run(tile)
            return
        device = torch.cuda.get_device_name(like.device) if like.is_cuda else "interpreter"
        run(select(kernel.fn.__name__, key, like.dtype, device, candidates, run))


# ------------------------------------------------------------------------------------- opt-in autotuning


def autotune_enabled() -> bool:
    return os.environ.get(AUTOTUNE_ENV, "") not in ("", "0")


def cache_dir() -> Path:
    return Path(cache_root()) / "autotune"


def cache_file(device_name: str) -> Path:
    """The JSON file of one device name (and Triton version: another compiler may favour another tile)."""
    try:
        import triton

        version = triton.__version__
    except ImportError:  # pragma: no cover - the kernels need Triton anyway
        version = "none"
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", f"{device_name}-triton{version}")
    return cache_dir() / f"{name}.json"


def _read(path: Path) -> dict:
    try:
        with open(path) as fh:
            data = json.load(fh)
    except (OSError, ValueError):
        return {}  # missing or unreadable: tune again rather than fail the user's call
    return data if isinstance(data, dict) else {}


def _write_atomic(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as fh:
            json.dump(data, fh, indent=1, sort_keys=True)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


# Results already read or measured in this process: {(file, key): config}.
_MEMO: dict[tuple[str, str], dict] = {}


def _default_timer(fn: Callable[[], None]) -> float:
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=5, rep=20, return_mode="median"))


def select(
    kernel: str,
    key: Iterable,
    dtype: torch.dtype,
    device_name: str,
    candidates: list[dict],
    launch: Callable[[dict], None],
    timer: Callable[[Callable[[], None]], float] | None = None,
) -> dict:
    """The configuration to launch ``kernel`` with: ``candidates[0]`` (the rule's) unless ``DYNCONV_AUTOTUNE``
    is set and there is a choice; then the fastest candidate, looked up in or added to the on-disk cache.

    Args:
        kernel: the kernel's name.
        key: what the best configuration depends on (shape and geometry), JSON-representable values.
        dtype, device_name: the rest of the cache key.
        candidates: configurations (dicts of JSON values), the rule's first.
        launch: runs the kernel with a configuration (the output it writes must not depend on earlier runs).
        timer: ``timer(fn) -> milliseconds``; ``triton.testing.do_bench`` by default.
    """
    if not autotune_enabled() or len(candidates) <= 1:
        return candidates[0]
    path = cache_file(device_name)
    entry = "|".join([kernel, str(dtype).replace("torch.", ""), ",".join(str(v) for v in key)])
    memo_key = (str(path), entry)
    if memo_key in _MEMO:
        return _MEMO[memo_key]
    found = _read(path).get(entry)
    if isinstance(found, dict) and found in candidates:
        _MEMO[memo_key] = found
        return found
    timer = timer or _default_timer
    times = []
    for cfg in candidates:
        try:
            times.append(timer(lambda cfg=cfg: launch(cfg)))
        except Exception:  # a candidate that fails to compile or launch (out of resources) is not chosen
            times.append(float("inf"))
    best = candidates[min(range(len(candidates)), key=times.__getitem__)]
    data = _read(path)  # re-read: another process may have added entries meanwhile
    data[entry] = best
    _write_atomic(path, data)
    _MEMO[memo_key] = best
    return best
