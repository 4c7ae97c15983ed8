"""The package's shape: imports point one way (records at the bottom, integrations on top) with no cycle, and
every user-facing name is importable from ``gradwatch`` itself, the old paths included."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

import gradwatch

ROOT = Path(gradwatch.__file__).parent
INTEGRATIONS = ROOT.parent / "integrations"

#: Bottom to top. A module may import from its own layer or below, never above (TYPE_CHECKING imports and the
#: module-level ``__getattr__`` aliases that keep old import paths working are not dependencies).
LAYERS = (
    ("gradwatch.errors", "gradwatch._optional", "gradwatch.core.kinds"),
    ("gradwatch.core.stats", "gradwatch.core.structure", "gradwatch.core.report", "gradwatch.core.text",
     "gradwatch.core.plots"),
    ("gradwatch.core.checks", "gradwatch.core.detector"),
    ("gradwatch.core.advice", "gradwatch.core.recommender"),
    ("gradwatch.core.summarize", "gradwatch.core.runlog", "gradwatch.core"),
    ("gradwatch.reporters",),
    ("gradwatch.options",),
    ("gradwatch.adapters",),
    ("gradwatch._watcher",),
    ("gradwatch.integrations", "gradwatch.cli", "gradwatch.__main__", "gradwatch"),
)


def _modules() -> dict[str, Path]:
    out = {}
    for base, prefix in ((ROOT, "gradwatch"), (INTEGRATIONS, "gradwatch.integrations")):
        for path in base.rglob("*.py"):
            parts = list(path.relative_to(base).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join([prefix, *parts])] = path
    return out


def _is_type_checking(node: ast.If) -> bool:
    return isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING"


def _imports(path: Path, known: set[str]) -> set[str]:
    found: set[str] = set()

    def visit(node: ast.AST, top: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child):
                continue
            if top and isinstance(child, ast.FunctionDef) and child.name == "__getattr__":
                continue  # lazy aliases for old import paths, resolved on attribute access only
            if isinstance(child, ast.Import):
                found.update(a.name for a in child.names)
            elif isinstance(child, ast.ImportFrom) and child.module:
                found.add(child.module)
                found.update(f"{child.module}.{a.name}" for a in child.names)
            visit(child, top=False)

    visit(ast.parse(path.read_text()), top=True)
    return {m for m in found if m in known}


def _graph() -> dict[str, set[str]]:
    mods = _modules()
    return {name: _imports(path, set(mods)) - {name} for name, path in mods.items()}


def _layer(module: str) -> int:
    best, depth = None, -1
    for i, names in enumerate(LAYERS):
        for name in names:
            if (module == name or module.startswith(name + ".")) and len(name) > depth:
                best, depth = i, len(name)
    assert best is not None, f"{module} is in no layer of tests/test_architecture.py: add it"
    return best


def test_no_import_cycle():
    graph = _graph()
    state: dict[str, int] = {}
    path: list[str] = []

    def dfs(node: str) -> None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycle = path[path.index(nxt):] + [nxt]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                dfs(nxt)
        path.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            dfs(node)


def test_imports_point_down():
    upward = [f"{a} (layer {_layer(a)}) imports {b} (layer {_layer(b)})"
              for a, targets in _graph().items() for b in targets if _layer(b) > _layer(a)]
    assert not upward, "\n".join(upward)


def test_the_graph_is_read():
    """The two tests above would pass on an empty graph: check that it holds the edges everyone knows."""
    graph = _graph()
    assert "gradwatch.core.stats" in graph["gradwatch.core.detector"]
    assert "gradwatch.options" in graph["gradwatch._watcher"]
    assert "gradwatch.core.text" in graph["gradwatch.core.report"]  # inside Report.__str__


PUBLIC = ("attach", "load", "Watcher", "WatchOptions", "Thresholds", "Report", "Finding", "Recommendation",
          "LayerSummary", "ParamSummary", "Structure", "LayerInfo", "Reporter", "Flush", "WatchInfo",
          "ConsoleReporter", "RunLogWriter", "WandbReporter", "KerasCallback", "GradwatchError", "AttachError",
          "MonitoringError", "LogError", "WatcherStateError", "__version__", "trial", "TrialReport", "TrialRun")


def test_every_public_name_is_exported_from_gradwatch():
    assert sorted(gradwatch.__all__) == sorted(PUBLIC)
    for name in PUBLIC:
        assert getattr(gradwatch, name) is not None
    assert set(PUBLIC) <= set(dir(gradwatch))


@pytest.mark.parametrize("old, name", [
    ("gradwatch.core.runlog", "RunLogWriter"), ("gradwatch.reporters.console", "ConsoleReporter"),
    ("gradwatch.reporters.plots", "flow_figure"), ("gradwatch.reporters.console", "render_text"),
    ("gradwatch.integrations.wandb", "WandbReporter"), ("gradwatch.integrations.keras", "KerasCallback"),
    ("gradwatch._watcher", "WatchOptions"), ("gradwatch.core.detector", "Thresholds"),
    ("gradwatch.core.detector", "ActivationRows"), ("gradwatch.reporters.base", "Reporter"),
    ("gradwatch.core.recommender", "REFERENCES"), ("gradwatch.adapters", "framework_of"),
])
def test_old_import_paths_keep_working(old, name):
    obj = getattr(importlib.import_module(old), name)
    if hasattr(gradwatch, name):
        assert obj is getattr(gradwatch, name)
