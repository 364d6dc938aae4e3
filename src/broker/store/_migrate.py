"""Versioned SQL migrations: `migrations/NNNN_name.sql`, shipped as package data.

Loading is engine-neutral (a PostgreSQL backend can reuse `load_migrations`);
`apply_sqlite` runs the pending ones, each in its own `BEGIN IMMEDIATE`
transaction that also records it in `schema_migrations`.
"""

from __future__ import annotations

import hashlib
import re
import sqlite3
import time
from dataclasses import dataclass
from importlib import resources

import aiosqlite

_FILE_NAME = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")

_BOOTSTRAP = """
CREATE TABLE IF NOT EXISTS schema_migrations (
    version     INTEGER PRIMARY KEY,
    name        TEXT    NOT NULL,
    checksum    TEXT    NOT NULL,
    applied_at  BIGINT  NOT NULL
)
"""


@dataclass(frozen=True, slots=True)
class Migration:
    version: int
    name: str
    sql: str

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.sql.encode("utf-8")).hexdigest()

    def statements(self) -> list[str]:
        """The script split into single statements (a statement ends with `;` at the end of a line)."""
        statements: list[str] = []
        buffer = ""
        for line in self.sql.splitlines(keepends=True):
            buffer += line
            if sqlite3.complete_statement(buffer):
                statements.append(buffer.strip())
                buffer = ""
        leftover = [ln for ln in buffer.splitlines() if ln.strip() and not ln.strip().startswith("--")]
        if leftover:
            raise ValueError(f"migration {self.version:04d}_{self.name} ends with an incomplete statement")
        return statements


def load_migrations(package: str = "broker.store", folder: str = "migrations") -> list[Migration]:
    """Every migration shipped with the package, in version order."""
    found: dict[int, Migration] = {}
    for entry in resources.files(package).joinpath(folder).iterdir():
        match = _FILE_NAME.match(entry.name)
        if match is None:
            continue
        version = int(match.group(1))
        if version in found:
            raise ValueError(f"two migrations share version {version:04d}")
        found[version] = Migration(version, match.group(2), entry.read_text(encoding="utf-8"))
    return [found[v] for v in sorted(found)]


async def apply_sqlite(conn: aiosqlite.Connection, migrations: list[Migration]) -> list[int]:
    """Apply the pending migrations; return the versions applied now.

    Refuses a database whose recorded migrations differ from the shipped ones
    (edited after release) or are newer than this code knows.
    """
    await conn.execute(_BOOTSTRAP)
    known = {m.version: m for m in migrations}
    rows = await conn.execute_fetchall("SELECT version, name, checksum FROM schema_migrations")
    for version, name, checksum in rows:
        shipped = known.get(version)
        if shipped is None:
            raise RuntimeError(
                f"the database has migration {version:04d}_{name}, which this broker does not know; "
                "it was written by a newer version"
            )
        if shipped.checksum != checksum:
            raise RuntimeError(f"migration {version:04d}_{name} was changed after it was applied")

    applied: list[int] = []
    for migration in migrations:
        await conn.execute("BEGIN IMMEDIATE")
        try:
            # Checked again under the write lock: another process may have applied it meanwhile.
            done = await conn.execute_fetchall(
                "SELECT 1 FROM schema_migrations WHERE version = ?", (migration.version,)
            )
            if not list(done):
                for statement in migration.statements():
                    await conn.execute(statement)
                await conn.execute(
                    "INSERT INTO schema_migrations (version, name, checksum, applied_at) VALUES (?, ?, ?, ?)",
                    (migration.version, migration.name, migration.checksum, time.time_ns() // 1000),
                )
                applied.append(migration.version)
            await conn.commit()
        except BaseException:
            await conn.rollback()
            raise
    return applied
