"""SQLite: open the file read-only on the broker's host and run `SELECT 1`.

The file is never created or modified: it is opened through a `mode=ro` URI after checking it
exists and is a regular file (a FIFO would block the open, a device could be endless). The
test reads a file on the *broker's* host, which is not necessarily where an executor will open
it; the result says so. Tenant admins are trusted within their tenant, but the broker host is
shared: a deployment can confine sqlite tests to some directories (`roots`), and even
unconfined, the test reveals only whether a path holds a readable SQLite database.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sqlite3
import stat
import urllib.parse
from collections.abc import Sequence

from broker.model import TestCategory, TestResult, TestStage
from broker.testers.base import Target, TestFailure, passed

_NOT_VERIFIED = ("that executors can reach this file on their own hosts", "write access")


async def test_sqlite(target: Target, roots: Sequence[str] | None, busy_timeout: float) -> TestResult:
    """Open the SQLite file named by `database` read-only and run `SELECT 1`; never create it."""
    path = str(target.config["database"])
    details = {"driver": "sqlite", "path": path}
    if "\x00" in path or not os.path.isabs(path):
        raise TestFailure(
            TestCategory.INVALID_CONFIG,
            TestStage.CONNECT,
            "for sqlite, database must be an absolute file path",
            details,
        )
    # File system calls may block (network mounts): all of them run in a worker thread.
    version, schema = await asyncio.to_thread(_open_and_select, path, roots, busy_timeout, details)
    return passed(
        f"opened {path} read-only and ran SELECT 1",
        details={**details, "sqlite_version": version, "schema_version": str(schema)},
        verified=("file exists on the broker host", "readable SQLite database", "SELECT 1"),
        not_verified=_NOT_VERIFIED,
    )


def _open_and_select(
    path: str, roots: Sequence[str] | None, busy_timeout: float, details: dict[str, str]
) -> tuple[str, int]:
    real = os.path.realpath(path)
    if roots is not None and not _inside(real, roots):
        raise TestFailure(
            TestCategory.BLOCKED_BY_POLICY,
            TestStage.CONNECT,
            "sqlite files may be tested only inside the directories the broker allows",
            details,
        )
    _check_file(real, details)
    return _select_one(real, busy_timeout, details)


def _inside(real: str, roots: Sequence[str]) -> bool:
    """Whether `real` (symlinks resolved) is inside one of `roots` (resolved too)."""
    for root in roots:
        base = os.path.realpath(root)
        if os.path.commonpath([real, base]) == base:
            return True
    return False


def _check_file(real: str, details: dict[str, str]) -> None:
    """Fail unless `real` is an existing, readable regular file."""
    try:
        info = os.stat(real)
    except FileNotFoundError:
        raise TestFailure(
            TestCategory.NOT_FOUND, TestStage.CONNECT, "the SQLite file does not exist", details
        ) from None
    except PermissionError:
        raise TestFailure(
            TestCategory.PERMISSION_DENIED,
            TestStage.CONNECT,
            "the broker may not look up the SQLite file",
            details,
        ) from None
    if not stat.S_ISREG(info.st_mode):
        raise TestFailure(
            TestCategory.INVALID_CONFIG, TestStage.CONNECT, "the sqlite path is not a regular file", details
        )
    if not os.access(real, os.R_OK):
        raise TestFailure(
            TestCategory.PERMISSION_DENIED,
            TestStage.CONNECT,
            "the broker may not read the SQLite file",
            details,
        )


def _select_one(real: str, busy_timeout: float, details: dict[str, str]) -> tuple[str, int]:
    """(sqlite library version, schema version) after `SELECT 1` on a read-only connection."""
    uri = f"file:{urllib.parse.quote(real)}?mode=ro"
    try:
        with contextlib.closing(sqlite3.connect(uri, uri=True, timeout=busy_timeout)) as conn:
            value = conn.execute("SELECT 1").fetchone()
            # SELECT 1 alone never reads the file; the schema version is in its header, so a
            # file that is not a database fails here.
            schema = conn.execute("PRAGMA schema_version").fetchone()
    except sqlite3.DatabaseError as exc:
        name = getattr(exc, "sqlite_errorname", "") or type(exc).__name__
        message = (
            "the file is not a SQLite database"
            if name == "SQLITE_NOTADB"
            else f"SQLite could not read the file ({name})"
        )
        raise TestFailure(
            TestCategory.UNEXPECTED_RESPONSE,
            TestStage.SAMPLE_OPERATION,
            message,
            {**details, "sqlite_error": name},
        ) from None
    if value != (1,):
        raise TestFailure(
            TestCategory.UNEXPECTED_RESPONSE, TestStage.SAMPLE_OPERATION, "SELECT 1 did not return 1", details
        )
    return sqlite3.sqlite_version, int(schema[0]) if schema else 0
