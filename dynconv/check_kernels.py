"""``dynconv check-kernels``: compile every Triton kernel variant dynconv can launch for a GPU architecture,
without a GPU, and report registers, spills, shared memory and compile time.

The interpreter (``TRITON_INTERPRET=1``, how the tests run on CPU) never runs Triton's compiler, so a kernel
it accepts can still fail to compile for a GPU, use an fp64 path the GPU lacks, or spill registers to local
memory (the register blow-up that made a bf16 autotuning run hang). Triton compiles for ``cuda:<arch>`` on
any machine (``triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))``), and its wheel ships
``ptxas``; ``ptxas -v`` on the PTX reports registers, spill stores/loads and the stack frame (local memory).

Variants (:func:`variants`): every kernel of every family (``local_filter``; ``dcnv``, ``deform`` and ``warp``,
which share the two kernels of the sampling core, :mod:`dynconv.kernels._sampling`, each with its own position
rule and layout), in every dtype the family's Triton backend accepts (``dynconv.backends.TRITON_OPS``), with
every configuration the launch rules of :mod:`dynconv.kernels._launch` can pick at their register budget (fp64
has its own budget; fp16 and bf16 get every configuration too: one fp16 variant spilled where fp32 did not), and
the configurations the rules pick for the benchmarks' shapes (:func:`grid_configs`); atomic and deterministic
backward paths; at the largest block of the sampling core also int64 offsets, no mask, the removed centre and
every warp mode and padding. A variant fails on a compile error, on spills or a stack frame (local memory), or
when an fp64 variant takes an fp32 scalar argument (Triton passes Python floats as fp32 on a GPU but as fp64 in
the interpreter: a precision loss only a GPU shows).

It lives beside the command line rather than in :mod:`dynconv.kernels` because it reads the benchmarks' shapes
(``dynconv.bench``) and the command-line types (``dynconv.recipes.args``): the kernel package imports nothing above
itself.

``python -m dynconv check-kernels --first-call`` instead times, per family, shape and dtype, the compilation of
every kernel the first forward+backward of a new shape needs (the start-up cost a user pays once per shape).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import multiprocessing
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

from dynconv.kernels import _launch as L

DTYPES = ("fp32", "bf16", "fp16", "fp64")
FAMILY_DTYPES = {
    "local_filter": ("fp32", "bf16", "fp16", "fp64"),
    "dcnv": ("fp32", "bf16", "fp16", "fp64"),
    "deform": ("fp32", "bf16", "fp16"),
    "warp": ("fp32", "bf16", "fp16"),
}
MODULES = {f: f"dynconv.kernels.{f}" for f in FAMILY_DTYPES}
# Stride arguments that are 1 for contiguous (NCHW) tensors, the common case, compiled as the constant 1 (the
# sampling core's variants carry theirs).
UNIT_STRIDES = {"local_filter": ("sxw", "sfw", "syw", "sgw")}


@dataclass(frozen=True)
class Variant:
    """One kernel compilation: ``kernel`` of ``dynconv.kernels.<family>`` (or of ``module``) with these constexprs.

    ``kinds`` overrides the Triton type of arguments: ``"*fp32"`` buffers, ``"*i64"`` tables, ``"fp32"`` scalars;
    other ``*_ptr`` arguments are ``*<dtype>``, other arguments ``i32``. ``ACC`` constexprs are given as
    ``"fp32"``/``"fp64"`` and become Triton dtypes in the worker.
    """

    family: str
    kernel: str
    dtype: str
    constexprs: tuple
    num_warps: int
    kinds: tuple = ()
    num_stages: int = 0  # 0: Triton's default
    note: str = ""
    module: str = ""

    @property
    def label(self) -> str:
        keys = ("BLOCK_C", "BLOCK_H", "BLOCK_W", "BLOCK_R", "SINGLE_C_BLOCK", "ATOMIC", "MODE", "PAD", "HAS_MASK")
        keys += ("REMOVE_CENTER", "INT64")
        c = dict(self.constexprs)
        parts = [f"{k.replace('BLOCK_', '')}={int(c[k]) if isinstance(c[k], bool) else c[k]}" for k in keys if k in c]
        stages = [f"s={self.num_stages}"] if self.num_stages else []
        return " ".join(parts + [f"w={self.num_warps}"] + stages + ([self.note] if self.note else []))


def _variant(family, kernel, dtype, constexprs: dict, num_warps, kinds=None, note="", module="", num_stages=0):
    kinds = tuple(sorted((kinds or {}).items()))
    constexprs = tuple(sorted(constexprs.items()))
    return Variant(family, kernel, dtype, constexprs, num_warps, kinds, note=note, module=module, num_stages=num_stages)


# ------------------------------------------------------------------------------------------- local_filter

LF_GEOMETRY = dict(KH=5, KW=5, SH=1, SW=1, PH=2, PW=2, DH=1, DW=1, INT64=False)
LF_KERNELS = {"_forward_kernel": 16, "_grad_x_kernel": 16, "_grad_filters_kernel": 32}  # kernel: BLOCK_C cap


def local_filter_tiles(cap: int, f64: bool) -> list[tuple[int, dict]]:
    """``(BLOCK_C, tile)`` of every tile the rule picks at its register budget (images of many rows)."""
    out = []
    for block_c in (1, 2, 4, 8, 16, 32):
        for cols in (32, 4096):
            if block_c == L.local_filter_block_c(block_c, cap, f64):
                pair = (block_c, L.local_filter_tile(4096, cols, block_c, f64))
                if pair not in out:
                    out.append(pair)
    return out


def _lf_variant(kernel, dtype, block_c, tile, single=None, note=""):
    c = dict(LF_GEOMETRY, ACC_F64=dtype == "fp64", BLOCK_C=block_c, BLOCK_H=tile["BLOCK_H"], BLOCK_W=tile["BLOCK_W"])
    if kernel == "_grad_filters_kernel":
        c["SINGLE_C_BLOCK"] = single
    return _variant("local_filter", kernel, dtype, c, tile["num_warps"], note=note)


def _lf_singles(kernel, block_c, top):
    # SINGLE_C_BLOCK is cpg <= BLOCK_C: always true below the largest BLOCK_C (the next power of 2 of cpg), both
    # at it.
    if kernel != "_grad_filters_kernel":
        return [None]
    return [True, False] if block_c == top else [True]


def local_filter_variants(dtype: str, largest_only: bool) -> list[Variant]:
    out = []
    for kernel, cap in LF_KERNELS.items():
        tiles = local_filter_tiles(cap, dtype == "fp64")
        top = max(block_c for block_c, _ in tiles)
        if largest_only:
            tiles = [t for t in tiles if t[0] == top]
        for block_c, tile in tiles:
            for single in _lf_singles(kernel, block_c, top):
                out.append(_lf_variant(kernel, dtype, block_c, tile, single))
    return out


# ------------------------------------------------------------------ the sampling core: dcnv, deform, warp

SAMPLING_MODULE = "dynconv.kernels._sampling"
SAMPLING_BLOCK_C = (2, 4, 8, 16, 32)  # every BLOCK_C of dynconv.kernels._launch.sampling_config
# Each family's position rule (the ``META`` of its kernel module) and geometry (3x3, stride and dilation 1: Triton
# specialises an integer argument equal to 1 into a constant at launch, as it does the unit strides listed).
_RULE = dict(GRID=0, OFFSET_XY=False, REMOVE_CENTER=False, PAD=0, MODE=0, PIXEL_MAJOR=False, SH=1, SW=1)
SAMPLING = {
    "deform": (dict(_RULE, KH=3, KW=3, KR=9, P=1, DH=1, DW=1), ("s_xw", "s_ow", "s_mw", "s_yc"), ("s_pw", "s_qw")),
    "dcnv": (dict(_RULE, GRID=1, OFFSET_XY=True, KH=3, KW=3, KR=1, P=9, DH=1, DW=1),
             ("s_xc", "s_oc", "s_mc", "s_yc", "s_yk"), ("s_pc", "s_qc")),
    "warp": (dict(_RULE, OFFSET_XY=True, PIXEL_MAJOR=True, KH=1, KW=1, KR=1, P=1, G=1),
             ("s_xw", "s_ow", "s_yw", "s_yk"), ("s_pw",)),
}  # fmt: skip


def _sampling_variant(family, kernel, dtype, channels_per_group, extra=None):
    """A variant of ``kernel`` (``forward_kernel`` or ``backward_kernel``, every gradient needed) with the block
    sizes the launch rule picks for ``channels_per_group``; ``extra`` sets ATOMIC, INT64, modes."""
    f64, backward = dtype == "fp64", kernel == "backward_kernel"
    geometry, ones, backward_ones = SAMPLING[family]
    cfg = L.sampling_config(channels_per_group, f64, backward)
    c = dict(geometry, ACC="fp64" if f64 else "fp32", INT64=False, HAS_MASK=family != "warp")
    c.update(BLOCK_R=cfg["BLOCK_R"], BLOCK_C=cfg["BLOCK_C"], **(extra or {}))
    if backward:
        c = dict(dict(NEED_X=True, NEED_OFFSET=True, NEED_MASK=c["HAS_MASK"], ATOMIC=True), **c)
        # grad x: [B, C, H, W] (dcnv's channels-last) when atomic, else contributions [slots, C/G]
        ones += backward_ones + (("s_gc",) if c["ATOMIC"] and family == "dcnv" else ("s_gw",))
    c.update({name: 1 for name in ones})
    acc = "*fp64" if f64 else "*fp32"
    kinds = {"idx_ptr": "*i64", **{n: acc for n in ("gx_ptr", "goff_ptr", "gm_ptr", "scale_ptr")}}
    if family == "deform":  # the columns and their gradient are in the accumulation dtype
        kinds.update(y_ptr=acc, gy_ptr=acc)
    return _variant(family, kernel, dtype, c, cfg["num_warps"], kinds, module=SAMPLING_MODULE)


def _sampling_paths(family, dtype, channels_per_group, extra=None) -> list[Variant]:
    """The forward and the atomic and deterministic backward."""
    extra = extra or {}
    out = [_sampling_variant(family, "forward_kernel", dtype, channels_per_group, extra)]
    for atomic in (True, False):
        out.append(_sampling_variant(family, "backward_kernel", dtype, channels_per_group, dict(extra, ATOMIC=atomic)))
    return out


def sampling_variants(family: str, dtype: str, largest_only: bool) -> list[Variant]:
    """Every block size the rule picks x atomic/deterministic; at the largest, int64 offsets and the family's
    modes (no mask; removed centre; every warp mode and padding)."""
    out = []
    for block_c in SAMPLING_BLOCK_C[-1:] if largest_only else SAMPLING_BLOCK_C:
        out += _sampling_paths(family, dtype, block_c)
    if largest_only:
        return out
    top = SAMPLING_BLOCK_C[-1]
    out += _sampling_paths(family, dtype, top, dict(INT64=True))
    if family == "deform":
        out += _sampling_paths(family, dtype, top, dict(HAS_MASK=False))
    if family == "dcnv":
        out += _sampling_paths(family, dtype, top, dict(REMOVE_CENTER=True, P=8))
    if family == "warp":
        for mode, pad in [(m, p) for m in (0, 1) for p in (0, 1, 2)][1:]:
            out += _sampling_paths(family, dtype, top, dict(MODE=mode, PAD=pad))
    return out


def dcnv_variants(dtype: str, largest_only: bool) -> list[Variant]:
    return sampling_variants("dcnv", dtype, largest_only)


def deform_variants(dtype: str, largest_only: bool) -> list[Variant]:
    return sampling_variants("deform", dtype, largest_only)


def warp_variants(dtype: str, largest_only: bool) -> list[Variant]:
    return sampling_variants("warp", dtype, largest_only)


FAMILIES = {"local_filter": local_filter_variants, "dcnv": dcnv_variants, "deform": deform_variants,
            "warp": warp_variants}  # fmt: skip


def grid_configs() -> list[Variant]:
    """The variants the launch rules pick for the benchmarks' shapes (fp32 and fp64 where the op takes it)."""
    from dynconv.bench import dcnv as bench_dcnv
    from dynconv.bench import local_filter as bench_lf

    out = []
    for _, C, H, W, _, G in {*bench_lf.DEFAULT_SHAPES, *bench_lf.SMALL_SHAPES, *bench_lf.GPU_SHAPES}:
        cpg = C // G
        for dtype in ("fp32", "fp64"):
            for kernel, cap in LF_KERNELS.items():
                block_c = L.local_filter_block_c(cpg, cap, dtype == "fp64")
                tile = L.local_filter_tile(H, W, block_c, dtype == "fp64")  # stride 1: grad x tiles H x W too
                single = (cpg <= block_c) if kernel == "_grad_filters_kernel" else None
                out.append(_lf_variant(kernel, dtype, block_c, tile, single))
    for shape in {*bench_dcnv.FULL_SHAPES, *bench_dcnv.QUICK_SHAPES}:
        for dtype in ("fp32", "fp64"):
            out += _sampling_paths("dcnv", dtype, shape[4])
    return list(dict.fromkeys(out))


def variants(families=None) -> list[Variant]:
    """Every variant ``check-kernels`` compiles, without repeats (see the module docstring)."""
    out = []
    for family, make in FAMILIES.items():
        if families and family not in families:
            continue
        for dtype in FAMILY_DTYPES[family]:
            out += make(dtype, largest_only=False)
    out += [v for v in grid_configs() if not families or v.family in families]
    return list(dict.fromkeys(out))


# -------------------------------------------------------------------------------------------- compiling


def _signature(fn, dtype: str, constexprs: dict, kinds: dict) -> dict:
    def kind(name):
        if name in constexprs:
            return "constexpr"
        if name in kinds:
            return kinds[name]
        return "*" + dtype if name.endswith("_ptr") else "i32"

    return {name: kind(name) for name in fn.arg_names}


_PTXAS: list[str] = []


def _triton_ptxas(arch: int) -> list[str]:
    """The assembler Triton itself runs for ``sm_<arch>`` (its ``get_ptxas``: the plain ``ptxas`` of Triton 3.6 for
    sm_90, ``ptxas-blackwell`` in Triton 3.9): registers and spills then are those of the GPU's real compile."""
    try:
        from triton.backends.nvidia.compiler import get_ptxas

        return [get_ptxas(arch).path]
    except Exception:  # another Triton layout: fall back to the wheel's assemblers
        return []


def _ptxas_report(ptx: str, arch: int) -> str:
    """``ptxas -lineinfo -v`` on ``ptx`` (Triton's own flags) with the assembler Triton uses for the arch, else one of
    its wheel that accepts the PTX version (Triton 3.9 ships a plain ``ptxas`` too old for the PTX it writes, and
    ``ptxas-blackwell``, which takes it)."""
    import triton.backends.nvidia as nv

    target = re.search(r"\.target\s+(sm_\w+)", ptx)
    gpu = target.group(1) if target else f"sm_{arch}a"
    bindir = os.path.join(os.path.dirname(nv.__file__), "bin")
    wheel = [os.path.join(bindir, n) for n in ("ptxas-blackwell", "ptxas") if os.path.exists(os.path.join(bindir, n))]
    found = _triton_ptxas(arch) + wheel + ([shutil.which("ptxas")] if shutil.which("ptxas") else [])
    candidates = _PTXAS or list(dict.fromkeys(found))
    errors = []
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.ptx")
        with open(path, "w") as fh:
            fh.write(ptx)
        for exe in candidates:
            proc = subprocess.run(
                [exe, "-lineinfo", "-v", "--gpu-name", gpu, path, "-o", os.devnull], capture_output=True, text=True
            )
            if proc.returncode == 0:
                _PTXAS[:] = [exe]
                return proc.stdout + proc.stderr
            errors.append(f"{os.path.basename(exe)}: {(proc.stderr or proc.stdout).strip().splitlines()[-1:]}")
    raise RuntimeError("no ptxas accepted the PTX: " + "; ".join(errors))


def _parse(report: str) -> dict:
    def num(pattern):
        found = re.findall(pattern, report)
        return max((int(v) for v in found), default=0)

    return {
        "registers": num(r"Used (\d+) registers"),
        "spill_stores": num(r"(\d+) bytes spill stores"),
        "spill_loads": num(r"(\d+) bytes spill loads"),
        "stack": num(r"(\d+) bytes stack frame"),
        "smem_static": num(r"(\d+) bytes smem"),
    }


def _cpu_seconds() -> float:
    import resource

    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def compile_variant(v: Variant, arch: int = 90) -> dict:
    """Compile ``v`` for ``sm_<arch>``; return its row: registers, spills, local and shared memory, seconds, and
    ``error`` (``""`` when it compiled). Runs in a process with ``TRITON_INTERPRET=0``."""
    import importlib

    import triton
    import triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    row = {"variant": v, "error": "", "seconds": 0.0, "cpu_seconds": 0.0}
    constexprs = dict(v.constexprs)
    kinds = dict(v.kinds)
    if "ACC" in constexprs:
        constexprs["ACC"] = {"fp32": tl.float32, "fp64": tl.float64}[constexprs["ACC"]]
    # Triton specialises an integer argument equal to 1 into a constant at launch: the unit strides of
    # contiguous tensors, which decide the memory-coalescing layout (and with it the registers).
    ones = UNIT_STRIDES.get(v.family, ())
    try:
        fn = getattr(importlib.import_module(v.module or MODULES[v.family]), v.kernel)
        constexprs.update({name: 1 for name in ones if name in fn.arg_names and name not in kinds})
        signature = _signature(fn, v.dtype, constexprs, kinds)
        if v.dtype == "fp64":
            narrow = [n for n, k in signature.items() if k == "fp32"]
            if narrow:
                row["error"] = (
                    f"fp32 scalar argument(s) {narrow} in an fp64 variant: Triton passes Python floats as fp32 on a "
                    "GPU (fp64 in the interpreter); pass a tensor of the accumulation dtype"
                )
        start, cpu_start = time.perf_counter(), _cpu_seconds()
        src = ASTSource(fn, signature, constexprs=constexprs)
        options = {"num_warps": v.num_warps, **({"num_stages": v.num_stages} if v.num_stages else {})}
        compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)
        row["seconds"] = time.perf_counter() - start
        row["cpu_seconds"] = _cpu_seconds() - cpu_start  # this process and its ptxas: a shared machine's wall time
        row.update(_parse(_ptxas_report(compiled.asm["ptx"], arch)))
        row["shared"] = max(int(getattr(compiled.metadata, "shared", 0) or 0), row["smem_static"])
    except Exception as exc:  # a compile error is a result to report, not a crash of the check
        row["error"] = f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1] if str(exc).strip() else ''}"[:300]
    return row


def _init_worker(cache: str) -> None:
    import warnings

    os.environ["TRITON_INTERPRET"] = "0"
    os.environ["TRITON_CACHE_DIR"] = cache
    # Triton 3.9 warns once per process that its FP-fusion default will change; the kernels do not depend on it.
    warnings.filterwarnings("ignore", message="TRITON_DEFAULT_FP_FUSION")


def compile_all(todo: list[Variant], arch: int = 90, jobs: int = 2, on_row=None) -> list[dict]:
    """Compile ``todo`` in ``jobs`` fresh processes (``TRITON_INTERPRET=0``, an empty Triton cache, so every
    variant really compiles); ``on_row(row)`` sees each row as it finishes. Rows come back in ``todo``'s order."""
    cache = tempfile.mkdtemp(prefix="dynconv-check-")
    # Import triton in the children only after the environment is set: spawn, not fork.
    saved = {k: os.environ.get(k) for k in ("TRITON_INTERPRET", "TRITON_CACHE_DIR")}
    _init_worker(cache)
    try:
        ctx = multiprocessing.get_context("spawn")
        with concurrent.futures.ProcessPoolExecutor(max(1, jobs), mp_context=ctx, initializer=_init_worker,
                                                    initargs=(cache,)) as pool:  # fmt: skip
            futures = {pool.submit(compile_variant, v, arch): i for i, v in enumerate(todo)}
            rows: list[dict] = [{}] * len(todo)
            for fut in concurrent.futures.as_completed(futures):
                row = fut.result()
                rows[futures[fut]] = row
                if on_row:
                    on_row(row)
    finally:
        for k, val in saved.items():
            if val is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = val
        shutil.rmtree(cache, ignore_errors=True)
    return rows


def failed(row: dict) -> str:
    """Why ``row`` fails the check (``""`` when it passes)."""
    if row["error"]:
        return row["error"]
    if row["spill_stores"] or row["spill_loads"]:
        return f"spills to local memory: {row['spill_stores']} bytes stored, {row['spill_loads']} loaded"
    if row["stack"]:
        return f"a stack frame of {row['stack']} bytes (local memory)"
    return ""


HEADER = f"{'family':<13}{'kernel':<24}{'dtype':<6}{'regs':>5}{'spill B':>8}{'stack B':>8}{'smem B':>8}{'s':>6}  config"


def format_row(row: dict) -> str:
    v = row["variant"]
    if row["error"] and "registers" not in row:
        return f"{v.family:<13}{v.kernel:<24}{v.dtype:<6}{'-':>5}{'-':>8}{'-':>8}{'-':>8}{row['seconds']:>6.1f}  " \
               f"{v.label}  FAIL: {row['error']}"  # fmt: skip
    spill = row["spill_stores"] + row["spill_loads"]
    line = f"{v.family:<13}{v.kernel:<24}{v.dtype:<6}{row['registers']:>5}{spill:>8}{row['stack']:>8}"
    line += f"{row['shared']:>8}{row['seconds']:>6.1f}  {v.label}"
    why = failed(row)
    return line + (f"  FAIL: {why}" if why else "")


# ---------------------------------------------------------------------------------------- first-call cost


# (family, shape): the first forward+backward of a new shape; shapes of the benchmarks' GPU grids.
FIRST_CALL_SHAPES = [
    ("local_filter", (8, 64, 64, 64, 5, 1)),  # B, C, H, W, k, G
    ("local_filter", (16, 3, 64, 64, 9, 1)),  # k=9: nine taps a row unrolled
    ("dcnv", (64, 56, 56, 4, 32)),  # B, H, W, G, C/G (3x3)
    ("deform", (8, 64, 56, 56)),  # B, C, H, W (3x3, with mask)
    ("warp", (1, 1024, 64, 128)),  # B, C, H, W (bilinear, zeros)
]


def first_call_variants(family: str, shape: tuple, dtype: str) -> list[Variant]:
    """The kernels the first forward+backward of ``shape`` compiles (atomic backward, every input needing grad)."""
    f64 = dtype == "fp64"
    if family == "local_filter":
        B, C, H, W, k, G = shape
        geometry = dict(LF_GEOMETRY, KH=k, KW=k, PH=k // 2, PW=k // 2)
        out = []
        for kernel, cap in LF_KERNELS.items():
            block_c = L.local_filter_block_c(C // G, cap, f64)
            tile = L.local_filter_tile(H, W, block_c, f64)
            c = dict(geometry, ACC_F64=f64, BLOCK_C=block_c, BLOCK_H=tile["BLOCK_H"], BLOCK_W=tile["BLOCK_W"])
            if kernel == "_grad_filters_kernel":
                c["SINGLE_C_BLOCK"] = C // G <= block_c
            out.append(_variant(family, kernel, dtype, c, tile["num_warps"]))
        return out
    # the sampling core: the atomic paths for the shape's channels per group
    cg = {"dcnv": shape[-1], "deform": shape[1], "warp": shape[1]}[family]
    return [v for v in _sampling_paths(family, dtype, cg) if dict(v.constexprs).get("ATOMIC", True)]


def first_call_table(arch: int = 90, shapes=None) -> tuple[str, float]:
    """Markdown table of the first-call compile time per (family, shape, dtype), compiled one kernel after another
    in one process (what a user's first call does); returns it and the worst total."""
    lines = [
        "| op | shape | dtype | kernels | compile s (sum) | max regs | spills |",
        "|---|---|---|---:|---:|---:|---:|",
    ]
    worst = 0.0
    for family, shape in shapes or FIRST_CALL_SHAPES:
        for dtype in FAMILY_DTYPES[family]:
            rows = compile_all(first_call_variants(family, shape, dtype), arch, jobs=1)
            bad = [failed(r) for r in rows if failed(r)]
            total = sum(r["cpu_seconds"] for r in rows)
            wall = sum(r["seconds"] for r in rows)
            worst = max(worst, total)
            regs = max(r.get("registers", 0) for r in rows)
            spills = sum(r.get("spill_stores", 0) + r.get("spill_loads", 0) for r in rows)
            shape_s = "x".join(map(str, shape))
            line = f"| {family} | {shape_s} | {dtype} | {len(rows)} | {total:.2f} | {wall:.2f} | {regs} | {spills} |"
            lines.append(line + (f" FAIL: {bad[0]}" if bad else ""))
            print(lines[-1], flush=True)
    return "\n".join(lines), worst


# ---------------------------------------------------------------------------------------------- command


def main(argv: list[str] | None = None) -> int:
    from dynconv.recipes.args import positive_int

    parser = argparse.ArgumentParser(prog="dynconv check-kernels", description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=positive_int, default=90, help="CUDA compute capability, e.g. 90 (sm_90)")
    parser.add_argument("--jobs", type=positive_int, default=2, help="compiler processes")
    parser.add_argument("--family", action="append", choices=sorted(FAMILIES), help="only these op families")
    parser.add_argument("--first-call", action="store_true", help="time the first forward+backward's compiles")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    if args.first_call:
        table, worst = first_call_table(args.arch)
        print(f"\nworst first-call compile total: {worst:.2f} CPU s ({time.perf_counter() - start:.0f} s in all)")
        return 0
    todo = variants(args.family)
    print(f"compiling {len(todo)} kernel variants for sm_{args.arch} ({args.jobs} processes)", flush=True)
    print(HEADER, flush=True)
    rows = compile_all(todo, args.arch, args.jobs, on_row=lambda row: print(format_row(row), flush=True))
    bad = [r for r in rows if failed(r)]
    regs = max((r.get("registers", 0) for r in rows), default=0)
    cpu = sum(r["cpu_seconds"] for r in rows)
    print(f"\n{len(rows)} variants, {len(bad)} failed, max {regs} registers, {cpu:.0f} CPU s compiling, "
          f"{time.perf_counter() - start:.0f} s in all")  # fmt: skip
    for r in bad:
        print("FAILED: " + format_row(r), file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
