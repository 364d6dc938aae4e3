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


def private_names_imported(path: Path, package: str) -> list[str]:
    """`module.name` for each `_name` that `path` imports from a module of `package`."""
    return [
        f"{node.module}.{alias.name}"
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith(package + ".")
        for alias in node.names
        if alias.name.startswith("_")
    ]


def test_services_share_only_public_names() -> None:
    found = {
        path.name: names
        for path in sorted((SOURCE / "service").glob("*.py"))
        if (names := private_names_imported(path, "broker.service"))
    }
    assert found == {}


def test_the_check_finds_a_private_import(tmp_path: Path) -> None:
    module = tmp_path / "m.py"
    module.write_text("from broker.service.oauth import _state_hash, OAuthService\n")
    assert private_names_imported(module, "broker.service") == ["broker.service.oauth._state_hash"]


def private_testers_imports(path: Path) -> list[str]:
    """What `path` takes from `broker.testers` that is private: a `_module` or a `_name`."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            module, names = node.module, [alias.name for alias in node.names]
        elif isinstance(node, ast.Import):
            module, names = "", [alias.name for alias in node.names]
        else:
            continue
        for name in names:
            full = f"{module}.{name}" if module else name
            if full.startswith("broker.testers.") and any(part.startswith("_") for part in full.split(".")):
                found.append(full)
    return found


def test_lease_users_take_only_public_names_from_the_testers() -> None:
    # One way to connect per driver is broker.dbconnect's, not a tester's private module.
    paths = sorted((SOURCE / "dbusers").glob("*.py"))
    assert "broker.dbconnect.mysql" in imported_modules(SOURCE / "dbusers" / "_mysql.py")
    found = {path.name: names for path in paths if (names := private_testers_imports(path))}
    assert found == {}


def test_the_check_finds_a_private_testers_import(tmp_path: Path) -> None:
    module = tmp_path / "m.py"
    module.write_text(
        "from broker.testers import Target, _registry\n"
        "from broker.testers._db_mysql import connect\n"
        "import broker.testers._db_common\n"
    )
    assert private_testers_imports(module) == [
        "broker.testers._registry",
        "broker.testers._db_mysql.connect",
        "broker.testers._db_common",
    ]


_ABOVE = ("broker.testers", "broker.dbusers", "broker.service", "broker.store", "broker.api")


def imports_from_above(package: str) -> dict[str, list[str]]:
    """Per module of `package`, what it imports from testers, dbusers or the layers above them."""
    imported = {path.name: imported_modules(path) for path in sorted((SOURCE / package).glob("*.py"))}
    found = {
        name: sorted(m for m in modules if any(m == up or m.startswith(up + ".") for up in _ABOVE))
        for name, modules in imported.items()
    }
    return {name: modules for name, modules in found.items() if modules}


def test_the_database_connections_sit_below_testers_and_lease_users() -> None:
    assert "broker.egress.tcp" in imported_modules(SOURCE / "dbconnect" / "__init__.py")  # the walk works
    assert imports_from_above("dbconnect") == {}


def test_the_oauth_protocol_sits_below_the_testers_that_use_it() -> None:
    """`testers/` asks for a client credentials token through `oauth/`: never the other way round."""
    assert "broker.egress" in imported_modules(SOURCE / "oauth" / "_token.py")  # the walk works
    assert imports_from_above("oauth") == {}
