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
