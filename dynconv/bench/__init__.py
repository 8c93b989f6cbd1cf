"""Operator benchmarks behind ``dynconv bench NAME``.

Each benchmark is a module with ``add_arguments(parser)`` and ``run(args) -> str`` (a markdown table). ``run``
writes its table through a :class:`dynconv.bench.report.Report`: each row to ``args.stream`` (the command passes
``sys.stdout``) and appended to ``args.output`` as soon as it is measured, so a run cut by a time limit keeps what it
measured; a candidate that cannot run is a row saying why. Modules are imported lazily, so one that needs an
optional package fails only when it is asked for.
"""

BENCHMARKS = {
    "local_filter": "dynconv.bench.local_filter",
    "mixture": "dynconv.bench.mixture",
    "deform": "dynconv.bench.deform",
    "dcnv": "dynconv.bench.dcnv",
    "warp": "dynconv.bench.warp",
}
