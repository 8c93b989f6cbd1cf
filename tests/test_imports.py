"""The import graph of dynconv: arrows run down (functional -> ops -> kernels -> _launch and neutral helpers), with no
circle, so a kernel module can be read, imported and tested without the autograd layer above it."""

from __future__ import annotations

import ast
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "dynconv"
# All a kernel module may import of dynconv: the kernel package itself and the neutral torch-only helpers. Anything
# else (ops, functional, backends, nn, bench, recipes...) stands above the kernels: importing it is an arrow back up.
KERNELS_MAY_IMPORT = ("dynconv.kernels", "dynconv._columns", "dynconv._cache")


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _imports(path: Path, name: str, known: set[str]) -> set[str]:
    """dynconv modules that ``path`` imports anywhere in its body (lazy imports inside functions included).
    ``from pkg import mod`` counts as importing ``pkg.mod`` (not the package ``pkg`` it stands in)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            for alias in node.names:
                full = f"{base}.{alias.name}"
                out.add(full if full in known else base)
    return {m for m in out if m in known and m != "dynconv" and m != name}


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    known = set(modules)
    return {name: _imports(path, name, known) for name, path in modules.items()}


def _cycle(graph: dict[str, set[str]], nodes: set[str]) -> list[str] | None:
    """One import circle among ``nodes`` (a list of modules, the first repeated at the end), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(n: str) -> list[str] | None:
        state[n] = 1
        path.append(n)
        for m in sorted(graph[n] & nodes):
            if state.get(m) == 1:
                return path[path.index(m) :] + [m]
            if m not in state and (found := visit(m)):
                return found
        path.pop()
        state[n] = 2
        return None

    for n in sorted(nodes):
        if n not in state and (found := visit(n)):
            return found
    return None


def test_no_import_circle_among_kernels_and_ops():
    graph = _graph()
    layer = {m for m in graph if m.startswith(("dynconv.kernels", "dynconv.ops"))} | {"dynconv._columns"}
    layer &= set(graph)
    assert len(layer) >= 10  # the test reads the real package (both folders), not an empty one
    assert _cycle(graph, layer) is None, f"import circle: {' -> '.join(_cycle(graph, layer))}"


def test_kernels_import_nothing_above_them():
    graph = _graph()
    kernels = sorted(m for m in graph if m.startswith("dynconv.kernels"))
    assert "dynconv.kernels.deform" in kernels
    back_up = {k: sorted(m for m in graph[k] if not m.startswith(KERNELS_MAY_IMPORT)) for k in kernels}
    assert not {k: v for k, v in back_up.items() if v}, f"kernel modules importing a layer above: {back_up}"


def test_cycle_finder_finds_a_circle():
    # The checker itself must be able to fail: a two-module circle like the one kernels/deform <-> ops/deform was.
    graph = {"a": {"b"}, "b": {"a", "c"}, "c": set()}
    assert _cycle(graph, set(graph)) == ["a", "b", "a"]
    assert _cycle({"a": {"b"}, "b": set()}, {"a", "b"}) is None


def test_kernel_modules_import_with_the_layers_above_blocked():
    """What the static graph cannot see (an import built at run time) shows here: every kernel module imports in a
    fresh interpreter where importing any other part of dynconv raises."""
    script = textwrap.dedent(
        f"""
        import importlib, importlib.abc, sys

        class Block(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name.startswith("dynconv.") and not name.startswith({KERNELS_MAY_IMPORT!r}):
                    raise ImportError("blocked: " + name)
                return None

        # dynconv/__init__.py imports the whole library: stand an empty package in for it.
        package = type(sys)("dynconv")
        package.__path__ = [{str(PACKAGE)!r}]
        sys.modules["dynconv"] = package
        sys.meta_path.insert(0, Block())
        for name in ("_launch", "deform", "dcnv", "warp", "local_filter"):
            importlib.import_module("dynconv.kernels." + name)
        print("ok")
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=120,
        env={"TRITON_INTERPRET": "1", "PATH": "/usr/bin:/bin"},
    )
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-2000:]
