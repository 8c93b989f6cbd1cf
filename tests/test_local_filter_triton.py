"""dynamic local filtering: the Triton kernels (dynconv/kernels/local_filter.py) against the unfold reference.

Without a GPU the kernels run in Triton's interpreter on CPU tensors. ``triton.jit`` reads
``TRITON_INTERPRET`` when the kernel module is imported, which happens at the first call of the ``triton``
backend (never at ``import dynconv``), so setting it here, before any test runs, works whatever the other
test modules imported. On a machine with CUDA the variable is left alone and the same small grid runs on
the GPU with the compiled kernels; the ``cuda``-marked tests add realistic sizes there.

The interpreter costs ~60-90 ms per program instance, so the shapes are tiny: the kernels then cover each
(b, g) with one tile (see ``dynconv.kernels._launch.local_filter_tile``).

Tolerances: fp32 and fp64 use the dtype table of :mod:`dynconv.testing` (a different order of summation);
fp16/bf16 use ``assert_close_lowp`` (twice the error the reference makes in that dtype, + 1e-3).
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import functools  # noqa: E402
import random  # noqa: E402

import dynconv  # noqa: E402
from dynconv.backends import BackendError, can_run_triton, choose_backend, triton_interpret  # noqa: E402
from dynconv.testing import assert_close, assert_close_lowp, run_without_interpreter  # noqa: E402

pytest.importorskip("triton")

if triton_interpret():
    DEVICE = "cpu"
elif torch.cuda.is_available():
    DEVICE = "cuda"
else:
    pytest.skip("TRITON_INTERPRET is set to 0 and there is no CUDA device", allow_module_level=True)

kernels = pytest.importorskip("dynconv.kernels.local_filter")


def make_case(seed):
    """A random configuration: odd sizes, k in {1,3,5}, stride 1-2, dilation 1-2, groups, padding, layout."""
    rng = random.Random(seed)
    k = rng.choice([1, 3, 5])
    stride, dilation = rng.choice([(1, 1), (2, 1), (1, 2), (2, 2), ((1, 2), 1), (1, (2, 1))])
    C = rng.choice([1, 3, 4, 6])
    G = rng.choice([g for g in range(1, C + 1) if C % g == 0])
    B = rng.choice([1, 2])
    padding = rng.choice([None, 0, 1, (2, 0), (0, 3)])
    dh, dw = (dilation, dilation) if isinstance(dilation, int) else dilation
    ph, pw = (
        ((k - 1) // 2 * dh, (k - 1) // 2 * dw)
        if padding is None
        else ((padding, padding) if isinstance(padding, int) else padding)
    )
    H = max(rng.choice([5, 7, 11]), dh * (k - 1) + 1 - 2 * ph)
    W = max(rng.choice([6, 9, 13]), dw * (k - 1) + 1 - 2 * pw)
    layout = rng.choice(["contiguous", "channels_last", "strided"])
    return dict(B=B, C=C, H=H, W=W, k=k, G=G, stride=stride, padding=padding, dilation=dilation, layout=layout)


CASES = [make_case(s) for s in range(40)]
# More channels per group than one block of the grad-filters kernel (32): its loop over channel blocks.
WIDE = dict(B=1, C=40, H=6, W=7, k=3, G=1, stride=1, padding=None, dilation=1, layout="channels_last")


def _out_size(size, k, s, p, d):
    return (size + 2 * p - d * (k - 1) - 1) // s + 1


def make_inputs(case, dtype, requires_grad=True, device=DEVICE):
    B, C, H, W, k, G = (case[n] for n in "B C H W k G".split())
    sh, sw = (case["stride"],) * 2 if isinstance(case["stride"], int) else case["stride"]
    dh, dw = (case["dilation"],) * 2 if isinstance(case["dilation"], int) else case["dilation"]
    p = case["padding"]
    ph, pw = ((k - 1) // 2 * dh, (k - 1) // 2 * dw) if p is None else ((p, p) if isinstance(p, int) else p)
    Ho, Wo = _out_size(H, k, sh, ph, dh), _out_size(W, k, sw, pw, dw)
    x = torch.randn(B, C, H, W, dtype=torch.float64)
    f = torch.randn(B, G, k * k, Ho, Wo, dtype=torch.float64)
    if case["layout"] == "channels_last":
        x = x.to(memory_format=torch.channels_last)
    elif case["layout"] == "strided":  # a non-contiguous view: every other column of a wider tensor
        x = torch.randn(B, C, H, 2 * W, dtype=torch.float64)[..., ::2]
        f = torch.randn(B, G, k * k, Ho, 2 * Wo, dtype=torch.float64)[..., 1::2]
    x, f = x.to(device, dtype), f.to(device, dtype)
    return x.requires_grad_(requires_grad), f.requires_grad_(requires_grad)


def call(x, f, case, backend):
    return dynconv.local_filter2d(x, f, case["k"], case["stride"], case["padding"], case["dilation"], backend=backend)


def run_both(x, f, gy, case, backend):
    """Output and both gradients of ``backend`` on fresh leaves copied from ``x`` and ``f``."""
    x, f = x.detach().clone().requires_grad_(), f.detach().clone().requires_grad_()
    out = call(x, f, case, backend)
    gx, gf = torch.autograd.grad(out, (x, f), gy)
    return out, gx, gf


def check_fp32(case, dtype=torch.float32):
    x, f = make_inputs(case, dtype)
    out = call(x, f, case, "triton")
    assert out.is_contiguous() and out.dtype == dtype
    # A transposed view: the kernels read grad_y through its strides too.
    gy = torch.randn(tuple(reversed(out.shape)), dtype=dtype, device=DEVICE).permute(3, 2, 1, 0)
    gx, gf = torch.autograd.grad(out, (x, f), gy)
    assert gx.is_contiguous() and gf.is_contiguous()
    ref, gxr, gfr = run_both(x, f, gy, case, "reference")
    assert_close(out, ref, what=f"output {case}")
    assert_close(gx, gxr, what=f"grad x {case}")
    assert_close(gf, gfr, what=f"grad filters {case}")


@pytest.mark.parametrize("case", CASES, ids=[str(i) for i in range(len(CASES))])
def test_triton_matches_reference_fp32(case):
    check_fp32(case)


def test_triton_many_channels_per_group():
    check_fp32(WIDE)


@pytest.mark.parametrize("case", CASES[:12], ids=[str(i) for i in range(12)])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_triton_low_precision(case, dtype):
    """fp16/bf16 with fp32 accumulation: within twice the error the reference makes in that dtype, + 1e-3."""
    x, f = make_inputs(case, dtype)
    gy = torch.randn(call(x, f, case, "reference").shape, dtype=dtype, device=DEVICE)
    out, gx, gf = run_both(x, f, gy, case, "triton")
    assert out.dtype == gx.dtype == gf.dtype == dtype
    ref32, gx32, gf32 = run_both(x.float(), f.float(), gy.float(), case, "reference")
    ref_lowp, gxl, gfl = run_both(x, f, gy, case, "reference")
    assert_close_lowp(out, ref_lowp, ref32, what=f"output {case}")
    assert_close_lowp(gx, gxl, gx32, what=f"grad x {case}")
    assert_close_lowp(gf, gfl, gf32, what=f"grad filters {case}")


@pytest.mark.parametrize("case", [CASES[i] for i in (0, 1, 3)], ids=lambda c: f"k{c['k']}s{c['stride']}")
def test_triton_gradcheck_fp64(case):
    """fp64 kernels (fp64 accumulation) against finite differences; fast mode keeps interpreter calls few."""
    x, f = make_inputs(case, torch.float64)
    assert torch.autograd.gradcheck(lambda x, f: call(x, f, case, "triton"), (x, f), fast_mode=True)


def test_triton_gradient_of_one_input_only():
    case = CASES[1]
    x, f = make_inputs(case, torch.float32)
    (gx,) = torch.autograd.grad(call(x, f.detach(), case, "triton").sum(), (x,))
    (gxr,) = torch.autograd.grad(call(x, f.detach(), case, "reference").sum(), (x,))
    assert_close(gx, gxr)
    (gf,) = torch.autograd.grad(call(x.detach(), f, case, "triton").sum(), (f,))
    (gfr,) = torch.autograd.grad(call(x.detach(), f, case, "reference").sum(), (f,))
    assert_close(gf, gfr)
    x, f = torch.randn(1, 2, 5, 6, device=DEVICE), torch.randn(1, 1, 9, 5, 6, device=DEVICE)
    grad_x, grad_f = kernels.backward(torch.ones(1, 2, 5, 6, device=DEVICE), x, f, [3, 3], [1, 1], [1, 1], [1, 1], 0, 0)
    assert grad_x.numel() == 0 and grad_f.numel() == 0


def test_triton_int64_offsets(monkeypatch):
    """The int64 offset path (taken for tensors of >= 2**30 elements) gives the same results on small ones."""
    monkeypatch.setattr(kernels, "FORCE_INT64", True)
    check_fp32(CASES[3])
    check_fp32(dict(CASES[1], stride=2))


@pytest.mark.skipif(DEVICE != "cpu", reason="views over 8 GB of address space: a CPU check")
def test_triton_past_int32_offsets_through_strides():
    """Inputs whose strides put elements past 2**31 (views over a lazily allocated storage, a few pages of it
    written): the kernels must decide on int64 offsets from the strides, not the element count, and read
    those elements right. Forward and both gradients against the reference on contiguous copies."""
    from dynconv.testing import huge_strided, output_and_grads

    g = torch.Generator().manual_seed(0)
    k, stride, dilation = 3, (1, 2), (2, 1)
    x = huge_strided(torch.randn(1, 3, 9, 11, generator=g), dim=1)  # channel c at element c * 2**30
    Ho, Wo = _out_size(9, k, 1, 2, 2), _out_size(11, k, 2, 1, 1)
    f = huge_strided(torch.randn(1, 3, k * k, Ho, Wo, generator=g), dim=1)  # one filter group per channel
    assert x.numel() < 2**10 and x.stride(1) * 2 >= 2**31
    gy = torch.randn(1, 3, Ho, Wo, generator=g)
    outs = {}
    for backend, tensors in (("triton", (x, f)), ("reference", (x.contiguous(), f.contiguous()))):
        geometry = dict(kernel_size=k, stride=stride, padding=(2, 1), dilation=dilation, backend=backend)
        outs[backend] = output_and_grads(functools.partial(dynconv.local_filter2d, **geometry), tensors, gy)
    for what, a, e in zip(("output", "grad x", "grad filters"), outs["triton"], outs["reference"]):
        assert_close(a, e, what=what)


@pytest.mark.skipif(DEVICE != "cpu", reason="a stub timer: a CPU check of the launch path")
def test_opt_in_autotuned_launch_path(monkeypatch, tmp_path):
    """DYNCONV_AUTOTUNE=1 under the interpreter: a stub timer makes the last candidate tried win, so tiles other
    than the rule's run (and must still give the reference's values); the winners land in the on-disk cache, and
    a second call with the same shape times nothing."""
    from dynconv.kernels import _launch

    monkeypatch.setenv("DYNCONV_AUTOTUNE", "1")
    monkeypatch.setenv("DYNCONV_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(_launch, "_MEMO", {})
    tried = []

    def stub_timer(fn):
        fn()
        tried.append(1)
        return 1.0 / len(tried)

    monkeypatch.setattr(_launch, "_default_timer", stub_timer)
    case = dict(B=1, C=3, H=5, W=7, k=3, G=1, stride=(2, 1), padding=None, dilation=1, layout="channels_last")
    check_fp32(case)
    assert len(tried) >= 6  # each of the three kernels timed at least two candidates
    (cache,) = tmp_path.glob("autotune/*.json")
    import json

    entries = json.loads(cache.read_text())
    assert {e.split("|")[0] for e in entries} == {"_forward_kernel", "_grad_x_kernel", "_grad_filters_kernel"}
    n = len(tried)
    monkeypatch.setattr(_launch, "_MEMO", {})  # a new process: only the file remembers
    check_fp32(case)
    assert len(tried) == n


def test_triton_opcheck():
    x, f = make_inputs(CASES[0], torch.float32)
    args = (x, f, [CASES[0]["k"]] * 2, [1, 1], [0, 0], [1, 1], "triton")
    x, f = make_inputs(dict(CASES[0], padding=0, stride=1, dilation=1), torch.float32)
    torch.library.opcheck(torch.ops.dynconv.local_filter2d.default, (x, f) + args[2:])


def test_triton_backend_under_torch_compile_fullgraph():
    """The custom op (fake kernel + autograd) traces with the triton backend: no graph break, same values."""
    torch._dynamo.reset()
    case = CASES[5]
    x, f = make_inputs(case, torch.float32)
    out = torch.compile(lambda x, f: call(x, f, case, "triton"), fullgraph=True, backend="aot_eager")(x, f)
    gx, gf = torch.autograd.grad(out.square().sum(), (x, f))
    ref = call(x, f, case, "reference")
    gxr, gfr = torch.autograd.grad(ref.square().sum(), (x, f))
    assert_close(out, ref)
    assert_close(gx, gxr)
    assert_close(gf, gfr)


def test_triton_dispatch_rule():
    x, f = make_inputs(CASES[0], torch.float32, requires_grad=False)
    assert can_run_triton("local_filter2d", x, f)
    # An explicit backend="triton" is honoured; automatic dispatch picks triton only for CUDA tensors.
    assert choose_backend("local_filter2d", x, f, backend="triton") == "triton"
    assert choose_backend("local_filter2d", x, f) == ("triton" if DEVICE == "cuda" else "torch")
    if DEVICE == "cpu":
        with pytest.raises(BackendError, match=r"supports dtypes .* got \['torch.int32'\]"):
            choose_backend("local_filter2d", x, f, torch.zeros(1, dtype=torch.int32), backend="triton")


def test_cpu_tensors_without_interpreter_raise(monkeypatch):
    monkeypatch.setattr(kernels, "INTERPRETED", False)
    x, f = torch.randn(1, 2, 5, 5), torch.randn(1, 1, 9, 5, 5)
    with pytest.raises(RuntimeError, match=r"imported without TRITON_INTERPRET=1"):
        kernels.forward(x, f, [3, 3], [1, 1], [1, 1], [1, 1])


# ---------------------------------------------------------------------------------- CUDA, realistic sizes

GPU_CASES = [
    dict(B=4, C=64, H=64, W=64, k=5, G=1, stride=1, padding=None, dilation=1, layout="contiguous"),
    dict(B=2, C=128, H=56, W=56, k=7, G=8, stride=1, padding=None, dilation=1, layout="channels_last"),
    dict(B=4, C=3, H=64, W=64, k=9, G=1, stride=2, padding=None, dilation=1, layout="strided"),
    dict(B=2, C=256, H=28, W=28, k=7, G=16, stride=1, padding=None, dilation=2, layout="contiguous"),
    dict(B=2, C=96, H=45, W=61, k=3, G=3, stride=(2, 1), padding=(0, 2), dilation=(1, 3), layout="channels_last"),
]


@pytest.mark.cuda
@pytest.mark.parametrize("case", GPU_CASES, ids=[str(i) for i in range(len(GPU_CASES))])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_triton_cuda_realistic_sizes(case, dtype):
    x, f = make_inputs(case, dtype, device="cuda")
    gy = torch.randn(call(x, f, case, "reference").shape, dtype=dtype, device="cuda")
    out, gx, gf = run_both(x, f, gy, case, "triton")
    ref32, gx32, gf32 = run_both(x.float(), f.float(), gy.float(), case, "reference")
    if dtype == torch.float32:
        # The flash-attention rule one precision up: no worse than twice the fp32 reference's own error against
        # fp64 (sums over up to 256 channels: a fixed tolerance would assume small sizes).
        ref64 = run_both(x.double(), f.double(), gy.double(), case, "reference")
        for a, e32, e64, what in zip((out, gx, gf), (ref32, gx32, gf32), ref64, ("output", "grad x", "grad filters")):
            assert_close_lowp(a, e32, e64, atol=1e-5, what=f"{what} {case}")
    else:
        ref_lowp, gxl, gfl = run_both(x, f, gy, case, "reference")
        assert_close_lowp(out, ref_lowp, ref32, what=f"output {case}")
        assert_close_lowp(gx, gxl, gx32, what=f"grad x {case}")
        assert_close_lowp(gf, gfl, gf32, what=f"grad filters {case}")


@pytest.mark.cuda
@pytest.mark.slow
def test_triton_cuda_past_int32_offsets():
    """x of 16 * 12000**2 > 2**31 elements (bf16, ~20 GB in all): the tail rows, reached only through int64
    offsets, against the reference on a crop."""
    B, C, H, W, k = 1, 16, 12000, 12000, 3
    x = torch.randn(B, C, H, W, dtype=torch.bfloat16, device="cuda").requires_grad_()
    f = torch.randn(B, 1, k * k, H, W, dtype=torch.bfloat16, device="cuda").requires_grad_()
    assert x.numel() > 2**31
    out = dynconv.local_filter2d(x, f, k, backend="triton")
    gy = torch.ones_like(out)
    gx, gf = torch.autograd.grad(out, (x, f), gy)
    rows = 4  # the last output rows; the crop starts one row above them, whose output sees a false border
    xc = x.detach()[:, :, H - rows - 1 :].float().requires_grad_()
    fc = f.detach()[..., H - rows - 1 :, :].float().requires_grad_()
    refc = dynconv.local_filter2d(xc, fc, k, backend="reference")
    gxc, gfc = torch.autograd.grad(refc, (xc, fc), torch.ones_like(refc))
    assert_close(out[:, :, H - rows :].float(), refc[:, :, 1:], rtol=1e-2, atol=1e-2, what="output tail")
    assert_close(gx[:, :, H - rows + 1 :].float(), gxc[:, :, 2:], rtol=1e-2, atol=2e-2, what="grad x tail")
    assert_close(gf[..., H - rows :, :].float(), gfc[..., 1:, :], rtol=2e-2, atol=5e-2, what="grad filters tail")


# ------------------------------------------------------------------------------ GPU compilation, no GPU

_COMPILE_SCRIPT = r"""
import dynconv.kernels.local_filter as K
from dynconv.testing import compile_ptx

geometry = dict(KH=3, KW=3, SH=2, SW=1, PH=1, PW=1, DH=1, DW=2, ACC_F64=False, BLOCK_H=4, BLOCK_W=64)
variants = [
    (K._forward_kernel, "fp32", dict(geometry, INT64=False, BLOCK_C=16)),
    (K._grad_x_kernel, "bf16", dict(geometry, INT64=True, BLOCK_C=16)),
    (K._grad_filters_kernel, "fp16", dict(geometry, INT64=False, SINGLE_C_BLOCK=False, BLOCK_C=32)),
]
print("compiled", compile_ptx(variants))
"""


@pytest.mark.slow
def test_kernels_compile_for_sm90_without_a_gpu():
    """Compile one variant of each kernel to PTX for sm_90 (ptxas ships with Triton, no GPU needed)."""
    assert "compiled 3" in run_without_interpreter(_COMPILE_SCRIPT)


def test_bench_reports_bandwidth_and_ratios():
    """`dynconv bench local_filter --backends torch,triton` runs and its derived columns follow from the times."""
    import argparse

    from dynconv.bench import local_filter as bench

    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    args = parser.parse_args(["--shapes", "1,2,5,6,3,1", "--backends", "torch,triton", "--peak-gbs", "100"])
    args.device, args.repeats = DEVICE, 1
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
    if DEVICE == "cpu":  # no known peak bandwidth: the fraction columns are left out rather than printed as nan
        args = parser.parse_args(["--shapes", "1,2,5,6,3,1", "--backends", "torch"])
        args.device, args.repeats = DEVICE, 1
        text = bench.run(args)
        assert "fwd GB/s" in text and "frac. of peak" not in text and "nan" not in text


def test_triton_batch_of_zero():
    x = torch.randn(0, 4, 9, 9, device=DEVICE, requires_grad=True)
    filters = torch.randn(0, 2, 9, 5, 5, device=DEVICE, requires_grad=True)
    out = dynconv.local_filter2d(x, filters, 3, stride=2, padding=1, backend="triton")
    assert out.shape == (0, 4, 5, 5)
    out.sum().backward()
    assert x.grad.shape == x.shape and filters.grad.shape == filters.shape
