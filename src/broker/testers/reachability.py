"""Reachability testers for ssh and the cloud accounts (aws, gcp, azure).

No SSH client or cloud SDK is installed, and signing cloud requests ourselves is out of
scope, so these check what can be checked honestly and say so in `not_verified`:
ssh reads the server's identification banner (RFC 4253, 4.2); the cloud types open a
TLS connection to the provider's public authentication endpoint (gcp also checks that
its key file is well-formed). No credential is ever sent.
"""

from __future__ import annotations

import asyncio
import json
import ssl
from collections.abc import Mapping
from contextlib import suppress
from typing import Any

from cryptography.hazmat.primitives.serialization import load_pem_private_key

from broker.egress import EgressPolicy
from broker.egress.tcp import open_connection, pinned_tls_context
from broker.model import TestCategory, TestResult, TestStage
from broker.testers.base import Target, TestFailure, passed

# Public endpoints each cloud type is checked against: (host template, port). The aws
# template takes the configured region. A module-level mapping so tests can aim it at a
# local server; the catalog has no endpoint field for these types.
ENDPOINTS: dict[str, tuple[str, int]] = {
    "aws": ("sts.{region}.amazonaws.com", 443),
    "gcp": ("oauth2.googleapis.com", 443),
    "azure": ("login.microsoftonline.com", 443),
}
# A CA bundle used instead of the system trust store for the cloud endpoints (tests).
CAFILE: str | None = None

# RFC 4253: the identification line is at most 255 bytes; lines before it are allowed.
# Read at most this much looking for it, so a chatty non-SSH service cannot keep us reading.
_MAX_PREAMBLE = 4096
_MAX_BANNER = 255
# Seconds to wait for a TLS close_notify; the test has succeeded by then.
_CLOSE_WAIT = 1.0


async def test_ssh(target: Target, egress: EgressPolicy) -> TestResult:
    """Connect through the policy and read the SSH identification banner; no credentials are sent."""
    host, port = str(target.config["host"]), int(target.config["port"])
    details = {"endpoint": f"{host}:{port}"}
    reader, writer = await _connect(egress, host, port, None)
    try:
        banner = await _read_banner(reader, egress.settings.connect_timeout, details)
    finally:
        await _close(writer)
    details["banner"] = banner
    version, _, software = banner.removeprefix("SSH-").partition("-")
    details.update(protocol=version, software=software.split(" ")[0])
    if version not in ("2.0", "1.99"):  # 1.99: a server that also speaks 2.0 (RFC 4253, 5.1)
        raise TestFailure(
            TestCategory.PROTOCOL_ERROR,
            TestStage.CONNECT,
            f"SSH server speaks only protocol {version}, not 2.0",
            details,
        )
    return passed(
        f"SSH server {host} answered ({software or banner})",
        TestStage.CONNECT,
        details,
        verified=("tcp reachable", "ssh protocol banner"),
        not_verified=("credentials", "host key"),
    )


async def test_aws(target: Target, egress: EgressPolicy) -> TestResult:
    """TLS reachability of the region's STS endpoint; the access key is not checked."""
    template, port = ENDPOINTS["aws"]
    return await _check_endpoint(egress, template.format(region=target.config["region"]), port, {})


async def test_gcp(target: Target, egress: EgressPolicy) -> TestResult:
    """Check the service account key file is well-formed, then TLS reachability of Google's OAuth endpoint."""
    details = _check_service_account(target.secret("service_account_json"))
    host, port = ENDPOINTS["gcp"]
    return await _check_endpoint(egress, host, port, details, "key file well-formed")


async def test_azure(target: Target, egress: EgressPolicy) -> TestResult:
    """TLS reachability of the Microsoft identity platform; the client secret is not checked."""
    host, port = ENDPOINTS["azure"]
    return await _check_endpoint(egress, host, port, {})


async def _check_endpoint(
    egress: EgressPolicy, host: str, port: int, details: Mapping[str, str], *also_verified: str
) -> TestResult:
    _, writer = await _connect(egress, host, port, pinned_tls_context(host, cafile=CAFILE))
    try:
        ssl_object = writer.get_extra_info("ssl_object")
        version = ssl_object.version() if isinstance(ssl_object, ssl.SSLObject) else None
    finally:
        await _close(writer)
    return passed(
        f"{host} is reachable over TLS; credentials were not checked",
        TestStage.TLS,
        {**details, "endpoint": f"{host}:{port}", "tls_version": version or ""},
        verified=("config", *also_verified, "endpoint reachable over TLS"),
        not_verified=("credentials",),
    )


def _check_service_account(document: str) -> dict[str, str]:
    """The catalog checked `type: service_account`; also require an identity and a usable key."""

    def invalid(problem: str) -> TestFailure:
        return TestFailure(
            TestCategory.INVALID_CONFIG, TestStage.RESOLVE_ADDRESS, f"service_account_json {problem}"
        )

    try:
        key: Any = json.loads(document)
    except ValueError:
        raise invalid("is not JSON") from None
    if not isinstance(key, dict):
        raise invalid("is not a JSON object")
    email, private_key = key.get("client_email"), key.get("private_key")
    if not isinstance(email, str) or "@" not in email:
        raise invalid("has no client_email")
    if not isinstance(private_key, str) or not private_key.strip():
        raise invalid("has no private_key")
    try:
        load_pem_private_key(private_key.encode(), password=None)
    except (ValueError, TypeError):
        # Never echo the parser's view of the key.
        raise invalid("private_key is not an unencrypted PEM private key") from None
    details = {"client_email": email}
    if isinstance(key.get("project_id"), str):
        details["project_id"] = key["project_id"]
    return details


async def _connect(
    egress: EgressPolicy, host: str, port: int, tls: ssl.SSLContext | None
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """`open_connection` through the policy, with socket and TLS errors classified."""
    endpoint = {"endpoint": f"{host}:{port}"}
    try:
        return await open_connection(egress, host, port, tls)
    except ssl.SSLCertVerificationError as exc:
        message = f"certificate not valid for {host}: {exc.verify_message}"
        raise TestFailure(TestCategory.TLS_ERROR, TestStage.TLS, message, endpoint) from None
    except ssl.SSLError as exc:
        message = f"TLS handshake failed: {exc.reason or type(exc).__name__}"
        raise TestFailure(TestCategory.TLS_ERROR, TestStage.TLS, message, endpoint) from None
    except TimeoutError:
        message = f"no connection within {egress.settings.connect_timeout:g} s"
        raise TestFailure(TestCategory.TIMEOUT, TestStage.CONNECT, message, endpoint) from None
    except ConnectionRefusedError:
        raise TestFailure(
            TestCategory.CONNECTION_REFUSED, TestStage.CONNECT, "connection refused", endpoint
        ) from None
    except (ConnectionResetError, EOFError):
        # Reset during a TLS handshake: the port answers, but not with TLS.
        stage = TestStage.TLS if tls else TestStage.CONNECT
        message = "server closed the connection" + (" during the TLS handshake" if tls else "")
        raise TestFailure(TestCategory.PROTOCOL_ERROR, stage, message, endpoint) from None
    except OSError as exc:
        message = f"cannot connect: {exc.strerror or type(exc).__name__}"
        raise TestFailure(TestCategory.CONNECTION_REFUSED, TestStage.CONNECT, message, endpoint) from None


async def _read_banner(reader: asyncio.StreamReader, within: float, details: Mapping[str, str]) -> str:
    """The first line starting with `SSH-`, read within `within` seconds and `_MAX_PREAMBLE` bytes."""
    received = b""
    try:
        async with asyncio.timeout(within):
            while len(received) < _MAX_PREAMBLE:
                chunk = await reader.read(_MAX_PREAMBLE - len(received))
                if not chunk:
                    break
                received += chunk
                *lines, _ = received.split(b"\n")  # the last piece is not a complete line yet
                for line in lines:
                    if line.startswith(b"SSH-"):
                        return _printable(line.rstrip(b"\r")[:_MAX_BANNER])
    except TimeoutError:
        if not received:
            raise TestFailure(
                TestCategory.TIMEOUT,
                TestStage.CONNECT,
                f"connected, but no SSH banner within {within:g} s",
                details,
            ) from None
    first = _printable(received.split(b"\n")[0].rstrip(b"\r")[:80])
    raise TestFailure(
        TestCategory.PROTOCOL_ERROR,
        TestStage.CONNECT,
        "not an SSH server: no SSH identification banner" + (f" (it said {first!r})" if first else ""),
        details,
    )


def _printable(raw: bytes) -> str:
    return "".join(c if c.isprintable() else "?" for c in raw.decode("ascii", "replace"))


async def _close(writer: asyncio.StreamWriter) -> None:
    writer.close()
    # A peer that never answers a TLS close_notify must not hold the test.
    with suppress(OSError, TimeoutError):
        await asyncio.wait_for(writer.wait_closed(), _CLOSE_WAIT)
