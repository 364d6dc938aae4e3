"""Request values read at the boundary: Struct conversion and page tokens, without sockets."""

from __future__ import annotations

import base64
import json
import math

import pytest
from google.protobuf import json_format, struct_pb2

from broker.api import convert
from broker.errors import InvalidArgument
from broker.model import AuditFilter, ConnectionFilter, GrantFilter
from broker.service import paging


def struct(values: dict[str, object]) -> struct_pb2.Struct:
    message = struct_pb2.Struct()
    message.update(values)
    return message


def test_finite_structs_read_as_message_to_dict_reads_them() -> None:
    message = struct(
        {"port": 5432, "ssl": True, "host": "db", "none": None, "deep": {"list": [1.5, "a", {}]}}
    )
    assert convert.from_struct(message, "config") == json_format.MessageToDict(message)


def test_every_non_finite_number_is_named_by_its_path() -> None:
    message = struct({"port": math.nan, "deep": {"list": [1, math.inf, {"x": -math.inf}]}, "ok": 1})
    with pytest.raises(InvalidArgument) as info:
        convert.from_struct(message, "draft.config")
    assert {v.field for v in info.value.violations} == {
        "draft.config.port",
        "draft.config.deep.list[1]",
        "draft.config.deep.list[2].x",
    }


def test_a_key_that_is_no_field_name_is_left_out_of_the_path() -> None:
    with pytest.raises(InvalidArgument) as info:
        convert.from_struct(struct({"hunter2 is my password": math.nan}), "config")
    assert [v.field for v in info.value.violations] == ["config"]


@pytest.mark.parametrize(
    ("kind", "position", "shape"),
    [
        ("audit", 10**30, paging.event_id),
        ("audit", 2**63, paging.event_id),
        ("audit", 0, paging.event_id),
        ("audit", True, paging.event_id),
        ("audit", 3.0, paging.event_id),
        ("connections", 5, paging.text),
        ("connections", "\ud800", paging.text),
        ("connections", "x" * 2000, paging.text),
        ("grants", ["a"], paging.text_pair),
        ("grants", ["a", 1], paging.text_pair),
    ],
)
def test_a_position_of_the_wrong_shape_is_a_forged_token(kind: str, position: object, shape: object) -> None:
    token = paging.encode_token(kind, position, GrantFilter())
    with pytest.raises(InvalidArgument) as info:
        paging.decode_token(kind, token, shape, GrantFilter())  # type: ignore[arg-type]
    assert info.value.violations[0].field == "page_token"


def test_positions_the_broker_makes_round_trip() -> None:
    unfiltered = AuditFilter()
    token = paging.encode_token("audit", 2**63 - 1, unfiltered)
    assert paging.decode_token("audit", token, paging.event_id, unfiltered) == 2**63 - 1
    pair = ["conn_01", "spiffe://broker.local/tenant/t/executor/e"]
    grants = GrantFilter(principal=pair[1])
    assert (
        paging.decode_token("grants", paging.encode_token("grants", pair, grants), paging.text_pair, grants)
        == pair
    )
    assert paging.decode_token("audit", "", paging.event_id, unfiltered) is None


def test_a_token_goes_with_the_filters_it_was_returned_for() -> None:
    labelled = ConnectionFilter(type="http", labels={"env": "prod", "team": "a"})
    token = paging.encode_token("connections", "conn_01", labelled)
    same = ConnectionFilter(type="http", labels={"team": "a", "env": "prod"})  # labels in another order
    assert paging.decode_token("connections", token, paging.text, same) == "conn_01"
    for other in (
        ConnectionFilter(type="http", labels={"env": "prod"}),
        ConnectionFilter(labels={"env": "prod", "team": "a"}),
        ConnectionFilter(),
    ):
        with pytest.raises(InvalidArgument) as info:
            paging.decode_token("connections", token, paging.text, other)
        assert info.value.violations[0].field == "page_token"
        assert "other filters" in info.value.violations[0].description


def test_a_token_from_before_filters_were_bound_is_refused_as_forged() -> None:
    old = paging.encode_token("connections", "conn_01", ConnectionFilter())
    raw = json.loads(base64.urlsafe_b64decode(old + "=" * (-len(old) % 4)))
    two = base64.urlsafe_b64encode(json.dumps(raw[:2]).encode()).decode().rstrip("=")
    with pytest.raises(InvalidArgument) as info:
        paging.decode_token("connections", two, paging.text, ConnectionFilter())
    assert "not a token returned" in info.value.violations[0].description
