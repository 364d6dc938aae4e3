"""What to tell a user whose call never reached the broker: one hint per kind of failure.

`brokerctl` and `broker health` print the same hints; each names its own options
(`Vocabulary`). The kind is read from the text gRPC puts in the UNAVAILABLE status, the
only place it says what went wrong (grpc 1.85 wordings, with the older ones beside them).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from broker.config import DEFAULT_ADMIN_ADDR, DEFAULT_RESOLVE_ADDR

# Only these get "start one with `make run`": anywhere else, the user meant a broker of their own.
DEV_ADDRESSES = frozenset({DEFAULT_ADMIN_ADDR, DEFAULT_RESOLVE_ADDR})


class Failure(enum.Enum):
    """Why a connection to the broker failed, as far as the client can tell."""

    HOST_NAME = "the server certificate does not hold the expected name"
    HANDSHAKE = "the TLS handshake failed"
    CLIENT_FILES = "the client's own TLS files could not be loaded"
    CLOSED = "the server closed the connection"
    NOT_TLS = "the server does not speak TLS"
    REFUSED = "connection refused"
    DNS = "the host name did not resolve"
    TIMEOUT = "no answer in time"
    UNREACHABLE = "could not connect"


# First match wins: a TLS failure's text also says "failed to connect to all addresses".
_MARKERS: tuple[tuple[Failure, tuple[str, ...]], ...] = (
    (Failure.HOST_NAME, ("hostname verification", "not in peer certificate", "peer name")),
    (Failure.CLIENT_FILES, ("failed to create security handshaker",)),
    (Failure.NOT_TLS, ("wrong_version_number", "http_request", "record_layer_failure")),
    (Failure.HANDSHAKE, ("handshake", "ssl", "certificate", "tls")),
    (Failure.REFUSED, ("connection refused",)),
    (
        Failure.DNS,
        ("errors resolving", "dns resolution failed", "domain name not found", "name or service not known"),
    ),
    (Failure.CLOSED, ("socket closed", "connection reset", "end of tcp stream")),
    (Failure.UNREACHABLE, ("failed to connect", "unreachable", "no route to host", "connect failed")),
)


@dataclass(frozen=True)
class Vocabulary:
    """How one command lets the user change each thing a hint may point at."""

    address: str
    server_name: str
    ca: str
    identity: str
    timeout: str


BROKERCTL = Vocabulary(
    address="the address (--addr, BROKER_ADDR or the profile's addr; --resolve-addr for `resolve`)",
    server_name="--server-name (BROKER_SERVER_NAME, or server_name in the profile)",
    ca="--ca (BROKER_CA)",
    identity="--cert and --key (BROKER_CERT and BROKER_KEY; for `resolve` BROKER_EXECUTOR_CERT and "
    "BROKER_EXECUTOR_KEY)",
    timeout="--timeout (BROKER_TIMEOUT)",
)
HEALTH = Vocabulary(
    address="the address (--target, or the listener in the settings)",
    server_name="--server-name",
    ca="--ca (default tls.client_ca)",
    identity="--cert and --key (default health.cert and health.key)",
    timeout="--timeout",
)


def classify(code: str, details: str) -> Failure | None:
    """The kind of failure behind a status (its code's name and details), or None when the broker answered."""
    if code == "DEADLINE_EXCEEDED":
        # gRPC's own words: this client's deadline passed. Anything else is the broker's answer (a
        # proxied call outlived the deadline), which reached us: the address is not in question.
        return Failure.TIMEOUT if details.strip().lower() == "deadline exceeded" else None
    if code != "UNAVAILABLE":
        return None
    text = details.lower()
    for failure, markers in _MARKERS:
        if any(marker in text for marker in markers):
            return failure
    # UNAVAILABLE from the broker itself (shutting down, store down) says what it means.
    return None


def connection_hint(
    code: str,
    details: str,
    addr: str,
    timeout: float | None,
    words: Vocabulary,
    server_name: str | None = None,
) -> str | None:
    """One sentence for a call to `addr` that failed with `code` and `details`; None: nothing to add.

    `server_name` is the name the server certificate was checked for, when not the address's host.
    """
    failure = classify(code, details)
    if failure is None:
        return None
    host = addr.rpartition(":")[0].strip("[]") or addr
    if failure is Failure.HOST_NAME:
        checked = server_name or host
        how = "the server name given" if server_name else "the host of the address"
        return (
            f"the server certificate at {addr} does not hold {checked} ({how}): pass "
            f"{words.server_name} with a name it holds, or issue a server certificate for {checked} "
            f"(`broker init --host {checked}` or `broker certs server --host {checked}`)"
        )
    if failure is Failure.HANDSHAKE:
        return (
            f"the TLS handshake with {addr} failed: check {words.ca}, the CA that signed the broker's "
            f"certificate, and {words.identity}, a client certificate from the broker's CA and its key"
        )
    if failure is Failure.CLIENT_FILES:
        return (
            f"the TLS files could not be loaded: {words.ca} must be a PEM CA certificate, and "
            f"{words.identity} a PEM certificate and its own PEM private key"
        )
    if failure is Failure.CLOSED:
        return (
            f"{addr} closed the connection, as a broker does with a client certificate it does not "
            f"accept: check {words.identity} (issued by the broker's CA), and {words.address}"
        )
    if failure is Failure.NOT_TLS:
        return f"{addr} does not speak TLS: is it the broker's gRPC listener? Check {words.address}"
    if failure is Failure.REFUSED:
        if addr in DEV_ADDRESSES:
            return (
                f"nothing is listening on {addr}, the `broker dev` default: start a local broker with "
                f"`make run` (or `broker dev`), or check {words.address}"
            )
        return f"nothing is listening on {addr} (connection refused): check {words.address}"
    if failure is Failure.DNS:
        return f"the host name {host} did not resolve (DNS): check {words.address}"
    if failure is Failure.TIMEOUT:
        within = f"within {timeout:g} s" if timeout is not None else "in time"
        return (
            f"no answer from {addr} {within} (timeout): check {words.address}, or allow longer "
            f"with {words.timeout}"
        )
    return f"could not connect to {addr}: check {words.address}, and that the broker runs there"
