"""Remove secret values, and what the broker composed from them, from what a server sent back.

Each secret and each composed credential (`broker.testers.sent`) is masked plain, URL-encoded,
base64 (standard, URL-safe, unpadded; also where it sits inside a longer base64 text), hex,
JSON-escaped and HTML-escaped.
Text is scrubbed as a whole string; JSON (an MCP tool's input schema) in every string it holds,
keys included.
"""

from __future__ import annotations

import base64
import functools
import html
import json
import re
import urllib.parse
from collections.abc import Container, Iterable, Sequence
from typing import Any, AnyStr

MASK = "[redacted]"
_MASK_BYTES = MASK.encode()
# Shorter values would mask ordinary words; validation keeps real secrets longer.
MIN_LENGTH = 4
_UNSTORABLE = re.compile("[\x00\ud800-\udfff]")
_PERCENT = re.compile("%[0-9A-F]{2}")
_UNICODE_ESCAPE = re.compile(r"\\u[0-9a-f]{4}")


def _forms(value: str) -> set[str]:
    raw = value.encode()
    in_json = json.dumps(value, ensure_ascii=False)[1:-1]
    quoted = {urllib.parse.quote(value, safe=""), urllib.parse.quote_plus(value), urllib.parse.quote(value)}
    forms = {
        value,
        *quoted,
        # Lower-case percent escapes, as .NET's HttpUtility.UrlEncode writes them.
        *(_PERCENT.sub(lambda m: m[0].lower(), q) for q in quoted),
        base64.b64encode(raw).decode(),
        base64.urlsafe_b64encode(raw).decode(),
        base64.b64encode(raw).decode().rstrip("="),
        base64.urlsafe_b64encode(raw).decode().rstrip("="),
        raw.hex(),
        raw.hex().upper(),
        # Inside a JSON string: `/`, quotes, backslashes and non-ASCII may come escaped.
        json.dumps(value)[1:-1],
        in_json,
        # As HTML-safe encoders write it (Go's encoding/json by default).
        in_json.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026"),
        _dotnet_json(value),
        value.replace("/", "\\/"),
        # In an HTML or XML page (an error page quoting what it was sent), as the common escapers
        # write `&<>"'`: Python's and Jinja's, PHP's htmlspecialchars, Go's html/template.
        html.escape(value, quote=False),
        html.escape(value),
        html.escape(value).replace("&#x27;", "&#39;"),
        html.escape(value).replace("&quot;", "&#34;").replace("&#x27;", "&#39;"),
    }
    # Inside a longer base64 text (a blob, a token, an echoed header block) the value starts at
    # any of three offsets and its ends share groups with its neighbours: the whole groups it
    # fills alone, at each offset, are masked (at most two bytes at either end stay readable).
    for skip in range(3):
        alone = raw[skip:][: (len(raw) - skip) // 3 * 3]
        forms |= {base64.b64encode(alone).decode(), base64.urlsafe_b64encode(alone).decode()}
    return {f for f in forms if len(f) >= MIN_LENGTH}


def _dotnet_json(value: str) -> str:
    """`value` inside a JSON string as System.Text.Json writes it by default: quotes, `&'+<>` and
    the backtick, and all that is not ASCII, as `\\uXXXX` with upper-case hex."""
    text = json.dumps(value)[1:-1].replace('\\"', "\\u0022")
    text = _UNICODE_ESCAPE.sub(lambda m: m[0].upper().replace("\\U", "\\u"), text)
    for char in "&'+<>`":
        text = text.replace(char, f"\\u{ord(char):04X}")
    return text


class Scrubber:
    """Masks every form of the given secrets and composed credentials, built once per test."""

    def __init__(self, secrets: Iterable[str], composed: Iterable[str] = ()) -> None:
        values = [value for value in (*secrets, *composed) if len(value) >= MIN_LENGTH]
        forms: set[str] = set()
        for value in values:
            forms |= _forms(value)
        # Longest first, so a form that contains another is masked whole; one pass over the text.
        ordered = sorted(forms, key=lambda f: (-len(f), f))
        self._forms = ordered
        self._values = values  # for `fragments`, which most scrubbers never use
        self._pattern = re.compile("|".join(map(re.escape, ordered))) if ordered else None
        self._data_pattern: re.Pattern[bytes] | None = None
        self._encoded_forms: list[bytes] | None = None

    def text(self, text: str) -> str:
        """`text` with every known form masked, made storable (see `storable`)."""
        text = storable(text)
        if self._pattern is None:
            return text
        return self._pattern.sub(MASK, text)

    def data(self, data: bytes) -> bytes:
        """`data` (a body, any encoding that keeps ASCII as it is) with every known form masked."""
        pattern = self._bytes_pattern()
        return data if pattern is None else pattern.sub(_MASK_BYTES, data)

    def body(self, data: bytes) -> bytes:
        """A whole answer's body scrubbed as `data` does, and a form's beginning left at its very
        end masked too, and a form's end at its very start: an answer can stop inside an echoed
        secret (a Content-Length one short, a dropped connection) or begin inside one (a part of
        a file), and what it holds of it would give most of it away."""
        forms = self._byte_forms()
        return _masked_cut(_masked_start(self.data(data), forms, _MASK_BYTES), forms, _MASK_BYTES)

    def stream(self) -> StreamScrubber:
        """A scrubber for a body that arrives in chunks: a form split between two is masked too."""
        return StreamScrubber(self._bytes_pattern(), self._byte_forms())

    def _byte_forms(self) -> list[bytes]:
        if self._encoded_forms is None:
            self._encoded_forms = sorted((f.encode() for f in self._forms), key=lambda f: (-len(f), f))
        return self._encoded_forms

    def _bytes_pattern(self) -> re.Pattern[bytes] | None:
        if self._forms and self._data_pattern is None:
            self._data_pattern = re.compile(b"|".join(map(re.escape, self._byte_forms())))
        return self._data_pattern

    def cut_text(self, text: str) -> str:
        """`text` scrubbed, and also a form's beginning left at its very end.

        Testers shorten what servers say; a form cut there would pass `text` whole, and its
        first part still gives the secret's first characters away.
        """
        return _masked_cut(self.text(text), self._forms, MASK)

    def fragments(self, text: str) -> str:
        """`text` scrubbed as `cut_text` does, and every run of `MIN_LENGTH` or more characters that
        a secret or composed value contains masked too.

        For a short text a server wrote about what it received (an OAuth provider's
        error_description): it may quote a secret shortened, `abcd...wxyz`, or by its first or
        last characters, which no whole form matches. Ordinary words that happen to share four
        characters with a secret are masked as well; such texts are worth less than the secret.
        """
        text = storable(text)
        pieces = self._pieces
        spans = [m.span() for m in self._pattern.finditer(text)] if self._pattern is not None else []
        starts = range(len(text) - MIN_LENGTH + 1)
        spans += [(i, i + MIN_LENGTH) for i in starts if text[i : i + MIN_LENGTH] in pieces]
        spans.append((_cut_at_the_end(text, self._forms), len(text)))
        masked: list[str] = []
        end = 0
        for start, stop in sorted(spans):
            if start >= stop:
                continue
            if start > end or not masked:
                masked += [text[end:start], MASK]
            end = max(end, stop)
        return "".join(masked) + text[end:]

    @functools.cached_property
    def _pieces(self) -> frozenset[str]:
        """Every run of MIN_LENGTH characters of each value itself, built once `fragments` needs it."""
        return frozenset(v[i : i + MIN_LENGTH] for v in self._values for i in range(len(v) - MIN_LENGTH + 1))

    def json(self, value: Any) -> Any:
        """A JSON value with every string masked, object keys included; a number that spells a secret too.

        Keys that become equal once masked are told apart by a `#2`, `#3`... suffix, so nothing is lost.
        """
        if isinstance(value, str):
            return self.text(value)
        if isinstance(value, dict):
            found: dict[str, Any] = {}
            for key, item in value.items():
                found[distinct(self.text(str(key)), found)] = self.json(item)
            return found
        if isinstance(value, list):
            return [self.json(item) for item in value]
        if isinstance(value, int | float) and not isinstance(value, bool):
            return MASK if self.text(str(value)) != str(value) else value
        return value


def _cut_at_the_end(text: AnyStr, forms: Sequence[AnyStr]) -> int:
    """Where a form's beginning (`MIN_LENGTH` or more of it) left at the very end of `text` starts;
    `len(text)` if none is."""
    cut = len(text)
    for form in forms:
        head = form[:MIN_LENGTH]
        at = text.find(head, max(0, len(text) - len(form) + 1))
        while at != -1 and at < cut:
            if form.startswith(text[at:]):
                cut = at
                break
            at = text.find(head, at + 1)
    return cut


def _cut_at_the_start(text: bytes, forms: Sequence[bytes]) -> int:
    """Where a form's end (`MIN_LENGTH` or more of it, not all of it) at the very start of `text`
    ends, or `len(text)` if all of `text` lies inside a form; 0 if neither."""
    head = text[:MIN_LENGTH]
    if len(head) < MIN_LENGTH:
        return 0
    cut = 0
    for form in forms:
        at = form.find(head, 1)
        while at != -1:
            rest = form[at:]
            if rest.startswith(text):
                return len(text)
            if text.startswith(rest):
                cut = max(cut, len(rest))
                break  # the first match is the longest piece of this form
            at = form.find(head, at + 1)
    return cut


def _masked_start(data: bytes, forms: Sequence[bytes], mask: bytes) -> bytes:
    """`data` with a form's end left at its very start replaced by `mask`."""
    cut = _cut_at_the_start(data, forms)
    return data if not cut else mask + data[cut:]


def _masked_cut(text: AnyStr, forms: Sequence[AnyStr], mask: AnyStr) -> AnyStr:
    """`text` with a form's beginning left at its very end replaced by `mask`."""
    cut = _cut_at_the_end(text, forms)
    return text if cut == len(text) else text[:cut] + mask


class StreamScrubber:
    """Masks forms in a chunked body: what may be the start of a form is held back until the
    next chunk (or `end`) shows whether it is one, so a form split across chunks is masked, and a
    body that ends inside one (cut short) has that beginning masked too; as `Scrubber.body`, a
    body that begins inside one has that end masked."""

    def __init__(self, pattern: re.Pattern[bytes] | None, forms: Sequence[bytes]) -> None:
        longest = max(map(len, forms), default=0)
        self._pattern, self._forms, self._hold, self._carry = pattern, forms, max(longest - 1, 0), b""
        self._started = False  # whether the body's first bytes were checked for a form's end

    def feed(self, chunk: bytes) -> bytes:
        """The scrubbed bytes that can be released now (possibly none)."""
        if self._pattern is None:
            return chunk
        buffer = self._carry + chunk
        if not self._started:
            if len(buffer) <= self._hold:  # a form's end there could still be longer than the buffer
                self._carry = buffer
                return b""
            # As `Scrubber.body`: a whole form at the start is the pattern's to mask.
            if not self._pattern.match(buffer):
                buffer = _masked_start(buffer, self._forms, _MASK_BYTES)
            self._started = True
        # A match starting before `cut` is complete here (no form is longer than hold + 1), so
        # everything up to the later of `cut` and the end of such a match can go out.
        cut = len(buffer) - self._hold
        end = max(cut, 0)
        for match in self._pattern.finditer(buffer):
            if match.start() >= cut:
                break
            end = max(end, match.end())
        self._carry = buffer[end:]
        return self._pattern.sub(_MASK_BYTES, buffer[:end])

    def end(self) -> bytes:
        """The scrubbed rest, once the body is complete."""
        rest, self._carry = self._carry, b""
        if self._pattern is None:
            return rest
        rest = self._pattern.sub(_MASK_BYTES, rest)
        if not self._started:
            rest, self._started = _masked_start(rest, self._forms, _MASK_BYTES), True
        return _masked_cut(rest, self._forms, _MASK_BYTES)


def storable(text: str) -> str:
    """`text` that every store and the wire accept: NUL (PostgreSQL's text refuses it) and lone
    surrogates (not UTF-8; a JSON string from a server may hold one) become U+FFFD."""
    return _UNSTORABLE.sub("\ufffd", text)


def distinct(name: str, taken: Container[str]) -> str:
    """`name`, or `name#2`, `name#3`... when it is taken: masked names may collide."""
    candidate, n = name, 1
    while candidate in taken:
        n += 1
        candidate = f"{name}#{n}"
    return candidate
