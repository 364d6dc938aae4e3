"""Parsing and checking single values: one parser per field kind, plus reusable checks.

Every failure raises `Problem` with a message that names what is wrong and never quotes
the value: a caller may have pasted a password into any field.
"""

from __future__ import annotations

import ipaddress
import json
import math
import re
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import Any
from urllib.parse import parse_qsl, urlsplit

from broker.catalog._spec import Check, FieldKind, FieldSpec, Problem
from broker.catalog.oauth_providers import FLOW_PARAMS, flow_params_in
from broker.egress import InvalidTarget, parse_host, parse_url

MAX_STRING = 65_536
MAX_URL = 2_048
MAX_LIST = 256
# How deep objects and arrays may nest in JSON the broker passes on as a protobuf Struct (a config,
# a tool's schema, a tool's result): each level is two protobuf messages (Struct or ListValue, and
# Value), and protobuf readers stop at 100 messages deep, the messages around the Struct counted.
MAX_JSON_DEPTH = 32

# `[^\S]` style classes would miss control characters; a URL or host may contain neither.
_SPACE_OR_CONTROL = re.compile(r"[\s\x00-\x1f\x7f]")
_LINE_BREAK_OR_NUL = re.compile(r"[\r\n\x00]")
_RFC3339 = re.compile(r"\d{4}-\d{2}-\d{2}[Tt]\d{2}:\d{2}:\d{2}(\.\d+)?([Zz]|[+-]\d{2}:\d{2})")
# A header value that is an Authorization credential, whatever the header's name.
_AUTH_SCHEME = re.compile(r"\s*(bearer|basic|digest|token)\s+\S", re.IGNORECASE)
_HEADER_NAME = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
# Headers that carry credentials belong in the secret fields, where they are sealed.
_CREDENTIAL_HEADERS = frozenset(
    {"authorization", "proxy-authorization", "cookie", "x-api-key", "api-key", "x-auth-token"}
)


# Names that say "I am a credential": config keys of `custom`, URL query parameters, header
# names, driver options. Matched on the last word of the name, so `token_url` passes and
# `access_token` does not; run together, `x-api-key` and `sslpassword` are caught too.
_SECRET_WORDS = frozenset(
    {"password", "passwd", "secret", "token", "passphrase", "credential", "credentials", "signature"}
)
_SECRET_SUFFIXES = ("apikey", "privatekey", "secretkey", "clientsecret", "password", "passwd")
# Query parameters that carry a credential under a short name (Google's `key`, signed URLs' `sig`).
_CREDENTIAL_PARAMS = frozenset({"key", "sig", "auth"})
# Config is stored in clear and shown to every admin: a credential pasted there would be too.
_PRIVATE_KEY = re.compile(r"-----BEGIN [A-Z0-9 ]*PRIVATE KEY-----")
_URL_PASSWORD = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^/?#\s@:]*:[^/?#\s@]+@")
_IN_SECRETS = "pass it in the secret fields, which are sealed, not in config"


def looks_secret(name: str) -> bool:
    """Whether a key, parameter or header name says it holds a credential."""
    words = [w for w in re.split(r"[_.\-\s]+", name.lower()) if w]
    squashed = "".join(words)
    return bool(words) and (words[-1] in _SECRET_WORDS or squashed.endswith(_SECRET_SUFFIXES))


def _string(value: Any) -> str:
    if not isinstance(value, str):
        raise Problem("must be a string")
    if len(value) > MAX_STRING:
        raise Problem(f"must be at most {MAX_STRING} characters")
    if "\x00" in value:
        raise Problem("must not contain NUL characters")
    if _PRIVATE_KEY.search(value):
        raise Problem(f"holds a private key: {_IN_SECRETS}")
    if _URL_PASSWORD.search(value):
        raise Problem(f"holds a URL with a password (user:password@): {_IN_SECRETS}")
    return value


def _integer(value: Any) -> int:
    # A protobuf Struct carries every number as a double, so 5432.0 is an honest integer.
    if isinstance(value, bool):
        raise Problem("must be an integer")
    if isinstance(value, int):
        return value
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        return int(value)
    raise Problem("must be an integer")


def _number(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise Problem("must be a number")
    if not math.isfinite(value):
        raise Problem("must be a finite number")
    return float(value)


def _boolean(value: Any) -> bool:
    if not isinstance(value, bool):
        raise Problem("must be true or false")
    return value


def _url(value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise Problem("must be an http or https URL with a host")
    if len(value) > MAX_URL:
        raise Problem(f"must be at most {MAX_URL} characters")
    if _SPACE_OR_CONTROL.search(value):
        raise Problem("must not contain whitespace or control characters")
    try:
        parts = urlsplit(value)
        port_ok = parts.port is None or parts.port > 0
    except ValueError:
        raise Problem("must be an http or https URL with a host") from None
    if parts.scheme.lower() not in ("http", "https") or not parts.hostname:
        raise Problem("must be an http or https URL with a host")
    if "@" in parts.netloc:
        raise Problem("must not contain credentials (user:password@): use the secret fields")
    names = [name for name, _ in parse_qsl(parts.query, keep_blank_values=True)]
    names += [name for name, _ in parse_qsl(parts.fragment, keep_blank_values=True)]
    if any(looks_secret(name) or name.lower() in _CREDENTIAL_PARAMS for name in names):
        raise Problem(
            "must not carry a credential in its query or fragment (a key, token or password parameter):"
            " use the secret fields"
        )
    if not port_ok:
        raise Problem("has an invalid port")
    try:
        # The egress policy's own parser: a URL saved here is read the same way when it is used.
        parse_url(value)
    except InvalidTarget:
        raise Problem("has an invalid host name") from None
    return value


def _enum(spec: FieldSpec, value: Any) -> str:
    if not isinstance(value, str) or value not in spec.choices:
        raise Problem("must be one of: " + ", ".join(spec.choices))
    return value


def _string_list(value: Any) -> list[str]:
    if not isinstance(value, list | tuple) or not all(isinstance(item, str) and item for item in value):
        raise Problem("must be a list of non-empty strings")
    if len(value) > MAX_LIST:
        raise Problem(f"must have at most {MAX_LIST} items")
    return [_string(item) for item in value]


def _string_map(value: Any) -> dict[str, str]:
    if not isinstance(value, Mapping):
        raise Problem("must be an object of string values")
    if len(value) > MAX_LIST:
        raise Problem(f"must have at most {MAX_LIST} entries")
    out: dict[str, str] = {}
    for k, v in value.items():
        if not isinstance(k, str) or not k or not isinstance(v, str):
            raise Problem("must map non-empty names to string values")
        # Map entries end up in headers and DSN options, where a line break is an injection.
        if _LINE_BREAK_OR_NUL.search(k) or _LINE_BREAK_OR_NUL.search(v):
            raise Problem("names and values must not contain line breaks or NUL characters")
        out[_string(k)] = _string(v)
    return out


def _timestamp(value: Any) -> str:
    if not isinstance(value, str) or not _RFC3339.fullmatch(value):
        raise Problem("must be an RFC 3339 timestamp with a time zone, like 2030-01-02T03:04:05Z")
    try:
        parsed = datetime.fromisoformat(value.upper().replace("Z", "+00:00"))
    except ValueError:
        raise Problem("must be a valid date and time") from None
    return parsed.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def json_value(value: Any, enclosing: int = 1) -> Any:
    """A deep copy of a JSON-able value (as a protobuf Struct carries it) inside `enclosing` objects
    (the config, by default); raises Problem otherwise.

    Objects and arrays nest no deeper than `MAX_JSON_DEPTH` in all, the config counted: a client's
    protobuf reader could not read a deeper one back, and one such connection would make every
    listing of its tenant unreadable.
    """
    if isinstance(value, list | tuple | Mapping) and enclosing >= MAX_JSON_DEPTH:
        raise Problem(
            f"must not nest deeper than {MAX_JSON_DEPTH - 1} levels ({MAX_JSON_DEPTH} with the config)"
        )
    if value is None or isinstance(value, bool | int):
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise Problem("must not contain NaN or infinite numbers")
        return value
    if isinstance(value, str):
        return _string(value)
    if isinstance(value, list | tuple):
        return [json_value(v, enclosing + 1) for v in value]
    if isinstance(value, Mapping):
        if not all(isinstance(k, str) for k in value):
            raise Problem("must have string keys")
        return {k: json_value(v, enclosing + 1) for k, v in value.items()}
    raise Problem("must be a JSON value")


def _object(value: Any) -> dict[str, Any]:
    if not isinstance(value, Mapping):
        raise Problem("must be an object")
    result: dict[str, Any] = json_value(value)
    return result


_PARSERS: dict[FieldKind, Callable[[Any], Any]] = {
    FieldKind.STRING: _string,
    FieldKind.INTEGER: _integer,
    FieldKind.BOOLEAN: _boolean,
    FieldKind.URL: _url,
    FieldKind.STRING_LIST: _string_list,
    FieldKind.STRING_MAP: _string_map,
    FieldKind.NUMBER: _number,
    FieldKind.TIMESTAMP: _timestamp,
    FieldKind.OBJECT: _object,
}


def parse(spec: FieldSpec, value: Any) -> Any:
    """The value parsed for `spec`'s kind and passed through its check; raises Problem."""
    parsed = _enum(spec, value) if spec.kind is FieldKind.ENUM else _PARSERS[spec.kind](value)
    return spec.check(parsed) if spec.check is not None else parsed


# ----------------------------------------------------------------- checks for FieldSpec.check


def integer_between(low: int, high: int) -> Check:
    """Check: an integer in [low, high]."""

    def check(value: int) -> int:
        if not low <= value <= high:
            raise Problem(f"must be an integer between {low} and {high}")
        return value

    return check


def number_in(above: float, at_most: float) -> Check:
    """Check: a number greater than `above` and at most `at_most`."""

    def check(value: float) -> float:
        if not above < value <= at_most:
            raise Problem(f"must be greater than {above:g} and at most {at_most:g}")
        return value

    return check


def matching(pattern: str, what: str) -> Check:
    """Check: the whole string matches `pattern`; `what` completes "must be ..."."""
    compiled = re.compile(pattern)

    def check(value: str) -> str:
        if not compiled.fullmatch(value):
            raise Problem(f"must be {what}")
        return value

    return check


def each(check: Check) -> Check:
    """Check: `check` holds for every item of a list."""

    def check_all(values: list[Any]) -> list[Any]:
        return [check(value) for value in values]

    return check_all


# The placeholders of a dynamic database connection's statement templates. This is their one
# grammar: the catalog checks a template when the connection is saved, broker.dbusers again when it
# renders one with the driver's own quoting (a row saved before a rule existed must not run).
STATEMENT_PLACEHOLDERS = ("name", "password", "expiration", "group", "password_hash")
# Only a creation statement has a password to fill these in: the broker keeps none afterwards.
CREATION_ONLY_PLACEHOLDERS = ("password", "password_hash")
# Any `{{ word }}`; a word outside STATEMENT_PLACEHOLDERS makes the template unacceptable.
_PLACEHOLDER = re.compile(r"\{\{\s*([A-Za-z0-9_]*)\s*\}\}")


def statement_problem(statement: str) -> str | None:
    """Why a statement template is unacceptable (blank, an unknown placeholder, unbalanced braces),
    or None."""
    if not isinstance(statement, str) or not statement.strip():
        return "must not be blank"
    for name in _PLACEHOLDER.findall(statement):
        if name not in STATEMENT_PLACEHOLDERS:
            known = ", ".join("{{" + p + "}}" for p in STATEMENT_PLACEHOLDERS)
            return f"uses an unknown placeholder {{{{{name[:32]}}}}}; known: {known}"
    rest = _PLACEHOLDER.sub("", statement)
    if "{{" in rest or "}}" in rest:
        return "has an unbalanced {{ or }} (a placeholder is written {{name}})"
    return None


def statement_placeholders(statement: str) -> set[str]:
    """The placeholder names a statement template uses."""
    return set(_PLACEHOLDER.findall(statement))


def fill_statement(statement: str, quoted: Mapping[str, str]) -> str:
    """The template with each placeholder replaced by its already-quoted value, in one pass (a
    value that itself contains `{{name}}` is never expanded again)."""
    return _PLACEHOLDER.sub(lambda match: quoted[match.group(1)], statement)


def statement_template(value: str) -> str:
    """Check: one SQL statement whose only `{{...}}` are the known placeholders."""
    problem = statement_problem(value)
    if problem is not None:
        raise Problem(problem)
    return value


def later_statement_template(value: str) -> str:
    """Check: a statement_template for renewal or revocation, without {{password}} or
    {{password_hash}} (they have a value only when the user is created)."""
    statement_template(value)
    for name in CREATION_ONLY_PLACEHOLDERS:
        if name in statement_placeholders(value):
            raise Problem(f"uses {{{{{name}}}}}, which has a value only in creation_statements")
    return value


def host(value: str) -> str:
    """Check: a host name or IP address without scheme, port or path; normalised to lowercase."""
    problem = Problem("must be a host name or IP address (no scheme, port or path)")
    if not value or len(value) > 253 or _SPACE_OR_CONTROL.search(value):
        raise problem
    try:
        return str(ipaddress.ip_address(value.strip("[]")))
    except ValueError:
        pass
    if not re.fullmatch(r"[A-Za-z0-9_]([A-Za-z0-9_.-]*[A-Za-z0-9_.])?", value):
        raise problem
    try:
        # What the egress policy will make of it: `256.1.1.1` or `1.2.3.4.5` is no host at all.
        parse_host(value)
    except InvalidTarget:
        raise problem from None
    return value.lower()


def email(value: str) -> str:
    """Check: a plain address like name@example.com (no display name)."""
    if len(value) > 254 or not re.fullmatch(r"[^@\s<>]+@[^@\s<>]+\.[^@\s<>.]+", value):
        raise Problem("must be an email address like name@example.com")
    return value


def http_headers(value: dict[str, str]) -> dict[str, str]:
    """Check: valid header names, none of them a credential header or holding an Authorization value."""
    if not all(_HEADER_NAME.fullmatch(name) for name in value):
        raise Problem("header names must be HTTP tokens (letters, digits and -_.!#$%&'*+^`|~)")
    if any(
        name.lower() in _CREDENTIAL_HEADERS or looks_secret(name) or _AUTH_SCHEME.match(text)
        for name, text in value.items()
    ):
        raise Problem("must not carry credentials (Authorization, Cookie, API key headers): use auth_type")
    return value


_QUERY_NAME = re.compile(r"[A-Za-z0-9_.~-]{1,64}")


def no_secret_names(value: dict[str, str]) -> dict[str, str]:
    """Check: no map entry named like a credential (a driver's `password` or `sslpassword` option)."""
    if any(looks_secret(name) for name in value):
        raise Problem(f"must not hold a credential (an entry named like a password or key): {_IN_SECRETS}")
    return value


def authorize_params(value: dict[str, str]) -> dict[str, str]:
    """Check: extra authorization request parameters (prompt, audience, ...), none the flow sets."""
    if not all(_QUERY_NAME.fullmatch(name) for name in value):
        raise Problem("parameter names must be 1 to 64 letters, digits or -._~")
    if any(name.lower() == "resource" for name in value):
        # Here it would reach the authorization request only, and a refreshed token would lose it.
        raise Problem(
            "must not set resource: use the connection's resource field, which is sent on the token"
            " and refresh requests too"
        )
    taken = sorted(name for name in value if name.lower() in FLOW_PARAMS)
    if taken:
        raise Problem(f"must not set {', '.join(taken)}: the authorization flow sets it")
    return value


def authorization_endpoint(value: str) -> str:
    """Check: an authorization endpoint whose own query sets none of the flow's parameters."""
    taken = flow_params_in(value)
    if taken:
        raise Problem(f"must not set {', '.join(taken)} in its query: the authorization flow sets it")
    return value


# RFC 3986 section 3.1.
_URI_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*")
MAX_RESOURCES = 16


def resource_indicators(values: list[str]) -> list[str]:
    """Check: RFC 8707 section 2 resource indicators: absolute URIs (RFC 3986 section 4.3), no fragment.

    A query is allowed (RFC 8707 discourages it, not forbids it); an http(s) URI needs a host, as
    an MCP server's canonical URI does. Non-ASCII is refused: a URI is ASCII, an IRI is not sent.
    """
    if not values:
        raise Problem("must list at least one absolute URI, or be left out")
    if len(values) > MAX_RESOURCES:
        raise Problem(f"must have at most {MAX_RESOURCES} items")
    if len(set(values)) != len(values):
        raise Problem("must not list a URI twice")
    for value in values:
        if len(value) > MAX_URL:
            raise Problem(f"must hold URIs of at most {MAX_URL} characters")
        if _SPACE_OR_CONTROL.search(value) or not value.isascii():
            raise Problem("must hold URIs without whitespace, control or non-ASCII characters")
        scheme, colon, rest = value.partition(":")
        if not colon or not rest or not _URI_SCHEME.fullmatch(scheme):
            raise Problem("must hold absolute URIs with a scheme, like https://mcp.example.com/mcp")
        if "#" in value:
            raise Problem("must hold URIs without a fragment (#...): RFC 8707 section 2 forbids one")
        if scheme.lower() in ("http", "https"):
            try:
                _url(value)
            except Problem as problem:
                raise Problem(f"must hold valid http(s) URIs: each {problem}") from None
    return values


def service_account_json(value: str) -> str:
    """Check: a Google service account key file, i.e. a JSON object with type service_account."""
    try:
        document = json.loads(value)
    except ValueError:
        # JSONDecodeError's message holds only positions, but say nothing about the content anyway.
        raise Problem("must be a JSON service account key file") from None
    if not isinstance(document, dict) or document.get("type") != "service_account":
        raise Problem('must be a JSON object with "type": "service_account"')
    return value
