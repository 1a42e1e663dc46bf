"""No import circles in the package (issue 23 item 4).

Circles that "work" only because one import sits inside a function break as soon as someone moves
that import to the top. So the graph counts every import of a duospec module wherever it is written,
inside functions too; only `if TYPE_CHECKING:` blocks (never run) are left out. Importing
`duospec.a.b` also runs `duospec/a/__init__.py`, so it is an edge to both, except to the importing
module's own packages (a package and its modules may refer to each other: Python loads the package first).
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE_ROOT = Path(__file__).resolve().parents[1] / "duospec"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE_ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def all_modules() -> dict[str, Path]:
    return {module_name(path): path for path in PACKAGE_ROOT.rglob("*.py")}


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def imported_names(tree: ast.AST, this: str, is_package: bool) -> list[str]:
    """Every module name an import statement in `tree` names, outside TYPE_CHECKING blocks.
    `from x import y` names x and x.y (y may be a module)."""
    names: list[str] = []

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            names.extend(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against this module's package
                base = this.split(".") if is_package else this.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                origin = ".".join([*base, node.module] if node.module else base)
            else:
                origin = node.module or ""
            names.append(origin)
            names.extend(f"{origin}.{alias.name}" for alias in node.names)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return names


def import_graph() -> dict[str, set[str]]:
    """module -> the duospec modules its imports run (packages on the way included)."""
    modules = all_modules()
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        own_packages = {".".join(name.split(".")[:i]) for i in range(1, name.count(".") + 2)}
        edges = set()
        for imported in imported_names(ast.parse(path.read_text()), name, path.name == "__init__.py"):
            parts = imported.split(".")
            for i in range(1, len(parts) + 1):  # duospec.a.b runs duospec, duospec.a, duospec.a.b
                prefix = ".".join(parts[:i])
                if prefix in modules and prefix not in own_packages:
                    edges.add(prefix)
        graph[name] = edges
    return graph


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def connect(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for other in graph[node]:
            if other not in index:
                connect(other)
                low[node] = min(low[node], low[other])
            elif other in on_stack:
                low[node] = min(low[node], index[other])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            connect(node)
    return found


def test_the_package_has_no_import_circles() -> None:
    found = circles(import_graph())
    assert not found, "import circles (move shared names down a layer, or pass objects in):\n" + "\n".join(" <-> ".join(c) for c in found)


def test_the_graph_sees_imports_inside_functions_and_skips_type_checking() -> None:
    source = (
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n    from duospec.api import Pipeline\n"
        "def late():\n    from duospec.bench import runner\n    import duospec.models.hf\n"
        "from .tree import TokenTree\n"
    )
    names = imported_names(ast.parse(source), "duospec.verify", is_package=False)
    assert "duospec.api" not in names
    assert {"duospec.bench", "duospec.bench.runner", "duospec.models.hf", "duospec.tree", "duospec.tree.TokenTree"} <= set(names)


def test_a_circle_is_found_and_a_package_with_its_modules_is_not() -> None:
    assert circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    graph = import_graph()
    assert "duospec.drafting" not in graph["duospec.drafting.chain"]  # its own package: no edge
    assert "duospec.drafting.chain" in graph["duospec.drafting"]  # the registry imports its drafters
