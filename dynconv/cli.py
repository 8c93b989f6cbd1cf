"""The ``dynconv`` command.

    dynconv bench NAME [options]            operator benchmarks (NAME: see ``dynconv bench --help``)
    dynconv train|eval|predict TASK [...]   recipes (TASK: see ``dynconv train --help``)
    dynconv demo [--out DIR] [--steps N]    what ``make demo`` runs: DFN video prediction, then the operators
    dynconv check-kernels [--arch 90]       compile every Triton kernel variant for a GPU, no GPU needed

Recipes own their options: everything after ``TASK`` is handed to the recipe's
``main(command, argv)``, so ``dynconv train TASK --help`` lists them.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys
import traceback

from dynconv.bench import BENCHMARKS
from dynconv.errors import UserError
from dynconv.recipes.args import device, positive_int
from dynconv.recipes.checkpoint import CheckpointError

RECIPES = {
    "video-prediction": "dynconv.recipes.video_prediction",
    "classification": "dynconv.recipes.classification",
    "video-segmentation": "dynconv.recipes.video_segmentation",
}


def _import(table: dict[str, str], name: str, what: str):
    try:
        return importlib.import_module(table[name])
    except ModuleNotFoundError as exc:
        if exc.name == table[name]:
            raise UserError(f"the {what} {name!r} is not implemented yet") from None
        raise


def _recipe_list(command: str) -> str:
    """``dynconv train --help``: the tasks, each with the first line of its recipe's docstring."""
    lines = [f"usage: dynconv {command} TASK [options]   ('dynconv {command} TASK --help' lists a task's options)", ""]
    lines.append("tasks:")
    for task, module_name in sorted(RECIPES.items()):
        if importlib.util.find_spec(module_name) is None:
            summary = "(not implemented yet)"
        else:
            doc = importlib.import_module(module_name).__doc__ or ""
            summary = doc.strip().splitlines()[0] if doc.strip() else ""
        lines.append(f"  {task:<20} {summary}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Run the command; a user's mistake (:class:`UserError`, a bad checkpoint) is one line on stderr, exit 2."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    if debug:
        argv.remove("--debug")
    try:
        return _main(argv)
    except (UserError, CheckpointError) as exc:
        if debug:
            traceback.print_exc()
        print(f"dynconv: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if debug:
            traceback.print_exc()
        print("dynconv: interrupted", file=sys.stderr)
        return 130


def _main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="dynconv",
        description="dynamic convolution: benchmarks and recipes",
        epilog="--debug anywhere on the line shows the traceback of a user error too",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    bench = sub.add_parser("bench", help="operator benchmarks")
    bench_sub = bench.add_subparsers(dest="name", required=True)
    for name in BENCHMARKS:
        p = bench_sub.add_parser(name, help=f"benchmark {name}")
        p.add_argument("--device", type=device, default="cpu")
        p.add_argument("--repeats", type=positive_int, default=10, help="timed runs per measurement (median)")
        p.add_argument("--output", help="also write the markdown table to this file, row by row as measured")
        p.set_defaults(_bench=name)

    for command in ("train", "eval", "predict", "compare"):
        p = sub.add_parser(command, help=f"{command} a recipe", add_help=False)
        p.add_argument("task", choices=sorted(RECIPES))
        p.add_argument("rest", nargs=argparse.REMAINDER)

    demo = sub.add_parser("demo", help="the demonstration that 'make demo' runs")
    demo.add_argument("--out", default="demo_out")
    demo.add_argument(
        "--steps",
        type=positive_int,
        default=60,
        help="training steps of the DFN video demo (about 5 s each on 2 CPU cores)",
    )
    demo.add_argument("--operators-only", action="store_true", help="skip the video-prediction training")

    # 'dynconv train --help' (or no task): the recipe subparsers hand everything after TASK to the recipe, so
    # they cannot have their own --help; list the tasks here.
    if argv and argv[0] in ("train", "eval", "predict") and (len(argv) == 1 or argv[1] in ("-h", "--help")):
        asked = len(argv) > 1
        print(_recipe_list(argv[0]), file=sys.stdout if asked else sys.stderr)
        return 0 if asked else 2

    # check-kernels owns its options (dynconv/check_kernels.py): listed here, parsed there.
    sub.add_parser("check-kernels", help="compile every Triton kernel variant for a GPU (no GPU needed)")
    if argv[:1] == ["check-kernels"]:
        from dynconv import check_kernels as check_module

        return check_module.main(argv[1:])

    # Benchmarks add their own options; parse in two passes so 'dynconv bench NAME --help' shows them.
    if len(argv) >= 2 and argv[0] == "bench" and argv[1] in BENCHMARKS:
        module = _import(BENCHMARKS, argv[1], "benchmark")
        module.add_arguments(bench_sub.choices[argv[1]])
    args = parser.parse_args(argv)

    if args.command == "bench":
        # Each row is printed (and appended to --output) as soon as it is measured: a run stopped by a time
        # limit keeps what it measured.
        args.stream = sys.stdout
        _import(BENCHMARKS, args.name, "benchmark").run(args)
        return 0
    if args.command in ("train", "eval", "predict", "compare"):
        return _import(RECIPES, args.task, "recipe").main(args.command, args.rest) or 0
    if args.command == "demo":
        from dynconv import demo as demo_module

        return demo_module.main(args.out, args.steps, args.operators_only) or 0
    return 1


if __name__ == "__main__":
    raise SystemExit(main())
