"""The two servers under test, each run in its own process (`python -m bench.servers ...`).

    broker <dir> [<name>]    broker.server.Broker with <dir>/<name>.toml (name: broker);
                             one name per replica when several share a PostgreSQL database
    echo <dir> <response>    a bare grpc.aio server on the same mTLS files: ResolveService
                             answering every call with the response bytes in <response>

Each writes {"pid", "event_loop", ports...} to <dir>/<name>.ready (the echo server: echo.ready)
once it serves, and stops on SIGTERM, or by itself once the process that started it is gone.

Both run on the event loop `broker serve` would use (uvloop when installed), so the echo
reference stays a fair ceiling; `BROKER_BENCH_LOOP=asyncio` runs both on asyncio's own loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import os
import signal
import sys
from pathlib import Path
from typing import Any

import grpc

from broker import log as broker_log
from broker._proto import broker_pb2 as pb
from broker.config import Settings
from broker.server import Broker, event_loop_name, loop_factory


async def _until_stopped() -> None:
    """Until SIGTERM or SIGINT, or until the bench that started us is gone.

    A bench killed outright (SIGKILL, e.g. by a test's timeout) can stop nothing; polling
    for the parent once a second keeps its servers from running on forever.
    """
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    parent = os.getppid()
    while not stop.is_set() and os.getppid() == parent:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), 1.0)


def _ready(root: Path, name: str, info: dict[str, Any]) -> None:
    tmp = root / f"{name}.ready.tmp"
    tmp.write_text(json.dumps({"pid": os.getpid(), "event_loop": event_loop_name(), **info}))
    tmp.rename(root / f"{name}.ready")


async def serve_broker(root: Path, name: str = "broker") -> None:
    settings = Settings.load(root / f"{name}.toml", environ={})
    broker_log.configure(settings.log_level)
    broker = Broker(settings)
    await broker.start()
    gc.freeze()  # as `broker serve` does once SERVING (broker.server.serve)
    ports = {"admin": broker.admin_port, "resolve": broker.resolve_port, "metrics": broker.metrics_port}
    _ready(root, name, ports)
    await _until_stopped()
    await broker.stop(grace=1)


async def serve_echo(root: Path, response_file: Path) -> None:
    """No interceptors, no work: parse the request, return a prebuilt response of Resolve's size."""
    settings = Settings.load(root / "broker.toml", environ={})
    response = pb.ResolveResponse.FromString(response_file.read_bytes())  # noqa: ASYNC240 (start-up)

    async def resolve(request: pb.ResolveRequest, context: Any) -> pb.ResolveResponse:
        return response

    handler = grpc.method_handlers_generic_handler(
        "broker.v1.ResolveService",
        {
            "Resolve": grpc.unary_unary_rpc_method_handler(
                resolve,
                request_deserializer=pb.ResolveRequest.FromString,
                response_serializer=pb.ResolveResponse.SerializeToString,
            )
        },
    )
    server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
    server.add_generic_rpc_handlers((handler,))
    tls = settings.tls
    # The broker's own mTLS setup: its server key pair, client certificate required, same CA.
    credentials = grpc.ssl_server_credentials(
        [(tls.key.read_bytes(), tls.cert.read_bytes())],
        root_certificates=tls.client_ca.read_bytes(),
        require_client_auth=True,
    )
    port = server.add_secure_port("127.0.0.1:0", credentials)
    await server.start()
    gc.freeze()  # the broker's process does the same once serving: the ceiling gets it too
    _ready(root, "echo", {"resolve": port})
    await _until_stopped()
    await server.stop(1)


async def serve_upstream(root: Path) -> None:
    """The proxy scenario's upstream: HTTP/1.1 with keep-alive, the same small JSON answer to all."""
    body = b'{"items": [1, 2, 3], "next": null}'
    answer = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (
        len(body),
        body,
    )

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:  # one request per loop: its head (GET: no body), then the answer
                while (line := await reader.readline()) not in (b"\r\n", b""):
                    pass
                if not line:
                    break
                writer.write(answer)
                await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    _ready(root, "upstream", {"port": server.sockets[0].getsockname()[1]})
    await _until_stopped()
    server.close()


def main(argv: list[str]) -> None:
    kind, root = argv[0], Path(argv[1])
    factory = None if os.environ.get("BROKER_BENCH_LOOP") == "asyncio" else loop_factory()
    with asyncio.Runner(loop_factory=factory) as runner:
        if kind == "broker":
            runner.run(serve_broker(root, *argv[2:3]))
        elif kind == "echo":
            runner.run(serve_echo(root, Path(argv[2])))
        elif kind == "upstream":
            runner.run(serve_upstream(root))
        else:
            raise SystemExit(f"unknown server kind {kind!r}")


if __name__ == "__main__":
    main(sys.argv[1:])
