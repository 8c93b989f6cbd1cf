"""Comparison helpers for tests of fast paths against :mod:`dynconv.reference`.

* :func:`assert_close` uses one tolerance table by dtype and, on failure, reports how many elements
  mismatch and the first few indices (Liger-Kernel style), not only the largest difference.
* :func:`assert_close_lowp` is the fp16/bf16 rule of flash-attention's tests: compare the fast path in
  low precision with the reference upcast to fp32, allowing twice the error the reference itself makes in
  that low precision, ``|fast - ref32| <= 2 * |ref_lowp - ref32| + atol``. It adapts to the op and the
  shape instead of a loose fixed bound.
"""

from __future__ import annotations

import contextlib

import torch

# (rtol, atol) for results of the same computation in a different order of summation.
TOLERANCES = {
    torch.float64: (1e-10, 1e-10),
    torch.float32: (1e-5, 1e-5),
    torch.float16: (1e-2, 1e-2),
    torch.bfloat16: (2e-2, 2e-2),
}


def _report(bad: torch.Tensor, actual: torch.Tensor, expected: torch.Tensor, what: str) -> str:
    idx = bad.nonzero()[:5].tolist()
    diff = (actual.double() - expected.double()).abs()
    lines = [f"{what}: {int(bad.sum())} of {bad.numel()} elements mismatch; max abs diff {diff.max().item():.3g}"]
    for i in idx:
        t = tuple(i)
        lines.append(f"  at {t}: got {actual[t].item():.6g}, expected {expected[t].item():.6g}")
    return "\n".join(lines)


def assert_close(
    actual: torch.Tensor,
    expected: torch.Tensor,
    *,
    rtol: float | None = None,
    atol: float | None = None,
    what: str = "tensor",
) -> None:
    """Assert ``|actual - expected| <= atol + rtol * |expected|`` elementwise, with the dtype's tolerance."""
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert actual.dtype == expected.dtype, f"{what}: dtype {actual.dtype} != {expected.dtype}"
    d_rtol, d_atol = TOLERANCES.get(actual.dtype, (1e-5, 1e-5))
    rtol = d_rtol if rtol is None else rtol
    atol = d_atol if atol is None else atol
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    bad = ~((a - e).abs() <= atol + rtol * e.abs())
    bad |= a.isnan() != e.isnan()
    if bad.any():
        raise AssertionError(_report(bad, a, e, what))


def assert_close_lowp(
    fast: torch.Tensor, ref_lowp: torch.Tensor, ref32: torch.Tensor, *, atol: float = 1e-3, what: str = "tensor"
) -> None:
    """Assert ``|fast - ref32| <= 2 * |ref_lowp - ref32| + atol`` elementwise (``fast`` in fp16/bf16)."""
    assert fast.dtype == ref_lowp.dtype, f"{what}: dtype {fast.dtype} != {ref_lowp.dtype}"
    f, lo, r = (t.detach().double().cpu() for t in (fast, ref_lowp, ref32))
    bad = ~((f - r).abs() <= 2 * (lo - r).abs() + atol)
    if bad.any():
        raise AssertionError(_report(bad, f, r, what + " (vs fp32 reference)"))


# ------------------------------------------------------------------------------ offsets past int32, on CPU


def huge_strided(values: torch.Tensor, dim: int, stride: int = 2**30) -> torch.Tensor:
    """A view equal to ``values`` whose ``dim`` has the given element stride (other dims packed below it), so
    that ``index * stride`` passes ``2**31`` for the third index along ``dim`` while the view stays small.

    The storage (``(size - 1) * stride`` elements and more: several GB of address space) is allocated
    uninitialised and only the pages the view covers are written, so a kernel that addresses its inputs
    through their strides must compute those offsets in int64 to read the right elements; under
    ``TRITON_INTERPRET=1`` this checks the int64 index math of Triton kernels on CPU. Skips the calling test
    when the address space cannot be reserved.
    """
    import pytest

    shape = list(values.shape)
    inner = [i for i in range(values.dim()) if i != dim]
    strides = [0] * values.dim()
    step = 1
    for i in reversed(inner):
        strides[i] = step
        step *= shape[i]
    if step > stride:
        raise ValueError(f"the other dims span {step} elements, more than the stride {stride}")
    strides[dim] = stride
    try:
        base = torch.empty(1 + sum((n - 1) * s for n, s in zip(shape, strides)), dtype=values.dtype)
    except RuntimeError as err:  # e.g. overcommit disabled
        pytest.skip(f"cannot reserve {stride * shape[dim] * values.element_size() / 2**30:.0f} GB: {err}")
    view = base.as_strided(shape, strides)
    view.copy_(values)
    return view


def output_and_grads(fn, tensors, grad_out: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
    """``(fn(*leaves), *grads of every leaf)`` for leaves made from ``tensors`` by ``detach()`` (not ``clone()``,
    which packs a view with gaps, such as :func:`huge_strided`'s, into a contiguous tensor). ``grad_out`` defaults
    to a fixed ramp over the output; a leaf ``fn`` does not use gets a zero gradient."""
    leaves = [t.detach().requires_grad_() for t in tensors]
    out = fn(*leaves)
    if grad_out is None:
        grad_out = torch.linspace(-1, 1, out.numel(), dtype=out.dtype, device=out.device).view_as(out)
    grads = torch.autograd.grad(out, leaves, grad_out, allow_unused=True)
    return (out, *(torch.zeros_like(t) if g is None else g for t, g in zip(leaves, grads)))


# ------------------------------------------------------------------------------ GPU compilation, no GPU


def compile_ptx(variants, pointer_kind=None, arch: int = 90) -> int:
    """Compile Triton kernels to PTX for ``sm_<arch>`` (no GPU needed): the interpreter never runs Triton's
    compiler, so a kernel it accepts can still fail to compile for a GPU.

    Args:
        variants: ``(kernel, dtype, constexprs)`` triples; ``dtype`` (``"fp32"``, ``"bf16"``, ...) is the
            element type of every pointer argument that ``pointer_kind`` does not name.
        pointer_kind: ``{argument name: Triton type}`` for arguments of another type (``"*fp32"`` buffers,
            ``"*i64"`` index tables, ``"fp32"`` scalars). Other arguments are ``i32`` scalars.

    Returns:
        The number of kernels compiled. Must run with ``TRITON_INTERPRET=0`` (see :func:`run_without_interpreter`).
    """
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    pointer_kind = pointer_kind or {}
    for fn, dtype, constexprs in variants:

        def kind(name):
            if name in constexprs:
                return "constexpr"
            if name in pointer_kind:
                return pointer_kind[name]
            return "*" + dtype if name.endswith("_ptr") else "i32"

        signature = {name: kind(name) for name in fn.arg_names}
        compiled = triton.compile(ASTSource(fn, signature, constexprs=constexprs), target=GPUTarget("cuda", arch, 32))
        assert ".entry " + fn.__name__ in compiled.asm["ptx"], fn.__name__
    return len(variants)


def run_without_interpreter(script: str, timeout: float = 600) -> str:
    """Run a Python ``script`` in a fresh process with ``TRITON_INTERPRET=0`` and this checkout on the path;
    return its stdout. Skips the calling test when Triton's CUDA compiler cannot be imported there, fails it
    when the script fails."""
    import os
    import subprocess
    import sys

    import pytest

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, TRITON_INTERPRET="0")
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run(
        [sys.executable, "-c", script], env=env, cwd=root, capture_output=True, text=True, timeout=timeout
    )
    if proc.returncode != 0 and ("ModuleNotFoundError" in proc.stderr or "ImportError" in proc.stderr):
        pytest.skip(f"Triton's CUDA compiler is not usable here: {proc.stderr.strip().splitlines()[-1]}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


@contextlib.contextmanager
def deterministic_algorithms(enabled: bool = True):
    """``torch.use_deterministic_algorithms(enabled)`` for the ``with`` block, then the previous setting back."""
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(enabled)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous)


def record_last_argument(monkeypatch, module, name: str = "backward") -> list:
    """Wrap ``module.<name>`` (with pytest's ``monkeypatch``) so that every call appends its last positional
    argument (the kernels' ``deterministic`` flag) to the returned list, then runs the original."""
    calls: list = []
    original = getattr(module, name)

    def spy(*args):
        calls.append(args[-1])
        return original(*args)

    monkeypatch.setattr(module, name, spy)
    return calls
