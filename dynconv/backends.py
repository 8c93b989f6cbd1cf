"""Choosing the implementation of an op: ``reference``, ``torch`` or ``triton``.

The rule: an explicit ``backend=`` argument wins and, if it cannot run, the error says
why; then the ``DYNCONV_BACKEND`` environment variable (if it cannot run an op, that op falls back to the
automatic choice with a one-time :class:`BackendFallbackWarning`); then ``triton`` for CUDA tensors when Triton is
importable and the op has a Triton kernel for the dtype; otherwise ``torch``. ``reference`` always runs.

Every reason an implementation can refuse lives in one ``can_run_<backend>`` function, which either
returns ``False`` (logging the reason at debug level) or raises it, as NATTEN's backend checks do.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import sys
import warnings

import torch

from dynconv.kernels._launch import triton_interpret

logger = logging.getLogger(__name__)

BACKENDS = ("reference", "torch", "triton")

# Which backends each op implements, and which dtypes its Triton kernels take. An op family adds its
# Triton kernels by adding its name here (``dynconv/ops/<family>.py`` does so when it registers them).
TRITON_OPS: dict[str, tuple[torch.dtype, ...]] = {}


class BackendError(RuntimeError):
    """Raised when a requested backend cannot run the given inputs."""


# Checked once at import (without importing triton): a cached function call inside ops makes dynamo warn.
_TRITON_AVAILABLE = importlib.util.find_spec("triton") is not None


def triton_available() -> bool:
    """Whether ``import triton`` would succeed."""
    return _TRITON_AVAILABLE


def _refuse(reason: str, raise_error: bool) -> bool:
    if raise_error:
        raise BackendError(reason)
    if not torch.compiler.is_compiling():  # dynamo does not trace logging calls
        logger.debug("%s", reason)
    return False


def can_run_reference(op: str, *tensors: torch.Tensor, raise_error: bool = False) -> bool:
    return True


def can_run_torch(op: str, *tensors: torch.Tensor, raise_error: bool = False) -> bool:
    return True


def can_run_triton(op: str, *tensors: torch.Tensor, raise_error: bool = False) -> bool:
    if op not in TRITON_OPS:
        return _refuse(f"{op}: the triton backend has no kernel for this op", raise_error)
    if not triton_available():
        return _refuse(
            f"{op}: the triton backend needs the 'triton' package (pip install 'dynconv[triton]')", raise_error
        )
    devices = {t.device.type for t in tensors}
    if devices != {"cuda"} and not (devices == {"cpu"} and triton_interpret()):
        return _refuse(
            f"{op}: the triton backend needs CUDA tensors (or CPU tensors with TRITON_INTERPRET=1), "
            f"got tensors on {sorted(devices)}",
            raise_error,
        )
    dtypes = {t.dtype for t in tensors}
    unsupported = sorted(str(d) for d in dtypes if d not in TRITON_OPS[op])
    if unsupported:
        return _refuse(
            f"{op}: the triton backend supports dtypes {[str(d) for d in TRITON_OPS[op]]}, got {unsupported}",
            raise_error,
        )
    return True


_CHECKS = {"reference": can_run_reference, "torch": can_run_torch, "triton": can_run_triton}


class BackendFallbackWarning(UserWarning):
    """Warned (once per op) when ``DYNCONV_BACKEND`` names a backend that cannot run an op, which then runs on the
    automatic choice instead."""


# Ops already warned about under DYNCONV_BACKEND (one warning per op and process, not one per call).
_FALLBACK_WARNED: set[str] = set()


def choose_backend(op: str, *tensors: torch.Tensor, backend: str | None = None) -> str:
    """Return the backend that runs ``op`` on ``tensors`` under the dispatch rule in the module docstring.

    An explicit ``backend`` that cannot run raises :class:`BackendError` with the reason. A ``DYNCONV_BACKEND``
    that cannot run (``triton`` for an op without a Triton kernel, for CPU tensors without
    ``TRITON_INTERPRET=1``, for a dtype its kernels lack...) is a preference for the whole program: the op
    falls back to the automatic choice, with one :class:`BackendFallbackWarning` per op giving the reason.
    """
    if backend is not None:
        if backend not in _CHECKS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        _CHECKS[backend](op, *tensors, raise_error=True)
        return backend
    preferred = os.environ.get("DYNCONV_BACKEND") or None
    if preferred is not None:
        if preferred not in _CHECKS:
            raise ValueError(f"DYNCONV_BACKEND must be one of {BACKENDS}, got {preferred!r}")
        try:
            _CHECKS[preferred](op, *tensors, raise_error=True)
            return preferred
        except BackendError as error:
            fallback = _automatic(op, tensors)
            # dynamo does not trace warnings; the first eager call warns.
            if op not in _FALLBACK_WARNED and not torch.compiler.is_compiling():
                _FALLBACK_WARNED.add(op)
                warnings.warn(
                    f"DYNCONV_BACKEND={preferred}: {error}; running {op} on the {fallback!r} backend instead "
                    f"(warned once per op)",
                    BackendFallbackWarning,
                    stacklevel=_caller_stacklevel(),
                )
            return fallback
    return _automatic(op, tensors)


def _caller_stacklevel() -> int:
    """The ``stacklevel`` (for a warning issued by this function's caller) of the first frame outside dynconv and
    torch: the user's line, whether the op was called directly, through a layer or through an autograd function."""
    frame, level = sys._getframe(2), 2  # 1 is the caller of this function, the one that warns
    while frame is not None and frame.f_globals.get("__name__", "").partition(".")[0] in ("dynconv", "torch"):
        frame, level = frame.f_back, level + 1
    return level


def _automatic(op: str, tensors: tuple[torch.Tensor, ...]) -> str:
    if can_run_triton(op, *tensors) and all(t.device.type == "cuda" for t in tensors):
        return "triton"
    return "torch"
