"""Replies as JSON typed the way a script expects: numbers are numbers.

`json_format` follows the proto3 JSON mapping, which renders 64-bit integers as strings
(`"secret_version": "3"`) and every number in a Struct as a double (`"port": 5432.0`).
Both are fixed here by walking the message's own descriptor, never by guessing from the
text: an int64 field becomes a JSON integer, and a Struct number that is exactly whole
(and within 2**53, where a double is still exact) becomes one too.
"""

from __future__ import annotations

import json
import re
from typing import Any

from google.protobuf import json_format, struct_pb2
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message

from broker.client import struct_to_dict

_INT64 = {
    FieldDescriptor.TYPE_INT64,
    FieldDescriptor.TYPE_UINT64,
    FieldDescriptor.TYPE_SINT64,
    FieldDescriptor.TYPE_FIXED64,
    FieldDescriptor.TYPE_SFIXED64,
}


def json_doc(message: Message) -> dict[str, Any]:
    """The message as a dict with the proto's field names, integers and whole Struct numbers as ints."""
    doc: dict[str, Any] = json_format.MessageToDict(message, preserving_proto_field_name=True)
    return _typed(message, doc)


def to_json(message: Message) -> str:
    """The message as indented JSON (non-ASCII escaped, so no byte can reach a terminal raw)."""
    return json.dumps(json_doc(message), indent=2, sort_keys=True)


def json_line(message: Message) -> str:
    """The message as one line of compact JSON (for JSON Lines files): readable text kept as it
    is, anything not printable (C1 controls, bidi marks, zero-width characters) escaped, so an
    export read at a terminal cannot drive it or hide text."""
    text = json.dumps(json_doc(message), sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return _NOT_PRINTABLE.sub(_escaped, text)


# JSON escapes what is below U+0020 itself; these can only occur inside strings.
_NOT_PRINTABLE = re.compile("[^\x00-\x7e]")


def _escaped(match: re.Match[str]) -> str:
    char = match[0]
    if char.isprintable():
        return char
    # json.dumps with ensure_ascii's own spelling: \uXXXX, a surrogate pair beyond U+FFFF.
    return json.dumps(char)[1:-1]


# Fields are typed Any: protobuf's upb and pure-Python descriptors are distinct types to mypy.
def _typed(message: Message, doc: dict[str, Any]) -> dict[str, Any]:
    for field in message.DESCRIPTOR.fields:
        if field.name in doc:
            doc[field.name] = _field(field, getattr(message, field.name), doc[field.name])
    return doc


def _field(field: Any, value: Any, rendered: Any) -> Any:
    if field.message_type is not None and field.message_type.GetOptions().map_entry:
        value_field = field.message_type.fields_by_name["value"]
        return {
            key: _single(value_field, value[key], item) if key in value else item
            for key, item in rendered.items()
        }
    if field.is_repeated:
        return [_single(field, v, r) for v, r in zip(value, rendered, strict=True)]
    return _single(field, value, rendered)


def _single(field: Any, value: Any, rendered: Any) -> Any:
    if field.type in _INT64:
        return int(value)
    if field.message_type is None:
        return rendered
    if field.message_type.full_name in _DYNAMIC:
        return _DYNAMIC[field.message_type.full_name](value)
    # Well-known types such as Timestamp render as strings and have nothing to fix.
    return _typed(value, rendered) if isinstance(rendered, dict) else rendered


def plain_value(value: struct_pb2.Value) -> Any:
    """A Value as plain JSON data, by the same rule as a Struct's values."""
    holder = struct_pb2.Struct()
    holder.fields["v"].CopyFrom(value)
    return struct_to_dict(holder)["v"]


def _list(value: struct_pb2.ListValue) -> Any:
    holder = struct_pb2.Struct()
    holder.fields["v"].list_value.CopyFrom(value)
    return struct_to_dict(holder)["v"]


# Dynamic JSON values: whole numbers by struct_to_dict's rule, the one the SDK applies too.
_DYNAMIC: dict[str, Any] = {
    "google.protobuf.Struct": struct_to_dict,
    "google.protobuf.Value": plain_value,
    "google.protobuf.ListValue": _list,
}
