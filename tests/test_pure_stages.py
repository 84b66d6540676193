"""Render, compose and the campaign model are pure stages: nothing they import, directly or
through another module of ours, reaches the store, the transport, dispatch or the scheduler."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "mailer"
PURE = ("mailer.render", "mailer.compose", "mailer.campaign")
IMPURE = ("mailer.store", "mailer.transport", "mailer.dispatch", "mailer.relay",
          "mailer.workers", "mailer.scheduler", "mailer.jobs", "mailer.leader",
          "mailer.schedule_view", "mailer.quota", "mailer.capture")


def module_file(name: str) -> Path | None:
    parts = name.split(".")[1:]
    if not parts:
        return PACKAGE / "__init__.py"
    rel = Path(*parts)
    for path in (PACKAGE / rel.with_suffix(".py"), PACKAGE / rel / "__init__.py"):
        if path.exists():
            return path
    return None


def imports_of(name: str) -> set[str]:
    """Every module of ours that `name` imports, at module level or inside a function."""
    path = module_file(name)
    assert path is not None, name
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("mailer"))
        elif isinstance(node, ast.ImportFrom):
            base = package
            for _ in range(node.level - 1):
                base = base.rpartition(".")[0]
            target = f"{base}.{node.module}" if node.level and node.module else (
                base if node.level else node.module or "")
            if not target.startswith("mailer"):
                continue
            found.add(target)
            for alias in node.names:  # `from . import htmlcraft` names a module
                if module_file(f"{target}.{alias.name}") is not None:
                    found.add(f"{target}.{alias.name}")
    return {m for m in found if module_file(m) is not None}


def reachable(start: str) -> dict[str, str]:
    """Each module reachable from `start`, with the module that imports it."""
    seen: dict[str, str] = {start: ""}
    todo = [start]
    while todo:
        current = todo.pop()
        for target in imports_of(current):
            if target not in seen:
                seen[target] = current
                todo.append(target)
    return seen


def test_pure_stages_reach_no_store_transport_or_dispatch() -> None:
    for stage in PURE:
        found = reachable(stage)
        bad = {m: via for m, via in found.items() if m.startswith(IMPURE)}
        assert bad == {}, f"{stage} reaches {bad} (module: imported by)"


def test_the_check_sees_imports_inside_functions_too() -> None:
    # dispatch imports relay at module level and sending imports workers inside a function:
    # if the walk missed either kind, the test above could pass for the wrong reason.
    assert "mailer.relay" in reachable("mailer.dispatch")
    assert "mailer.workers" in imports_of("mailer.sending")
    assert "mailer.htmlcraft" in imports_of("mailer.render")  # `from . import htmlcraft`
