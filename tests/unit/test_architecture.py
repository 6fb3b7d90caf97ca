"""The shape of the code, read from its imports (ast): core knows no task, no monitoring and no
protocol layer; no import cycles; no private name imported across modules; no framework internals."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

APP = Path(__file__).resolve().parents[2] / "app"
LAYERS_CORE_MUST_NOT_IMPORT = ("app.monitoring", "app.tasks", "app.openinference", "app.web")
STARLETTE_PRIVATE = ("_body", "_stream_consumed", "_is_disconnected", "_form", "_json", "_receive", "_send")


def module_name(path: Path) -> str:
    parts = path.relative_to(APP.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, ast.Module]:
    return {module_name(p): ast.parse(p.read_text(), str(p)) for p in sorted(APP.rglob("*.py"))}


def imports(name: str, tree: ast.Module, known: set[str]) -> list[tuple[str, list[str], int]]:
    """(imported module, names taken from it, line) for every import anywhere in ``tree`` that names a
    module of the app; ``from package import module`` counts as importing the module."""
    package = name if name in {m for m in known if any(k.startswith(m + ".") for k in known)} else name.rsplit(".", 1)[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(a.name, [], node.lineno) for a in node.names if a.name.startswith("app")]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - node.level + 1]
                target = ".".join([*base, node.module] if node.module else base)
            else:
                target = node.module or ""
            if not target.startswith("app"):
                continue
            names = [a.name for a in node.names]
            submodules = [f"{target}.{n}" for n in names if f"{target}.{n}" in known]
            found += [(m, [], node.lineno) for m in submodules]
            taken = [n for n in names if f"{target}.{n}" not in known]
            if taken or not submodules:
                found.append((target, taken, node.lineno))
    return found


@pytest.fixture(scope="module")
def graph() -> dict[str, list[tuple[str, list[str], int]]]:
    trees = modules()
    known = set(trees)
    return {name: imports(name, tree, known) for name, tree in trees.items()}


def test_core_imports_no_task_no_monitoring_and_no_protocol_layer(graph):
    wrong = [f"{module}:{line} imports {target}" for module, found in graph.items() if module.startswith("app.core")
             for target, _, line in found if target.startswith(LAYERS_CORE_MUST_NOT_IMPORT)]
    assert wrong == []


def test_no_import_cycles(graph):
    edges = {m: sorted({t for t, _, _ in found if t in graph and t != m}) for m, found in graph.items()}
    cycles, state = [], {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = "open"
        for nxt in edges[node]:
            if state.get(nxt) == "open":
                cycles.append(" -> ".join(path[path.index(nxt):] + [nxt]))
            elif nxt not in state:
                visit(nxt, [*path, nxt])
        state[node] = "done"

    for node in edges:
        if node not in state:
            visit(node, [node])
    assert cycles == []


def test_no_private_name_is_imported_from_another_module(graph):
    wrong = [f"{module}:{line} imports {target}.{name}" for module, found in graph.items()
             for target, names, line in found for name in names
             if name.startswith("_") and not name.startswith("__")]
    assert wrong == []


def test_no_class_is_swapped_and_no_framework_internals_are_written():
    wrong = []
    for path in sorted(APP.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            targets = node.targets if isinstance(node, ast.Assign) else \
                [node.target] if isinstance(node, ast.AugAssign | ast.AnnAssign) else []
            for target in targets:
                if isinstance(target, ast.Attribute) and (
                        target.attr == "__class__" or target.attr in STARLETTE_PRIVATE):
                    wrong.append(f"{path.relative_to(APP.parent)}:{node.lineno} assigns .{target.attr}")
    assert wrong == []


def test_the_checks_see_the_code(graph):
    """The walk finds the app's modules and their imports (a broken walk would pass everything)."""
    assert {"app.main", "app.core.pipeline", "app.core.middleware", "app.monitoring.store"} <= set(graph)
    assert any(t == "app.core.pipeline" for t, _, _ in graph["app.main"])
