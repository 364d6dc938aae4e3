"""docs/ARCHITECTURE.md cannot fall behind the code: every package and top-level module of
src/broker is named in it, and every test it cites as proof exists."""

from __future__ import annotations

import ast
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SOURCE = REPO / "src" / "broker"
DOC = (REPO / "docs" / "ARCHITECTURE.md").read_text()
# A cited test: `tests/<dir>/test_x.py`, optionally `::test_name` (a parametrized id is cut off).
CITED = re.compile(r"(tests/(?:unit|integration|e2e)/test_\w+\.py)(?:::(\w+))?")
BARE = re.compile(r"(?<![\w/])test_\w+\.py")


def code_units() -> list[str]:
    """Packages as `store/sqlite/`, top-level modules as `config.py`, as the doc names them."""
    packages = [
        f"{init.parent.relative_to(SOURCE).as_posix()}/"
        for init in SOURCE.rglob("__init__.py")
        if init.parent != SOURCE
    ]
    modules = [path.name for path in SOURCE.glob("*.py") if path.name != "__init__.py"]
    return sorted(packages + modules)


def named_in_doc(unit: str) -> bool:
    return re.search(rf"(?<![\w/.]){re.escape(unit)}", DOC) is not None


def test_every_package_and_top_level_module_is_in_the_doc() -> None:
    units = code_units()
    assert {"api/", "store/sqlite/", "server.py", "client.py"} <= set(units)  # the walk finds them
    missing = [unit for unit in units if not named_in_doc(unit)]
    assert missing == [], f"docs/ARCHITECTURE.md does not describe: {', '.join(missing)}"


def test_the_check_would_notice_a_missing_package() -> None:
    assert not named_in_doc("vault/") and not named_in_doc("sqlite/")  # `store/sqlite/` only


def _test_functions(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    return {
        node.name
        for node in ast.walk(tree)
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.name.startswith("test_")
    }


def test_every_cited_test_exists() -> None:
    citations = CITED.findall(DOC)
    assert len(citations) >= 11, "the invariant table cites its tests"
    problems = []
    for file, function in citations:
        path = REPO / file
        if not path.is_file():
            problems.append(f"{file} does not exist")
        elif function and function not in _test_functions(path):
            problems.append(f"{file} has no {function}")
    assert problems == [], "docs/ARCHITECTURE.md cites: " + "; ".join(problems)


def test_tests_are_cited_by_their_full_path() -> None:
    """A bare `test_x.py` could not be checked above."""
    without_full_paths = CITED.sub("", DOC)
    assert BARE.findall(without_full_paths) == []


def test_every_invariant_has_a_row() -> None:
    rows = re.findall(r"^\| (\d+) \| [^|]+\| ([^|]+) \|$", DOC, re.MULTILINE)
    assert [int(number) for number, _ in rows] == list(range(1, 12))
    for number, tests in rows:
        assert CITED.search(tests) or tests.strip().startswith("not built yet"), f"invariant {number}"
