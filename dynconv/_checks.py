"""Argument normalisation and validation shared by every public op.

Every check raises ``ValueError`` or ``TypeError`` whose message names the argument, what it got and
what was expected, so a user never has to read a stack trace to find the wrong tensor.
"""

from __future__ import annotations

import functools
import inspect
import operator
from collections.abc import Callable, Sequence

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def as_int(value: object, name: str, *, minimum: int | None = None) -> int:
    """``value`` as a Python int, accepting what ``F.conv2d`` accepts for one: an int, a numpy integer or a
    one-element integer tensor (anything with ``__index__``), but not a bool or a float.

    Raises:
        TypeError: ``value`` is not an integer (a bool, a float, a string, a tensor of several elements...).
        ValueError: ``value < minimum``.
    """
    if isinstance(value, bool) or (isinstance(value, torch.Tensor) and value.dtype == torch.bool):
        raise TypeError(f"{name} must be an int, got {value!r}")
    try:
        out = operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an int, got {value!r} of type {type(value).__name__}") from None
    if minimum is not None and out < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value!r}")
    return out


def pair(value: int | Sequence[int], name: str, *, minimum: int = 1) -> tuple[int, int]:
    """Normalise ``value`` to a pair of Python ints, checking each entry is ``>= minimum``.

    Accepts what ``F.conv2d`` accepts for ``stride``/``padding``/``dilation``: an int (or a numpy integer, or a
    one-element integer tensor), or a sequence of one or two of them (one is used for both axes).
    """
    try:
        if isinstance(value, Sequence) and not isinstance(value, str):
            if len(value) not in (1, 2):
                raise TypeError
            out = (as_int(value[0], name), as_int(value[-1], name))
        else:
            out = (as_int(value, name),) * 2
    except TypeError:
        raise TypeError(f"{name} must be an int or a pair of ints, got {value!r}") from None
    if min(out) < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value!r}")
    return out


PADDING_STRINGS = ("valid", "same")


def conv_padding(
    padding: int | Sequence[int] | str,
    kernel_size: tuple[int, int],
    stride: tuple[int, int],
    dilation: tuple[int, int],
) -> tuple[tuple[int, int], tuple[int, int]]:
    """``padding`` as ``F.conv2d`` takes it: an int or a pair, ``"valid"`` (none) or ``"same"`` (stride 1 only).

    Returns:
        ``((ph, pw), (extra_h, extra_w))``: the padding on each side and, for ``"same"`` with an odd
        ``dilation * (kernel_size - 1)``, one more row/column at the bottom/right (where ``F.conv2d`` puts it),
        which the caller pads the input with (``F.pad``) before the op.
    """
    if not isinstance(padding, str):
        return pair(padding, "padding", minimum=0), (0, 0)
    if padding == "valid":
        return (0, 0), (0, 0)
    if padding != "same":
        raise ValueError(f"padding must be an int, a pair of ints, 'valid' or 'same', got {padding!r}")
    if stride != (1, 1):
        raise ValueError(f"padding='same' needs stride 1 (as in F.conv2d), got stride {stride}")
    total = tuple(d * (k - 1) for k, d in zip(kernel_size, dilation))
    return (total[0] // 2, total[1] // 2), (total[0] % 2, total[1] % 2)


def layer_padding(
    padding: int | Sequence[int] | str, kernel_size: tuple[int, int], stride: tuple[int, int], dilation: tuple[int, int]
) -> tuple[int, int] | str:
    """A layer's ``padding`` argument as it stores it: a pair, or ``"valid"``/``"same"`` (checked now, so a bad one
    fails when the layer is built, as in ``nn.Conv2d``)."""
    conv_padding(padding, kernel_size, stride, dilation)
    return padding if isinstance(padding, str) else pair(padding, "padding", minimum=0)


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
            # Devices without autocast (meta, for shape propagation) make torch.is_autocast_enabled raise.
            if (
                not isinstance(first, torch.Tensor)
                or not torch.amp.is_autocast_available(first.device.type)
                or not torch.is_autocast_enabled(first.device.type)
            ):
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
