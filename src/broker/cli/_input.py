"""Turning command-line text into request values: config, secrets, labels, times.

Every problem is a `UsageError` with a message that names the flag at fault.
Secret values are never part of a message.
"""

from __future__ import annotations

import datetime as dt
import getpass
import json
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TextIO

from broker.catalog import MAX_JSON_DEPTH


class UsageError(ValueError):
    """The command line is wrong; the CLI prints the message and exits with status 2."""


def parse_config(
    pairs: Sequence[str], json_text: str | None = None, flag: str = "--config"
) -> dict[str, Any]:
    """`--config-json` (an object, or `@file`) overlaid with each `--config k=v` (`flag` names
    the option in messages: `--arg` for a tool's arguments).

    A value is JSON when it parses as JSON (`5432`, `true`, `["a"]`, `null`),
    otherwise the text itself. An integer a request cannot carry exactly is refused (see
    `_exact_numbers`).
    """
    config: dict[str, Any] = {}
    if json_text is not None:
        text = _read_text(json_text[1:], f"{flag}-json") if json_text.startswith("@") else json_text
        try:
            doc = json.loads(text)
        except json.JSONDecodeError as exc:
            raise UsageError(f"{flag}-json is not valid JSON: {exc}") from None
        except RecursionError:
            raise UsageError(f"{flag}-json nests too deeply") from None
        if not isinstance(doc, dict):
            raise UsageError(f"{flag}-json must be a JSON object")
        _exact_numbers(doc, f"{flag}-json")
        config.update(doc)
    for pair in pairs:
        key, value = _split(pair, flag)
        try:
            config[key] = json.loads(value)
        except json.JSONDecodeError:
            config[key] = value
        except RecursionError:
            raise UsageError(f"{flag} {key} nests too deeply") from None
        _exact_numbers(config[key], flag, key)
    return config


# A request carries every config number as a double, exact for integers up to 2**53 - 1 only (the
# broker refuses larger ones, since it cannot know what was meant); said here before anything is sent.
MAX_EXACT_INTEGER = 2**53 - 1


def _exact_numbers(value: Any, flag: str, path: str = "", depth: int = 0) -> None:
    """A `UsageError` naming `flag` and the path in the value for an integer beyond +-(2**53 - 1)."""
    if depth > MAX_JSON_DEPTH:  # the broker refuses less deep ones anyway: a bound on the recursion
        raise UsageError(f"{flag} {path}".rstrip() + f": nests deeper than {MAX_JSON_DEPTH} levels")
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) > MAX_EXACT_INTEGER:
        raise UsageError(
            f"{flag} {path}".rstrip() + f": an integer beyond {MAX_EXACT_INTEGER} (2^53 - 1) cannot be"
            ' sent exactly; quote it as a JSON string ("...") to send it as text'
        )
    if isinstance(value, dict):
        for key, item in value.items():
            _exact_numbers(item, flag, f"{path}.{key}" if path else str(key), depth + 1)
    elif isinstance(value, list):
        for i, item in enumerate(value):
            _exact_numbers(item, flag, f"{path}[{i}]", depth + 1)


def parse_labels(pairs: Sequence[str]) -> dict[str, str]:
    """Each `--label k=v` as a map; a key given twice is an error."""
    labels: dict[str, str] = {}
    for pair in pairs:
        key, value = _split(pair, "--label")
        if key in labels:
            raise UsageError(f"--label {key} is given twice")
        labels[key] = value
    return labels


def parse_secrets(specs: Sequence[str], prog: str = "brokerctl") -> dict[str, str]:
    """Each `--secret`: `field=value`, `field=@file` (`@-` is stdin, `@@x` the literal `@x`), or `field`.

    A bare `field` is prompted for without echo, at a terminal only. A value typed on the
    command line works, with a warning: it ends up in shell history and the process list.
    """
    secrets: dict[str, str] = {}
    warned = stdin_used = False
    for spec in specs:
        field, sep, value = spec.partition("=")
        field = field.strip()
        if not field:
            # The message never echoes `spec`: what follows the `=` may be a secret.
            raise UsageError("--secret needs a field name before '=', as in password=@file")
        if field in secrets:
            raise UsageError(f"--secret {field} is given twice")
        if not sep:
            value = _prompt(field)
        elif value.startswith("@@"):
            value = value[1:]
            warned = _warn_inline(field, prog, warned)
        elif value == "@-":
            if stdin_used:
                raise UsageError("only one --secret can read standard input (@-)")
            stdin_used = True
            value = _strip_newline(standard_input(f"--secret {field}=@-").read())
        elif value.startswith("@"):
            value = _strip_newline(_read_text(value[1:], f"--secret {field}"))
        else:
            warned = _warn_inline(field, prog, warned)
        secrets[field] = value
    return secrets


def standard_input(purpose: str) -> TextIO:
    """sys.stdin, or a `UsageError` naming `purpose` when the shell closed it (`<&-`)."""
    if sys.stdin is None:
        raise UsageError(f"{purpose} reads standard input, but it is closed")
    return sys.stdin


def _prompt(field: str) -> str:
    """The value typed at a no-echo prompt; a `UsageError` when there is no terminal or no value."""
    # With standard input closed or redirected, a script is running, not a person: getpass
    # would prompt on /dev/tty (a script hangs on a question nobody sees) or, with no
    # terminal at all, read stdin with echo and a GetPassWarning. Asking for @- or @FILE
    # says plainly where the value should come from.
    if sys.stdin is None or not sys.stdin.isatty():
        raise UsageError(
            f"--secret {field} prompts for the value, but standard input is not a terminal "
            f"(closed or redirected); pass {field}=@- to read it from standard input, or {field}=@FILE"
        )
    try:
        value = getpass.getpass(f"{field}: ")
    except EOFError:  # Ctrl-D at the prompt
        print(file=sys.stderr)
        value = ""
    if not value:
        raise UsageError(f"no value entered for secret {field}")
    return value


_DURATION_PART = re.compile(r"(\d+)([smhdw])")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_duration(text: str) -> dt.timedelta:
    """`90s`, `30m`, `1h`, `7d`, `2w`, or a sum such as `1h30m`."""
    compact = text.strip().lower()
    parts = _DURATION_PART.findall(compact)
    if not parts or "".join(n + u for n, u in parts) != compact:
        raise UsageError(f"{text!r} is not a duration such as 30m, 1h, 7d or 1h30m")
    seconds = sum(int(n) * _UNITS[u] for n, u in parts)
    if seconds <= 0:
        raise UsageError(f"duration {text!r} must be positive")
    return dt.timedelta(seconds=seconds)


def parse_time(text: str, now: dt.datetime, *, relative: bool = False) -> dt.datetime:
    """An RFC 3339 time (UTC when it has no offset); with `relative`, a duration means that long ago."""
    if relative and _DURATION_PART.match(text.strip().lower()):
        return now - parse_duration(text)
    try:
        when = dt.datetime.fromisoformat(text.strip())
    except ValueError:
        hint = ", or a duration such as 1h meaning that long ago" if relative else ""
        raise UsageError(f"{text!r} is not an RFC 3339 time such as 2025-01-31T12:00:00Z{hint}") from None
    return when if when.tzinfo is not None else when.replace(tzinfo=dt.UTC)


def _split(pair: str, flag: str) -> tuple[str, str]:
    key, sep, value = pair.partition("=")
    key = key.strip()
    if not sep or not key:
        raise UsageError(f"{flag} takes key=value, got {pair!r}")
    return key, value


def _read_text(path: str, flag: str) -> str:
    try:
        data = Path(path).expanduser().read_bytes()
    except OSError as exc:
        raise UsageError(f"{flag}: cannot read {path}: {exc.strerror}") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise UsageError(f"{flag}: {path} is not UTF-8 text") from None


def _strip_newline(text: str) -> str:
    """Drop the one newline an editor or `echo` adds; keep any other whitespace, it may matter."""
    if text.endswith("\r\n"):
        return text[:-2]
    return text.removesuffix("\n")


def _warn_inline(field: str, prog: str, warned: bool) -> bool:
    if not warned:
        print(
            f"{prog}: warning: --secret {field}=... puts the value in your shell history and the "
            f"process list; prefer {field}=@FILE, or just {field} to be prompted",
            file=sys.stderr,
        )
    return True


def read_data(spec: str) -> bytes:
    """A request body from `--data`: the text itself, `@FILE`, `@-` (standard input), `@@x` for `@x`."""
    if spec.startswith("@@"):
        return spec[1:].encode()
    if spec == "@-":
        return standard_input("--data @-").buffer.read()
    if spec.startswith("@"):
        try:
            return Path(spec[1:]).read_bytes()
        except OSError as exc:
            raise UsageError(f"--data {spec}: {exc.strerror or exc}") from None
    return spec.encode()
