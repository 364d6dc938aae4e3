"""An ASGI app served by uvicorn on a free loopback port, in a background thread (test servers)."""

from __future__ import annotations

import socket
import threading
import time
from typing import Any

import uvicorn


class ThreadedUvicorn:
    """Start with `start()`, which returns once the server accepts connections; `stop()` joins it."""

    def __init__(self, app: Any, name: str, *, lifespan: str = "off", tls: tuple[str, str] | None = None):
        self._app = app
        self._name = name
        self._lifespan = lifespan
        self._tls = tls
        self._uvicorn: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self._socket: socket.socket | None = None
        self.port = 0

    def start(self) -> None:
        self._socket = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._socket.bind(("127.0.0.1", 0))
        self.port = self._socket.getsockname()[1]
        certfile, keyfile = self._tls or (None, None)
        config = uvicorn.Config(
            self._app,
            log_level="warning",
            lifespan=self._lifespan,
            ws="none",
            http="h11",
            timeout_graceful_shutdown=2,
            ssl_certfile=certfile,
            ssl_keyfile=keyfile,
        )
        self._uvicorn = uvicorn.Server(config)
        self._thread = threading.Thread(
            target=self._uvicorn.run, kwargs={"sockets": [self._socket]}, name=self._name, daemon=True
        )
        self._thread.start()
        deadline = time.monotonic() + 10
        while not self._uvicorn.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise RuntimeError(f"the {self._name} did not start")
            time.sleep(0.01)

    def stop(self) -> None:
        """Ask uvicorn to exit, wait for its thread, and close the listening socket."""
        if self._uvicorn is not None:
            self._uvicorn.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=10)
            if self._thread.is_alive():
                raise RuntimeError(f"the {self._name} did not stop")
        if self._socket is not None:
            self._socket.close()
