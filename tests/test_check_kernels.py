"""Launch rules, opt-in autotuning cache and ``dynconv check-kernels`` (kernels/_launch.py, check_kernels.py).

The rules and the cache are plain Python (a fake timer stands in for CUDA events); the compile checks run
Triton's compiler for sm_90 in child processes with ``TRITON_INTERPRET=0`` (no GPU needed) and are skipped
where Triton's CUDA backend cannot be imported.
"""

import json
import textwrap

import pytest

pytest.importorskip("triton")

from dynconv import check_kernels as check  # noqa: E402
from dynconv.kernels import _launch as L  # noqa: E402
from dynconv.testing import deterministic_algorithms  # noqa: E402


def _pow2(n):
    return n >= 1 and n & (n - 1) == 0


# --------------------------------------------------------------------------------------------------- rules


def test_rules_pick_one_bounded_config_for_every_bench_shape():
    """Every shape of the benchmarks' grids gets one configuration: powers of two, within the register budget,
    and among the variants that check-kernels compiles (so `make test` has checked it compiles without spills)."""
    from dynconv.bench import dcnv as bench_dcnv
    from dynconv.bench import deform as bench_deform
    from dynconv.bench import local_filter as bench_lf
    from dynconv.bench import warp as bench_warp

    checked = set(check.variants())
    lf_shapes = {*bench_lf.DEFAULT_SHAPES, *bench_lf.SMALL_SHAPES, *bench_lf.GPU_SHAPES}
    assert len(lf_shapes) >= 5
    for _, C, H, W, _, G in lf_shapes:
        for f64 in (False, True):
            for cap in (16, 32):
                block_c = L.local_filter_block_c(C // G, cap, f64)
                tile = L.local_filter_tile(H, W, block_c, f64)
                assert all(_pow2(v) for v in (block_c, *tile.values()))
                elements = block_c * tile["BLOCK_H"] * tile["BLOCK_W"]
                assert elements <= L.LOCAL_FILTER_BUDGET // (2 if f64 else 1)
                assert tile["BLOCK_W"] <= max(32, 2 * W)  # no tile much wider than the image
    for shape in {*bench_dcnv.FULL_SHAPES, *bench_dcnv.QUICK_SHAPES}:
        for f64 in (False, True):
            for backward in (False, True):
                cfg = L.sampling_config(shape[4], f64, backward)
                assert cfg["BLOCK_C"] >= min(shape[4], 32) and all(_pow2(v) for v in cfg.values())
                assert cfg["BLOCK_R"] * cfg["BLOCK_C"] <= L.SAMPLING_BUDGET // (4 if f64 else 1)
    # The CUDA tests' local_filter shapes (tests/test_local_filter.py GPU_CASES), strides included:
    # (C, H, W, G, stride); every dtype's picks are among the checked variants.
    for C, H, W, G, (sh, sw) in [(64, 64, 64, 1, (1, 1)), (128, 56, 56, 8, (1, 1)), (3, 64, 64, 1, (2, 2)),
                                 (256, 28, 28, 16, (1, 1)), (96, 45, 61, 3, (2, 1))]:  # fmt: skip
        for dtype in ("fp32", "bf16", "fp16", "fp64"):
            for kernel, cap in check.LF_KERNELS.items():
                block_c = L.local_filter_block_c(C // G, cap, dtype == "fp64")
                # grad x tiles one stride class of input pixels; the others tile output pixels (padding k // 2)
                rows, cols = (-(-H // sh), -(-W // sw))
                if kernel != "_grad_x_kernel":
                    rows, cols = (H - 1) // sh + 1, (W - 1) // sw + 1
                tile = L.local_filter_tile(rows, cols, block_c, dtype == "fp64")
                single = C // G <= block_c if kernel == "_grad_filters_kernel" else None
                assert check._lf_variant(kernel, dtype, block_c, tile, single) in checked, (kernel, dtype, tile)
    assert bench_deform.DCNV2_SHAPES and bench_warp.SHAPES  # fixed configs: any shape, checked below
    grid = check.grid_configs()
    assert {v.family for v in grid} == {"local_filter", "dcnv"} and len(grid) >= 20
    assert set(grid) <= checked
    for family in ("deform", "warp"):
        assert {v.kernel for v in checked if v.family == family} == {"forward_kernel", "backward_kernel"}


def test_variants_cover_every_dtype_and_backward_path():
    vs = check.variants()
    assert len(vs) == len(set(vs))
    for family, dtypes in check.FAMILY_DTYPES.items():
        assert {v.dtype for v in vs if v.family == family} == set(dtypes)
    det = {dict(v.constexprs).get("DETERMINISTIC", not dict(v.constexprs).get("ATOMIC", True)) for v in vs}
    assert det == {True, False}
    assert any(v.dtype == "fp64" and v.family == "dcnv" and dict(v.constexprs)["ACC"] == "fp64" for v in vs)


# ------------------------------------------------------------------------------------- autotuning cache


@pytest.fixture
def cache_env(monkeypatch, tmp_path):
    monkeypatch.setenv("DYNCONV_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("DYNCONV_AUTOTUNE", "1")
    monkeypatch.setattr(L, "_MEMO", {})
    return tmp_path


CANDIDATES = [{"BLOCK": 16}, {"BLOCK": 32}, {"BLOCK": 64}]


def test_autotune_off_by_default_times_nothing(monkeypatch, tmp_path):
    monkeypatch.delenv("DYNCONV_AUTOTUNE", raising=False)
    monkeypatch.setenv("DYNCONV_CACHE_DIR", str(tmp_path))
    launched = []
    got = L.select("k", [1, 2], "float32", "GPU A", CANDIDATES, launched.append, timer=lambda fn: 1 / 0)
    assert got == CANDIDATES[0] and launched == [] and not list(tmp_path.rglob("*.json"))


def test_autotune_picks_the_fastest_and_caches_it_per_device(cache_env, monkeypatch):
    import torch

    times = {16: 3.0, 32: 1.0, 64: 2.0}
    launched = []

    def timer(fn):
        fn()
        return times[launched[-1]["BLOCK"]]

    got = L.select("kern", [7, 9], torch.bfloat16, "NVIDIA H200", CANDIDATES, launched.append, timer=timer)
    assert got == {"BLOCK": 32} and len(launched) == 3
    (path,) = cache_env.glob("autotune/*.json")
    assert "NVIDIA_H200" in path.name and not list(cache_env.glob("autotune/*.tmp"))
    assert json.loads(path.read_text()) == {"kern|bfloat16|7,9": {"BLOCK": 32}}
    # A new process (empty memo) reads the file and times nothing.
    monkeypatch.setattr(L, "_MEMO", {})
    again = L.select("kern", [7, 9], torch.bfloat16, "NVIDIA H200", CANDIDATES, launched.append, timer=lambda fn: 1 / 0)
    assert again == {"BLOCK": 32} and len(launched) == 3
    # Another dtype, key or device is tuned again; entries accumulate in the device's own file.
    times[64] = 0.5
    assert L.select("kern", [7, 9], torch.float32, "NVIDIA H200", CANDIDATES, launched.append, timer) == {"BLOCK": 64}
    assert L.select("kern", [7, 9], torch.bfloat16, "NVIDIA A100", CANDIDATES, launched.append, timer) == {"BLOCK": 64}
    assert len(json.loads(path.read_text())) == 2
    assert len(list(cache_env.glob("autotune/*.json"))) == 2


def test_autotune_survives_a_corrupt_cache_and_a_failing_candidate(cache_env):
    path = L.cache_file("GPU X")
    path.parent.mkdir(parents=True)
    path.write_text("{not json")

    def timer(fn):
        fn()
        return 1.0

    def launch(cfg):
        if cfg["BLOCK"] != 64:
            raise RuntimeError("out of resources")  # as a config too large for the device would

    assert L.select("k", [1], "float16", "GPU X", CANDIDATES, launch, timer) == {"BLOCK": 64}
    assert json.loads(path.read_text()) == {"k|float16|1": {"BLOCK": 64}}


# ------------------------------------------------------------------------------------------ check-kernels

PLANTED = textwrap.dedent(
    """
    import triton
    import triton.language as tl


    @triton.jit
    def spilling_kernel(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
        # BLOCK fp32 accumulators and as many loaded values live in one warp: far past 255 registers a thread.
        offs = tl.arange(0, BLOCK)
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        for i in range(n):
            acc = acc * tl.load(x_ptr + i * BLOCK + offs) + tl.load(x_ptr + (i + n) * BLOCK + offs)
        tl.store(y_ptr + offs, acc)


    @triton.jit
    def broken_kernel(x_ptr, y_ptr, BLOCK: tl.constexpr):
        offs = tl.arange(0, BLOCK)  # BLOCK = 3: not a power of two, a compile error
        tl.store(y_ptr + offs, tl.load(x_ptr + offs))


    @triton.jit
    def scaled_kernel(x_ptr, y_ptr, scale, BLOCK: tl.constexpr):
        offs = tl.arange(0, BLOCK)
        tl.store(y_ptr + offs, tl.load(x_ptr + offs) * scale)
    """
)


def _planted(tmp_path, monkeypatch):
    (tmp_path / "dynconv_planted_kernels.py").write_text(PLANTED)
    monkeypatch.syspath_prepend(str(tmp_path))  # spawned compiler processes get the parent's sys.path
    module = "dynconv_planted_kernels"
    return [
        check._variant("planted", "spilling_kernel", "fp32", dict(BLOCK=8192), 1, module=module),
        check._variant("planted", "broken_kernel", "fp32", dict(BLOCK=3), 4, module=module),
        check._variant("planted", "scaled_kernel", "fp64", dict(BLOCK=128), 4, {"scale": "fp32"}, module=module),
        check._variant("planted", "scaled_kernel", "fp32", dict(BLOCK=128), 4, {"scale": "fp32"}, module=module),
    ]


def test_check_reports_spills_compile_errors_and_fp32_scalars_in_fp64(tmp_path, monkeypatch, capsys):
    """Planted variants: one that spills, one that cannot compile, an fp64 kernel taking an fp32 scalar (the
    dcnv offset_scale bug) and the same kernel in fp32 (fine). The check names each failure and exits 1."""
    planted = _planted(tmp_path, monkeypatch)
    monkeypatch.setattr(check, "variants", lambda families=None: planted)
    status = check.main(["--arch", "90", "--jobs", "2"])
    out, err = capsys.readouterr()
    assert status == 1, out + err
    failures = [line for line in err.splitlines() if line.startswith("FAILED")]
    assert len(failures) == 3, err
    assert any("spilling_kernel" in f and "spills" in f for f in failures)
    assert any("broken_kernel" in f for f in failures)
    assert any("scaled_kernel" in f and "fp64" in f and "fp32 scalar" in f for f in failures)
    ok = [line for line in out.splitlines() if line.split()[1:3] == ["scaled_kernel", "fp32"]]
    assert len(ok) == 1 and "FAIL" not in ok[0]
    assert "4 variants, 3 failed" in out


def test_picked_configs_compile_without_spills():
    """The configurations the rules pick for a benchmark shape of each family with a rule, in fp64 (the largest
    registers) and bf16, compile for sm_90 without spills; the rest run in `make test` (check-kernels)."""
    todo = check.first_call_variants("local_filter", (4, 128, 56, 56, 7, 8), "fp64")
    todo += check.first_call_variants("dcnv", (1, 25, 40, 8, 64), "bf16")
    rows = check.compile_all(todo, arch=90, jobs=2)
    for row in rows:
        assert not check.failed(row), check.format_row(row)
        assert row["registers"] > 0


def test_ptxas_report_uses_the_assembler_triton_compiles_with(tmp_path, monkeypatch):
    """Registers and spills are those of the GPU's real compile: Triton 3.6 assembles sm_90 with its ptxas 12.8,
    Triton 3.9 with ptxas-blackwell 12.9, and they allocate differently (3.6's spilled where 3.9's did not). The
    report asks Triton's own choice first, with Triton's flags, and falls back to the wheel's others."""
    calls = tmp_path / "calls"
    fake = tmp_path / "triton-ptxas"
    fake.write_text(f'#!/bin/sh\necho "$@" >> {calls}\necho "ptxas info    : Used 77 registers"\n')
    fake.chmod(0o755)
    real = check._triton_ptxas
    monkeypatch.setattr(check, "_triton_ptxas", lambda arch: [str(fake)])
    monkeypatch.setattr(check, "_PTXAS", [])
    assert check._parse(check._ptxas_report(".version 8.7\n.target sm_90a\n", 90))["registers"] == 77
    assert calls.read_text().split()[:4] == ["-lineinfo", "-v", "--gpu-name", "sm_90a"]
    from triton.backends.nvidia.compiler import get_ptxas

    assert real(90) == [get_ptxas(90).path]  # the real one: what this Triton runs for sm_90


def test_cli_routes_check_kernels_and_refuses_a_bad_arch(capsys):
    from dynconv import cli

    with pytest.raises(SystemExit) as exc:
        cli.main(["check-kernels", "--arch", "0"])
    assert exc.value.code == 2
    assert "--arch: expected an integer >= 1, got '0'" in capsys.readouterr().err


def test_shared_launch_helpers(monkeypatch):
    """The one copy of the helpers every kernel family (and the torch backend) uses."""
    import torch

    assert [L.acc_dtype(d) for d in (torch.float16, torch.bfloat16, torch.float32, torch.float64)] == [
        torch.float32,
        torch.float32,
        torch.float32,
        torch.float64,
    ]
    cpu = torch.zeros(1)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        L.check_launchable(cpu, interpreted=False)
    L.check_launchable(cpu, interpreted=True)  # the interpreter takes CPU tensors
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert not L.triton_interpret()
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert L.triton_interpret()
    assert L.resolve_deterministic(True) and not L.resolve_deterministic(False)
    with deterministic_algorithms(True):
        assert L.resolve_deterministic(None)
    with deterministic_algorithms(False):
        assert not L.resolve_deterministic(None)
