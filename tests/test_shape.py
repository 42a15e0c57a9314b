"""The house's shape limits on the package, read from its source: no model, milliseconds.

No module over 400 lines, no function over 60, no class over 300; no import
cycle between modules; and packages import downward only.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "vergeai"
# lowest first: a package may import only those before it (and itself)
LAYERS = ("errors", "gguf", "logs", "state", "auth", "limits", "runtime", "upstream", "room",
          "pool", "service", "api", "server", "cli", "__main__")  # fmt: skip


def modules() -> Iterator[tuple[str, ast.Module, int]]:
    for path in sorted(PACKAGE.rglob("*.py")):
        name = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        source = path.read_text()
        yield name.removesuffix(".__init__"), ast.parse(source), len(source.splitlines())


def imports(tree: ast.Module, names: set[str]) -> set[str]:
    """The package's modules a module imports (``from x import y`` may name module x.y)."""
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
    return found & names


def test_no_module_function_or_class_is_too_long() -> None:
    too_long = []
    for name, tree, lines in modules():
        if lines > 400:
            too_long.append(f"module {name}: {lines} lines")
        for node in ast.walk(tree):
            if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                continue
            size = (node.end_lineno or node.lineno) - node.lineno + 1
            if size > (300 if isinstance(node, ast.ClassDef) else 60):
                too_long.append(f"{type(node).__name__} {name}.{node.name}: {size} lines")
    assert too_long == []


def test_no_import_cycle_and_packages_import_downward() -> None:
    parsed = {name: tree for name, tree, _ in modules()}
    graph = {name: imports(tree, set(parsed)) - {name} for name, tree in parsed.items()}

    def layer(module: str) -> int:
        part = module.split(".")[1] if "." in module else ""
        return LAYERS.index(part) if part in LAYERS else -1  # vergeai itself: __version__

    upward = [f"{m} -> {d}" for m, deps in graph.items() for d in deps if layer(d) > layer(m)]
    assert upward == []
    cycles = []
    for start in graph:  # depth-first from each module, back to it
        stack = [(start, [start])]
        seen: set[str] = set()
        while stack:
            node, path = stack.pop()
            for dep in graph[node]:
                if dep == start:
                    cycles.append(" -> ".join([*path, dep]))
                elif dep not in seen:
                    seen.add(dep)
                    stack.append((dep, [*path, dep]))
    assert cycles == []
