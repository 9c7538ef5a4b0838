"""The package layout: no import cycle, ``engine`` never imports ``connectors``, and
``connectors`` uses only what ``engine`` exports.

The imports are read from the source (``ast``), lazy ones inside functions included, so a
cycle that only shows at run time is caught too.
"""

from __future__ import annotations

import ast
from pathlib import Path

import engine

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("engine", "connectors")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path) -> list[tuple[str, list[str]]]:
    """(module imported, names taken from it) for every import in ``path``, relative ones
    resolved."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out: list[tuple[str, list[str]]] = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(alias.name, []) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            names = [alias.name for alias in node.names]
            out.append((target, names))
            # ``from . import x`` / ``from engine import datasets``: x may be a module.
            out += [(f"{target}.{n}", []) for n in names if _is_module(f"{target}.{n}")]
    return out


def _is_module(name: str) -> bool:
    path = ROOT.joinpath(*name.split("."))
    return path.with_suffix(".py").exists() or (path / "__init__.py").exists()


def _graph() -> dict[str, dict[str, list[str]]]:
    """Module -> {imported module of ours -> names}, over engine/ and connectors/."""
    graph: dict[str, dict[str, list[str]]] = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            edges: dict[str, list[str]] = {}
            for target, names in _imports(path):
                if target.split(".")[0] in PACKAGES:
                    edges.setdefault(target, []).extend(names)
            graph[_module_name(path)] = edges
    return graph


def _cycle(graph: dict[str, dict[str, list[str]]]) -> list[str] | None:
    """One import cycle, as the modules along it, or None."""
    done: set[str] = set()
    path: list[str] = []
    on_path: set[str] = set()

    def visit(module: str) -> list[str] | None:
        if module in on_path:
            return path[path.index(module) :] + [module]
        if module in done:
            return None
        path.append(module)
        on_path.add(module)
        for target in graph.get(module, {}):
            found = visit(target)
            if found:
                return found
        path.pop()
        on_path.discard(module)
        done.add(module)
        return None

    for module in graph:
        found = visit(module)
        if found:
            return found
    return None


def test_the_module_graph_is_read_from_every_module() -> None:
    graph = _graph()
    assert {"engine", "engine._engine", "engine._log", "connectors", "connectors.node"} <= set(
        graph
    )
    assert "engine._engine" in graph["engine"]
    assert "engine._log" in graph["engine._engine"]
    assert "engine" in graph["connectors.node"]


def test_there_is_no_import_cycle() -> None:
    assert _cycle(_graph()) is None


def test_the_cycle_check_finds_a_cycle() -> None:
    graph = {"a": {"b": []}, "b": {"c": []}, "c": {"a": []}, "d": {"a": []}}
    assert _cycle(graph) == ["a", "b", "c", "a"]


def test_engine_never_imports_connectors() -> None:
    for module, edges in _graph().items():
        if module.split(".")[0] == "engine":
            wrong = [t for t in edges if t.split(".")[0] == "connectors"]
            assert not wrong, f"{module} imports {wrong}"


def test_connectors_use_only_the_public_names_of_engine() -> None:
    public_modules = {"engine", "engine.datasets"}
    for module, edges in _graph().items():
        if module.split(".")[0] != "connectors":
            continue
        for target, names in edges.items():
            if target.split(".")[0] != "engine":
                continue
            assert target in public_modules, f"{module} imports the private {target}"
            if target == "engine":
                private = [n for n in names if n not in engine.__all__ and n != "datasets"]
                assert not private, f"{module} imports {private} from engine, not exported"


def test_no_actor_imports_the_composition() -> None:
    graph = _graph()
    actors = [m for m in graph if m.startswith("engine.") and m != "engine._engine"]
    for module in actors:
        assert "engine._engine" not in graph[module], f"{module} imports the composition"
        assert "engine" not in graph[module], f"{module} imports the package (a cycle)"
