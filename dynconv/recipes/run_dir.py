"""The run folder of a training recipe: which checkpoint a run starts from, its training log, its output files.

Every recipe uses the same four pieces, so that a run folder behaves the same whatever the task:

- :func:`resume_from` decides whether a ``train`` command continues ``RUN_DIR/last.pt``, starts a new run,
  or refuses (a typo in ``--run-dir`` must not silently start a new run, nor a forgotten ``--resume``
  overwrite one);
- :func:`remove_stale_temporaries` deletes the ``.tmp-*.pt`` files that a kill during
  :func:`~dynconv.recipes.checkpoint.save_checkpoint` leaves behind;
- :class:`TrainingLog` appends ``log.jsonl`` rows and, when a run resumes at step ``s``, first drops the rows
  after ``s`` (written after the checkpoint, then lost with the process), so every step appears once;
- :func:`write_json` / :func:`write_text` write output files atomically (a kill never leaves half a file);
- :func:`flags_given` and :func:`resumed_config` give a ``--resume`` the run's own config (saved in its
  checkpoint) with the flags given again changing it.
"""

from __future__ import annotations

import argparse
import dataclasses
import glob
import json
import os
import sys
import tempfile
from collections.abc import Callable
from typing import Any, TypeVar

from dynconv.errors import UserError
from dynconv.recipes.args import device

CHECKPOINT = "last.pt"
LOG = "log.jsonl"

C = TypeVar("C")


def resume_from(run_dir: str, resume: bool, resume_if_exists: bool = False) -> str | None:
    """The checkpoint a ``train`` command continues, or ``None`` for a new run.

    Args:
        run_dir: the run folder (``--run-dir``).
        resume: ``--resume``: ``RUN_DIR/last.pt`` must exist.
        resume_if_exists: ``--resume-if-exists``: continue ``RUN_DIR/last.pt`` if it exists, else start a new
            run (for job scripts that run the same command until the run is done).

    Raises:
        UserError: ``run_dir`` is a file, ``last.pt`` exists and neither flag is given, or ``--resume`` is given
            and it does not exist.
    """
    if os.path.exists(run_dir) and not os.path.isdir(run_dir):
        raise UserError(f"--run-dir {run_dir} is a file; give a folder (it is created if missing)")
    path = os.path.join(run_dir, CHECKPOINT)
    exists = os.path.isfile(path)
    if exists and (resume or resume_if_exists):
        return path
    if exists:
        raise UserError(f"{path} exists: pass --resume to continue that run, or choose another --run-dir")
    if resume:
        hint = " (the folder does not exist)" if not os.path.isdir(run_dir) else ""
        raise UserError(
            f"--resume: nothing to resume in --run-dir {run_dir}: it holds no last.pt{hint}; check the path, or leave "
            "out --resume to start a new run (--resume-if-exists does either)"
        )
    return None


def remove_stale_temporaries(folder: str) -> list[str]:
    """Delete the ``.tmp-*.pt`` and ``.tmp-*.txt`` files in ``folder`` (left by a process killed while saving a
    checkpoint or writing an output file with :func:`write_text`).

    Call it once when a run starts, on the process that writes the checkpoints, before its first save: a
    temporary file is only ever open while that process saves. Returns the paths removed.
    """
    removed = []
    pattern = os.path.join(glob.escape(folder), ".tmp-*")
    for path in sorted(p for p in glob.glob(pattern) if p.endswith((".pt", ".txt"))):
        try:
            os.unlink(path)
            removed.append(path)
        except FileNotFoundError:
            pass
    return removed


def read_log(path: str) -> list[dict]:
    """The rows of a ``log.jsonl``: a line that is not a JSON object (the last line of a process killed while
    writing it) is skipped. Missing file: ``[]``."""
    rows = []
    if not os.path.isfile(path):
        return rows
    with open(path) as fh:
        for line in fh:
            try:
                row = json.loads(line)
            except ValueError:
                continue
            if isinstance(row, dict) and isinstance(row.get("step"), int):
                rows.append(row)
    return rows


class TrainingLog:
    """``log.jsonl`` of a run that starts (or resumes) at step ``start``: one JSON object per step, ``"step"``
    counted from 1.

    Opening it keeps the rows of steps ``<= start`` (the checkpoint's past, once each, the last written
    winning) and drops the rest: rows after the checkpoint that a killed or time-limited process wrote
    before dying, a finished run's rows when a new run starts in the same folder (``start`` 0), and a
    half-written last line.

    Args:
        path: the ``log.jsonl`` file.
        start: the step the run continues from (0 for a new run).
        enabled: ``False`` on the processes that do not write (every rank but 0 under ``torchrun``).
    """

    def __init__(self, path: str, start: int, enabled: bool = True):
        self.path, self.enabled = path, enabled
        kept: dict[int, dict] = {}
        for row in read_log(path):
            if row["step"] <= start:
                kept[row["step"]] = row
        self.rows = [kept[s] for s in sorted(kept)]
        self._fh = None
        if enabled:
            write_text(path, "".join(json.dumps(r) + "\n" for r in self.rows))
            self._fh = open(path, "a")

    def write(self, row: dict[str, Any]) -> None:
        self.rows.append(row)
        if self._fh is not None:
            self._fh.write(json.dumps(row) + "\n")

    def last(self, key: str) -> Any:
        """The value of ``key`` in the last row that has it (this process's or an earlier one's), or ``None``."""
        for row in reversed(self.rows):
            if key in row:
                return row[key]
        return None

    def flush(self) -> None:
        if self._fh is not None:
            self._fh.flush()

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None


def write_text(path: str, text: str) -> None:
    """Write ``text`` to ``path`` atomically (a temporary file in the same folder, then a rename), creating the
    folder if needed. Raises :class:`UserError` naming ``path`` if it cannot be written."""
    if os.path.isdir(path):
        raise UserError(f"cannot write {path}: it is a folder; give a file name")
    folder = os.path.dirname(os.path.abspath(path))
    tmp = None
    try:
        os.makedirs(folder, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".txt", dir=folder)
        os.fchmod(fd, 0o644)
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
        os.replace(tmp, path)
    except OSError as exc:  # a user's path: an unwritable folder, a file where a folder should be, a full disk
        raise UserError(f"cannot write {path}: {exc.strerror or exc}") from exc
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)


def write_json(path: str, obj: Any) -> None:
    """Write ``obj`` as indented JSON to ``path`` atomically."""
    write_text(path, json.dumps(obj, indent=2) + "\n")


def flags_given(add_config_arguments: Callable[..., None], argv: list[str]) -> dict[str, Any]:
    """The config flags given on this command line, field name -> parsed value; a flag left out is absent.

    Args:
        add_config_arguments: the recipe's ``_add_config_arguments(parser, defaults)``, one flag per config field
            (``defaults=False`` leaves a flag not given out of the namespace).
        argv: the command line; flags that are not config fields (``--resume``, ...) are ignored.
    """
    flags = argparse.ArgumentParser(add_help=False)
    add_config_arguments(flags, defaults=False)
    return vars(flags.parse_known_args(argv)[0])


def resumed_config(
    given: C,
    saved: dict[str, Any],
    explicit: dict[str, Any],
    never_restored: tuple[str, ...] = (),
    old_defaults: dict[str, Any] | None = None,
) -> C:
    """The config a ``--resume`` continues with: the run's own values (``saved``, from its checkpoint), except the
    flags given on this command line (``explicit``, from :func:`flags_given`), which change them. Flags left out
    keep the run's values, not the defaults, so ``--run-dir DIR --resume`` alone continues the run as it was.
    ``run_dir`` is always the given one (wherever the run folder is now; a moved folder is listed among the
    changes). Rank 0 prints ``resuming with the run's config; changed: ...`` to stderr.

    Args:
        given: the config parsed from this command line (a dataclass instance).
        saved: the config saved in the checkpoint (``{}`` when it holds none).
        explicit: the flags given on this command line.
        never_restored: fields that belong to one invocation, not to the run (they keep ``given``'s value).
        old_defaults: values for fields that a checkpoint saved before they existed lacks.
    """
    names = {f.name for f in dataclasses.fields(given)}
    restored = {k: v for k, v in saved.items() if k in names and k not in explicit and k not in never_restored}
    for k, v in (old_defaults or {}).items():
        if saved and k not in saved and k not in explicit:
            restored[k] = v
    values = {**dataclasses.asdict(given), **restored}
    values["run_dir"] = given.run_dir
    if "device" in restored:  # from the checkpoint, past argparse's check: a GPU run resumed on a machine without one
        try:
            device(restored["device"])
        except argparse.ArgumentTypeError as e:
            raise UserError(f"--device (the run's, from its checkpoint): {e}; pass --device for this one") from None
    changed = [f"{k} {saved[k]!r} -> {v!r}" for k, v in values.items() if k in saved and saved[k] != v]
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"resuming with the run's config{'; changed: ' + ', '.join(changed) if changed else ''}", file=sys.stderr)
    return type(given)(**values)
