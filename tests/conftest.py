import os

# Without a GPU the Triton kernels are tested in the interpreter. triton.jit reads TRITON_INTERPRET when a
# function is decorated, including Triton's own library functions (tl.sum, ...) when triton is first
# imported, which collecting any test module can trigger (torch.utils.flop_counter does): set it first.
if "TRITON_INTERPRET" not in os.environ:
    import torch as _torch

    if not _torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import stream_report  # noqa: E402  (tests/ is on sys.path: pytest puts a conftest's folder there)
import torch  # noqa: E402

# Tests must not inherit a forced backend from the user's shell.
os.environ.pop("DYNCONV_BACKEND", None)


def pytest_configure(config):
    # DYNCONV_TEST_STREAM=PATH streams each result to PATH as it ends; DYNCONV_TEST_TIMEOUT=S limits each test
    # (scripts/gpu_check.sh sets both): see tests/stream_report.py.
    stream_report.register(config)
    config.addinivalue_line(
        "markers",
        "gpu: runs on the GPU when there is one: every test of a *_triton.py file and every cuda test "
        "(added at collection; scripts/gpu_check.sh selects them with -m gpu)",
    )


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
    for item in items:
        # the Triton test files run their kernels on CUDA when there is a GPU (in the interpreter otherwise)
        if "cuda" in item.keywords or item.path.name.endswith("_triton.py"):
            item.add_marker(pytest.mark.gpu)
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device; none is available on this machine")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)
