"""Raw TCP (and TLS) to a checked address, for protocols without an HTTP client (SMTP, databases)."""

from __future__ import annotations

import asyncio
import ssl
from typing import Any

from broker.egress.policy import EgressPolicy, IPAddress


class PinnedHostnameContext(ssl.SSLContext):
    """An SSLContext that verifies and sends SNI for `hostname` even when the socket was
    opened to an IP address: drivers that connect by IP still check the right certificate."""

    hostname: str = ""

    def wrap_bio(self, incoming: Any, outgoing: Any, server_side: bool = False,
                 server_hostname: str | None = None, session: Any = None) -> ssl.SSLObject:  # fmt: skip
        return super().wrap_bio(incoming, outgoing, server_side, self.hostname or server_hostname, session)

    def wrap_socket(
        self, sock: Any, *args: Any, server_hostname: str | None = None, **kwargs: Any
    ) -> ssl.SSLSocket:
        return super().wrap_socket(sock, *args, server_hostname=self.hostname or server_hostname, **kwargs)


def pinned_tls_context(hostname: str, cafile: str | None = None, verify: bool = True) -> ssl.SSLContext:
    """A client TLS context bound to `hostname` for use on a connection opened to its checked IP."""
    context = PinnedHostnameContext(ssl.PROTOCOL_TLS_CLIENT)
    context.hostname = hostname
    if verify:
        context.load_verify_locations(cafile=cafile) if cafile else context.load_default_certs()
    else:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


async def resolve_one(policy: EgressPolicy, host: str, port: int) -> IPAddress:
    """The first checked address of `host` (every answer was checked)."""
    return (await policy.resolve(host, port))[0]


async def open_connection(
    policy: EgressPolicy, host: str, port: int, tls: ssl.SSLContext | None = None
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """Connect to a checked address of `host` within the connect timeout."""
    address = await resolve_one(policy, host, port)
    return await asyncio.wait_for(
        asyncio.open_connection(str(address), port, ssl=tls, server_hostname=host if tls else None),
        policy.settings.connect_timeout,
    )
