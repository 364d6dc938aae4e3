"""Invariant 2: the admin Connection message has no field that can hold a secret value."""

from __future__ import annotations

from google.protobuf.descriptor import FieldDescriptor

from broker._proto import broker_pb2 as pb

# Every field of the admin summary, reviewed: none carries a secret value. A new field
# fails this test until someone decides, here, that it cannot hold one.
REVIEWED = {
    "id", "name", "type", "provider", "config", "secret_fields", "labels", "status", "etag",
    "created_at", "updated_at", "last_used_at", "last_tested_at", "test_status", "deleted_at",
    "last_test", "stale",  # last_test.message and .details are scrubbed of every secret value
    "reauthorization",  # reauthorization.description is scrubbed of every secret value
}  # fmt: skip


def test_connection_fields_are_reviewed() -> None:
    assert {f.name for f in pb.Connection.DESCRIPTOR.fields} == REVIEWED


def test_secret_fields_holds_names_only() -> None:
    field = pb.Connection.DESCRIPTOR.fields_by_name["secret_fields"]
    assert field.type == FieldDescriptor.TYPE_STRING
    assert field.label == FieldDescriptor.LABEL_REPEATED  # a list of names, not a map of values


def test_no_admin_response_message_has_a_secrets_map() -> None:
    admin = pb.DESCRIPTOR.services_by_name["AdminService"]
    seen: set[str] = set()

    def walk(message: object) -> None:
        descriptor = message  # a Descriptor
        if descriptor.full_name in seen:  # type: ignore[attr-defined]
            return
        seen.add(descriptor.full_name)  # type: ignore[attr-defined]
        for field in descriptor.fields:  # type: ignore[attr-defined]
            assert field.name != "secrets", f"{descriptor.full_name} carries secret values"  # type: ignore[attr-defined]
            if field.message_type is not None and field.message_type.file.package == "broker.v1":
                walk(field.message_type)

    for method in admin.methods:
        walk(method.output_type)
    assert "broker.v1.Connection" in seen
