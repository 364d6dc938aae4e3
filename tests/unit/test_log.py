"""The redaction processor masks secrets wherever they sit in a log event."""

from __future__ import annotations

import io
import json

import structlog

from broker import log
from broker.sensitive import SecretFields


def test_secret_named_keys_and_secret_values_are_masked() -> None:
    stream = io.StringIO()
    log.configure("debug", stream)
    secrets = SecretFields({"password": "CANARY-1"})
    structlog.get_logger().info(
        "event",
        password="CANARY-2",
        headers={"Authorization": "Bearer CANARY-3", "Accept": "json"},
        nested=[{"api_key": "CANARY-4"}],
        value=secrets,
        fine="visible",
    )
    line = stream.getvalue()
    assert "CANARY" not in line
    event = json.loads(line)
    assert event["fine"] == "visible" and event["headers"]["Accept"] == "json"
    assert event["password"] == log.REDACTED and event["headers"]["Authorization"] == log.REDACTED
    assert event["value"] == "SecretFields(password=<redacted>)"


def test_request_id_from_context_is_on_every_line() -> None:
    stream = io.StringIO()
    log.configure("info", stream)
    with structlog.contextvars.bound_contextvars(request_id="req-1"):
        structlog.get_logger().info("one")
        structlog.get_logger().debug("filtered out")
        structlog.get_logger().warning("two")
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert [(e["event"], e["request_id"]) for e in lines] == [("one", "req-1"), ("two", "req-1")]


def test_a_bound_call_puts_its_request_id_and_method_on_every_line_until_unbound() -> None:
    stream = io.StringIO()
    log.configure("info", stream)
    assert not log.debug_enabled()
    token = log.bind_call("req-2", "/broker.v1.ResolveService/Resolve")
    structlog.get_logger().info("inside")
    structlog.get_logger().info("own id", request_id="given")
    log.unbind_call(token)
    structlog.get_logger().info("after")
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert [(e["event"], e.get("request_id"), e.get("method")) for e in lines] == [
        ("inside", "req-2", "/broker.v1.ResolveService/Resolve"),
        ("own id", "given", "/broker.v1.ResolveService/Resolve"),
        ("after", None, None),
    ]
    log.configure("debug", stream)
    assert log.debug_enabled()


def test_standard_library_logs_go_through_the_same_redaction() -> None:
    import logging

    stream = io.StringIO()
    log.configure("info", stream)
    logging.getLogger("mcp.client.test").error("upstream failed")
    logging.getLogger("mcp.client.test").info("below the floor")
    (line,) = stream.getvalue().splitlines()
    event = json.loads(line)
    assert event["event"] == "upstream failed" and event["level"] == "error"
    assert event["logger"] == "mcp.client.test"


def test_lines_from_structlog_and_standard_logging_in_several_threads_stay_whole() -> None:
    """A library logging from its own thread (grpc's, the SQLite writer's) never splits another line."""
    import logging
    import threading
    import time

    class Yielding(io.StringIO):
        def write(self, text: str) -> int:
            time.sleep(0)  # let another thread run between any two writes
            return super().write(text)

    stream = Yielding()
    log.configure("info", stream)

    def ours() -> None:
        for n in range(200):
            structlog.get_logger("broker.test").info("ours", n=n)

    def theirs() -> None:
        for n in range(200):
            logging.getLogger("grpc.test").warning("theirs %d", n)

    threads = [threading.Thread(target=target) for target in (ours, theirs, ours, theirs)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    events = [json.loads(line)["event"] for line in stream.getvalue().splitlines()]
    assert sorted(set(events)) == ["ours", *sorted({f"theirs {n}" for n in range(200)})]
    assert len(events) == 800
