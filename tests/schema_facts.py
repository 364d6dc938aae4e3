"""What a live schema is, read from the engine's own catalog, for tests that compare schemas.

Two readings per engine:

* `*_facts`: the schema in a vocabulary both engines share, one fact per line
  ("connections.id type" -> "text"), so that the two engines can be compared;
* `*_exact`: the schema as the engine itself spells it (SQLite's stored CREATE
  statements, PostgreSQL's canonical definitions), to tell whether one database's
  schema is exactly another's on the same engine.
"""

from __future__ import annotations

import re
import sqlite3
from collections.abc import Iterable

import asyncpg

Facts = dict[str, str]

# Declared types as the migrations spell them, in the shared vocabulary. A type not listed
# reads as "unmapped ..." and so differs from anything on the other engine: a new type is a
# decision, never a silent match.
_SQLITE_TYPES = {"INTEGER": "int", "BIGINT": "int", "TEXT": "text", "BLOB": "bytes", "REAL": "float"}
# PostgreSQL's narrow types get their own names: an `integer` where SQLite holds 64 bits
# would overflow on a timestamp in microseconds.
_POSTGRES_TYPES = {
    "bigint": "int",
    "integer": "int32",
    "smallint": "int16",
    "text": "text",
    "bytea": "bytes",
    "double precision": "float",
    "real": "float32",
}
# How indexed text compares: byte order is what SQLite does, and what PostgreSQL does under "C".
_ORDERS = {"BINARY": "bytes", "C": "bytes", "POSIX": "bytes", "default": "database default"}
_FK_ACTIONS = {"a": "NO ACTION", "r": "RESTRICT", "c": "CASCADE", "n": "SET NULL", "d": "SET DEFAULT"}


def _add(facts: Facts, key: str, value: str) -> None:
    """Several constraints of one kind on the same columns read as one fact listing them all."""
    facts[key] = " | ".join(sorted([*facts[key].split(" | "), value])) if key in facts else value


def _literals(expression: str) -> str:
    return " ".join(sorted(re.findall(r"'([^']*)'", expression))) or "-"


def _predicate(expression: str) -> str:
    return " ".join(expression.replace("(", " ").replace(")", " ").lower().split())


def _strip_comments(sql: str) -> str:
    return re.sub(r"--[^\n]*", "", sql)


def _sqlite_checks(create_table: str) -> list[str]:
    """The expressions of a CREATE TABLE's CHECK clauses (SQLite has no catalog for them)."""
    sql = _strip_comments(create_table)
    found = []
    for match in re.finditer(r"\bCHECK\s*\(", sql, re.IGNORECASE):
        depth, end = 1, match.end()
        while depth:
            depth += {"(": 1, ")": -1}.get(sql[end], 0)
            end += 1
        found.append(sql[match.end() : end - 1])
    return found


def sqlite_facts(db: sqlite3.Connection) -> Facts:
    """The schema of a SQLite database in the shared vocabulary."""
    facts: Facts = {}
    tables = db.execute(
        "SELECT name, sql FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%'"
    ).fetchall()
    for table, create in tables:
        columns = db.execute(f"PRAGMA table_info('{table}')").fetchall()  # cid, name, type, notnull, dflt, pk
        types = {
            name: _SQLITE_TYPES.get(type_.upper(), f"unmapped {type_}") for _, name, type_, *_ in columns
        }
        key = [c[1] for c in sorted((c for c in columns if c[5]), key=lambda c: c[5])]
        # A lone INTEGER PRIMARY KEY is the rowid: never NULL, whatever table_info says.
        rowid = key[0] if len(key) == 1 and _declared(columns, key[0]) == "INTEGER" else None
        for _, name, _, notnull, default, _ in columns:
            facts[f"{table}.{name} type"] = types[name]
            facts[f"{table}.{name} null"] = "not null" if notnull or name == rowid else "null"
            if name == rowid and "AUTOINCREMENT" in create.upper():
                facts[f"{table}.{name} default"] = "generated"
            elif default is not None:
                facts[f"{table}.{name} default"] = default
        if key:
            facts[f"{table} primary key"] = ", ".join(key)
        for _, index, unique, origin, partial in db.execute(f"PRAGMA index_list('{table}')").fetchall():
            # seqno, cid, name, desc, collation, key column
            parts = [row for row in db.execute(f"PRAGMA index_xinfo('{index}')").fetchall() if row[5]]
            names = ", ".join(row[2] for row in parts)
            for row in parts:
                if types[row[2]] == "text":
                    _add(facts, f"{table}.{row[2]} order", _ORDERS.get(row[4], row[4]))
            if origin == "c":
                (index_sql,) = db.execute("SELECT sql FROM sqlite_master WHERE name = ?", (index,)).fetchone()
                where = f" where {_predicate(index_sql.split(' WHERE ', 1)[1])}" if partial else ""
                facts[f"{table} index {index}"] = f"{'unique ' if unique else ''}({names}){where}"
            elif origin == "u":
                facts[f"{table} unique ({names})"] = "unique"
        foreign: dict[int, list[tuple[str, ...]]] = {}
        for fk_id, _, target, source, referenced, on_update, on_delete, _ in db.execute(
            f"PRAGMA foreign_key_list('{table}')"
        ).fetchall():
            foreign.setdefault(fk_id, []).append((target, source, referenced, on_update, on_delete))
        for rows in foreign.values():
            target, _, _, on_update, on_delete = rows[0]
            sources = ", ".join(r[1] for r in rows)
            referenced = ", ".join(r[2] for r in rows)
            facts[f"{table} foreign key ({sources})"] = (
                f"{target} ({referenced}) on delete {on_delete} on update {on_update}"
            )
        for expression in _sqlite_checks(create):
            code = re.sub(r"'[^']*'", "''", expression)
            names = ", ".join(sorted(n for n in types if re.search(rf"\b{n}\b", code)))
            _add(facts, f"{table} check ({names})", _literals(expression))
    return facts


def _declared(columns: Iterable[tuple[object, ...]], name: str) -> str:
    return next(str(c[2]).upper() for c in columns if c[1] == name)


def sqlite_exact(db: sqlite3.Connection) -> list[tuple[str, str, str]]:
    """Every stored CREATE statement, comments and runs of blanks aside, by name."""
    rows = db.execute(
        "SELECT type, name, sql FROM sqlite_master WHERE sql IS NOT NULL ORDER BY name"
    ).fetchall()
    return [(kind, name, " ".join(_strip_comments(sql).split())) for kind, name, sql in rows]


_PG_COLUMNS = """
SELECT table_name, column_name, data_type, is_nullable, column_default, is_identity
FROM information_schema.columns WHERE table_schema = 'public'
"""
# Not-null constraints (contype 'n', PostgreSQL 18) are read from the columns instead.
_PG_CONSTRAINTS = """
SELECT rel.relname AS table, con.contype::text AS kind, pg_get_constraintdef(con.oid) AS definition,
       ARRAY(SELECT a.attname FROM unnest(con.conkey) WITH ORDINALITY AS k(num, i)
             JOIN pg_attribute a ON a.attrelid = con.conrelid AND a.attnum = k.num ORDER BY k.i) AS columns,
       ref.relname AS target,
       ARRAY(SELECT a.attname FROM unnest(con.confkey) WITH ORDINALITY AS k(num, i)
             JOIN pg_attribute a ON a.attrelid = con.confrelid AND a.attnum = k.num
             ORDER BY k.i) AS referenced,
       con.confdeltype::text AS on_delete, con.confupdtype::text AS on_update
FROM pg_constraint con
JOIN pg_class rel ON rel.oid = con.conrelid
JOIN pg_namespace ns ON ns.oid = rel.relnamespace
LEFT JOIN pg_class ref ON ref.oid = con.confrelid
WHERE ns.nspname = 'public' AND con.contype IN ('p', 'u', 'f', 'c')
"""
_PG_INDEXES = """
SELECT tab.relname AS table, idx.relname AS index, ix.indisunique AS unique,
       ARRAY(SELECT a.attname FROM unnest(ix.indkey::int2[]) WITH ORDINALITY AS k(num, i)
             JOIN pg_attribute a ON a.attrelid = tab.oid AND a.attnum = k.num ORDER BY k.i) AS columns,
       ARRAY(SELECT coalesce(co.collname, '')
             FROM unnest(ix.indcollation::oid[]) WITH ORDINALITY AS k(coll, i)
             LEFT JOIN pg_collation co ON co.oid = k.coll ORDER BY k.i) AS orders,
       pg_get_expr(ix.indpred, ix.indrelid) AS predicate,
       EXISTS (SELECT 1 FROM pg_constraint con
               WHERE con.conindid = ix.indexrelid AND con.contype IN ('p', 'u')) AS backs_constraint
FROM pg_index ix
JOIN pg_class idx ON idx.oid = ix.indexrelid
JOIN pg_class tab ON tab.oid = ix.indrelid
JOIN pg_namespace ns ON ns.oid = tab.relnamespace
WHERE ns.nspname = 'public'
"""


async def postgres_facts(conn: asyncpg.Connection) -> Facts:
    """The schema of a PostgreSQL database (schema `public`) in the shared vocabulary."""
    facts: Facts = {}
    types: dict[tuple[str, str], str] = {}
    for row in await conn.fetch(_PG_COLUMNS):
        table, name = row["table_name"], row["column_name"]
        types[table, name] = _POSTGRES_TYPES.get(row["data_type"], f"unmapped {row['data_type']}")
        facts[f"{table}.{name} type"] = types[table, name]
        facts[f"{table}.{name} null"] = "null" if row["is_nullable"] == "YES" else "not null"
        default = row["column_default"]
        if row["is_identity"] == "YES" or (default or "").startswith("nextval("):
            facts[f"{table}.{name} default"] = "generated"
        elif default is not None:
            facts[f"{table}.{name} default"] = re.sub(r"::[a-z ]+$", "", default)
    for row in await conn.fetch(_PG_CONSTRAINTS):
        table, names = row["table"], ", ".join(row["columns"])
        if row["kind"] == "p":
            facts[f"{table} primary key"] = names
        elif row["kind"] == "u":
            facts[f"{table} unique ({names})"] = "unique"
        elif row["kind"] == "f":
            facts[f"{table} foreign key ({names})"] = (
                f"{row['target']} ({', '.join(row['referenced'])})"
                f" on delete {_FK_ACTIONS[row['on_delete']]} on update {_FK_ACTIONS[row['on_update']]}"
            )
        else:
            _add(facts, f"{table} check ({', '.join(sorted(row['columns']))})", _literals(row["definition"]))
    for row in await conn.fetch(_PG_INDEXES):
        table, names = row["table"], ", ".join(row["columns"])
        for name, order in zip(row["columns"], row["orders"], strict=True):
            if types[table, name] == "text":
                _add(facts, f"{table}.{name} order", _ORDERS.get(order, order))
        if not row["backs_constraint"]:
            where = f" where {_predicate(row['predicate'])}" if row["predicate"] else ""
            facts[f"{table} index {row['index']}"] = f"{'unique ' if row['unique'] else ''}({names}){where}"
    return facts


async def postgres_exact(conn: asyncpg.Connection) -> list[tuple[str, ...]]:
    """Columns, constraints, indexes and sequences as PostgreSQL itself defines them."""
    rows: list[tuple[str, ...]] = []
    for row in await conn.fetch(
        "SELECT table_name, column_name, ordinal_position, data_type, is_nullable, column_default,"
        " is_identity, identity_generation, collation_name FROM information_schema.columns"
        " WHERE table_schema = 'public'"
    ):
        rows.append(("column", *(str(v) for v in row.values())))
    for row in await conn.fetch(
        "SELECT rel.relname, con.conname, pg_get_constraintdef(con.oid) FROM pg_constraint con"
        " JOIN pg_class rel ON rel.oid = con.conrelid JOIN pg_namespace ns ON ns.oid = rel.relnamespace"
        " WHERE ns.nspname = 'public'"
    ):
        rows.append(("constraint", *(str(v) for v in row.values())))
    for row in await conn.fetch("SELECT indexname, indexdef FROM pg_indexes WHERE schemaname = 'public'"):
        rows.append(("index", *(str(v) for v in row.values())))
    for row in await conn.fetch(
        "SELECT sequencename, data_type::text, start_value, increment_by FROM pg_sequences"
        " WHERE schemaname = 'public'"
    ):
        rows.append(("sequence", *(str(v) for v in row.values())))
    return sorted(rows)
