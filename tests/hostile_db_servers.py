"""Hostile database servers on 127.0.0.1: just enough of the PostgreSQL and MySQL protocols to
ask a client for its password in a form the server can read, and to record what the client sends.

* `FakePostgres(auth)`: refuses TLS ('N' to an SSLRequest), then asks for the password with
  AuthenticationCleartextPassword (`auth="cleartext"`) or AuthenticationMD5Password (`"md5"`),
  records the client's answer and ends with an error; `"silent"` never answers the startup, and
  `"huge_error"` answers it with an ErrorResponse of `huge` bytes that never ends, and
  `"odd_error"` with one whose SQLSTATE is 5000 characters and a terminal escape.
* `FakeMysql(plugin)`: a handshake without the SSL capability whose plugin is
  caching_sha2_password (the fast path fails: "perform full authentication", then the server's RSA
  public key on request) or sha256_password, or an auth switch to `dialog`,
  `mysql_clear_password` or `mysql_old_password`; `recovered` is what the server could read
  back (the password, or the answer to the switch), if anything was sent.

Both record every byte the client sent (`received`).
"""

from __future__ import annotations

import asyncio
import contextlib
import struct
from collections.abc import AsyncIterator

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

_SSL_REQUEST = 80877103


class _Fake:
    def __init__(self) -> None:
        self.received = b""
        self.port = 0
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        raise NotImplementedError

    async def _read(self, reader: asyncio.StreamReader, n: int) -> bytes:
        data = await reader.readexactly(n)
        self.received += data
        return data

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[_Fake]:
        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            task = asyncio.current_task()
            assert task is not None
            self._tasks.add(task)
            try:
                await self._serve(reader, writer)
            except (asyncio.IncompleteReadError, ConnectionError):
                pass
            finally:
                writer.close()
                self._tasks.discard(task)

        self._server = await asyncio.start_server(handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        try:
            yield self
        finally:
            self._server.close()
            for task in list(self._tasks):
                task.cancel()
            await self._server.wait_closed()


class FakePostgres(_Fake):
    def __init__(self, auth: str, huge: int = 0) -> None:
        super().__init__()
        self.auth = auth
        self.huge = huge

    async def _startup(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            (length,) = struct.unpack("!I", await self._read(reader, 4))
            body = await self._read(reader, length - 4)
            if struct.unpack("!I", body[:4])[0] != _SSL_REQUEST:
                return
            writer.write(b"N")  # no TLS here

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await self._startup(reader, writer)
        if self.auth == "silent":
            await asyncio.sleep(3600)
        if self.auth == "huge_error":
            # An ErrorResponse announcing `huge` bytes, sent in part and never finished.
            writer.write(b"E" + struct.pack("!I", self.huge + 4) + b"SFATAL\0C28P01\0M" + b"x" * 60_000)
            await writer.drain()
            await asyncio.sleep(3600)
        if self.auth == "odd_error":
            # An ErrorResponse whose SQLSTATE is no SQLSTATE: long, with terminal escapes.
            error = b"SFATAL\0C" + b"\x1b[2J" + b"Z" * 5000 + b"\0Mgo away\0\0"
            writer.write(b"E" + struct.pack("!I", 4 + len(error)) + error)
            await writer.drain()
            return
        if self.auth == "cleartext":
            writer.write(b"R" + struct.pack("!II", 8, 3))
        else:
            writer.write(b"R" + struct.pack("!II", 12, 5) + b"salt")
        await writer.drain()
        kind = await self._read(reader, 1)
        (length,) = struct.unpack("!I", await self._read(reader, 4))
        await self._read(reader, length - 4)
        assert kind == b"p"
        error = b"SFATAL\0C28P01\0Mpassword authentication failed\0\0"
        writer.write(b"E" + struct.pack("!I", 4 + len(error)) + error)
        await writer.drain()


def _packet(seq: int, payload: bytes) -> bytes:
    return struct.pack("<I", len(payload))[:3] + bytes([seq]) + payload


class FakeMysql(_Fake):
    SALT = b"abcdefghijklmnopqrst"  # 20 bytes of auth-plugin-data

    def __init__(self, plugin: str) -> None:
        super().__init__()
        self.plugin = plugin
        self.recovered = b""
        self._key = rsa.generate_private_key(public_exponent=65537, key_size=2048)

    async def _packet(self, reader: asyncio.StreamReader) -> tuple[int, bytes]:
        header = await self._read(reader, 4)
        length = int.from_bytes(header[:3], "little")
        return header[3], await self._read(reader, length)

    def _greeting(self, plugin: str) -> bytes:
        # PROTOCOL_41 | LONG_PASSWORD | CONNECT_WITH_DB | SECURE_CONNECTION | PLUGIN_AUTH |
        # PLUGIN_AUTH_LENENC_CLIENT_DATA; no SSL.
        caps = 0x1 | 0x8 | 0x200 | 0x8000 | 0x80000 | 0x200000
        return (
            b"\x0a8.0.36\0"
            + struct.pack("<I", 7)
            + self.SALT[:8]
            + b"\0"
            + struct.pack("<H", caps & 0xFFFF)
            + b"\x21"
            + struct.pack("<H", 2)
            + struct.pack("<H", caps >> 16)
            + bytes([21])
            + b"\0" * 10
            + self.SALT[8:]
            + b"\0"
            + plugin.encode()
            + b"\0"
        )

    def _recover(self, encrypted: bytes) -> None:
        oaep = padding.OAEP(mgf=padding.MGF1(algorithm=hashes.SHA1()), algorithm=hashes.SHA1(), label=None)
        xored = self._key.decrypt(encrypted, oaep)
        self.recovered = bytes(b ^ self.SALT[i % len(self.SALT)] for i, b in enumerate(xored)).rstrip(b"\0")

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        switched = ("dialog", "mysql_clear_password", "mysql_old_password")
        first = "mysql_native_password" if self.plugin in switched else self.plugin
        writer.write(_packet(0, self._greeting(first)))
        seq, _ = await self._packet(reader)  # the handshake response
        pem = self._key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        if self.plugin == "caching_sha2_password":
            writer.write(_packet(seq + 1, b"\x01\x04"))  # perform full authentication
            seq, request = await self._packet(reader)
            if request == b"\x02":  # the public key, please
                writer.write(_packet(seq + 1, b"\x01" + pem))
                seq, encrypted = await self._packet(reader)
                self._recover(encrypted)
        elif self.plugin == "sha256_password":
            # The client asked for the key in its handshake response (b"\x01").
            writer.write(_packet(seq + 1, b"\x01" + pem))
            seq, encrypted = await self._packet(reader)
            self._recover(encrypted)
        else:
            switch = b"\xfe" + self.plugin.encode() + b"\0"
            switch += b"\x04Password: " if self.plugin == "dialog" else self.SALT + b"\0"
            writer.write(_packet(seq + 1, switch))
            seq, answer = await self._packet(reader)
            self.recovered = answer.rstrip(b"\0")
        writer.write(_packet(seq + 1, b"\xff" + struct.pack("<H", 1045) + b"#28000Access denied"))
        await writer.drain()
        await asyncio.sleep(0.5)
