"""Connection types as data: their fields, which are secret, defaults, and validation.

One registry (`list_types`, `get_type`) and one validator (`validate`), which is the only
place a connection's content is checked; `destination_digest` says where a connection's
secrets are sent. No I/O, no grpc.
"""

from broker.catalog._destination import destination_digest, destination_fields, fields_needing_secrets
from broker.catalog._registry import get_type, list_types, withheld_fields
from broker.catalog._spec import ConnectionType, FieldKind, FieldSpec, Validated
from broker.catalog._validate import NAME as FIELD_NAME
from broker.catalog._validate import validate, validate_field
from broker.catalog._values import (
    CREATION_ONLY_PLACEHOLDERS,
    MAX_JSON_DEPTH,
    STATEMENT_PLACEHOLDERS,
    fill_statement,
    statement_placeholders,
    statement_problem,
)

__all__ = [
    "CREATION_ONLY_PLACEHOLDERS",
    "FIELD_NAME",
    "MAX_JSON_DEPTH",
    "STATEMENT_PLACEHOLDERS",
    "ConnectionType",
    "FieldKind",
    "FieldSpec",
    "Validated",
    "destination_digest",
    "destination_fields",
    "fields_needing_secrets",
    "fill_statement",
    "get_type",
    "list_types",
    "statement_placeholders",
    "statement_problem",
    "validate",
    "validate_field",
    "withheld_fields",
]
