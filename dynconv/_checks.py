"""Argument normalisation and validation shared by every public op.

Every check raises ``ValueError`` or ``TypeError`` whose message names the argument, what it got and
what was expected, so a user never has to read a stack trace to find the wrong tensor.
"""

from __future__ import annotations

from collections.abc import Sequence

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


def conv_out_size(size: int, kernel: int, stride: int, padding: int, dilation: int) -> int:
    """The output length of ``F.conv2d`` along one axis."""
    return (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1
