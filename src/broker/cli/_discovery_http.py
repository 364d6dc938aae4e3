"""Bounded HTTP for `oauth connect --mcp-server` discovery: which URLs are followed, and how.

A URL is followed only if it is https (http only to a loopback host: 127.0.0.1, ::1, localhost),
has a host and carries no user info or fragment. No redirect is followed; an answer must come
uncompressed, within `MAX_BODY` bytes and `TIMEOUT` seconds (per connect and read; a trickling
answer stops at its first chunk after that); JSON must be an object. Every problem is a
`DiscoveryError` naming what was wrong and at which URL, and never quotes an answer beyond `shown`'s
bound.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import httpx

MAX_BODY = 64 * 1024
TIMEOUT = 10.0
LOOPBACK_HOSTS = frozenset({"127.0.0.1", "::1", "localhost"})


class DiscoveryError(Exception):
    """Discovery stopped; the message says what was wrong and where. `url` is the URL at fault."""

    def __init__(self, message: str, url: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.url = url


def shown(text: str, limit: int = 200) -> str:
    """`text` for a terminal: non-printable characters escaped, cut to `limit` characters."""
    text = "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)
    return text if len(text) <= limit else text[:limit] + "..."


def check_url(url: str, what: str, where: str = "") -> str:
    """`url` if it may be followed: https, or http to a loopback host; a host, no user info or fragment."""
    at = f" (from {shown(where)})" if where else ""
    if not url or len(url) > 2000 or any(c <= " " or c == "\x7f" or not c.isascii() for c in url):
        raise DiscoveryError(f"{what} {shown(url)!r}{at} is not a URL", where)
    try:
        parts = urlsplit(url)
        host, _ = parts.hostname, parts.port
    except ValueError:
        raise DiscoveryError(f"{what} {shown(url)!r}{at} is not a URL", where) from None
    if parts.scheme.lower() not in ("http", "https") or not host:
        raise DiscoveryError(f"{what} {shown(url)!r}{at} is not an http(s) URL with a host", where)
    if parts.scheme.lower() == "http" and host not in LOOPBACK_HOSTS:
        raise DiscoveryError(
            f"{what} {shown(url)!r}{at} is plain http: only https is accepted (http only on 127.0.0.1, "
            "::1 or localhost)",
            where,
        )
    if parts.username is not None or parts.password is not None or "#" in url:
        raise DiscoveryError(f"{what} {shown(url)!r}{at} has user info or a fragment", where)
    return url


@dataclass(frozen=True)
class Answer:
    url: str
    status: int
    headers: httpx.Headers
    body: bytes


def fetch(
    client: httpx.Client, method: str, url: str, what: str, *, body: Any = None, read: bool = True
) -> Answer:
    """One request, no redirect followed, the answer's body capped at MAX_BODY and TIMEOUT."""
    deadline = time.monotonic() + TIMEOUT
    headers = {"Accept-Encoding": "identity"}
    if method == "GET":
        headers["Accept"] = "application/json"
    try:
        with client.stream(method, url, json=body, headers=headers) as response:
            if 300 <= response.status_code < 400:
                location = shown(response.headers.get("location", ""))
                raise DiscoveryError(
                    f"{what} at {shown(url)} redirects (HTTP {response.status_code} to {location!r});"
                    " redirects are not followed: give the final URL",
                    url,
                )
            coding = response.headers.get("content-encoding", "identity").strip().lower()
            if coding not in ("", "identity"):
                raise DiscoveryError(
                    f"{what} at {shown(url)} came in a content coding ({shown(coding)})", url
                )
            length = response.headers.get("content-length", "")
            if length.isdigit() and int(length) > MAX_BODY:
                raise DiscoveryError(f"{what} at {shown(url)} is larger than {MAX_BODY // 1024} KiB", url)
            received = bytearray()
            for chunk in response.iter_raw() if read else ():
                received += chunk
                if len(received) > MAX_BODY:
                    raise DiscoveryError(f"{what} at {shown(url)} is larger than {MAX_BODY // 1024} KiB", url)
                if time.monotonic() > deadline:
                    raise httpx.ReadTimeout("the answer took too long")
            return Answer(url, response.status_code, response.headers, bytes(received))
    except httpx.TimeoutException:
        raise DiscoveryError(f"{what} at {shown(url)}: no answer within {TIMEOUT:g} s", url) from None
    except httpx.HTTPError as exc:
        raise DiscoveryError(
            f"{what} at {shown(url)}: cannot reach it ({shown(str(exc), 120)})", url
        ) from None
    finally:
        client.cookies.clear()  # nothing one server set travels to the next


def json_object(answer: Answer, what: str) -> dict[str, Any]:
    """The answer's body as a JSON object, or a `DiscoveryError` saying it is not one."""
    try:
        document = json.loads(answer.body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise DiscoveryError(f"{what} at {shown(answer.url)} is not JSON", answer.url) from None
    if not isinstance(document, dict):
        raise DiscoveryError(f"{what} at {shown(answer.url)} is not a JSON object", answer.url)
    return document


def text_field(document: Mapping[str, Any], key: str, what: str, url: str, *, required: bool = True) -> str:
    value = document.get(key)
    if value is None and not required:
        return ""
    if not isinstance(value, str) or not value:
        problem = "has no" if value is None else "has a wrong-typed"
        raise DiscoveryError(f"{what} at {shown(url)} {problem} {key} (a non-empty string)", url)
    return value


def text_list(document: Mapping[str, Any], key: str, what: str, url: str) -> tuple[str, ...] | None:
    value = document.get(key)
    if value is None:
        return None
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise DiscoveryError(f"{what} at {shown(url)} has a wrong-typed {key} (a list of strings)", url)
    return tuple(value)


def open_client() -> httpx.Client:
    """The HTTP client discovery uses: no redirects followed, TIMEOUT per step, no credentials."""
    return httpx.Client(
        timeout=TIMEOUT,
        follow_redirects=False,
        headers={"User-Agent": "brokerctl", "Accept": "application/json, text/event-stream"},
    )
