"""Raw TCP (and TLS) to a checked address, for protocols without an HTTP client (SMTP, databases).

A driver handed an IP address would verify the server certificate against that
address; `pinned_tls_context` makes the TLS layer send SNI for, and verify, the
host name the user typed instead, whatever the driver passes.
"""

from __future__ import annotations

import asyncio
import socket
import ssl

from broker.egress.addresses import IPAddress
from broker.egress.hosts import host_text
from broker.egress.policy import EgressPolicy

# Each address gets the full connect timeout, so trying every answer of a long list
# could outlast the total timeout; a few are enough for an IPv6/IPv4 fallback.
_MAX_ATTEMPTS = 3
PEM_MARKER = "-----BEGIN"


class UnusableCa(Exception):
    """A connection's CA setting cannot be used (the message says why, in our words); nothing was sent."""


class PinnedHostnameContext(ssl.SSLContext):
    """An SSLContext that verifies and sends SNI for `hostname` even when the socket was
    opened to an IP address: drivers that connect by IP still check the right certificate."""

    hostname: str = ""

    def wrap_bio(
        self,
        incoming: ssl.MemoryBIO,
        outgoing: ssl.MemoryBIO,
        server_side: bool = False,
        server_hostname: str | bytes | None = None,
        session: ssl.SSLSession | None = None,
    ) -> ssl.SSLObject:
        # asyncio's transports (open_connection, start_tls, asyncpg, aiosmtplib) come through here.
        return super().wrap_bio(incoming, outgoing, server_side, self.hostname or server_hostname, session)

    def wrap_socket(
        self,
        sock: socket.socket,
        server_side: bool = False,
        do_handshake_on_connect: bool = True,
        suppress_ragged_eofs: bool = True,
        server_hostname: str | bytes | None = None,
        session: ssl.SSLSession | None = None,
    ) -> ssl.SSLSocket:
        # Blocking drivers wrap a plain socket instead.
        return super().wrap_socket(
            sock,
            server_side,
            do_handshake_on_connect,
            suppress_ragged_eofs,
            self.hostname or server_hostname,
            session,
        )


def pinned_tls_context(
    hostname: str, cafile: str | None = None, verify: bool = True, cadata: str | None = None
) -> ssl.SSLContext:
    """A client TLS context bound to `hostname` for use on a connection opened to its checked IP.

    `cafile`/`cadata` (PEM) replace the system trust store; `verify=False` skips
    certificate checks (the name is still sent as SNI).
    """
    context = PinnedHostnameContext(ssl.PROTOCOL_TLS_CLIENT)
    context.hostname = hostname
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if not verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    elif cafile or cadata:
        context.load_verify_locations(cafile=cafile, cadata=cadata)
    else:
        context.load_default_certs()
    return context


def ca_tls_context(hostname: str, ca: str | None) -> ssl.SSLContext:
    """`pinned_tls_context` trusting `ca`, a connection's `ssl_ca`: PEM text or a file path on the
    broker host, in place of the system trust store (None: the system CAs). Raises `UnusableCa`."""
    pem = ca is not None and ca.lstrip().startswith(PEM_MARKER)
    try:
        return pinned_tls_context(
            hostname, cafile=None if pem else ca, cadata=ca.strip() if pem and ca else None
        )
    except FileNotFoundError:
        raise UnusableCa("ssl_ca names a file that does not exist") from None
    except (ssl.SSLError, ValueError, OSError):
        raise UnusableCa("ssl_ca is not a readable PEM CA certificate") from None


async def resolve_one(policy: EgressPolicy, host: str, port: int) -> IPAddress:
    """The first checked address of `host` (every answer was checked)."""
    return (await policy.resolve(host, port))[0]


async def open_connection(
    policy: EgressPolicy, host: str, port: int, tls: ssl.SSLContext | None = None
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """Connect (and with `tls`, handshake) to a checked address of `host` within the connect timeout.

    The answers are tried in order; TLS verifies the host name, not the address.
    Raises `Blocked`/`DnsFailure` before any packet is sent, `TimeoutError`, or `OSError`
    (`ssl.SSLError` for a TLS failure).
    """
    parsed = policy.check_host(host)
    addresses = await policy.resolve(host, port)
    timeout = policy.settings.connect_timeout
    error: Exception | None = None
    for address in addresses[:_MAX_ATTEMPTS]:
        try:
            async with asyncio.timeout(timeout):
                return await asyncio.open_connection(
                    str(address), port, ssl=tls, server_hostname=host_text(parsed) if tls else None
                )
        except ssl.SSLError:
            raise  # the server answered: another address would not make the certificate right
        except (OSError, TimeoutError) as exc:
            error = exc
    assert error is not None
    raise error
