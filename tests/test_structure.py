"""The package's shape: no module of `mailer` imports itself back in a circle, and the modules
of `mailer.web` not even through an import deferred into a function.

The graph is read from the source (ast), not from an interpreter's import order: an edge is an
import of another `mailer` module at module level (class bodies and `try`/`if` blocks included;
not `if TYPE_CHECKING:` blocks, they do not run), and with `deferred=True` also one inside a
function. `from pkg import name` counts as an import of `pkg.name` when that is a module, else
of `pkg`. The parent packages Python imports first are not edges.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "mailer"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports(body: list[ast.stmt], *, deferred: bool) -> Iterator[ast.Import | ast.ImportFrom]:
    for node in body:
        if isinstance(node, ast.Import | ast.ImportFrom):
            yield node
        elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            if deferred:
                yield from (n for n in ast.walk(node) if isinstance(n, ast.Import | ast.ImportFrom))
        elif isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            yield from imports(node.orelse, deferred=deferred)
        else:
            for field in ("body", "orelse", "finalbody", "handlers"):
                children = getattr(node, field, None)
                if isinstance(children, list):
                    stmts = [c for c in children if isinstance(c, ast.stmt)]
                    stmts += [s for h in children if isinstance(h, ast.ExceptHandler)
                              for s in h.body]
                    yield from imports(stmts, deferred=deferred)


def import_graph(*, deferred: bool = False) -> dict[str, set[str]]:
    files = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {name: set() for name in files}
    for name, path in files.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in imports(tree.body, deferred=deferred):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            else:
                if node.level:
                    base = package.split(".")
                    base = base[: len(base) - node.level + 1]
                    origin = ".".join(base + ([node.module] if node.module else []))
                else:
                    origin = node.module or ""
                targets = [f"{origin}.{alias.name}" if f"{origin}.{alias.name}" in files
                           else origin for alias in node.names]
            graph[name].update(t for t in targets if t in files and t != name)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_graph_sees_the_web_modules_imports() -> None:
    graph = import_graph()
    assert "mailer.web.common" in graph["mailer.web.pages"]
    assert "mailer.web.archive" in graph["mailer.web.pages"]  # `from . import archive`
    assert {"mailer.web.pages", "mailer.web.ops"} <= graph["mailer.web.app"]
    assert graph["mailer.web"] == {"mailer.web.app"}
    assert "mailer.relay" not in graph["mailer.web.app"]
    assert "mailer.relay" in import_graph(deferred=True)["mailer.web.app"]  # in the lifespan


def test_no_module_level_import_cycle() -> None:
    assert cycles(import_graph()) == []


def test_no_import_cycle_even_through_imports_deferred_into_functions() -> None:
    """An import moved into a function dodges a cycle at import time but keeps it: not here."""
    assert cycles(import_graph(deferred=True)) == []


def test_the_graph_sees_imports_deferred_into_functions() -> None:
    graph = import_graph(deferred=True)
    assert "mailer.workers" in graph["mailer.sending"]  # inside send_run
    assert "mailer.workers" not in import_graph()["mailer.sending"]


def test_only_the_package_imports_the_app_module() -> None:
    graph = import_graph(deferred=True)
    importers = sorted(name for name, targets in graph.items() if "mailer.web.app" in targets)
    assert importers == ["mailer.web"]
