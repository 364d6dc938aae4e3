"""PostgreSQL administrative sessions with asyncpg.

Every setting is given explicitly (password "" rather than None, an ssl context or False), so
asyncpg never reads the broker host's PG* environment, ~/.pgpass or client certificates. The
statement cache is off: a cached statement would keep a rendered CREATE ROLE, password and all,
in the driver's memory and as a named prepared statement on the server. Statements go through
the extended protocol (`fetch`), which refuses a string of several statements.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import re
import secrets
from collections.abc import Awaitable, Mapping, Sequence
from typing import Any, TypeVar

import asyncpg
from cryptography.hazmat.primitives import hashes, hmac
from cryptography.hazmat.primitives.kdf.pbkdf2 import PBKDF2HMAC

from broker.dbconnect import CleartextRefused
from broker.dbconnect.postgres import connect
from broker.dbusers._errors import LeaseDbError
from broker.dbusers._session import checked_server, tls_for, transport_reason
from broker.egress import EgressPolicy
from broker.testers import Target

T = TypeVar("T")
_AUTH_STATES = {"28P01", "28000"}
# Placeholders quoted as identifiers; the others are literals.
_IDENTIFIERS = {"name", "group"}
# PostgreSQL's own default for the verifiers it computes (scram_iterations, 4096 up to 17).
SCRAM_ITERATIONS = 4096
_PRINTABLE_ASCII = re.compile(r"[\x20-\x7e]*")


def scram_verifier(password: str, *, salt: bytes | None = None, iterations: int = SCRAM_ITERATIONS) -> str:
    """The SCRAM-SHA-256 verifier PostgreSQL would store for `password` (RFC 5802, RFC 7677, in
    PostgreSQL's `SCRAM-SHA-256$iterations:salt$StoredKey:ServerKey` form).

    Only printable ASCII, which SASLprep (RFC 4013) leaves as it is, so the client's and this
    verifier's view of the password cannot differ; the broker's own passwords are URL-safe."""
    if _PRINTABLE_ASCII.fullmatch(password) is None:
        raise ValueError("a password sent as a SCRAM verifier must be printable ASCII")
    salt = secrets.token_bytes(16) if salt is None else salt
    kdf = PBKDF2HMAC(algorithm=hashes.SHA256(), length=32, salt=salt, iterations=iterations)
    salted = kdf.derive(password.encode())

    def mac(message: bytes) -> bytes:
        signer = hmac.HMAC(salted, hashes.SHA256())
        signer.update(message)
        return signer.finalize()

    digest = hashes.Hash(hashes.SHA256())
    digest.update(mac(b"Client Key"))
    stored_key, server_key = digest.finalize(), mac(b"Server Key")
    salt_b64, stored_b64, server_b64 = (base64.b64encode(b).decode() for b in (salt, stored_key, server_key))
    return f"SCRAM-SHA-256${iterations}:{salt_b64}${stored_b64}:{server_b64}"


class PostgresSession:
    """One asyncpg connection used for role administration."""

    mariadb = False
    password_hashes = True

    def __init__(self, conn: Any, timeout: float) -> None:
        self._conn = conn
        self._timeout = timeout

    @classmethod
    async def open(cls, target: Target, egress: EgressPolicy, bound: float) -> PostgresSession:
        timeout = bound  # every await of the session is bounded by it
        server = await checked_server(target, egress, "postgresql")
        tls = tls_for(server)
        try:
            # No statement cache: a rendered statement carries a password.
            conn = await connect(server, tls, timeout, statement_cache_size=0)
        except Exception as exc:
            raise _connect_error(exc, server.ssl) from None
        return cls(conn, timeout)

    async def _bounded(self, step: Awaitable[T]) -> T:
        try:
            async with asyncio.timeout(self._timeout):
                return await step
        except asyncpg.PostgresError as exc:
            state = str(exc.sqlstate or "")
            raise LeaseDbError(_statement_reason(state), state) from None
        except (asyncpg.InterfaceError, asyncpg.InternalClientError):
            # The connection is closed, or a message from the server (a terminated session) left it
            # in a state the driver refuses to use.
            raise LeaseDbError("connect_failed") from None
        except (OSError, TimeoutError, ConnectionError) as exc:
            raise LeaseDbError(transport_reason(exc) or "connect_failed") from None

    def password_form(self, password: str) -> str:
        """What {{password}} stands for on this server: the password's SCRAM verifier."""
        return scram_verifier(password)

    def password_hash(self, password: str) -> str:
        """What {{password_hash}} stands for on this server: the same, the SCRAM verifier."""
        return scram_verifier(password)

    async def quote(self, values: Mapping[str, str]) -> dict[str, str]:
        """The server's own quote_ident / quote_literal, so its settings (encoding,
        standard_conforming_strings) are the ones that read the result."""
        names = list(values)
        calls = ", ".join(
            f"{'quote_ident' if name in _IDENTIFIERS else 'quote_literal'}(${i}::text)"
            for i, name in enumerate(names, start=1)
        )
        row = await self._bounded(self._conn.fetchrow(f"SELECT {calls}", *(values[n] for n in names)))
        return {name: str(row[i]) for i, name in enumerate(names)}

    async def run(self, statements: Sequence[str]) -> None:
        """All of them in one transaction: a failure half way leaves nothing behind."""
        if not statements:
            return
        tx = self._conn.transaction()
        await self._bounded(tx.start())
        try:
            for statement in statements:
                await self._bounded(self._conn.fetch(statement))
        except BaseException:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(self._timeout):
                    await tx.rollback()
            raise
        await self._bounded(tx.commit())

    async def revoke(self, name: str, statements: Sequence[str]) -> None:
        """Refuse the role new logins, terminate its sessions, run the revocation, then terminate
        any session that logged in meanwhile: once the role is dropped its sessions have no name, so they are
        found by the oid read before (not the ones already told to end, which may take a moment
        to go: a second pg_terminate_backend on them would need privileges of a role now gone)."""
        oid = await self._bounded(self._conn.fetchval("SELECT oid FROM pg_roles WHERE rolname = $1", name))
        if oid is not None:
            # First no new logins, so no session can start between the terminations and the drop.
            # Best effort: the drop is what must succeed, and it is retried until it does.
            with contextlib.suppress(LeaseDbError):
                alter = await self._bounded(
                    self._conn.fetchval("SELECT format('ALTER ROLE %I NOLOGIN', $1::text)", name)
                )
                await self._bounded(self._conn.fetch(alter))
        ended = await self._terminate_sessions_of(name)
        try:
            await self.run(statements)
        except LeaseDbError as exc:
            if exc.code != "2BP01" or oid is None:
                raise
            # The role owns objects (a table it created) or holds privileges on others': DROP ROLE
            # refuses until they are gone, and would be refused at every retry.
            await self._hand_over_owned(name)
            await self.run(statements)
        if oid is not None:
            await self._bounded(
                self._conn.fetch(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                    " WHERE usesysid = $1 AND pid <> pg_backend_pid() AND pid <> ALL($2::int[])",
                    oid,
                    ended,
                )
            )

    async def _hand_over_owned(self, name: str) -> None:
        """Give what role `name` owns in this database to the administrator (kept, not dropped: it
        may hold a workflow's data) and revoke the privileges it was granted, as Vault's default
        revocation does. Its objects in other databases still keep the role from being dropped."""
        statements = [
            await self._bounded(self._conn.fetchval(f"SELECT format('{template}', $1::text)", name))
            for template in ("REASSIGN OWNED BY %I TO CURRENT_USER", "DROP OWNED BY %I")
        ]
        try:
            await self.run(statements)
        except LeaseDbError as exc:
            if exc.code != "42501":
                raise
            await self._take_privileges_of(name)
            await self.run(statements)

    async def _take_privileges_of(self, name: str) -> None:
        """Make the administrator a member of role `name` (CREATEROLE allows it; dropping the role
        undoes it), for what needs the role's privileges: ending its sessions, taking its objects."""
        # The server's own quoting of the name (format %I), never ours.
        grant = await self._bounded(
            self._conn.fetchval("SELECT format('GRANT %I TO CURRENT_USER', $1::text)", name)
        )
        await self._bounded(self._conn.fetch(grant))

    async def _terminate_sessions_of(self, name: str) -> list[int]:
        """End the sessions of role `name`; their pids. An administrator that is neither a superuser
        nor in pg_signal_backend may only end sessions of roles whose privileges it has (42501, and
        the drop would fail for as long as the user stays connected): it then takes them, and tries
        again."""
        terminate = (
            "SELECT pid, pg_terminate_backend(pid) FROM pg_stat_activity"
            " WHERE usename = $1 AND pid <> pg_backend_pid()"
        )
        try:
            rows = await self._bounded(self._conn.fetch(terminate, name))
        except LeaseDbError as exc:
            if exc.code != "42501":
                raise
            await self._take_privileges_of(name)
            rows = await self._bounded(self._conn.fetch(terminate, name))
        return [int(row[0]) for row in rows]

    async def ping(self) -> None:
        await self._bounded(self._conn.fetchval("SELECT 1"))

    async def users_with_prefix(self, prefix: str) -> list[str]:
        # Not LIKE: `_` and `%` in a prefix would be wildcards. Only login roles: the broker's users
        # log in, and a group role that happens to carry the prefix must never be dropped.
        rows = await self._bounded(
            self._conn.fetch(
                "SELECT rolname FROM pg_roles WHERE rolcanlogin"
                " AND left(rolname::text, char_length($1::text)) = $1::text ORDER BY rolname",
                prefix,
            )
        )
        return [str(row[0]) for row in rows]

    async def close(self) -> None:
        try:
            await self._conn.close(timeout=min(self._timeout, 2))
        except Exception:
            with contextlib.suppress(Exception):
                self._conn.terminate()


def _statement_reason(state: str) -> str:
    """Class 08 and 57P (the session was ended: terminated, server shutting down) are the
    connection's fault, 57014 a statement_timeout; anything else the server refused."""
    if state.startswith(("08", "57P")):
        return "connect_failed"
    if state == "57014":
        return "timeout"
    return "statement_failed"


def _connect_error(exc: Exception, tls: bool) -> LeaseDbError:
    """A connect-time error as a reason: SQLSTATE for what the server said, never its text."""
    if isinstance(exc, LeaseDbError):
        return exc
    if isinstance(exc, CleartextRefused):  # as MySQL's: the password stays ours, TLS would fix it
        return LeaseDbError("tls")
    if isinstance(exc, asyncpg.PostgresError) and not isinstance(exc, asyncpg.PostgresConnectionError):
        state = str(exc.sqlstate or "")
        return LeaseDbError("auth_failed" if state in _AUTH_STATES else "connect_failed", state)
    # asyncpg reports a refused SSLRequest as a bare ConnectionError: TLS is not offered.
    if tls and type(exc) is ConnectionError:
        return LeaseDbError("tls")
    reason = transport_reason(exc)
    if reason is not None:
        return LeaseDbError(reason)
    if isinstance(exc, asyncpg.InterfaceError):
        return LeaseDbError("connect_failed")
    return LeaseDbError("protocol")
