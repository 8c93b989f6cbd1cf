"""Where the Triton tests run, decided once for the whole suite (``tests/conftest.py`` imports this first).

Without CUDA the Triton kernels run in Triton's interpreter on CPU tensors. ``triton.jit`` reads
``TRITON_INTERPRET`` when a function is decorated, including Triton's own library functions (``tl.sum``, ...)
when triton is first imported, which collecting any test module can trigger (``torch.utils.flop_counter`` does):
so the variable is set here, when conftest.py is loaded, before any test module is collected. With CUDA it is left
alone and the same tests run the compiled kernels on the GPU.

The interpreter costs ~60-90 ms per program instance: the Triton tests keep to tiny shapes (one program per
(sample, group) or a few), and the ``cuda``-marked tests add realistic sizes on a GPU.

Tests that run a Triton kernel carry the ``triton`` mark (the ``backend`` fixture of conftest.py adds it to its
``triton`` parameter): conftest.py skips them with ``TRITON_SKIP_REASON`` where Triton cannot run, and marks them
``gpu`` (``scripts/gpu_check.sh`` selects ``-m gpu``).
"""

import os

import torch

if "TRITON_INTERPRET" not in os.environ and not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

from dynconv.backends import triton_available  # noqa: E402  (after the variable: see above)

#: Whether the Triton kernels run in the interpreter (on CPU tensors).
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
#: The device of the Triton tests' tensors.
TRITON_DEVICE = "cpu" if INTERPRET or not torch.cuda.is_available() else "cuda"


def _skip_reason() -> str | None:
    if not triton_available():
        return "triton is not installed"
    if not INTERPRET and not torch.cuda.is_available():
        return "TRITON_INTERPRET is set to 0 and there is no CUDA device"
    return None


#: Why the Triton tests are skipped on this machine, or None where they run.
TRITON_SKIP_REASON = _skip_reason()
