"""The table a benchmark writes as it measures, and the parsing of the options every benchmark shares.

A :class:`Report` prints its header as soon as it is made and each row as soon as it is added (flushed), to the
console and appended to the ``--output`` file, so a run stopped by a time limit keeps every row it measured.
A candidate that could not run is a row too, saying why, in the last column (``note``).
"""

from __future__ import annotations

import math
from typing import TextIO

import torch

from dynconv.bench.timing import Measurement
from dynconv.errors import UserError

DTYPES = ("float32", "bfloat16", "float16", "float64")


def format_cell(value: object) -> str:
    """A table cell: floats to 3 significant digits (whole numbers from 100 on), nan as ``-`` (not measured);
    text with its ``|`` escaped and on one line, so a message cannot break the table."""
    if isinstance(value, float):
        if math.isnan(value):
            return "-"
        return f"{value:.3g}" if abs(value) < 100 else f"{value:.0f}"
    return " ".join(str(value).split()).replace("|", "\\|")


def format_row(cells: list[object]) -> str:
    return "| " + " | ".join(format_cell(v) for v in cells) + " |"


class Report:
    """A markdown table written as it is measured.

    Args:
        header: the column names; a last column ``note`` is added for what a row needs to say (a candidate
            that could not run, a timing that fell back).
        note: a line printed above the table (the device, the geometry).
        stream: where each line is printed and flushed as it comes (``None``: nowhere; the ``dynconv bench``
            command passes ``sys.stdout``).
        output: a file that gets the same lines: emptied when the report starts, then appended to line by line.
    """

    def __init__(self, header: list[str], note: str = "", stream: TextIO | None = None, output: str | None = None):
        self.header = [*header, "note"]
        self.note = note
        self.rows: list[list[object]] = []
        self.footnotes: list[str] = []
        self.stream, self.output = stream, output
        if output:
            try:
                open(output, "w").close()
            except OSError as exc:
                raise UserError(f"--output {output}: cannot write it ({exc.strerror})") from None
        head = [note, ""] if note else []
        self._emit(head + [format_row(self.header), "|" + "|".join("---" for _ in self.header) + "|"])

    @classmethod
    def from_args(cls, args, header: list[str], note: str = "") -> Report:
        """A report to ``args.stream`` and ``args.output`` (either may be missing: a bench called from code)."""
        return cls(header, note, getattr(args, "stream", None), getattr(args, "output", None))

    def _emit(self, lines: list[str]) -> None:
        if self.stream is not None:
            for line in lines:
                print(line, file=self.stream, flush=True)
        if self.output:
            with open(self.output, "a") as fh:
                fh.write("".join(line + "\n" for line in lines))

    def row(self, cells: list[object], note: str = "") -> None:
        """Add, print and write one row (``cells`` without the note)."""
        cells = [*cells, note]
        if len(cells) != len(self.header):
            raise ValueError(f"a row of {len(cells)} cells for {len(self.header)} columns: {cells}")
        self.rows.append(cells)
        self._emit([format_row(cells)])

    def measured(self, cells: list[object], **measurements: Measurement) -> None:
        """Add a row of measured ``cells`` with the note :func:`row_note` writes for ``measurements``."""
        self.row(cells, row_note(**measurements))

    def failed(self, key: list[object], reason: str) -> None:
        """A row for a candidate that could not run: its ``key`` cells (shape, dtype, name), ``-`` in the
        measured columns and ``not run: reason`` in the note."""
        self.row([*key, *(["-"] * (len(self.header) - 1 - len(key)))], note="not run: " + reason)

    def footnote(self, text: str) -> None:
        """A line printed below the table when it is closed."""
        self.footnotes.append(text)

    def close(self) -> str:
        """Print the footnotes; the whole report as text (what ``run`` returns)."""
        if self.footnotes:
            self._emit([""] + self.footnotes)
        return self.text()

    def text(self) -> str:
        lines = [self.note, ""] if self.note else []
        lines += [format_row(self.header), "|" + "|".join("---" for _ in self.header) + "|"]
        lines += [format_row(r) for r in self.rows]
        if self.footnotes:
            lines += [""] + self.footnotes
        return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ columns


def time_header(cuda: bool) -> list[str]:
    """The time columns of a forward / forward+backward table: eager per-call ms, and on CUDA the kernel time by
    CUDA-graph replay beside it."""
    return ["fwd ms", "fwd+bwd ms"] + (["fwd graph ms", "fwd+bwd graph ms"] if cuda else [])


def time_cells(fwd: Measurement, both: Measurement, cuda: bool) -> list[float]:
    return [fwd.median_ms, both.median_ms] + ([fwd.graph_ms, both.graph_ms] if cuda else [])


def speedup(base: Measurement, m: Measurement) -> float:
    """``base``'s time over ``m``'s: by CUDA-graph replay when both have it, else eager (nan if either failed)."""
    if math.isfinite(base.graph_s) and math.isfinite(m.graph_s):
        return base.graph_s / m.graph_s
    return base.median_s / m.median_s


def row_note(**measurements: Measurement) -> str:
    """What a row must say about its measurements (``fwd=..., both=...``): failures and graph fallbacks."""
    labels = {"fwd": "fwd", "both": "fwd+bwd"}
    errors = {m.error for m in measurements.values()}
    if len(errors) == 1 and None not in errors:  # all failed alike: say it once
        return f"not run: {errors.pop()}"
    parts = []
    for key, m in measurements.items():
        label = labels.get(key, key)
        if m.error:
            parts.append(f"{label} not run: {m.error}")
        elif m.graph_error:
            parts.append(f"{label}: {m.graph_error}; eager time used")
    return "; ".join(parts)


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def timing_note(device: torch.device) -> str:
    """How the times of a table were taken (the line under the device)."""
    if device.type == "cuda":
        return (
            "ms: eager per call (median); graph ms: per call by CUDA-graph replay (the kernels alone); "
            "GB/s and speed-ups from the graph times where measured"
        )
    return "ms: per call (median of interleaved rounds)"


def device_note(device: torch.device, detail: str = "") -> str:
    """The note above a table: the device and ``detail`` (``"; ..."``), then how the times were taken."""
    return f"device: {device_name(device)}{detail}\n{timing_note(device)}"


# ------------------------------------------------------------------------------------------------ options


def parse_shapes(text: str, named: dict[str, list[tuple[int, ...]]], arity: int, form: str) -> list[tuple[int, ...]]:
    """``--shapes``: a name from ``named`` (``default``, ``small``, ``issue``, ...) or explicit shapes of ``arity``
    positive integers, ``form`` (e.g. ``'B,C,H,W'``), separated by ``;``."""
    text = text.strip()
    if text in named:
        return list(named[text])
    words = "', '".join(named)
    usage = f"--shapes: expected one of '{words}' or '{form};...' ({arity} positive integers each)"
    shapes = []
    for item in (i.strip() for i in text.split(";")):
        if not item:
            continue
        try:
            shape = tuple(int(v) for v in item.split(","))
        except ValueError:
            raise UserError(f"{usage}, got {text!r}") from None
        if len(shape) != arity or min(shape) < 1:
            raise UserError(f"{usage}, got {item!r}")
        shapes.append(shape)
    if not shapes:
        raise UserError(f"{usage}, got {text!r}")
    return shapes


def parse_dtypes(text: str) -> list[str]:
    """``--dtypes``: comma-separated torch dtype names."""
    names = [t.strip() for t in text.split(",") if t.strip()]
    bad = [n for n in names if n not in DTYPES]
    if bad or not names:
        raise UserError(f"--dtypes: expected a comma-separated list of {', '.join(DTYPES)}, got {text!r}")
    return names


def parse_common(args) -> tuple[list[str], list[str]]:
    """``--dtypes`` and ``--backends``, the options of every benchmark that times dynconv backends."""
    return parse_dtypes(args.dtypes), parse_list(args.backends, "--backends")


def parse_list(text: str, flag: str) -> list[str]:
    names = [t.strip() for t in text.split(",") if t.strip()]
    if not names:
        raise UserError(f"{flag}: expected a comma-separated list, got {text!r}")
    return names
