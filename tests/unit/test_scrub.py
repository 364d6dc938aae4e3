"""The scrubber and the composed credential forms it is told about."""

from __future__ import annotations

import base64
import urllib.parse

from broker.testers.scrub import MASK, Scrubber
from broker.testers.sent import SentCredentials

USER = "ada-lo"  # `user:` is then not whole base64 groups, so the pair hides the password's own base64
PASSWORD = "pw/Lovelace+1815="
TOKEN = "tok-8d0e3b5f"


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


def test_each_secret_is_masked_in_every_encoding() -> None:
    scrubber = Scrubber([PASSWORD])
    raw = PASSWORD.encode()
    for form in (
        PASSWORD,
        urllib.parse.quote(PASSWORD, safe=""),
        urllib.parse.quote_plus(PASSWORD),
        _b64(raw),
        _b64(raw).rstrip("="),
        base64.urlsafe_b64encode(raw).decode(),
        base64.urlsafe_b64encode(raw).decode().rstrip("="),
        raw.hex(),
    ):
        assert scrubber.text(f"said <{form}>") == f"said <{MASK}>", form


def test_short_values_and_no_secrets_change_nothing() -> None:
    assert Scrubber(["abc"]).text("abc abcd") == "abc abcd"
    assert Scrubber([]).text("anything") == "anything"


def test_basic_credentials_are_masked_with_and_without_the_prefix_and_encoded() -> None:
    sent = SentCredentials()
    header = sent.basic(USER, PASSWORD)
    blob = _b64(f"{USER}:{PASSWORD}".encode())
    assert header == f"Basic {blob}"
    assert blob.find(_b64(PASSWORD.encode()).rstrip("=")) == -1  # why the secret alone is not enough
    scrubber = Scrubber([PASSWORD], sent.forms)
    for echo in (header, blob, blob.rstrip("="), urllib.parse.quote(header, safe=""), f"{USER}:{PASSWORD}"):
        assert MASK in scrubber.text(echo) and blob[:8] not in scrubber.text(echo), echo
    assert scrubber.text(f"Location: /in/{urllib.parse.quote(header)}") == f"Location: /in/{MASK}"


def test_smtp_auth_plain_with_and_without_authzid_and_login_pieces_are_masked() -> None:
    sent = SentCredentials()
    sent.smtp_auth(USER, PASSWORD)
    scrubber = Scrubber([PASSWORD], sent.forms)
    plain = _b64(f"\0{USER}\0{PASSWORD}".encode())
    with_authzid = _b64(f"{USER}\0{USER}\0{PASSWORD}".encode())
    login_user, login_password = _b64(USER.encode()), _b64(PASSWORD.encode())
    for echo in (plain, with_authzid, login_user, login_password):
        assert scrubber.text(f"535 5.7.8 {echo} refused") == f"535 5.7.8 {MASK} refused", echo


def test_bearer_headers_and_query_parameters_are_masked() -> None:
    sent = SentCredentials()
    assert sent.bearer(TOKEN) == f"Bearer {TOKEN}"
    assert sent.query("api key", PASSWORD) == "api+key=" + urllib.parse.quote_plus(PASSWORD)
    scrubber = Scrubber([TOKEN, PASSWORD], sent.forms)
    assert scrubber.text(f"got Bearer {TOKEN}.") == f"got {MASK}."
    assert scrubber.text(f"GET /v1?api+key={urllib.parse.quote_plus(PASSWORD)}&x=1") == f"GET /v1?{MASK}&x=1"


def test_a_form_cut_short_at_the_end_of_a_text_is_masked_too() -> None:
    sent = SentCredentials()
    sent.smtp_auth(USER, PASSWORD)
    scrubber = Scrubber([PASSWORD], sent.forms)
    plain = _b64(f"\0{USER}\0{PASSWORD}".encode())
    assert scrubber.cut_text(f"535 {plain[:20]}") == f"535 {MASK}"
    assert scrubber.cut_text(f"secret was {PASSWORD[:6]}") == f"secret was {MASK}"
    assert scrubber.cut_text(f"{PASSWORD[:6]} in the middle") == f"{PASSWORD[:6]} in the middle"
    assert scrubber.cut_text("ordinary text") == "ordinary text"
