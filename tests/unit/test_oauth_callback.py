"""`brokerctl oauth`'s reading of the provider's redirect (RFC 6749 4.1.2, RFC 9207's `iss`)."""

from __future__ import annotations

import httpx
import pytest

from broker.cli._input import UsageError
from broker.cli._oauth_callback import CallbackListener, Redirect, parse_redirect


def test_a_refusal_shows_the_error_and_its_description_printable_and_bounded() -> None:
    url = (
        "http://127.0.0.1:8976/callback?error=access_denied"
        "&error_description=End-User+aborted+interaction%1b%5b31m"
        + "x" * 500
        + "&state=s&iss=https%3A%2F%2Fidp"
    )
    with pytest.raises(UsageError) as refused:
        parse_redirect(url)
    message = str(refused.value)
    assert message.startswith(
        "the provider refused the authorization: access_denied (End-User aborted interaction"
    )
    assert "\x1b" not in message and len(message) < 320


def test_the_iss_parameter_is_kept_for_the_broker_to_check() -> None:
    url = "http://127.0.0.1:8976/callback?code=c1&state=s1&iss=http%3A%2F%2F127.0.0.1%3A4111"
    assert parse_redirect(url) == Redirect("c1", "s1", "http://127.0.0.1:4111")
    assert parse_redirect("http://127.0.0.1:8976/callback?code=c1&state=s1") == Redirect("c1", "s1", "")


def test_the_listener_waits_for_its_own_state_and_refuses_other_requests() -> None:
    """Any local process or open web page can reach the loopback port: a request with another state
    (or one arriving before the authorization began) must not end the wait."""
    with CallbackListener() as listener:
        base = listener.redirect_uri
        assert httpx.get(f"{base}?code=early&state=s1").status_code == 400
        listener.expect("s1")
        for forged in ("?code=evil&state=s2", "?code=evil", "?error=access_denied&state=other"):
            assert httpx.get(base + forged).status_code == 400, forged
        assert httpx.get(f"{base}?code=c1&state=s1&iss=x").status_code == 200
        assert listener.wait(1) == Redirect("c1", "s1", "x")
