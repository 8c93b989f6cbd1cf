"""Operator benchmarks behind ``dynconv bench NAME``.

Each benchmark is a module with ``add_arguments(parser)`` and ``run(args) -> str`` (a markdown table).
Modules are imported lazily, so one that needs an optional package fails only when it is asked for.
"""

BENCHMARKS = {
    "local_filter": "dynconv.bench.local_filter",
    "mixture": "dynconv.bench.mixture",
    "deform": "dynconv.bench.deform",
    "dcnv": "dynconv.bench.dcnv",
    "warp": "dynconv.bench.warp",
}
