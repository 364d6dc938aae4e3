"""`--json` typing: int64 fields and whole Struct numbers are JSON numbers, by descriptor, not by guess."""

from __future__ import annotations

import json

from broker._proto import broker_pb2 as pb
from broker.cli._json import json_doc, json_line, to_json


def test_int64_fields_are_numbers_wherever_they_sit() -> None:
    rotated = pb.RotateMasterKeyResponse(active_kek_id="k2", deks_by_kek={"k1": 12, "k2": 2**62})
    assert json_doc(rotated)["deks_by_kek"] == {"k1": 12, "k2": 2**62}  # a map's values
    verify = pb.VerifyAuditLogResponse(ok=False, events_checked=7, first_broken_id=3)
    assert json_doc(verify) == {"events_checked": 7, "first_broken_id": 3}
    events = pb.ListAuditEventsResponse(events=[pb.AuditEvent(id=1), pb.AuditEvent(id=2, actor="a")])
    assert json_doc(events) == {"events": [{"id": 1}, {"id": 2, "actor": "a"}]}  # repeated messages
    changes = pb.RefreshMcpToolsResponse(result=pb.TestResult(success=True, latency_ms=40))
    assert json_doc(changes)["result"] == {"success": True, "latency_ms": 40}  # a nested message


def test_text_that_looks_like_a_number_stays_text() -> None:
    event = pb.AuditEvent(id=5, actor="1234", details={"count": "7"})
    assert json_doc(event) == {"id": 5, "actor": "1234", "details": {"count": "7"}}


def test_whole_struct_numbers_are_integers_and_the_rest_are_kept() -> None:
    connection = pb.Connection(id="conn_x")
    connection.config.update(
        {"port": 5432, "ratio": 0.5, "huge": 2.0**60, "nested": {"n": 3, "xs": [1, 2.5]}, "flag": True}
    )
    config = json_doc(connection)["config"]
    assert config == {
        "port": 5432,
        "ratio": 0.5,
        "huge": 2.0**60,
        "nested": {"n": 3, "xs": [1, 2.5]},
        "flag": True,
    }
    assert type(config["port"]) is int and type(config["huge"]) is float  # beyond 2**53 a double is inexact
    field = pb.FieldSpec(name="port")
    field.default_value.number_value = 5432
    assert json_doc(field)["default_value"] == 5432  # a bare Value too
    assert '"port": 5432,' in to_json(connection)


def test_json_lines_keep_non_ascii_and_pretty_json_escapes_it() -> None:
    event = pb.AuditEvent(id=1, reason="héllo")
    assert json_line(event) == '{"id":1,"reason":"héllo"}'
    hidden = pb.AuditEvent(id=1, reason="a\u202eb\x85c\u200bd\U000e0041e")  # bidi, C1, zero-width, tag
    line = json_line(hidden)
    assert line == '{"id":1,"reason":"a\\u202eb\\u0085c\\u200bd\\udb40\\udc41e"}'
    assert json.loads(line)["reason"] == hidden.reason
    assert json.loads(to_json(event)) == {"id": 1, "reason": "héllo"} and "h\\u00e9llo" in to_json(event)
