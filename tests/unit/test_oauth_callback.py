"""`brokerctl oauth`'s reading of the provider's redirect (RFC 6749 4.1.2, RFC 9207's `iss`)."""

from __future__ import annotations

import pytest

from broker.cli._input import UsageError
from broker.cli._oauth_callback import Redirect, parse_redirect


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
