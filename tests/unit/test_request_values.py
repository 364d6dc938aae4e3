"""Request values read at the boundary: Struct conversion and page tokens, without sockets."""

from __future__ import annotations

import math

import pytest
from google.protobuf import json_format, struct_pb2

from broker.api import convert
from broker.errors import InvalidArgument
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
    token = paging.encode_token(kind, position)
    with pytest.raises(InvalidArgument) as info:
        paging.decode_token(kind, token, shape)  # type: ignore[arg-type]
    assert info.value.violations[0].field == "page_token"


def test_positions_the_broker_makes_round_trip() -> None:
    assert paging.decode_token("audit", paging.encode_token("audit", 2**63 - 1), paging.event_id) == 2**63 - 1
    pair = ["conn_01", "spiffe://broker.local/tenant/t/executor/e"]
    assert paging.decode_token("grants", paging.encode_token("grants", pair), paging.text_pair) == pair
    assert paging.decode_token("audit", "", paging.event_id) is None
