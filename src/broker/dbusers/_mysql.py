"""MySQL / MariaDB administrative sessions with aiomysql, through the strict connection the testers
use too (`dbconnect.mysql.strict_connection`: no clear-text fallback, no LOAD DATA LOCAL,
no option files, and no multi-statements, so the server refuses a string of several statements:
a template, or a value that escaped its quotes).

User names are string literals (`'name'@'%'`) quoted by the driver's `escape`, which follows the
server's NO_BACKSLASH_ESCAPES; role names are backtick identifiers.

MariaDB writes a statement as it came to its general, slow and binary logs (MySQL rewrites the
password of `IDENTIFIED BY` in them), so on MariaDB {{password_hash}} offers the password as its
mysql_native_password hash, `IDENTIFIED BY PASSWORD '*...'`. MySQL's own default plugin
(caching_sha2_password) stores a salted crypt form the broker does not compute: on MySQL there
is no {{password_hash}}.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Mapping, Sequence
from typing import Any, TypeVar

import aiomysql
import pymysql
from cryptography.hazmat.primitives import hashes

from broker.dbconnect.mysql import (
    ACCESS_DENIED,
    ACCESS_DENIED_NO_PASSWORD,
    CANNOT_CONNECT,
    CleartextRefused,
    TlsNotOffered,
    connect,
    error_code,
    strict_connection,
)
from broker.dbusers._errors import LeaseDbError
from broker.dbusers._session import checked_server, tls_for, transport_reason
from broker.egress import EgressPolicy
from broker.testers import Target

T = TypeVar("T")
UNKNOWN_THREAD = 1094  # KILL of a session that ended meanwhile
# Client-side errors: the connection was lost or never worked.
_LOST = {2006, 2013, 2055, CANNOT_CONNECT}
# MariaDB refuses a password given as a hash when a password validation plugin is active and
# strict_password_validation is on (it cannot check a hash): then it has no {{password_hash}}.
_HASHES_REFUSED = (
    "SELECT @@strict_password_validation AND EXISTS (SELECT 1 FROM information_schema.PLUGINS"
    " WHERE PLUGIN_TYPE = 'PASSWORD VALIDATION' AND PLUGIN_STATUS = 'ACTIVE')"
)


def native_password_hash(password: str) -> str:
    """The mysql_native_password hash MariaDB stores for `password` (what its PASSWORD() returns):
    `*` and the upper-case hex of SHA1(SHA1(password)), the password encoded as UTF-8 (the
    connection's utf8mb4)."""

    def sha1(data: bytes) -> bytes:
        digest = hashes.Hash(hashes.SHA1())  # noqa: S303 (the server's own scheme, not our choice)
        digest.update(data)
        return digest.finalize()

    return "*" + sha1(sha1(password.encode())).hex().upper()


class _QuietCursor(aiomysql.Cursor):  # type: ignore[misc]
    """A cursor that does not fetch the server's warnings: aiomysql would turn them into Python
    warnings carrying server text (a note for DROP USER IF EXISTS of a user already gone)."""

    async def _show_warnings(self, conn: Any) -> None:
        return None


class MysqlSession:
    """One aiomysql connection used for user administration."""

    def __init__(self, conn: Any, timeout: float, mariadb: bool) -> None:
        self._conn = conn
        self._timeout = timeout
        self.mariadb = mariadb
        self.password_hashes = False  # MariaDB's is read from the server in `open`

    @classmethod
    async def open(cls, target: Target, egress: EgressPolicy, bound: float) -> MysqlSession:
        timeout = bound  # every await of the session is bounded by it
        server = await checked_server(target, egress, "mysql")
        conn = strict_connection(
            server,
            tls_for(server),
            timeout,
            # Whatever `options` says: escaping is done on text, and utf8mb4 carries every value.
            charset="utf8mb4",
            cursorclass=_QuietCursor,
            autocommit=True,
        )
        try:
            await connect(conn)
        except Exception as exc:
            conn.close()
            raise _connect_error(exc) from None
        session = cls(conn, timeout, "mariadb" in str(conn.get_server_info()).lower())
        if session.mariadb:
            try:
                [(refused,)] = await session._bounded(session._execute(_HASHES_REFUSED))
            except BaseException:
                await session.close()
                raise
            session.password_hashes = not refused
        return session

    async def _bounded(self, step: Awaitable[T]) -> T:
        try:
            async with asyncio.timeout(self._timeout):
                return await step
        except pymysql.MySQLError as exc:
            code = error_code(exc)
            if code in _LOST or not code:
                raise LeaseDbError("connect_failed", str(code or "")) from None
            raise LeaseDbError("statement_failed", str(code)) from None
        except (OSError, TimeoutError, asyncio.IncompleteReadError) as exc:
            raise LeaseDbError(transport_reason(exc) or "connect_failed") from None

    async def _execute(self, sql: str, args: Sequence[Any] | None = None) -> list[Any]:
        async with self._conn.cursor() as cursor:
            # Without args aiomysql sends the text as is (no %-interpolation).
            await cursor.execute(sql, args)
            return list(await cursor.fetchall())

    def password_form(self, password: str) -> str:
        """What {{password}} stands for on this server: the password itself (IDENTIFIED BY)."""
        return password

    def password_hash(self, password: str) -> str:
        """What {{password_hash}} stands for on MariaDB: the mysql_native_password hash
        (IDENTIFIED BY PASSWORD)."""
        return native_password_hash(password)

    async def quote(self, values: Mapping[str, str]) -> dict[str, str]:
        quoted = {}
        for name, value in values.items():
            if name == "group":
                quoted[name] = "`" + value.replace("`", "``") + "`"
            else:
                quoted[name] = str(self._conn.escape(value))
        return quoted

    async def run(self, statements: Sequence[str]) -> None:
        # Account statements commit on their own in MySQL: no transaction to wrap them in.
        for statement in statements:
            await self._bounded(self._execute(statement))

    async def revoke(self, name: str, statements: Sequence[str]) -> None:
        """Lock the account, end its sessions, run the revocation, then end any session that
        logged in meanwhile.

        The lock comes first, as PostgreSQL's NOLOGIN does: MySQL has no login expiry, so a
        revocation the server rejects (the connection's own statements, retried until they are put
        right) would otherwise leave a user its lease holder could still log in as. Best effort:
        a user the connection's creation statements made at another host than '%' is not found
        here, and the revocation is what must succeed.
        """
        with contextlib.suppress(LeaseDbError):
            await self._bounded(self._execute("ALTER USER %s@'%%' ACCOUNT LOCK", (name,)))
        await self._kill_sessions(name)
        await self.run(statements)
        # A session that logged in between the kill and DROP USER would outlive the user.
        await self._kill_sessions(name)

    async def _kill_sessions(self, name: str) -> None:
        rows = await self._bounded(
            self._execute(
                "SELECT ID FROM information_schema.PROCESSLIST WHERE USER = %s AND ID <> CONNECTION_ID()",
                (name,),
            )
        )
        for (session_id,) in rows:
            try:
                await self._bounded(self._execute("KILL CONNECTION %s", (int(session_id),)))
            except LeaseDbError as exc:
                if exc.code != str(UNKNOWN_THREAD):
                    raise

    async def ping(self) -> None:
        await self._bounded(self._execute("SELECT 1"))

    async def users_with_prefix(self, prefix: str) -> list[str]:
        # Not LIKE: `_` and `%` in a prefix would be wildcards. Host '%' is where the broker
        # creates users; MariaDB keeps roles in the same table with an empty host.
        rows = await self._bounded(
            self._execute(
                "SELECT DISTINCT User FROM mysql.user"
                " WHERE LEFT(User, CHAR_LENGTH(%s)) = %s AND Host = '%%' ORDER BY User",
                (prefix, prefix),
            )
        )
        return [_text(row[0]) for row in rows]

    async def close(self) -> None:
        try:
            async with asyncio.timeout(min(self._timeout, 2)):
                await self._conn.ensure_closed()
        except Exception:
            with contextlib.suppress(Exception):
                self._conn.close()


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes | bytearray) else str(value)


def _connect_error(exc: Exception) -> LeaseDbError:
    """A connect-time error as a reason: the MySQL error number, never the server's text."""
    if isinstance(exc, LeaseDbError):
        return exc
    if isinstance(exc, TlsNotOffered | CleartextRefused):
        return LeaseDbError("tls")
    code = error_code(exc)
    # aiomysql wraps TCP and TLS failures in error 2003; the cause says what happened.
    cause = exc.__cause__ if code == CANNOT_CONNECT and exc.__cause__ is not None else exc
    reason = transport_reason(cause)
    if reason is not None:
        return LeaseDbError(reason)
    if isinstance(exc, pymysql.MySQLError) and code:
        if code in (ACCESS_DENIED, ACCESS_DENIED_NO_PASSWORD):
            return LeaseDbError("auth_failed", str(code))
        return LeaseDbError("connect_failed", str(code))
    return LeaseDbError("protocol")
