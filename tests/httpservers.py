"""Real HTTP(S) servers on loopback for tester tests.

`serve(route)` runs a stdlib `ThreadingHTTPServer` on 127.0.0.1 (port 0) in a thread; `route`
turns each recorded request into an answer. `silent_port()` accepts TCP connections (the
kernel's backlog does) and never answers; `closed_port()` is a port nobody listens on.
`tls_files()` issues a CA and a server certificate for 127.0.0.1 with `broker.pki`.
"""

from __future__ import annotations

import contextlib
import json
import socket
import ssl
import threading
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from broker import pki


@dataclass(frozen=True)
class Seen:
    """A request as the server received it; header names are lower-cased."""

    method: str
    path: str
    headers: dict[str, str]
    body: bytes


@dataclass(frozen=True)
class Answer:
    """What the server sends back."""

    status: int = 200
    body: bytes = b""
    headers: Mapping[str, str] = field(default_factory=dict)

    @classmethod
    def json(cls, document: Any, status: int = 200) -> Answer:
        return cls(status, json.dumps(document).encode(), {"Content-Type": "application/json"})


Route = Callable[[Seen], Answer]


@dataclass
class LocalServer:
    """A running server: its base URL and every request it received."""

    url: str
    port: int
    requests: list[Seen]


def _handler(route: Route, requests: list[Seen]) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def _handle(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else b""
            seen = Seen(self.command, self.path, {k.lower(): v for k, v in self.headers.items()}, body)
            requests.append(seen)
            answer = route(seen)
            self.send_response(answer.status)
            for name, value in answer.headers.items():
                self.send_header(name, value)
            self.send_header("Content-Length", str(len(answer.body)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(answer.body)

        do_GET = do_HEAD = do_POST = do_PUT = do_DELETE = _handle

        def log_message(self, format: str, *args: Any) -> None:
            pass  # keep test output quiet

    return Handler


@contextlib.contextmanager
def serve(route: Route, tls: ssl.SSLContext | None = None) -> Iterator[LocalServer]:
    """A server on 127.0.0.1 answering with `route`, over TLS when `tls` is given; closed on exit."""
    requests: list[Seen] = []
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _handler(route, requests))
    if tls is not None:
        # A failed handshake raises SSLError (an OSError) in accept, which socketserver ignores.
        httpd.socket = tls.wrap_socket(httpd.socket, server_side=True)
    port = httpd.server_address[1]
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        scheme = "https" if tls is not None else "http"
        yield LocalServer(f"{scheme}://127.0.0.1:{port}", port, requests)
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(5)


@contextlib.contextmanager
def silent_port() -> Iterator[int]:
    """A port whose connections are accepted by the kernel but never answered."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(16)
        yield listener.getsockname()[1]


def closed_port() -> int:
    """A loopback port with no listener (bound, then released)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port


@dataclass(frozen=True)
class TlsFiles:
    """A CA certificate file and a server context whose certificate it signed."""

    ca_file: Path
    server: ssl.SSLContext


def tls_files(folder: Path, name: str = "test") -> TlsFiles:
    """A fresh CA and a server certificate for 127.0.0.1, written under `folder`."""
    ca, ca_key = pki.create_ca(f"{name} CA")
    cert, key = pki.issue_server_cert(ca, ca_key, ["127.0.0.1"])
    ca_file, cert_file, key_file = (folder / f"{name}-{part}.pem" for part in ("ca", "cert", "key"))
    ca_file.write_bytes(ca)
    cert_file.write_bytes(cert)
    key_file.write_bytes(key)
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(cert_file, key_file)
    return TlsFiles(ca_file, server)
