"""The committed stubs are what proto/generate.py makes from proto/ today."""

from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
COMMITTED = ROOT / "src" / "broker" / "_proto"


def test_generated_stubs_are_fresh(tmp_path: Path) -> None:
    spec = importlib.util.spec_from_file_location("generate", ROOT / "proto" / "generate.py")
    assert spec is not None and spec.loader is not None
    generate = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(generate)
    generate.generate(tmp_path)
    fresh = {p.name: p.read_text() for p in tmp_path.iterdir() if p.name != "__init__.py"}
    committed = {
        p.name: p.read_text()
        for p in COMMITTED.iterdir()
        if p.suffix in (".py", ".pyi") and p.name != "__init__.py"
    }
    assert fresh.keys() == committed.keys(), "run `make proto`"
    for name, text in fresh.items():
        assert committed[name] == text, f"src/broker/_proto/{name} is stale: run `make proto`"
