"""SPIFFE ids and the secret value type."""

from __future__ import annotations

import pickle

import pytest

from broker.identity import InvalidSpiffeId, parse_spiffe_id
from broker.model import Role
from broker.sensitive import SecretFields


def test_parses_broker_spiffe_ids() -> None:
    principal = parse_spiffe_id("spiffe://broker.local/tenant/acme/executor/runner-1", "broker.local")
    assert (principal.tenant, principal.role, principal.name) == ("acme", Role.EXECUTOR, "runner-1")
    assert principal.spiffe_id == "spiffe://broker.local/tenant/acme/executor/runner-1"


@pytest.mark.parametrize(
    "text",
    [
        "",
        "spiffe://broker.local/tenant/acme/root/x",
        "spiffe://broker.local/tenant/acme/executor",
        "spiffe://broker.local/tenant/acme/executor/a/b",
        "spiffe://broker.local/tenant/../executor/x",
        "spiffe://broker.local/tenant/./executor/x",
        "spiffe://broker.local/tenant/acme/executor/..",
        "spiffe://broker.local/tenant/acme/admin/.",
        "https://broker.local/tenant/acme/executor/x",
        "spiffe://broker.local/tenant/acme/executor/x?y",
        "spiffe://other.domain/tenant/acme/executor/x",
    ],
)
def test_rejects_anything_else(text: str) -> None:
    with pytest.raises(InvalidSpiffeId):
        parse_spiffe_id(text, "broker.local")


def test_secret_fields_mask_repr_and_refuse_pickling() -> None:
    secrets = SecretFields({"password": "CANARY", "token": "CANARY2"})
    assert "CANARY" not in repr(secrets) and "CANARY" not in str(secrets) and "CANARY" not in f"{secrets}"
    assert secrets.names == ("password", "token")
    with pytest.raises(TypeError):
        pickle.dumps(secrets)
    assert SecretFields.from_bytes(secrets.to_bytes()) == secrets
    with pytest.raises(ValueError):
        SecretFields.from_bytes(b'{"a": 1}')


def test_only_id_shaped_values_are_echoed_in_errors() -> None:
    from broker.model import new_id, shown_id

    real = new_id("conn")
    assert shown_id(real) == real
    for value in ("sk-live-0123456789", "conn_" + "x" * 40, "", "conn_ABC"):
        assert shown_id(value) == "(not a valid id)"
