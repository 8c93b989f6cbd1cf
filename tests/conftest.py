import os

import pytest
import stream_report  # (tests/ is on sys.path: pytest puts a conftest's folder there)
import torch
import triton_setup  # sets TRITON_INTERPRET=1 without CUDA, before any test module imports triton

# Tests must not inherit a forced backend from the user's shell.
os.environ.pop("DYNCONV_BACKEND", None)


def pytest_configure(config):
    # DYNCONV_TEST_STREAM=PATH streams each result to PATH as it ends; DYNCONV_TEST_TIMEOUT=S limits each test
    # (scripts/gpu_check.sh sets both): see tests/stream_report.py.
    stream_report.register(config)
    config.addinivalue_line(
        "markers",
        "gpu: runs on the GPU when there is one: every triton test and every cuda test "
        "(added at collection; scripts/gpu_check.sh selects them with -m gpu)",
    )


@pytest.fixture(params=["torch", pytest.param("triton", marks=pytest.mark.triton)])
def backend(request):
    """The backends this machine can run, for the tests that compare a backend against ``dynconv.reference``:
    ``torch`` always, ``triton`` on CUDA or in the interpreter (skipped elsewhere, with the reason). Tests that
    take it keep to shapes small enough for the interpreter."""
    return request.param


@pytest.fixture(scope="module")
def one_thread():
    """One OpenMP thread for a module of tiny ops: on a shared 2-core machine under load a tiny conv was measured
    at ~65 ms with 2 threads (they wait on each other) and ~20 us with one."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.hookimpl(tryfirst=True)  # before -m selects: the gpu mark is added here
def pytest_collection_modifyitems(config, items):
    cuda = torch.cuda.is_available()
    for item in items:
        needs_cuda, runs_triton = item.get_closest_marker("cuda"), item.get_closest_marker("triton")
        # the triton tests run their kernels on CUDA when there is a GPU (in the interpreter otherwise)
        if needs_cuda or runs_triton:
            item.add_marker(pytest.mark.gpu)
        if needs_cuda and not cuda:
            item.add_marker(pytest.mark.skip(reason="needs a CUDA device; none is available on this machine"))
        elif runs_triton and triton_setup.TRITON_SKIP_REASON:
            item.add_marker(pytest.mark.skip(reason=triton_setup.TRITON_SKIP_REASON))
