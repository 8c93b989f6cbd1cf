"""Checkpoints trained by dynconv's recipes that ship inside the package, usable by name wherever a recipe takes
``--checkpoint`` (``dynconv predict video-prediction --checkpoint dfn-moving-mnist``).

Each ``NAME.pt`` (a checkpoint of :mod:`dynconv.recipes.checkpoint`, weights only) has a ``NAME.json`` beside
it with the training config, the device and budget, the training log and the evaluation it reached.
"""

from __future__ import annotations

import os

__all__ = ["SHIPPED", "available", "describe_missing", "path_of", "resolve"]

_HERE = os.path.dirname(os.path.abspath(__file__))

#: name -> what it is (the file is ``NAME.pt`` in this folder)
SHIPPED = {
    "dfn-moving-mnist": "DFN video predictor (the paper's Moving MNIST model), trained on the embedded digits",
}


def path_of(name: str) -> str:
    return os.path.join(_HERE, name + ".pt")


def available() -> list[str]:
    """The shipped names whose file is present (a source checkout may lack a large file)."""
    return [name for name in SHIPPED if os.path.isfile(path_of(name))]


def resolve(path_or_name: str) -> str:
    """A path that exists is returned as it is; a shipped name becomes its file; anything else is returned as it
    is, so that loading it reports the missing file (see :func:`describe_missing`)."""
    if os.path.exists(path_or_name) or path_or_name not in SHIPPED:
        return path_or_name
    return path_of(path_or_name)


def describe_missing(path_or_name: str) -> str:
    names = ", ".join(available()) or "none in this installation"
    return f"checkpoint {path_or_name!r} is neither a file nor a shipped checkpoint (shipped: {names})"
