"""The house's size rules (issue 23): no function over 80 lines, no class over 250, in duospec/.

Long functions and classes are where jobs pile up unseen (the Pipeline once did five in 422 lines);
the limits make a new job find its own room. Docstrings count: a function whose docstring alone is
long should say less or move its notes to docs/.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE_ROOT = Path(__file__).resolve().parents[1] / "duospec"
MAX_FUNCTION_LINES = 80
MAX_CLASS_LINES = 250


def oversized(source: str) -> list[str]:
    """"kind name: lines" for each function or class over its limit."""
    found = []
    for node in ast.walk(ast.parse(source)):
        lines = getattr(node, "end_lineno", 0) - getattr(node, "lineno", 0) + 1
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and lines > MAX_FUNCTION_LINES:
            found.append(f"function {node.name}: {lines} lines")
        elif isinstance(node, ast.ClassDef) and lines > MAX_CLASS_LINES:
            found.append(f"class {node.name}: {lines} lines")
    return found


@pytest.mark.parametrize("path", sorted(PACKAGE_ROOT.rglob("*.py")), ids=lambda path: str(path.relative_to(PACKAGE_ROOT)))
def test_functions_and_classes_stay_small(path: Path) -> None:
    assert not oversized(path.read_text()), f"{path.relative_to(PACKAGE_ROOT.parent)}: {oversized(path.read_text())}"


def test_the_rule_sees_a_long_function() -> None:
    body = "\n".join(f"    x{i} = {i}" for i in range(MAX_FUNCTION_LINES))
    assert oversized(f"def long():\n{body}\n") == [f"function long: {MAX_FUNCTION_LINES + 1} lines"]
    assert oversized("def short():\n    return 1\n") == []
