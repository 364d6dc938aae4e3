"""Wiring you can read: services get their collaborators at construction, never by assignment
afterwards, and server.py builds them from the public faces of `broker.service` and `broker.api`."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

SOURCE = Path(__file__).resolve().parents[2] / "src" / "broker"


def assignments_to_other_objects(source: str) -> list[str]:
    """Each `x.y = ...` (or `x.y.z = ...`, `setattr(...)`) whose object is not `self` itself."""
    found = []
    for node in ast.walk(ast.parse(source)):
        targets: list[ast.expr] = []
        if isinstance(node, ast.Assign):
            targets = [t for target in node.targets for t in ast.walk(target)]
        elif isinstance(node, ast.AnnAssign | ast.AugAssign):
            targets = [node.target]
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "setattr":
            found.append(f"line {node.lineno}: {ast.unparse(node)}")
        for target in targets:
            if not isinstance(target, ast.Attribute) or not isinstance(target.ctx, ast.Store):
                continue
            owner = target.value
            if not (isinstance(owner, ast.Name) and owner.id == "self"):
                found.append(f"line {node.lineno}: {ast.unparse(target)} = ...")
    return found


def test_server_gives_no_service_a_collaborator_after_construction() -> None:
    assert assignments_to_other_objects((SOURCE / "server.py").read_text()) == []


def test_services_set_nothing_on_their_collaborators() -> None:
    found = {}
    for path in sorted((SOURCE / "service").glob("*.py")):
        tree = ast.parse(path.read_text())
        bad = [
            f"line {node.lineno}: {ast.unparse(target)}"
            for node in ast.walk(tree)
            if isinstance(node, ast.Assign)
            for target in node.targets
            # self._collaborator.attribute = ...: wiring from inside, as bad as from server.py
            if isinstance(target, ast.Attribute)
            and isinstance(target.value, ast.Attribute)
            and isinstance(target.value.value, ast.Name)
            and target.value.value.id == "self"
        ]
        if bad:
            found[path.name] = bad
    assert found == {}


def test_the_check_finds_wiring_after_the_fact() -> None:
    wired = (
        "self.oauth = OAuthService(store)\n"
        "self.oauth.create_connection = connections.create_authorized\n"
        "services.oauth.on_refresh_failure = monitor.oauth_refresh_failed\n"
        "oauth.hook: Hook = hook\n"
        "setattr(oauth, 'hook', hook)\n"
        "self._ready = True\n"
    )
    assert assignments_to_other_objects(wired) == [
        "line 2: self.oauth.create_connection = ...",
        "line 3: services.oauth.on_refresh_failure = ...",
        "line 4: oauth.hook = ...",
        "line 5: setattr(oauth, 'hook', hook)",
    ]


def test_server_imports_services_and_adapters_from_their_public_faces() -> None:
    tree = ast.parse((SOURCE / "server.py").read_text())
    modules = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    deep = sorted(m for m in modules if m and m.startswith(("broker.service.", "broker.api.")))
    assert deep == []
    assert {"broker.service", "broker.api"} <= modules


@pytest.mark.parametrize("package", ["broker.service", "broker.api"])
def test_every_public_name_is_importable_and_listed(package: str) -> None:
    module = importlib.import_module(package)
    names = module.__all__
    assert len(set(names)) == len(names)
    for name in names:
        assert getattr(module, name).__module__.startswith(package + ".") or name == "Clock", name
    tree = ast.parse(Path(module.__file__ or "").read_text())
    imported = {
        alias.name for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) for alias in node.names
    }
    assert imported - {"annotations", "TYPE_CHECKING", "importlib"} == set(names)


def test_the_service_face_loads_each_module_when_first_asked() -> None:
    service = importlib.import_module("broker.service")
    assert set(service._MODULES) == set(service.__all__)
    with pytest.raises(AttributeError, match="no attribute 'Nothing'"):
        service.Nothing  # noqa: B018


def from_imports(path: Path) -> set[str]:
    return {
        node.module or ""
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.ImportFrom)
    }


def test_the_adapters_import_services_from_the_public_face() -> None:
    imported = {path.name: from_imports(path) for path in sorted((SOURCE / "api").glob("*.py"))}
    assert "broker.service" in imported["admin.py"]  # the walk finds its imports
    deep = {
        name: sorted(m for m in modules if m.startswith("broker.service."))
        for name, modules in imported.items()
    }
    assert {name: found for name, found in deep.items() if found} == {}
