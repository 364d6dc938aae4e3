"""PostgreSQL with asyncpg: a connection to the checked IP with every setting explicit.

asyncpg is always given every setting explicitly (password "" rather than None, ssl context or
False), so it never falls back to the broker host's PG* environment, ~/.pgpass or
~/.postgresql client certificates, which would leak the broker's own credentials to a
user-chosen server.

Without TLS, asyncpg answers a server's AuthenticationCleartextPassword with the password, and
has no setting to refuse it (libpq's require_auth). So without TLS its bytes go through a relay
(`_CleartextGuard`) that reads the server's messages until authentication is done and ends the
connection, before anything is sent, when the server asks for the password in clear
(`CleartextRefused`, as `mysql.py` refuses the same). With TLS the server's certificate was
verified for the host name typed: there the password may travel as the server asks.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import ssl
import tempfile
from typing import Any

import asyncpg

from broker.dbconnect import CleartextRefused, Server

__all__ = ["connect"]

# Authentication request codes (the 'R' message): done, and "send the password in clear".
_AUTH_OK = 0
_AUTH_CLEARTEXT = 3
_CHUNK = 65536
# The relays of open connections: a task nothing else refers to could be collected.
_RELAYS: set[asyncio.Task[None]] = set()


async def connect(server: Server, tls: ssl.SSLContext | None, timeout: float, **options: Any) -> Any:  # noqa: ASYNC109
    """asyncpg to `server`'s checked address with every setting explicit (see the module
    docstring); the testers and the lease users (broker.dbusers) connect through this.
    Without TLS, `CleartextRefused` when the server asks for the password in clear."""
    settings: dict[str, Any] = {
        "port": server.port,
        "user": server.username,
        "password": server.password,
        "database": server.database,
        "direct_tls": False,
        "timeout": timeout,
        "server_settings": dict(server.options) or None,
        **options,
    }
    if tls is not None:
        return await asyncpg.connect(host=server.address, ssl=tls, **settings)
    guard = await _CleartextGuard.open(server, timeout)
    try:
        # A directory as the host: asyncpg connects to its socket .s.PGSQL.<port>.
        return await asyncpg.connect(host=guard.directory, ssl=False, **settings)
    except BaseException as exc:  # a cancellation too: nothing may keep listening
        guard.close()
        if guard.refused and isinstance(exc, Exception):
            raise CleartextRefused from None
        raise


class _CleartextGuard:
    """The relay of one asyncpg connection to the server: a socket in a directory only this user
    may enter, listening for as long as the connection lives, because asyncpg sends a query's
    cancellation on a new connection to the same address; each one is relayed to the server too."""

    def __init__(self, server: Server, upstream: tuple[asyncio.StreamReader, asyncio.StreamWriter]) -> None:
        self.refused = False
        self.directory = tempfile.mkdtemp(prefix="broker-pg-")  # mode 0700
        self._path = os.path.join(self.directory, f".s.PGSQL.{server.port}")
        self._server = server
        self._first: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = upstream
        self._listener: asyncio.Server | None = None

    @classmethod
    async def open(cls, server: Server, timeout: float) -> _CleartextGuard:  # noqa: ASYNC109
        """Connect to the server (so a refused or silent one fails as it would for asyncpg), then listen."""
        async with asyncio.timeout(timeout):
            upstream = await asyncio.open_connection(server.address, server.port)
        guard = cls(server, upstream)
        try:
            guard._listener = await asyncio.start_unix_server(guard._accept, guard._path)
        except BaseException:
            guard.close()
            raise
        return guard

    def close(self) -> None:
        """Stop listening and remove the socket; the relays of accepted connections go on."""
        if self._listener is not None:
            self._listener.close()
        if self._first is not None:
            self._first[1].close()
            self._first = None
        with contextlib.suppress(OSError):
            os.unlink(self._path)
        with contextlib.suppress(OSError):
            os.rmdir(self.directory)

    def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.create_task(self._relay(reader, writer))
        _RELAYS.add(task)
        task.add_done_callback(_RELAYS.discard)

    async def _relay(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        first, self._first = self._first, None
        try:
            # The connection's own socket was opened by `open`; a cancellation gets one of its own.
            server_reader, server_writer = first or await asyncio.open_connection(
                self._server.address, self._server.port
            )
        except OSError:
            client_writer.close()
            return
        to_server = asyncio.create_task(_pump(client_reader, server_writer))
        try:
            await self._authentication(server_reader, client_writer)
            await _pump(server_reader, client_writer)
        except (OSError, asyncio.IncompleteReadError):
            pass  # either side went away: both are closed below
        finally:
            client_writer.close()
            server_writer.close()
            to_server.cancel()
            with contextlib.suppress(asyncio.CancelledError, OSError):
                await to_server
            if first is not None:
                self.close()  # the connection is over: no cancellation can follow

    async def _authentication(self, server: asyncio.StreamReader, client: asyncio.StreamWriter) -> None:
        """Pass the server's messages on until AuthenticationOk; a request for the password in
        clear ends the connection instead (`refused`)."""
        while True:
            header = await server.readexactly(5)
            kind, length = header[:1], int.from_bytes(header[1:], "big")
            if length < (8 if kind == b"R" else 4):
                raise ConnectionError("not the PostgreSQL protocol")
            rest = length - 4
            if kind == b"R":
                code = await server.readexactly(4)
                if int.from_bytes(code, "big") == _AUTH_CLEARTEXT:
                    self.refused = True
                    raise ConnectionError("the password in clear text without TLS: refused")
                header, rest = header + code, rest - 4
            client.write(header)
            await _copy(server, client, rest)
            if kind == b"R" and int.from_bytes(header[5:], "big") == _AUTH_OK:
                return


async def _copy(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, count: int) -> None:
    """Pass `count` bytes on, a chunk at a time (a message can be large)."""
    while count > 0:
        data = await reader.readexactly(min(count, _CHUNK))
        writer.write(data)
        await writer.drain()
        count -= len(data)
    await writer.drain()


async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Pass everything on until the reader's end, then close the writer."""
    try:
        while data := await reader.read(_CHUNK):
            writer.write(data)
            await writer.drain()
    finally:
        writer.close()
