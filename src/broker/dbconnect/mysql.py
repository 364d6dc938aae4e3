"""MySQL / MariaDB with aiomysql: a connection to the checked IP that refuses to give a credential away.

aiomysql silently continues in clear text when `ssl` is set but the server does not offer TLS,
and sends the password in clear when the server asks for `mysql_clear_password`. A small
Connection subclass refuses both before any credential is sent. `local_infile` stays off so a
hostile server cannot read the broker's files with LOAD DATA LOCAL, and no option file is read.
"""

from __future__ import annotations

import asyncio
import ssl
from typing import Any

import aiomysql
from pymysql._auth import scramble_caching_sha2
from pymysql.constants import CLIENT

from broker.dbconnect import CleartextRefused, Server

__all__ = [
    "ACCESS_DENIED",
    "ACCESS_DENIED_NO_PASSWORD",
    "CANNOT_CONNECT",
    "DB_ACCESS_DENIED",
    "HOST_NOT_ALLOWED",
    "UNKNOWN_DATABASE",
    "CleartextRefused",
    "TlsNotOffered",
    "connect",
    "error_code",
    "strict_connection",
]

# MySQL / MariaDB error numbers.
ACCESS_DENIED = 1045
ACCESS_DENIED_NO_PASSWORD = 1698
DB_ACCESS_DENIED = 1044
HOST_NOT_ALLOWED = 1130
UNKNOWN_DATABASE = 1049
CANNOT_CONNECT = 2003
# Plugins whose answer a server (or anyone between) can turn back into the password without TLS.
_READABLE_PLUGINS = (b"mysql_clear_password", b"dialog", b"mysql_old_password")
# caching_sha2_password's answer to the fast-path scramble: accepted (else 4, full authentication).
_FAST_AUTH_OK = 3


def error_code(exc: BaseException) -> int:
    """The MySQL error number a driver error carries (its first argument), 0 when it has none."""
    args = getattr(exc, "args", ())
    return args[0] if args and isinstance(args[0], int) else 0


class TlsNotOffered(Exception):
    """The server's handshake lacks the SSL capability although TLS is required."""


class _StrictConnection(aiomysql.Connection):  # type: ignore[misc]
    """aiomysql's Connection, refusing to authenticate without TLS when TLS was asked for, or
    to send a clear-text password without TLS. Overrides private hooks of aiomysql 0.2/0.3."""

    async def _request_authentication(self) -> None:
        if self._ssl_context is not None and not self.server_capabilities & CLIENT.SSL:
            raise TlsNotOffered
        if (
            self._ssl_context is None
            and self._password
            and self._server_auth_plugin == "mysql_clear_password"
        ):
            raise CleartextRefused
        await super()._request_authentication()

    async def _process_auth(self, plugin_name: bytes, auth_packet: Any) -> Any:
        # dialog (MariaDB's PAM plugin) asks for the password in clear too: aiomysql does not
        # speak it, but without TLS the answer is the one this refusal gives. mysql_old_password's
        # pre-4.1 scramble is weak enough to give the password back to whoever chose the salt.
        if plugin_name in _READABLE_PLUGINS and not self._secure:
            raise CleartextRefused
        return await super()._process_auth(plugin_name, auth_packet)

    # Without TLS these plugins send the password encrypted under the public key the server hands
    # over on request: a server (or anyone between) that asks for them decrypts the password.
    # libmysqlclient refuses the same unless told to fetch the key (get-server-public-key).

    async def sha256_password_auth(self, pkt: Any) -> Any:
        if not self._secure and self._password:
            raise CleartextRefused
        return await super().sha256_password_auth(pkt)

    async def caching_sha2_password_auth(self, pkt: Any) -> Any:
        if self._secure or not self._password:
            return await super().caching_sha2_password_auth(pkt)
        # Only the fast path, a scramble the server checks against its cache, works without TLS.
        if pkt.is_auth_switch_request():
            self.salt = pkt.read_all()
            self.write_packet(scramble_caching_sha2(self._password.encode("latin1"), self.salt))
            pkt = await self._read_packet()
            pkt.check_error()
        if pkt.is_extra_auth_data():
            pkt.advance(1)
            if pkt.read_uint8() == _FAST_AUTH_OK:
                pkt = await self._read_packet()
                pkt.check_error()
                return pkt
        raise CleartextRefused  # "perform full authentication": the password itself


def strict_connection(server: Server, tls: ssl.SSLContext | None, timeout: float, **options: Any) -> Any:
    """An aiomysql connection to `server`'s checked address, not yet connected (`connect`):
    TLS-strict (`_StrictConnection`), no LOAD DATA LOCAL, no option file, and one statement per
    query: aiomysql turns multi-statements on, so a `;` that reached a query would run a second
    statement. The testers and the lease users (broker.dbusers) connect through this."""
    conn = _StrictConnection(
        host=server.address,
        port=server.port,
        user=server.username,
        password=server.password,
        db=server.database,
        ssl=tls,
        connect_timeout=timeout,
        local_infile=False,
        read_default_file=None,
        **options,
    )
    conn.client_flag &= ~CLIENT.MULTI_STATEMENTS
    return conn


async def connect(conn: Any) -> None:
    """What aiomysql.connect() does, for a `strict_connection`; aiomysql's connect_timeout covers
    only the TCP connect, so the handshake is bounded by it here too."""
    async with asyncio.timeout(conn.connect_timeout):
        await conn._connect()
