"""Argument normalisation and validation shared by every public op.

Every check raises ``ValueError`` or ``TypeError`` whose message names the argument, what it got and
what was expected, so a user never has to read a stack trace to find the wrong tensor.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Sequence

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def pair(value: int | Sequence[int], name: str, *, minimum: int = 1) -> tuple[int, int]:
    """Normalise ``value`` (an int or a pair of ints) to a pair, checking each entry is ``>= minimum``."""
    if isinstance(value, bool):
        raise TypeError(f"{name} must be an int or a pair of ints, got {value!r}")
    if isinstance(value, int):
        out = (value, value)
    elif (
        isinstance(value, Sequence)
        and len(value) == 2
        and all(isinstance(v, int) and not isinstance(v, bool) for v in value)
    ):
        out = (int(value[0]), int(value[1]))
    else:
        raise TypeError(f"{name} must be an int or a pair of ints, got {value!r}")
    if min(out) < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value!r}")
    return out


def check_tensor(t: object, name: str, *, ndim: int | Sequence[int], shape_hint: str) -> torch.Tensor:
    """Check that ``t`` is a floating-point tensor of the given rank (or one of the given ranks)."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    ranks = (ndim,) if isinstance(ndim, int) else tuple(ndim)
    if t.dim() not in ranks:
        raise ValueError(
            f"{name} must be a {' or '.join(f'{r}-D' for r in ranks)} tensor {shape_hint}, got shape {tuple(t.shape)}"
        )
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must have a floating dtype (float16, bfloat16, float32 or float64), got {t.dtype}")
    return t


def check_same(ref: torch.Tensor, ref_name: str, other: torch.Tensor, name: str) -> None:
    """Check that ``other`` has the dtype and device of ``ref``."""
    if other.dtype != ref.dtype:
        raise TypeError(f"{name} must have the dtype of {ref_name} ({ref.dtype}), got {other.dtype}")
    if other.device != ref.device:
        raise ValueError(f"{name} must be on the device of {ref_name} ({ref.device}), got {other.device}")


def autocast_op(*names: str, widest: bool = False) -> Callable[[Callable], Callable]:
    """Make a public op behave under ``torch.autocast`` as torch's own ops do.

    When autocast is on for the device of the op's first tensor argument, the tensor arguments ``names`` are
    cast as ``F.conv2d`` casts its inputs (float16/bfloat16/float32 to the autocast dtype; float64 and other
    dtypes are left alone, so float64 mixed with a low-precision tensor still fails the dtype check) or, with
    ``widest``, as ``F.grid_sample`` does (every floating argument promoted to the widest of their dtypes);
    the op then runs with autocast off, so its result is exactly that of the op on inputs cast by hand.
    Outside autocast the op runs unchanged.
    """

    def decorate(fn: Callable) -> Callable:
        signature = inspect.signature(fn)

        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            first = args[0] if args else kwargs.get(names[0])
            if not isinstance(first, torch.Tensor) or not torch.is_autocast_enabled(first.device.type):
                return fn(*args, **kwargs)  # the common case, without the cost of binding the arguments
            device = first.device.type
            bound = signature.bind(*args, **kwargs)
            tensors = {n: bound.arguments[n] for n in names if isinstance(bound.arguments.get(n), torch.Tensor)}
            floats = [t.dtype for t in tensors.values() if t.is_floating_point()]
            if widest:
                dtype = functools.reduce(torch.promote_types, floats) if floats else None
                castable = FLOAT_DTYPES
            else:
                dtype = torch.get_autocast_dtype(device)
                castable = (torch.float16, torch.bfloat16, torch.float32)
            for n, t in tensors.items():
                if t.dtype in castable:
                    bound.arguments[n] = t.to(dtype)
            with torch.autocast(device, enabled=False):
                return fn(*bound.args, **bound.kwargs)

        return wrapper

    return decorate


def conv_out_size(size: int, kernel: int, stride: int, padding: int, dilation: int) -> int:
    """The output length of ``F.conv2d`` along one axis."""
    return (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1
