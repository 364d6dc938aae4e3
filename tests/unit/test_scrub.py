"""The scrubber, the composed credential forms it is told about, and scrubbed MCP tool definitions."""

from __future__ import annotations

import base64
import urllib.parse

from broker.model import McpTool
from broker.scrub import MASK, Scrubber
from broker.testers.mcp import scrub_tools, tool_definition_hash
from broker.testers.sent import SentCredentials
from tests.helpers import base64_reveals

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


def test_json_is_scrubbed_in_keys_values_and_numbers_and_colliding_keys_are_kept() -> None:
    scrubber = Scrubber([TOKEN, "86753091"])
    schema = {
        "type": "object",
        "properties": {TOKEN: {"default": f"Bearer {TOKEN}", "enum": [TOKEN, 1]}, f"{TOKEN}": 2},
        "pin": 86753091,
        "flag": True,
        "nothing": None,
    }
    schema["properties"][_b64(TOKEN.encode())] = {"x": 1.5}
    assert scrubber.json(schema) == {
        "type": "object",
        "properties": {MASK: 2, f"{MASK}#2": {"x": 1.5}},
        "pin": MASK,
        "flag": True,
        "nothing": None,
    }


def _tool(name: str, description: str = "does things", schema: dict[str, object] | None = None) -> McpTool:
    schema = schema if schema is not None else {"type": "object"}
    return McpTool(name, description, schema, tool_definition_hash(name, description, schema))


def test_tools_are_scrubbed_and_hashed_in_their_scrubbed_form() -> None:
    plain = _tool("plain")
    leaky = _tool(f"call_{TOKEN}", f"sends {TOKEN}", {"properties": {TOKEN: {"type": "string"}}})
    tools, redacted = scrub_tools([plain, leaky], Scrubber([TOKEN]))
    assert redacted == 1
    assert tools[0] is plain
    masked = tools[1]
    assert (masked.name, masked.description, masked.input_schema) == (
        f"call_{MASK}",
        f"sends {MASK}",
        {"properties": {MASK: {"type": "string"}}},
    )
    assert masked.definition_hash == tool_definition_hash(
        masked.name, masked.description, masked.input_schema
    )
    # A rotated secret echoed the same way is the same stored tool: no spurious change.
    rotated = "tok-2c44aa10"
    again, _ = scrub_tools(
        [_tool(f"call_{rotated}", f"sends {rotated}", {"properties": {rotated: {}}})], Scrubber([rotated])
    )
    assert again[0].name == masked.name and again[0].description == masked.description


def test_tool_names_that_collide_once_masked_are_told_apart() -> None:
    other = "tok-0a1b2c3d"
    tools, redacted = scrub_tools(
        [_tool(f"t_{TOKEN}"), _tool(f"t_{other}"), _tool("t_" + MASK)], Scrubber([TOKEN, other])
    )
    assert redacted == 2
    assert [t.name for t in tools] == [f"t_{MASK}", f"t_{MASK}#2", f"t_{MASK}#3"]
    assert len({t.definition_hash for t in tools}) == 3


def test_text_no_store_accepts_becomes_the_replacement_character() -> None:
    scrubber = Scrubber([])
    assert scrubber.text("a\x00b\ud800c\udfffd") == "a\ufffdb\ufffdc\ufffdd"
    schema = scrubber.json({"k\x00": ["\ud83d", 1]})
    assert schema == {"k\ufffd": ["\ufffd", 1]}


def test_a_secret_inside_a_longer_base64_text_is_masked_at_every_offset() -> None:
    scrubber = Scrubber([PASSWORD, TOKEN])
    for secret in (PASSWORD, TOKEN):
        for prefix in ("", "a", "ab", "Authorization: Bearer ", "token=", '{"k":"'):
            for suffix in ("", "x", "\n", '"}'):
                inner = f"{prefix}{secret}{suffix}".encode()
                for encoded in (base64.b64encode(inner), base64.urlsafe_b64encode(inner).rstrip(b"=")):
                    blob = encoded.decode()
                    assert base64_reveals(blob, secret)  # the helper finds it when nothing is masked
                    assert not base64_reveals(scrubber.text(f"blob: {blob}"), secret), (prefix, suffix)
                    assert not base64_reveals(scrubber.data(encoded).decode(), secret), (prefix, suffix)


def test_a_secret_in_json_written_by_an_html_safe_encoder_is_masked() -> None:
    # Go's encoding/json (and others) escape <, > and & as \u003c, \u003e, \u0026 by default.
    secret = "pa<ss>&w/rd-42"
    said = '{"you_sent":"pa\\u003css\\u003e\\u0026w/rd-42"}'
    assert Scrubber([secret]).text(said) == f'{{"you_sent":"{MASK}"}}'
    assert Scrubber([secret]).data(said.encode()) == f'{{"you_sent":"{MASK}"}}'.encode()


def test_a_secret_quoted_in_an_html_page_is_masked() -> None:
    # An error page quoting what it was sent, through the usual escapers of `&<>"'`.
    secret = "Sup3r Secret!&<x>\"q'z"
    scrubber = Scrubber([secret])
    escaped = [
        "Sup3r Secret!&amp;&lt;x&gt;&quot;q&#x27;z",  # Python's html.escape, Jinja
        "Sup3r Secret!&amp;&lt;x&gt;&quot;q&#39;z",  # PHP's htmlspecialchars with ENT_QUOTES
        "Sup3r Secret!&amp;&lt;x&gt;&#34;q&#39;z",  # Go's html/template
        "Sup3r Secret!&amp;&lt;x&gt;\"q'z",  # text content, quotes left as they are
    ]
    for quoted in escaped:
        page = f"<p>bad token {quoted}</p>"
        assert scrubber.text(page) == f"<p>bad token {MASK}</p>", quoted
        assert scrubber.body(page.encode()) == f"<p>bad token {MASK}</p>".encode(), quoted


def test_a_secret_as_dotnet_writes_it_in_json_or_url_encoded_is_masked() -> None:
    # AWS-style secret keys hold '/' and '+'. ASP.NET Core's System.Text.Json escapes '+', quotes,
    # HTML characters and non-ASCII as \uXXXX (upper-case hex); HttpUtility.UrlEncode writes
    # lower-case percent escapes.
    secret = "wJalr/K7MDENG+bPxR'fi<CY>&é"
    dotnet = "wJalr/K7MDENG\\u002BbPxR\\u0027fi\\u003CCY\\u003E\\u0026\\u00E9"
    lower = "wJalr%2fK7MDENG%2bbPxR%27fi%3cCY%3e%26%c3%a9"
    scrubber = Scrubber([secret])
    for said in (f'{{"key":"{dotnet}"}}', f"https://x.example/?key={lower}"):
        assert MASK in scrubber.text(said), said
        assert "K7MDENG" not in scrubber.text(said) and b"K7MDENG" not in scrubber.data(said.encode())


def test_fragments_masks_a_secret_quoted_shortened_anywhere_and_keeps_the_rest() -> None:
    """A provider may quote a secret as `abcd...wxyz`, by its first or last characters, or cut in the
    middle: no whole form matches, yet each piece gives characters away. Four or more of them are
    masked, wherever they are."""
    canary = "cs-CANARY-7f3k9QzX2wLp"
    scrubber = Scrubber([canary, TOKEN])
    for quoted in (
        f"{canary[:4]}...{canary[-4:]}",
        f"{canary[:8]}…",
        f"…{canary[-6:]}",
        f"{canary[:5]}*****{canary[12:]}",
        f"prefix{canary[3:11]}suffix",
        canary,
        _b64(canary.encode()),
    ):
        described = scrubber.fragments(f"client secret {quoted} is not valid")
        assert described.startswith("client secret ") and described.endswith(" is not valid"), quoted
        for i in range(len(canary) - 3):
            assert canary[i : i + 4] not in described, (quoted, described)
    assert scrubber.fragments(f"{canary[:4]}...{canary[-4:]}") == f"{MASK}...{MASK}"
    # Three characters are not masked (they would mask ordinary words), nor is unrelated text.
    assert scrubber.fragments(f"got {canary[:3]} and {TOKEN[-3:]}") == f"got {canary[:3]} and {TOKEN[-3:]}"
    assert scrubber.fragments("the grant was revoked") == "the grant was revoked"
    # A form's beginning cut at the very end is masked, as cut_text does.
    assert scrubber.fragments("said " + _b64(canary.encode())[:9]) == f"said {MASK}"
    assert Scrubber([]).fragments("a\x00b") == "a\ufffdb"


def test_a_body_that_stops_inside_a_form_has_that_beginning_masked_whole_or_streamed() -> None:
    scrubber = Scrubber([TOKEN])
    cut_short = b'{"echo": "' + TOKEN[:-1].encode()
    assert scrubber.body(cut_short) == b'{"echo": "[redacted]'
    stream = scrubber.stream()
    streamed = b"".join([stream.feed(cut_short[:7]), stream.feed(cut_short[7:]), stream.end()])
    assert streamed == b'{"echo": "[redacted]'
    # Fewer than MIN_LENGTH characters of a form are not taken for one; a whole body keeps its end.
    assert scrubber.body(b"ends with " + TOKEN[:3].encode()) == b"ends with " + TOKEN[:3].encode()
    whole = b"a full echo " + TOKEN.encode() + b" then more"
    assert scrubber.body(whole) == b"a full echo [redacted] then more"
