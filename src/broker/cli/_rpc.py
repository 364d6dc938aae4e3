"""`brokerctl`'s side of gRPC: mTLS channels to the two listeners, and errors worded for people."""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from broker._proto import broker_pb2, broker_pb2_grpc
from broker.cli._hints import BROKERCTL, connection_hint
from broker.cli._input import UsageError
from broker.cli._output import render_test_result, shown


@dataclass(frozen=True)
class ClientTls:
    """The files for one mTLS identity: the CA that signed the server, our certificate and key."""

    ca: Path
    cert: Path
    key: Path

    def credentials(self) -> Any:
        """gRPC channel credentials; a missing file is a `UsageError` naming it and its flag."""
        ca = _read(self.ca, "CA certificate", "--ca, BROKER_CA or the profile's ca")
        cert = _read(self.cert, "client certificate", "--cert, BROKER_CERT or the profile's cert")
        key = _read(self.key, "client key", "--key, BROKER_KEY or the profile's key")
        return grpc.ssl_channel_credentials(root_certificates=ca, private_key=key, certificate_chain=cert)


class Session:
    """Channels to the admin and resolve listeners, opened on first use and closed by `close`.

    A command uses one of the two; `addr` remembers which, for the error hint.
    """

    def __init__(
        self,
        admin_addr: str,
        admin_tls: ClientTls,
        resolve_addr: str,
        resolve_tls: ClientTls,
        *,
        timeout: float,
        server_name: str | None = None,
    ) -> None:
        self.timeout = timeout
        self.addr = admin_addr
        self._admin = (admin_addr, admin_tls)
        self._resolve = (resolve_addr, resolve_tls)
        self.server_name = server_name
        self._channels: list[Any] = []
        self._admin_stub: Any = None
        self._resolve_stub: Any = None
        self._proxy_stub: Any = None
        self._resolve_channel: Any = None

    @property
    def admin(self) -> Any:
        """The AdminService stub, over a channel opened on first use."""
        if self._admin_stub is None:
            channel = self._open(*self._admin)
            self._admin_stub = broker_pb2_grpc.AdminServiceStub(channel)  # type: ignore[no-untyped-call]
        self.addr = self._admin[0]
        return self._admin_stub

    @property
    def resolver(self) -> Any:
        """The ResolveService stub, over the executor channel (opened on first use)."""
        if self._resolve_stub is None:
            self._resolve_stub = broker_pb2_grpc.ResolveServiceStub(self._executor_channel())  # type: ignore[no-untyped-call]
        self.addr = self._resolve[0]
        return self._resolve_stub

    @property
    def proxy(self) -> Any:
        """The ProxyService stub, over the same executor channel."""
        if self._proxy_stub is None:
            self._proxy_stub = broker_pb2_grpc.ProxyServiceStub(self._executor_channel())  # type: ignore[no-untyped-call]
        self.addr = self._resolve[0]
        return self._proxy_stub

    def _executor_channel(self) -> Any:
        if self._resolve_channel is None:
            self._resolve_channel = self._open(*self._resolve)
        return self._resolve_channel

    def close(self) -> None:
        """Close every channel this session opened."""
        for channel in self._channels:
            channel.close()
        self._channels.clear()
        self._admin_stub = self._resolve_stub = self._proxy_stub = self._resolve_channel = None

    def _open(self, addr: str, tls: ClientTls) -> Any:
        options = []
        if self.server_name:
            options.append(("grpc.ssl_target_name_override", self.server_name))
        channel = grpc.secure_channel(addr, tls.credentials(), options=options)
        self._channels.append(channel)
        return channel


def pages(call: Any, request: Any, field: str, timeout: float) -> Iterator[Any]:
    """Every item of a paged List call, following `next_page_token`."""
    while True:
        reply = call(request, timeout=timeout)
        yield from getattr(reply, field)
        if not reply.next_page_token:
            return
        request.page_token = reply.next_page_token


@dataclass(frozen=True)
class _Failed:
    """A failed call, read once for both outputs: text lines and the `--json` error object."""

    code: grpc.StatusCode
    details: str
    # The status text repeats the violations: with them at hand, a count says enough.
    summary: str
    violations: list[tuple[str, str]]
    hint: str | None


def _failed(error: grpc.RpcError, addr: str, timeout: float | None, server_name: str | None) -> _Failed:
    code = error.code() if hasattr(error, "code") else grpc.StatusCode.UNKNOWN
    details = (error.details() if hasattr(error, "details") else str(error)) or ""
    violations = list(field_violations(error)) if code == grpc.StatusCode.INVALID_ARGUMENT else []
    hint = None
    if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
        # Only a failure to reach the broker gets a hint.
        hint = connection_hint(code.name, details, addr, timeout, BROKERCTL, server_name)
    return _Failed(code, details, _count(violations) if violations else details, violations, hint)


def describe_error(
    error: grpc.RpcError,
    addr: str,
    prog: str = "brokerctl",
    *,
    timeout: float | None = None,
    server_name: str | None = None,
) -> list[str]:
    """The lines to print for a failed call: the status, each bad field once, and a hint where one helps.

    `timeout` (the call's deadline in seconds) and `server_name` (the name the server certificate was
    checked for, if not the address's host) make the hint precise.
    """
    failed = _failed(error, addr, timeout, server_name)
    lines = [f"{prog}: {failed.code.name}: {shown(failed.summary)}"]
    lines += [
        f"  {shown(field)}: {shown(text)}" if field else f"  {shown(text)}"
        for field, text in failed.violations
    ]
    if failed.code == grpc.StatusCode.FAILED_PRECONDITION:
        lines += [
            f"  {line}"
            for r in _details(error, broker_pb2.TestResult)
            for line in render_test_result(r).splitlines()
        ]
    return [*lines, f"{prog}: hint: {failed.hint}"] if failed.hint else lines


def error_doc(
    error: grpc.RpcError, addr: str, *, timeout: float | None = None, server_name: str | None = None
) -> dict[str, Any]:
    """A failed call for `--json`: code, message, violations (INVALID_ARGUMENT) and hint, if any."""
    failed = _failed(error, addr, timeout, server_name)
    doc: dict[str, Any] = {"code": failed.code.name, "message": failed.summary}
    if failed.code == grpc.StatusCode.INVALID_ARGUMENT:
        doc["violations"] = [{"field": f, "description": d} for f, d in failed.violations]
    if failed.hint:
        doc["hint"] = failed.hint
    return doc


def _count(violations: list[tuple[str, str]]) -> str:
    fields = len({field for field, _ in violations if field})
    more = sum(int(m.group(1)) for _, text in violations if (m := _MORE.fullmatch(text)))
    total = fields + more
    return f"{total} invalid field{'s' if total != 1 else ''}" if total else "invalid request"


# How the broker ends a long violation list (errors.InvalidArgument): "and N more".
_MORE = re.compile(r"and (\d+) more")


def field_violations(error: Any) -> Iterator[tuple[str, str]]:
    """(field, description) from the google.rpc.BadRequest in the status details trailer, if any."""
    for bad in _details(error, error_details_pb2.BadRequest):
        for violation in bad.field_violations:
            yield violation.field, violation.description


def _details(error: Any, kind: Any) -> Iterator[Any]:
    """The messages of type `kind` packed in the status details trailer."""
    try:
        status = rpc_status.from_call(error)
    except (ValueError, AttributeError):
        # A trailer that disagrees with the status line is not worth failing over; the status is shown.
        return
    if status is None:
        return
    for detail in status.details:
        if detail.Is(kind.DESCRIPTOR):
            message = kind()
            detail.Unpack(message)
            yield message


def _read(path: Path, what: str, where: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise UsageError(
            f"cannot read the {what} {path}: {exc.strerror}; set it with {where} (`brokerctl "
            "--help` lists the settings), or run `broker dev` here to create the dev files"
        ) from None
