"""The layers of the code base point down, and its modules stay small (docs/architecture.md).

    api/  workers/        the front door and the processes; never each other
      |      |  pool/     what keeps pools ready and expires sessions; workers run it
      |      |   |
    shoal/ (the core)     use cases, records, queue, registry, settings, errors
    shoal/ops/, shoal/bench/  the tools: operator commands and the benchmark, above everything

Imports are read from the source (every `import`, at any depth, except under `if TYPE_CHECKING:`),
so a forbidden import fails here before it ships.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from shoal.settings import REPO_ROOT

PACKAGES = ("api", "workers", "pool", "shoal")
MAX_MODULE_LINES = 600

# Which layers each layer may import (besides itself, the standard library and third parties).
ALLOWED = {
    "core": {"core"},
    "pool": {"core", "pool"},
    "api": {"core", "api"},
    "workers": {"core", "pool", "workers"},
    "tools": {"core", "pool", "workers", "tools"},
}


def layer_of(module: str) -> str:
    if module.startswith(("shoal.ops", "shoal.bench")):
        return "tools"
    top = module.split(".")[0]
    return "core" if top == "shoal" else top


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO_ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _product_modules() -> dict[str, Path]:
    modules = {}
    for package in PACKAGES:
        for path in sorted((REPO_ROOT / package).rglob("*.py")):
            modules[_module_name(path)] = path
    return modules


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imported_names(tree: ast.AST) -> list[str]:
    """Dotted names imported anywhere in the tree, `if TYPE_CHECKING:` blocks left out."""
    found: list[str] = []

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.extend(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, "relative imports are not used in Shoal"
            found.extend(f"{node.module}.{alias.name}" for alias in node.names)
            found.append(node.module or "")
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


def import_graph() -> dict[str, set[str]]:
    """Module -> the product modules it imports."""
    modules = _product_modules()
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        targets = set()
        for imported in _imported_names(ast.parse(path.read_text(), str(path))):
            # `from shoal import keys` names the module shoal.keys; `from x import func` names x.
            while imported and imported not in modules:
                imported = imported.rpartition(".")[0]
            if imported and imported != name:
                targets.add(imported)
        graph[name] = targets
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                connect(w)
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
            connect(v)
    return found


def test_layers_only_point_down() -> None:
    wrong = [
        f"{module} ({layer_of(module)}) imports {target} ({layer_of(target)})"
        for module, targets in import_graph().items()
        for target in sorted(targets)
        if layer_of(target) not in ALLOWED[layer_of(module)]
    ]
    assert not wrong, "\n".join(wrong)


def test_no_import_cycles() -> None:
    assert not _cycles(import_graph())


def test_the_check_sees_a_forbidden_import() -> None:
    assert layer_of("shoal.queue") == "core" and layer_of("shoal.ops.stack") == "tools"
    assert "workers" not in ALLOWED["api"] and "api" not in ALLOWED["workers"]
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    tree = ast.parse("from workers import host\nif TYPE_CHECKING:\n    import api.app\n")
    assert _imported_names(tree) == ["workers.host", "workers"]


def _product_files() -> list[Path]:
    files = [p for package in PACKAGES for p in (REPO_ROOT / package).rglob("*.py")]
    return sorted(files + list((REPO_ROOT / "vm-images" / "agent").glob("*.py")))


@pytest.mark.parametrize("path", _product_files(), ids=lambda p: str(p.relative_to(REPO_ROOT)))
def test_module_is_small(path: Path) -> None:
    lines = len(path.read_text().splitlines())
    assert lines <= MAX_MODULE_LINES, f"{lines} lines: split it by job"


def test_task_names_are_written_only_in_the_queue_module() -> None:
    from shoal import queue

    names = [t.name for t in vars(queue).values() if isinstance(t, queue.Task)]
    assert len(names) == len(set(names)) >= 10
    pattern = re.compile("|".join(re.escape(f'"{n}"') for n in names))
    elsewhere = [
        str(path.relative_to(REPO_ROOT))
        for path in _product_files()
        if path.name != "queue.py" and pattern.search(path.read_text())
    ]
    assert not elsewhere
