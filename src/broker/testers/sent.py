"""The credentials the broker composes from secrets and sends, built in one place and remembered.

A server may echo what it received: a Basic header in a redirect, an AUTH PLAIN blob in a
535 reply, a bearer header in an MCP tool's description. A composed form hides the secret
from a scrubber that only knows the secret: base64 of `user:password` shares no substring
with base64 of the password. So every credential a tester sends is built here, and what was
built is kept for the runner, which scrubs each kept form in every encoding it knows.
"""

from __future__ import annotations

import base64
import urllib.parse


def _b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode("ascii")


class SentCredentials:
    """The composed credentials one test sent; each builder returns the wire value and keeps it."""

    def __init__(self) -> None:
        self._forms: set[str] = set()

    @property
    def forms(self) -> frozenset[str]:
        """Every composed value sent (or offered) so far; the scrubber adds its encodings."""
        return frozenset(self._forms)

    def basic(self, username: str, password: str) -> str:
        """HTTP Basic: `Basic <base64(username:password)>`."""
        pair = f"{username}:{password}"
        header = f"Basic {_b64(pair)}"
        # The pair's base64 (bare, padded or not) comes from the pair; the header adds the prefix.
        self._forms.update((pair, header))
        return header

    def bearer(self, token: str) -> str:
        """An Authorization value: `Bearer <token>`."""
        header = f"Bearer {token}"
        self._forms.add(header)
        return header

    def obtained(self, token: str) -> str:
        """A credential the test obtained itself (a client credentials token): not among the secrets."""
        self._forms.add(token)
        return token

    def query(self, name: str, value: str) -> str:
        """A query-string parameter `name=value`, URL-encoded."""
        pair = urllib.parse.urlencode({name: value})
        self._forms.update((pair, f"{name}={value}"))
        return pair

    def smtp_auth(self, username: str, password: str) -> None:
        """What SMTP AUTH may send: the SASL PLAIN message and the AUTH LOGIN pieces.

        The SMTP client picks the mechanism from what the server offers, so every one it might
        use is kept: PLAIN with an empty authorisation identity (what aiosmtplib sends) and
        with the user as one (what many clients send), and LOGIN's base64 user and password.
        """
        for authzid in ("", username):
            self._forms.add(f"{authzid}\0{username}\0{password}")
        self._forms.update((_b64(username), _b64(password)))
