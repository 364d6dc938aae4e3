"""`broker health`: one grpc.health.v1 Check over mTLS, for container probes.

Exit 0 when the service is SERVING, 1 for anything else (NOT_SERVING, unknown
service, no answer); the status is printed either way, and a hint to stderr when
the broker could not be reached (the same hints as `brokerctl`, from `_hints`). The probe needs a client
identity: `--cert/--key`, else `health.cert`/`health.key` from the settings, else
(with `--data-dir`) the executor certificate `broker dev` made. Any certificate from
the client CA will do: health checking needs no role. The server is verified
against `--ca`, else `tls.client_ca` (one CA for both sides, as `broker certs` makes).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from broker.cli import settings_source
from broker.cli._hints import HEALTH, connection_hint
from broker.config import Settings
from broker.errors import ConfigError

DEFAULT_TIMEOUT = 5.0
# A listener bound to a wildcard address is dialled on this host's loopback.
_UNSPECIFIED_HOSTS = {"0.0.0.0": "127.0.0.1", "::": "[::1]", "[::]": "[::1]", "*": "127.0.0.1"}  # noqa: S104


def add_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """The `health` subcommand's arguments."""
    p = sub.add_parser(
        "health",
        help="ask a running broker's gRPC health service; exit 0 when SERVING",
        description="One grpc.health.v1 Check over mTLS against a listener of the broker these "
        "settings describe. Prints the status; exit 0 when SERVING, 1 otherwise (2: bad settings).",
    )
    settings_source.add_arguments(p)
    p.add_argument(
        "--service",
        default="",
        help='the service to ask about, e.g. broker.v1.ResolveService (default "": the whole listener)',
    )
    p.add_argument(
        "--addr", choices=("resolve", "admin"), default="resolve", help="which listener (default resolve)"
    )
    p.add_argument("--cert", type=Path, help="client certificate (default: health.cert)")
    p.add_argument("--key", type=Path, help="its private key (default: health.key)")
    p.add_argument("--ca", type=Path, help="CA that signed the server certificate (default: tls.client_ca)")
    p.add_argument("--target", metavar="HOST:PORT", help="dial this address instead of the listener's own")
    p.add_argument(
        "--server-name",
        help="name to expect in the server certificate (default: health.server_name, else the host)",
    )
    p.add_argument(
        "--timeout", type=float, default=DEFAULT_TIMEOUT, help=f"seconds (default {DEFAULT_TIMEOUT:g})"
    )


def target(listen: str) -> str:
    """Where to dial a listener bound to `listen`: a wildcard address means this host."""
    host, _, port = listen.rpartition(":")
    return f"{_UNSPECIFIED_HOSTS.get(host, host)}:{port}"


def run(args: argparse.Namespace, settings: Settings) -> int:
    """Check the listener's health; print the status; 0 when SERVING."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    dev = args.data_dir is not None
    cert = args.cert or settings.health_cert or (args.data_dir / "tls" / "executor.pem" if dev else None)
    key = args.key or settings.health_key or (args.data_dir / "tls" / "executor-key.pem" if dev else None)
    if cert is None or key is None:
        raise ConfigError(
            "no client identity for the probe: pass --cert and --key, or set health.cert and health.key"
        )
    ca = args.ca or settings.tls.client_ca
    credentials = grpc.ssl_channel_credentials(
        root_certificates=_read(ca, "--ca"),
        private_key=_read(key, "--key"),
        certificate_chain=_read(cert, "--cert"),
    )
    address = args.target or target(settings.resolve_addr if args.addr == "resolve" else settings.admin_addr)
    server_name = args.server_name or settings.health_server_name
    options = [("grpc.ssl_target_name_override", server_name)] if server_name else []
    with grpc.secure_channel(address, credentials, options=options) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            reply = stub.Check(health_pb2.HealthCheckRequest(service=args.service), timeout=args.timeout)
        except grpc.RpcError as exc:
            code = exc.code()
            if code == grpc.StatusCode.NOT_FOUND:
                print(f"SERVICE_UNKNOWN: {args.service!r} at {address}")
            else:
                print(f"UNREACHABLE: {address}: {code.name}: {exc.details()}")
                hint = connection_hint(
                    code.name, exc.details() or "", address, args.timeout, HEALTH, server_name
                )
                if hint:
                    print(f"broker: hint: {hint}", file=sys.stderr)
            return 1
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    print(f"{status}: {args.service or '(all)'} at {address}")
    return 0 if reply.status == health_pb2.HealthCheckResponse.SERVING else 1


def _read(path: Path, flag: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{flag}: cannot read {path}: {exc.strerror}") from None
