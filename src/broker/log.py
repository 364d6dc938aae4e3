"""Structured JSON logging with one redaction processor in the chain.

Every log line of a call carries its request id and method (`bind_call`, by the API
interceptor: one context variable, cheaper per call than structlog's own; structlog's
contextvars are merged too). The redaction processor masks any value whose key names a
secret and any `SecretFields`, wherever it sits in the event.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import re
import sys
import threading
from collections.abc import MutableMapping
from typing import Any, TextIO

import structlog

from broker.sensitive import SecretFields

REDACTED = "[redacted]"
_SECRET_KEY = re.compile(
    r"(?i)(pass(word|phrase)?|secret|token|api[_-]?key|authorization|private[_-]?key|credential|cookie)"
)


# (request id, method) of the call being served; see `bind_call`.
_CALL: contextvars.ContextVar[tuple[str, str] | None] = contextvars.ContextVar("broker_call", default=None)
_debug = False


def bind_call(request_id: str, method: str) -> contextvars.Token[tuple[str, str] | None]:
    """Put `request_id` and `method` on every line logged in this context until `unbind_call`."""
    return _CALL.set((request_id, method))


def unbind_call(token: contextvars.Token[tuple[str, str] | None]) -> None:
    """Undo `bind_call`; quietly, as a stream closed by the event loop runs in another context."""
    with contextlib.suppress(ValueError):
        _CALL.reset(token)


def merge_call(_logger: Any, _method: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """structlog processor: the bound call's request id and method, unless the line sets its own."""
    bound = _CALL.get()
    if bound is not None:
        event.setdefault("request_id", bound[0])
        event.setdefault("method", bound[1])
    return event


def debug_enabled() -> bool:
    """Whether debug lines are written: lets a hot path skip building a line nobody sees."""
    return _debug


def _redact(value: Any, depth: int = 0) -> Any:
    if isinstance(value, SecretFields):
        return repr(value)
    if depth > 4:
        return value
    if isinstance(value, dict):
        return {
            k: REDACTED if isinstance(k, str) and _SECRET_KEY.search(k) else _redact(v, depth + 1)
            for k, v in value.items()
        }
    if isinstance(value, list | tuple):
        return [_redact(v, depth + 1) for v in value]
    return value


def redact_secrets(_logger: Any, _method: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """structlog processor: mask secret-named keys and secret values anywhere in the event."""
    for key in list(event):
        if key != "event" and _SECRET_KEY.search(key):
            event[key] = REDACTED
        else:
            event[key] = _redact(event[key])
    return event


# One lock for every line written, by structlog or by the standard `logging` handler: each takes
# it, so a line from a library's thread (grpc's, the SQLite writer's) never lands between the two
# writes of another line and breaks both (structlog's PrintLogger locks only against itself).
_WRITE_LOCK = threading.RLock()


class _Lines:
    """structlog's logger: one JSON line per event, written whole under `_WRITE_LOCK` and flushed."""

    def __init__(self, out: TextIO) -> None:
        self._out = out

    def msg(self, message: str) -> None:
        with _WRITE_LOCK:
            self._out.write(message + "\n")
            self._out.flush()

    debug = info = warning = warn = error = critical = exception = fatal = log = msg


def configure(level: str = "info", stream: TextIO | None = None) -> None:
    """JSON lines to stdout (or `stream`), filtered at `level`.

    Libraries that log through the standard `logging` module (grpc, the MCP SDK,
    asyncio) are rendered by the same chain, redaction included, at WARNING and up.
    """
    global _debug
    out = stream or sys.stdout
    _debug = getattr(logging, level.upper()) <= logging.DEBUG
    shared: list[structlog.typing.Processor] = [
        structlog.contextvars.merge_contextvars,
        merge_call,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        redact_secrets,
    ]
    structlog.configure(
        processors=[
            *shared,
            structlog.processors.format_exc_info,
            structlog.processors.JSONRenderer(sort_keys=True),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(getattr(logging, level.upper())),
        logger_factory=lambda *_: _Lines(out),
        cache_logger_on_first_use=False,
    )
    handler = logging.StreamHandler(out)
    handler.lock = _WRITE_LOCK  # whole lines, whichever thread logs through which of the two
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                structlog.processors.format_exc_info,
                structlog.processors.JSONRenderer(sort_keys=True),
            ],
            foreign_pre_chain=[*shared, structlog.stdlib.add_logger_name],
        )
    )
    root = logging.getLogger()
    root.handlers = [h for h in root.handlers if not getattr(h, "_broker", False)]
    handler._broker = True  # type: ignore[attr-defined]
    root.addHandler(handler)
    root.setLevel(max(logging.WARNING, getattr(logging, level.upper())))
