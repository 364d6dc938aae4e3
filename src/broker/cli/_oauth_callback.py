"""The browser half of `brokerctl oauth connect`: a one-shot loopback listener for the redirect.

The provider sends the user's browser to `http://127.0.0.1:<port>/callback?code=...&state=...`;
the listener takes the one request carrying this authorization's state, answers a short page, and
hands the code and state back. Alternatively the user pastes the URL the browser ended up on.
"""

from __future__ import annotations

import hmac
import http.server
import threading
from dataclasses import dataclass
from urllib.parse import parse_qs, urlsplit

from broker.cli._input import UsageError

_PAGE = b"<!doctype html><title>broker</title><p>Authorization received. You can close this window.</p>"


@dataclass(frozen=True)
class Redirect:
    code: str
    state: str
    iss: str = ""  # RFC 9207: the issuer the provider named, for the broker to check


def parse_redirect(url: str) -> Redirect:
    """The code and state of a redirect URL; the provider's error when it refused."""
    query = parse_qs(urlsplit(url.strip()).query)
    if "error" in query:
        # RFC 6749 4.1.2.1: error_description is for the developer; shown bounded and printable
        # (it came through a browser from anywhere), never as terminal control sequences.
        described = query.get("error_description", [""])[0]
        described = "".join(c for c in described if c.isprintable())[:200]
        suffix = f" ({described})" if described else ""
        raise UsageError(f"the provider refused the authorization: {_printable(query['error'][0])}{suffix}")
    code, state = query.get("code", [""])[0], query.get("state", [""])[0]
    if not code or not state:
        raise UsageError("the redirect URL has no code and state")
    return Redirect(code, state, query.get("iss", [""])[0])


def _printable(text: str) -> str:
    return "".join(c for c in text if c.isprintable())[:64]


class CallbackListener:
    """Listens on 127.0.0.1 for exactly one request to /callback with the expected state.

    Requests with another state (or before `expect`) are refused and the listener keeps waiting:
    any local process, or a web page the user has open, can reach a loopback port, and must not be
    able to end the authorization before the provider's redirect arrives.
    """

    def __init__(self, port: int = 0) -> None:
        self._received: list[str] = []
        self._state = ""
        self._done = threading.Event()
        listener = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                if urlsplit(self.path).path != "/callback":
                    self.send_error(404)
                    return
                state = parse_qs(urlsplit(self.path).query).get("state", [""])[0]
                if not listener._state or not hmac.compare_digest(state.encode(), listener._state.encode()):
                    self.send_error(400, "not the authorization this listener is waiting for")
                    return
                listener._received.append(self.path)
                self.send_response(200)
                self.send_header("Content-Type", "text/html; charset=utf-8")
                self.end_headers()
                self.wfile.write(_PAGE)
                listener._done.set()

            def log_message(self, format: str, *args: object) -> None:
                return  # the query holds the code: keep it off the terminal

        try:
            self._server = http.server.HTTPServer(("127.0.0.1", port), Handler)
        except OSError as exc:
            # A port given (or the one a client was registered with) may be taken: say which, not a
            # traceback. An authorization server that matches redirect URIs exactly needs that port.
            raise UsageError(
                f"cannot listen on 127.0.0.1:{port} for the redirect: {exc.strerror or exc}; "
                "free that port, or use --paste"
            ) from None
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def redirect_uri(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}/callback"

    def __enter__(self) -> CallbackListener:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()

    def expect(self, state: str) -> None:
        """Accept only a redirect carrying `state` (BeginAuthorization's), from now on."""
        self._state = state

    def wait(self, timeout: float) -> Redirect:
        """The code and state of the first redirect, within `timeout` seconds."""
        if not self._done.wait(timeout):
            raise UsageError(f"no redirect arrived within {timeout:g} s; try again, or use --paste")
        return parse_redirect(self._received[0])
