"""Checkpoints written atomically and read back with clear errors.

A checkpoint is written to a temporary file in the same folder, flushed to disk, then renamed over the
target (``os.replace`` is atomic on POSIX), so an interrupted or failed write never damages the last good
checkpoint. A process killed while saving leaves its ``.tmp-*.pt`` file; a run removes them when it starts
(:func:`dynconv.recipes.run_dir.remove_stale_temporaries`). Loading never runs pickled code
(``weights_only=True``), and a file that is not a dynconv checkpoint gets a :class:`CheckpointError` in
dynconv's words (never torch's advice to load it unsafely).
"""

from __future__ import annotations

import os
import tempfile
from typing import Any

import torch

FORMAT = "dynconv-checkpoint-v1"


class CheckpointError(RuntimeError):
    """A checkpoint is missing, unreadable or not a dynconv checkpoint."""


def save_checkpoint(path: str, state: dict[str, Any]) -> None:
    """Write ``state`` (plus a format tag) to ``path`` atomically."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".pt", dir=folder)
    try:
        os.fchmod(fd, 0o644)  # mkstemp makes the file private (0600); a checkpoint is an ordinary file
        with os.fdopen(fd, "wb") as fh:
            torch.save({"format": FORMAT, **state}, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def load_checkpoint(path: str, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_checkpoint`; raises :class:`CheckpointError` saying what is wrong."""
    if os.path.isdir(path):
        raise CheckpointError(f"checkpoint {path!r} is a folder; give the file (a run's is RUN_DIR/last.pt)")
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint {path!r} does not exist")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)  # no pickled code is run
    except Exception as exc:  # torch raises several types for truncated or foreign files
        # torch's own message advises retrying with weights_only=False, which runs whatever code the file holds:
        # never pass that on. Say what is wrong in dynconv's terms instead.
        if "Weights only load failed" in str(exc) and "Unsupported global" in str(exc):
            why = "it holds pickled Python objects besides tensors (a safe load refuses them)"
        else:
            why = "it is truncated, corrupted or not a torch file"
        raise CheckpointError(f"checkpoint {path!r} cannot be read: {why}; it is not a dynconv checkpoint") from exc
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"checkpoint {path!r} is not a dynconv checkpoint (no {FORMAT!r} tag)")
    return state
