"""The mysql_native_password hash a lease's password reaches MariaDB as (`{{password_hash}}`),
against MariaDB's documented PASSWORD() example; the live server's own PASSWORD() is compared in
tests/integration/test_dbusers.py."""

from __future__ import annotations

import re

from broker.dbusers._mysql import native_password_hash


def test_the_hash_is_mariadbs_documented_one() -> None:
    # MariaDB's CREATE USER page: PASSWORD('mariadb') = '*54958E764CE10E50764C2EECBB71D01F08549980'.
    assert native_password_hash("mariadb") == "*54958E764CE10E50764C2EECBB71D01F08549980"


def test_the_hash_is_the_servers_format_and_never_holds_the_password() -> None:
    password = "Pa55-word-" + "x" * 30
    hashed = native_password_hash(password)
    assert re.fullmatch(r"\*[0-9A-F]{40}", hashed) and password not in hashed
    assert native_password_hash(password + "!") != hashed
