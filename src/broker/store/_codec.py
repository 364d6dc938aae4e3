"""Records to SQL parameters and rows back to records: one `Table` per stored dataclass.

A column has its field's name, and how a value is stored follows from the field's type:
datetimes as INTEGER microseconds since the epoch (UTC), dicts and tuples as JSON text
with sorted keys, enums by value, a dataclass inside a record (`TestResult`, `GrantScope`)
as a JSON document of its fields by the same rules, a `Sealed` envelope in three columns
(ciphertext, wrapped_dek, kek_id), text and integers as they are. Every
statement is assembled from these constant column lists, never from input, and nothing
here formats a value into an error message.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import operator
import typing
from collections.abc import Callable, Mapping
from datetime import UTC, datetime, timedelta
from types import NoneType
from typing import Any, Generic, Protocol, TypeVar

from broker.crypto.envelope import Sealed
from broker.model import (
    AuditCheckpoint,
    AuditEvent,
    AuditSeal,
    ConnectionRecord,
    Grant,
    Lease,
    McpTool,
    PendingAuthorization,
    SecurityEvent,
    SeenFact,
    TestResult,
)

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MICROSECOND = timedelta(microseconds=1)
_SEALED_COLUMNS = ("ciphertext", "wrapped_dek", "kek_id")

T = TypeVar("T")
Convert = Callable[[Any], Any]


class Row(Protocol):
    """A result row addressable by column name (sqlite3.Row, asyncpg.Record)."""

    def __getitem__(self, key: str, /) -> Any: ...


def to_micros(value: datetime) -> int:
    """Microseconds since the epoch; a naive datetime is a programming error."""
    if value.tzinfo is None or value.utcoffset() is None:
        raise ValueError("the store needs timezone-aware datetimes")
    return (value - _EPOCH) // _MICROSECOND


def from_micros(value: int) -> datetime:
    return _EPOCH + timedelta(microseconds=value)


# Built once: json.dumps with these options would build an encoder per call (every audit event).
_JSON = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def to_json(value: Any) -> str:
    return _JSON.encode(value)


def _blob(value: Any) -> bytes:
    # A sealed column written with another SQL type behind the broker's back (TEXT,
    # INTEGER) reads as no bytes, which never opens: the caller sees decrypt_failed,
    # not a TypeError (nor `bytes(<huge int>)` allocating that many zero bytes).
    return bytes(value) if isinstance(value, bytes | bytearray | memoryview) else b""


def sealed_from_row(row: Row) -> Sealed:
    """The sealed columns (ciphertext, wrapped_dek, kek_id) of a row, whatever SQL types they hold."""
    kek_id = row["kek_id"]
    return Sealed(
        _blob(row["ciphertext"]), _blob(row["wrapped_dek"]), kek_id if isinstance(kek_id, str) else ""
    )


def _conversions(hint: Any, *, in_column: bool = True) -> tuple[Convert, Convert]:
    """(to the stored value, from it) for a value of type `hint`: a column's, or inside a JSON
    document (not `in_column`), where dicts, tuples and dataclasses stay JSON values."""
    args = typing.get_args(hint)
    if NoneType in args:
        write, read = _conversions(next(a for a in args if a is not NoneType), in_column=in_column)
        return _or_none(write), _or_none(read)
    kind = typing.get_origin(hint) or hint
    if kind is dict or kind is tuple or dataclasses.is_dataclass(kind):
        write, read = (dict, dict) if kind is dict else (list, tuple) if kind is tuple else _document(kind)
        if not in_column:
            return write, read
        return (lambda v: to_json(write(v))), (lambda v: read(json.loads(v)))
    if kind is datetime:
        return to_micros, from_micros
    if isinstance(kind, type) and issubclass(kind, enum.Enum):
        return operator.attrgetter("value"), kind
    if kind is str:
        # NULL only where the chain has not hashed an event yet (its `hash`), or by tampering.
        return (lambda v: v), (lambda v: "" if v is None else str(v))
    if kind is int or kind is bool:
        return (lambda v: v), kind
    raise TypeError(f"no column type for {kind!r}")


def _document(model: Any) -> tuple[Convert, Convert]:
    """A dataclass (a `TestResult`, a `GrantScope`) as a JSON object of its fields, each
    converted by its type; a field missing from a stored object takes its default."""
    hints = typing.get_type_hints(model)
    fields = {f.name: _conversions(hints[f.name], in_column=False) for f in dataclasses.fields(model)}

    def write(value: Any) -> dict[str, Any]:
        return {name: to(getattr(value, name)) for name, (to, _) in fields.items()}

    def read(doc: dict[str, Any]) -> Any:
        return model(**{name: back(doc[name]) for name, (_, back) in fields.items() if name in doc})

    return write, read


def _or_none(convert: Convert) -> Convert:
    return lambda v: None if v is None else convert(v)


def _writer(field: str, write: Convert) -> Convert:
    get = operator.attrgetter(field)
    return lambda record: write(get(record))


def _reader(column: str, read: Convert) -> Callable[[Row], Any]:
    return lambda row: read(row[column])


def _sealed_writer(field: str, column: str) -> Convert:
    get, part = operator.attrgetter(field), operator.attrgetter(column)
    return lambda record: None if get(record) is None else part(get(record))


def _sealed_reader(optional: bool) -> Callable[[Row], Sealed | None]:
    def read(row: Row) -> Sealed | None:
        # A purge clears all three sealed columns; NULL in only some of them is tampering.
        if optional and all(row[c] is None for c in _SEALED_COLUMNS):
            return None
        return sealed_from_row(row)

    return read


class Table(Generic[T]):
    """How the dataclass `model` is stored in the table `name`; see the module docstring.

    `generated` fields are assigned by the database: read back, never written. `derived`
    columns are written from the record and never read back (for queries only).
    """

    def __init__(
        self,
        name: str,
        model: type[T],
        *,
        generated: tuple[str, ...] = (),
        derived: Mapping[str, Callable[[T], Any]] | None = None,
    ) -> None:
        self._model = model
        hints = typing.get_type_hints(model)
        writes: dict[str, Convert] = {}
        self._reads: list[tuple[str, Callable[[Row], Any]]] = []
        for field in dataclasses.fields(model):  # type: ignore[arg-type]
            if not field.init:
                continue
            hint = hints[field.name]
            if Sealed in (hint, *typing.get_args(hint)):
                self._reads.append((field.name, _sealed_reader(hint is not Sealed)))
                writes |= {column: _sealed_writer(field.name, column) for column in _SEALED_COLUMNS}
                continue
            write, read = _conversions(hint)
            self._reads.append((field.name, _reader(field.name, read)))
            if field.name not in generated:
                writes[field.name] = _writer(field.name, write)
        writes |= derived or {}
        self.columns = tuple(writes)
        self._writes = tuple(writes.values())
        # Names from the model's fields, never from input.
        self.select = f"SELECT {', '.join((*generated, *self.columns))} FROM {name}"  # noqa: S608
        placeholders = ", ".join("?" * len(writes))
        self.insert = f"INSERT INTO {name} ({', '.join(self.columns)}) VALUES ({placeholders})"  # noqa: S608

    def params(self, record: T) -> tuple[Any, ...]:
        """The record's values in `columns` order."""
        return tuple(write(record) for write in self._writes)

    def from_row(self, row: Row) -> T:
        return self._model(**{field: read(row) for field, read in self._reads})


CONNECTIONS = Table(
    "connections",
    ConnectionRecord,
    # For the background refresher's scan; read back through `token_expires_at`.
    derived={
        "secret_expires_at": lambda r: None if r.token_expires_at is None else to_micros(r.token_expires_at)
    },
)
GRANTS = Table("grants", Grant)
AUDIT = Table("audit_events", AuditEvent)
OAUTH_STATES = Table("oauth_states", PendingAuthorization)
SECURITY_EVENTS = Table("security_events", SecurityEvent, generated=("id",))
SEEN = Table("monitor_seen", SeenFact)
SEALS = Table("audit_seals", AuditSeal)
CHECKPOINTS = Table("audit_checkpoints", AuditCheckpoint, generated=("id",))
# The tool list of a connection: `tenant`, `connection_id` and `discovered_at` are written around it.
MCP_TOOLS = Table("mcp_tools", McpTool)
LEASES = Table("leases", Lease)
# A `TestResult` as the `last_test` column holds it (`record_test_result` writes it alone).
test_result_text: Convert = _conversions(TestResult)[0]
