"""An httpx client whose every connection goes to a policy-checked address.

httpcore opens TCP through a network backend; ours resolves through the policy
and connects to the checked IP, then httpcore starts TLS with the original
host name, so certificates are verified as usual. Redirect hops open new
connections through the same backend, so each hop is checked.
"""

from __future__ import annotations

from typing import Any

import httpcore
import httpx

from broker.egress.policy import EgressPolicy


class _PolicyBackend(httpcore.AsyncNetworkBackend):
    def __init__(self, policy: EgressPolicy) -> None:
        self._policy = policy
        self._inner = httpcore.AnyIOBackend()

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Any = None,
    ) -> httpcore.AsyncNetworkStream:
        address = (await self._policy.resolve(host, port))[0]
        return await self._inner.connect_tcp(str(address), port, timeout, local_address, socket_options)

    async def connect_unix_socket(
        self, path: str, timeout: float | None = None, socket_options: Any = None
    ) -> Any:
        raise httpcore.ConnectError("unix sockets are not allowed by the egress policy")

    async def sleep(self, seconds: float) -> None:
        await self._inner.sleep(seconds)


def http_client(policy: EgressPolicy, **kwargs: Any) -> httpx.AsyncClient:
    """An AsyncClient with the policy's timeouts and pinned, checked connections."""
    settings = policy.settings
    transport = httpx.AsyncHTTPTransport(retries=0)
    # httpx exposes no public hook for the network backend; the pool's is replaced here, once.
    transport._pool._network_backend = _PolicyBackend(policy)
    kwargs.setdefault("timeout", httpx.Timeout(settings.total_timeout, connect=settings.connect_timeout))
    kwargs.setdefault("follow_redirects", False)
    kwargs.setdefault("max_redirects", settings.max_redirects)
    kwargs.setdefault("trust_env", False)
    return httpx.AsyncClient(transport=transport, **kwargs)
