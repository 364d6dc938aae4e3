"""Finding a tenant's connection by id, with the errors every use-case reports the same way."""

from __future__ import annotations

from broker.errors import FailedPrecondition, InvalidArgument, NotFound
from broker.model import ConnectionRecord, ConnectionStatus, shown_id
from broker.service.inputs import require_printable
from broker.store import ConnectionStore


async def existing_connection(
    store: ConnectionStore, tenant: str, connection_id: str, field: str = "id"
) -> ConnectionRecord:
    """The connection in any state but purged; another tenant's id is simply not found."""
    if not connection_id:
        raise InvalidArgument.field(field, "is required")
    require_printable(**{field: connection_id})
    record = await store.get_connection(tenant, connection_id)
    if record is None or record.purged_at is not None:
        raise NotFound(f"connection {shown_id(connection_id)} not found")
    return record


async def live_connection(
    store: ConnectionStore, tenant: str, connection_id: str, field: str = "id"
) -> ConnectionRecord:
    """As `existing_connection`, and not soft-deleted."""
    record = await existing_connection(store, tenant, connection_id, field)
    if not record.live:
        raise FailedPrecondition(f"connection {record.id} is deleted")
    return record


def refusal(record: ConnectionRecord) -> str:
    """Why a connection in this state is never used for an executor ("" when it may be): the
    denial reason that Resolve and the proxy audit."""
    if record.purged_at is not None:
        return "unknown_connection"
    if not record.live:
        return "connection_deleted"
    if record.status is ConnectionStatus.REVOKED:
        return "connection_revoked"
    if record.suspended_at is not None:
        return "connection_suspended"
    return ""
