"""Imports go downward (docs/ARCHITECTURE.md, "Layers and which way imports go"): the
exceptions once listed there and since fixed stay fixed."""

from __future__ import annotations

import ast
from pathlib import Path

SOURCE = Path(__file__).resolve().parents[2] / "src" / "broker"


def imported_modules(path: Path) -> set[str]:
    """Every module `path` imports from, type-checking imports included."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return found


def test_the_settings_import_nothing_from_the_service_layer() -> None:
    imported = imported_modules(SOURCE / "config.py")
    assert {"broker.errors", "broker.egress.policy"} <= imported  # the walk finds its imports
    assert sorted(m for m in imported if m == "broker.service" or m.startswith("broker.service.")) == []


def test_the_adapters_reach_testers_only_through_the_service_layer() -> None:
    imported = {path.name: imported_modules(path) for path in sorted((SOURCE / "api").glob("*.py"))}
    assert "broker._proto" in imported["admin.py"]  # the walk finds its imports
    past_the_service = {
        name: sorted(m for m in modules if m == "broker.testers" or m.startswith("broker.testers."))
        for name, modules in imported.items()
    }
    assert {name: found for name, found in past_the_service.items() if found} == {}
