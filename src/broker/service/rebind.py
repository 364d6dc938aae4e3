"""Re-seal connections sealed in an older format (1, 2 or 3) in the current one (4).

Each format binds more of the row than the one before (`service.sealing.DIGEST_OF_FORMAT`):
format 1 no destination, format 2 where the secrets are sent, format 3 also how they
travel there (TLS, the trusted CA, driver options), format 4 also what is done with them
there (a dynamic database connection's statements, role and lifetimes). Runs at every start, before the
listeners open, so no request ever reads a row of an older format: outside this pass
such a row does not open (`open_secrets` takes the current format only). Each row
found is opened with its own format's binding (`open_legacy_secrets`), sealed again
under a fresh data key bound to what it holds now, with the same secret version (the
value did not change), and written with a compare-and-swap on its version and an
audit event naming both formats; two replicas starting together each skip what the
other did. A row that does not open stays as it is and keeps failing closed as
decrypt_failed.

Only an upgrade leaves rows of an older format: its first start re-seals them all before
serving. So once the database holds a connection of the current format, a row of an older
format beside it was written back afterwards (a backup's ciphertext, re-pointed by someone
with write access to the database, who would need only a restart for this pass to bind the
secret to their server). Such rows are left as they are, failing closed, and logged
(`rebind_refused`); `broker keys rebind` re-seals them for an operator who vouches for them
(`vouched`): an upgrade interrupted half way, rows an older replica wrote during a rolling
upgrade. (A replica that starts while another is half way through the upgrade's pass sees
its re-sealed rows and leaves the rest to it, logging them as refused.)

Format 1 also means "written before servers' echoes of composed credentials were
scrubbed": the row's last test result and its stored MCP tools are scrubbed again
(`broker.testers.scrub_stored`) in the same pass, so no echo kept from before stays
at rest.

The pass pages through the stored data keys (`KeyStore.list_deks_not_under` with no
key excluded) and reads nothing else once every row has the current format.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import datetime

import structlog

from broker.crypto import FORMAT_VERSION, UNBOUND_FORMAT_VERSION, Keyring
from broker.errors import Aborted, NotFound, SecretUnavailable
from broker.model import AuditEvent, ConnectionRecord
from broker.sensitive import SecretFields
from broker.service.context import system_event
from broker.service.sealing import LEGACY_FORMATS, open_legacy_secrets, seal
from broker.store import ConnectionStore, KeyStore, WrappedDek
from broker.testers import Target, scrub_stored

log = structlog.get_logger("broker.rebind")

SYSTEM_ACTOR = "broker:rebind"
ACTION = "connection.rebind"
RESCRUB = "connection.rescrub"  # a stored test result scrubbed again (see the module's docstring)


@dataclass
class RebindReport:
    """What one pass did."""

    rebound: int = 0
    skipped: int = 0  # changed meanwhile (another replica re-sealed it, an update, a purge)
    failed: list[str] = field(default_factory=list)  # "tenant id" of rows that did not open


async def rebind_legacy(
    connections: ConnectionStore,
    key_store: KeyStore,
    keyring: Keyring,
    clock: Callable[[], datetime],
    *,
    batch: int = 500,
    vouched: bool = False,
) -> RebindReport:
    """Re-seal every connection of an older format so its ciphertext binds what the current one
    does: all of them when no connection has the current format yet (an upgrade) or when
    `vouched`; else none (see the module's docstring)."""
    report = RebindReport()
    legacy, current = await _legacy_connections(key_store, batch)
    if current and not vouched:
        for dek in legacy:
            log.warning(
                "rebind_refused",
                tenant=dek.tenant,
                connection_id=dek.key,
                format=dek.sealed.format_version,
                why="rows of the current format exist: not left by an upgrade",
                vouch_with="broker keys rebind",
            )
        return report
    for dek in legacy:
        old_format = dek.sealed.format_version
        record = await connections.get_connection(dek.tenant, dek.key)
        if record is None or record.sealed != dek.sealed:
            report.skipped += 1
            continue
        try:
            secrets = open_legacy_secrets(keyring, record)
        except SecretUnavailable:
            report.failed.append(f"{record.tenant} {record.id}")
            log.warning("rebind_failed", tenant=record.tenant, connection_id=record.id)
            continue
        # The etag moves (caches and other replicas must see the new row); updated_at
        # stays: nothing an admin set has changed.
        updated = replace(record, version=record.version + 1)
        updated = replace(updated, sealed=seal(keyring, secrets, updated))
        try:
            details = {"from_format": str(old_format), "format": str(FORMAT_VERSION)}
            rebound = _event(clock(), record, ACTION, details)
            await connections.replace_connection(updated, record.version, rebound)
            report.rebound += 1
            if old_format == UNBOUND_FORMAT_VERSION:
                await _rescrub(connections, record, secrets, clock)
        except (Aborted, NotFound):
            report.skipped += 1
    if report.rebound or report.failed:
        log.info("rebind_done", rebound=report.rebound, skipped=report.skipped, failed=len(report.failed))
    return report


async def _legacy_connections(key_store: KeyStore, batch: int) -> tuple[list[WrappedDek], bool]:
    """The stored keys of connections sealed in an older format, and whether any connection has the
    current one (the whole table is read before anything is re-sealed)."""
    legacy: list[WrappedDek] = []
    current = False
    after: tuple[str, str, str] | None = None
    while rows := await key_store.list_deks_not_under("", batch, after):
        after = (rows[-1].kind, rows[-1].tenant, rows[-1].key)
        for dek in rows:
            if dek.kind != "connection":
                continue
            if dek.sealed.format_version in LEGACY_FORMATS:
                legacy.append(dek)
            elif dek.sealed.format_version == FORMAT_VERSION:
                current = True
    return legacy, current


async def _rescrub(
    connections: ConnectionStore,
    record: ConnectionRecord,
    secrets: SecretFields,
    clock: Callable[[], datetime],
) -> None:
    """Scrub a format-1 row's stored test result and MCP tools again (see the module's docstring)."""
    target = Target(record.type, record.provider, record.config, secrets)
    tools, discovered_at = await connections.list_mcp_tools(record.tenant, record.id)
    last_test, scrubbed_tools = scrub_stored(target, record.last_test, tools)
    if last_test is not None and last_test != record.last_test and last_test.tested_at:
        rescrubbed = _event(clock(), record, RESCRUB, {"field": "last_test"})
        await connections.record_test_result(record.tenant, record.id, last_test, rescrubbed)
    if scrubbed_tools != tools and discovered_at is not None:
        await connections.replace_mcp_tools(record.tenant, record.id, scrubbed_tools, discovered_at, None)


def _event(now: datetime, record: ConnectionRecord, action: str, details: dict[str, str]) -> AuditEvent:
    return system_event(now, SYSTEM_ACTOR, record.tenant, record.id, action, details=details)
