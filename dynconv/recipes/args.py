"""Argument checks shared by every recipe's command line, in one place.

Each check is an argparse ``type=``: it returns the parsed value or raises ``argparse.ArgumentTypeError``,
so a bad value is refused at parse time with argparse's message naming the flag (exit status 2), before any
data is read or any step is spent. :func:`recipe_parser` and :func:`config_from` are the recipes' common
parser and the config a parsed command line gives.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
from typing import TypeVar

C = TypeVar("C")


def recipe_parser(command: str, task: str, doc: str | None) -> argparse.ArgumentParser:
    """The parser of ``dynconv COMMAND TASK``, its help the recipe module's docstring ``doc`` as written."""
    return argparse.ArgumentParser(
        prog=f"dynconv {command} {task}", description=doc, formatter_class=argparse.RawDescriptionHelpFormatter
    )


def config_from(cls: type[C], namespace: argparse.Namespace) -> C:
    """The config dataclass ``cls`` with every field taken from the parsed flag of the same name."""
    return cls(**{f.name: getattr(namespace, f.name) for f in dataclasses.fields(cls)})


def _number(text: str, kind):
    try:
        value = kind(text)
    except (TypeError, ValueError):
        raise argparse.ArgumentTypeError(
            f"expected {'an integer' if kind is int else 'a number'}, got {text!r}"
        ) from None
    if kind is float and not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def _checked(text: str, kind, ok, expected: str):
    """``text`` parsed as ``kind`` (:func:`_number`), refused with "expected {expected}" unless ``ok(value)``."""
    value = _number(text, kind)
    if not ok(value):
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
    return value


def positive_int(text: str) -> int:
    """An integer >= 1 (batch sizes, step counts, intervals)."""
    return _checked(text, int, lambda v: v >= 1, "an integer >= 1")


def nonnegative_int(text: str) -> int:
    """An integer >= 0 (warm-up steps, seeds, indices)."""
    return _checked(text, int, lambda v: v >= 0, "an integer >= 0")


def positive_float(text: str) -> float:
    """A finite number > 0 (learning rates, time limits, temperatures)."""
    return _checked(text, float, lambda v: v > 0, "a number > 0")


def nonnegative_float(text: str) -> float:
    """A finite number >= 0 (weight decay, label smoothing)."""
    return _checked(text, float, lambda v: v >= 0, "a number >= 0")


def fraction(text: str) -> float:
    """A number in [0, 1) (label smoothing, dropout)."""
    return _checked(text, float, lambda v: 0 <= v < 1, "a number in [0, 1)")


def device(text: str) -> str:
    """A torch device that this machine has: ``cpu``, ``cuda``, ``cuda:1``, ``mps``."""
    import torch

    try:
        parsed = torch.device(text)
    except (RuntimeError, ValueError):
        raise argparse.ArgumentTypeError(f"expected a device such as cpu, cuda or cuda:0, got {text!r}") from None
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            raise argparse.ArgumentTypeError(f"{text!r}: this machine has no CUDA device (torch sees none); use cpu")
        if parsed.index is not None and parsed.index >= torch.cuda.device_count():
            raise argparse.ArgumentTypeError(f"{text!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif parsed.type == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise argparse.ArgumentTypeError(f"{text!r}: MPS is not available on this machine; use cpu")
    elif parsed.type not in ("cpu", "cuda", "mps"):
        raise argparse.ArgumentTypeError(f"expected cpu, cuda[:N] or mps, got {text!r}")
    return text


def existing_folder(text: str) -> str:
    """A path to a folder that exists (data folders: ``--frames-dir``, ``--mnist-dir``)."""
    if not os.path.isdir(text):
        what = "is a file, not a folder" if os.path.exists(text) else "does not exist"
        raise argparse.ArgumentTypeError(f"{text!r} {what}")
    return text


def existing_file(text: str) -> str:
    """A path to a file that exists (``--test-npy``)."""
    if not os.path.isfile(text):
        what = "is a folder, not a file" if os.path.isdir(text) else "does not exist"
        raise argparse.ArgumentTypeError(f"{text!r} {what}")
    return text


def existing_path(text: str) -> str:
    """A path to a file or a folder that exists (``predict --input``: an ``.npy`` or a folder of frames)."""
    if not os.path.exists(text):
        raise argparse.ArgumentTypeError(f"{text!r} does not exist")
    return text
