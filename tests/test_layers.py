"""The package's layers point down: each module imports only from its own layer or those below (LAYERS), there
are no import circles, and the model modules import nothing from their loaders."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "virnucpro"
LAYERS = (
    # the base: formats, file names, writing files, the failure manifest (and the package itself, for its version)
    {"virnucpro", "errors", "atomic", "fasta", "tables", "layout", "fingerprint", "manifest"},
    {"prep", "engines"},  # the steps before the classifier: reads to shards; the models' embeddings
    {"classify"},  # embeddings to predictions
    {"outputs"},  # predictions to a sample's tables and report
    {"cluster"},  # what a SLURM cluster offers and what it lost (read by the run's watch)
    {"serving", "resume"},  # the workflow's runs: the model daemons, and what a re-run trusts of earlier files
    {"pipeline", "testmodels", "cli", "__main__"},  # the whole method in one process, the commands
)
"""Top-level modules and packages of ``virnucpro`` from the bottom up: a module may import from its own layer
and those below, never from one above."""


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """Module -> the package's modules it imports anywhere in its code (function-level imports and
    TYPE_CHECKING blocks included); ``from virnucpro.a import b`` counts as importing ``virnucpro.a.b``
    when that is a module, else ``virnucpro.a``."""
    modules = {module_name(path): path for path in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        targets = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
            if isinstance(node, ast.Import):
                targets.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                for alias in node.names:
                    child = f"{node.module}.{alias.name}"
                    targets.add(child if child in modules else node.module)
        graph[name] = {target for target in targets if target in modules and target != name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for target in sorted(graph[node]):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def layer_of(module: str) -> int:
    """The index in LAYERS of a module (by its top-level module or package under ``virnucpro``)."""
    parts = module.split(".")
    top = parts[1] if len(parts) > 1 else parts[0]
    for index, layer in enumerate(LAYERS):
        if top in layer:
            return index
    raise AssertionError(f"{module} is in no layer: add {top!r} to LAYERS in tests/test_layers.py")


def upward_imports(graph: dict[str, set[str]]) -> list[tuple[str, str]]:
    """The (importer, imported) pairs where a module imports from a layer above its own."""
    return sorted((name, target) for name, targets in graph.items() for target in targets
                  if layer_of(target) > layer_of(name))  # fmt: skip


def test_every_import_points_down_the_layers():
    assert upward_imports(import_graph()) == []


def test_the_layer_check_finds_an_arrow_up():
    graph = {"virnucpro.classify.x": {"virnucpro.outputs.y", "virnucpro.layout"}, "virnucpro.outputs.y": set()}
    assert upward_imports(graph) == [("virnucpro.classify.x", "virnucpro.outputs.y")]


def test_the_package_has_no_import_circles():
    assert cycles(import_graph()) == []


def test_the_model_modules_import_nothing_from_their_loaders():
    graph = import_graph()
    assert "virnucpro.engines.dnabert" not in graph["virnucpro.engines.dnabert_model"]
    assert "virnucpro.engines.esm2" not in graph["virnucpro.engines.esm2_model"]
    assert graph["virnucpro.engines.dnabert_config"] <= {"virnucpro.errors"}


def test_the_file_names_module_is_a_leaf():
    assert import_graph()["virnucpro.layout"] == set()


def test_the_cycle_finder_finds_a_circle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
