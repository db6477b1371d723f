"""The import structure: each package imports on its own, in any order, and the project's imports
form no circle (function-level imports included, so none can exist to dodge one)."""
from __future__ import annotations

import ast
import re
import subprocess
import sys

import pytest

from conftest import REPO

PACKAGES = ("distill", "students", "teachers")
# The `distill` modules the model packages may use: reading weight files safely, and finding the
# models installed packages declare (imported only when a name is not registered).
SHARED = {"distill", "distill.errors", "distill.weights", "distill.plugins"}


def project_modules() -> dict[str, ast.Module]:
    modules = {}
    for package in PACKAGES:
        for path in sorted((REPO / package).glob("*.py")):
            name = package if path.stem == "__init__" else f"{package}.{path.stem}"
            modules[name] = ast.parse(path.read_text(), filename=str(path))
    return modules


def import_graph() -> dict[str, set[str]]:
    """module -> project modules it imports anywhere in its file. Importing ``a.b`` from another
    package also runs ``a/__init__``, so that counts as importing ``a`` too."""
    modules = project_modules()
    graph: dict[str, set[str]] = {}
    for name, tree in modules.items():
        found: set[str] = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                found |= {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module:
                # `from a import b` imports the module a.b if there is one, else a name of a.
                for alias in node.names:
                    found.add(f"{node.module}.{alias.name}" if f"{node.module}.{alias.name}" in modules else node.module)
        edges = {m for m in found if m in modules}
        own = name.split(".")[0]
        edges |= {m.split(".")[0] for m in edges if m.split(".")[0] != own}
        graph[name] = edges - {name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [node, nxt] if nxt in path else [node, nxt]
            if nxt not in state and (cycle := visit(nxt, path + [node])):
                return cycle
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node, [])):
            return cycle
    return None


def test_the_import_graph_has_no_cycle():
    graph = import_graph()
    assert {"distill.loop", "distill.build", "students.deit", "teachers.registry"} <= set(graph)
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) is not None
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_students_and_teachers_use_only_the_shared_low_level_module():
    for name, edges in import_graph().items():
        if name.split(".")[0] in ("students", "teachers"):
            assert {e for e in edges if e.split(".")[0] == "distill"} <= SHARED, name


# The layers of docs/development.md ("How the code is laid out"), top to bottom: a module imports only
# its own layer and the layers below. "students.*": every module of the package.
LAYERS = [
    ("commands", {"distill.cli", "distill.__main__", "distill.quickstart", "distill.planning"}),
    ("the loop", {"distill.loop"}),
    ("what else runs", {"distill.cache_teacher", "distill.evaluation", "distill.analyze", "distill.export",
                        "distill.onnx_export", "distill.prediction", "distill.report", "distill.compare"}),
    ("run set-up", {"distill.build", "distill.rundir", "distill.exportdir", "distill.cache"}),
    ("parts", {"distill.losses", "distill.targets", "distill.checkpoint", "distill.pipeline", "distill.replay",
               "distill.transforms", "distill.sources", "distill.splits", "distill.images", "distill.builtin_data",
               "distill.plots", "distill.lock", "distill.collective"}),
    ("schema", {"distill.config", "distill.recipes", "distill.trackers"}),
    ("models", {"students.*", "teachers.*"}),
    ("helpers", {"distill", "distill.errors", "distill.atomic", "distill.weights", "distill.plugins", "distill.spread"}),
]


def layer_of(module: str) -> int:
    package = module.split(".")[0]
    for depth, (_, members) in enumerate(LAYERS):
        if module in members or (package in ("students", "teachers") and f"{package}.*" in members):
            return depth
    raise AssertionError(f"{module} is in no layer of LAYERS (and of docs/development.md): place it")


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    return [f"{name} -> {edge}" for name, edges in sorted(graph.items()) for edge in sorted(edges)
            if layer_of(edge) < layer_of(name)]


def test_every_module_imports_only_its_layer_and_those_below():
    assert upward_imports(import_graph()) == []


def test_an_upward_import_is_found():
    assert upward_imports({"distill.config": {"distill.loop"}, "distill.loop": {"distill.config"}}) == [
        "distill.config -> distill.loop"]


def test_the_documented_layer_table_is_this_one():
    """docs/development.md's table names the same layers, in the same order, with the same files."""
    text = (REPO / "docs" / "development.md").read_text()
    table = text[text.index("| layer | files |"):].split("\n\n")[0].splitlines()[2:]
    documented = []
    for row in table:
        layer, files = [cell.strip() for cell in row.strip("|").split("|")][:2]
        names = set()
        for file in re.findall(r"`([^`]+)`", files):
            if file.endswith("/"):
                names.add(f"{file.rstrip('/')}.*")
            else:
                stem = file.removesuffix(".py").split("/")[-1]
                names.add("distill" if stem == "__init__" else f"distill.{stem}")
        documented.append((layer, names))
    assert documented == LAYERS


@pytest.mark.parametrize("order", [["teachers"], ["students", "teachers"], ["distill"]])
def test_import_order(order):
    code = "; ".join(f"import {m}" for m in order) + "; import distill.loop, distill; print(distill.train.__name__)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "train"


def test_the_model_packages_do_not_load_the_training_code():
    code = "import students, teachers, sys; print(sorted(m for m in sys.modules if m.startswith('distill')))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "['distill', 'distill.errors', 'distill.weights']"


def test_no_module_shares_a_public_api_name():
    """``distill.predict(...)`` and ``distill.evaluate(...)`` are functions: a module of the same name
    would be bound as the package's attribute when imported and shadow them."""
    import distill

    assert [name for name in distill.__all__ if (REPO / "distill" / f"{name}.py").exists()] == []
