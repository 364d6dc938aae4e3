"""brokerctl's parsing of --config, --secret, --label and times."""

from __future__ import annotations

import datetime as dt
import io
from pathlib import Path

import pytest

from broker.cli._input import (
    UsageError,
    parse_config,
    parse_duration,
    parse_labels,
    parse_secrets,
    parse_time,
)

CANARY = "canary-7f3a-secret"


def test_config_values_are_json_when_they_parse() -> None:
    config = parse_config(
        ["port=5432", "ssl=true", 'hosts=["a","b"]', "host=db.internal", "ratio=0.5", "empty=", "x=null"]
    )
    assert config == {
        "port": 5432,
        "ssl": True,
        "hosts": ["a", "b"],
        "host": "db.internal",
        "ratio": 0.5,
        "empty": "",
        "x": None,
    }


def test_config_value_keeps_everything_after_the_first_equals() -> None:
    assert parse_config(["dsn=a=b=c"]) == {"dsn": "a=b=c"}


def test_config_json_is_overlaid_by_pairs(tmp_path: Path) -> None:
    assert parse_config(["port=6543"], '{"host": "h", "port": 5432}') == {"host": "h", "port": 6543}
    doc = tmp_path / "config.json"
    doc.write_text('{"host": "from-file"}')
    assert parse_config([], f"@{doc}") == {"host": "from-file"}


@pytest.mark.parametrize(
    ("pairs", "json_text", "message"),
    [
        (["noequals"], None, "--config takes key=value"),
        (["=5"], None, "--config takes key=value"),
        ([], "[1, 2]", "must be a JSON object"),
        ([], "{bad", "not valid JSON"),
        ([], "@/no/such/file", "cannot read /no/such/file"),
    ],
)
def test_config_errors_name_the_flag(pairs: list[str], json_text: str | None, message: str) -> None:
    with pytest.raises(UsageError, match=message):
        parse_config(pairs, json_text)


def test_labels() -> None:
    assert parse_labels(["team=payments", "env=prod"]) == {"team": "payments", "env": "prod"}
    with pytest.raises(UsageError, match="given twice"):
        parse_labels(["a=1", "a=2"])
    with pytest.raises(UsageError, match="--label takes key=value"):
        parse_labels(["nolabel"])


def test_secret_from_file_drops_one_trailing_newline(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "pw").write_text(CANARY + "\n")
    (tmp_path / "crlf").write_bytes(b"line1\nline2\r\n")
    (tmp_path / "two").write_text("x\n\n")
    secrets = parse_secrets(
        [f"password=@{tmp_path / 'pw'}", f"b=@{tmp_path / 'crlf'}", f"c=@{tmp_path / 'two'}"]
    )
    assert secrets == {"password": CANARY, "b": "line1\nline2", "c": "x\n"}
    assert capsys.readouterr().err == ""  # no history warning for files


class Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_secret_prompts_without_echo_for_a_bare_field(monkeypatch: pytest.MonkeyPatch) -> None:
    prompts: list[str] = []

    def fake_getpass(prompt: str = "") -> str:
        prompts.append(prompt)
        return CANARY

    monkeypatch.setattr("sys.stdin", Tty())
    monkeypatch.setattr("getpass.getpass", fake_getpass)
    assert parse_secrets(["password"]) == {"password": CANARY}
    assert prompts == ["password: "]


def test_secret_prompt_refuses_an_empty_answer_and_ctrl_d(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("sys.stdin", Tty())
    monkeypatch.setattr("getpass.getpass", lambda prompt="": "")
    with pytest.raises(UsageError, match="no value entered for secret password"):
        parse_secrets(["password"])

    def end_of_input(prompt: str = "") -> str:
        raise EOFError

    monkeypatch.setattr("getpass.getpass", end_of_input)
    with pytest.raises(UsageError, match="no value entered for secret password"):
        parse_secrets(["password"])


@pytest.mark.parametrize("stdin", [io.StringIO("piped\n"), None], ids=["redirected", "closed"])
def test_secret_prompt_without_a_terminal_names_the_forms_that_work(
    monkeypatch: pytest.MonkeyPatch, stdin: io.StringIO | None
) -> None:
    def no_prompt(prompt: str = "") -> str:
        raise AssertionError("getpass must not run without a terminal")

    monkeypatch.setattr("sys.stdin", stdin)
    monkeypatch.setattr("getpass.getpass", no_prompt)
    with pytest.raises(UsageError) as info:
        parse_secrets(["password"])
    assert str(info.value) == (
        "--secret password prompts for the value, but standard input is not a terminal "
        "(closed or redirected); pass password=@- to read it from standard input, or password=@FILE"
    )


def test_inline_secret_works_but_warns_once_without_the_value(capsys: pytest.CaptureFixture[str]) -> None:
    assert parse_secrets([f"password={CANARY}", "token=abc"]) == {"password": CANARY, "token": "abc"}
    err = capsys.readouterr().err
    assert err.count("warning") == 1
    assert "shell history" in err
    assert CANARY not in err


def test_secret_double_at_is_a_literal_at(capsys: pytest.CaptureFixture[str]) -> None:
    assert parse_secrets(["token=@@home"]) == {"token": "@home"}
    assert "warning" in capsys.readouterr().err


def test_secret_from_stdin(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("sys.stdin", io.StringIO(CANARY + "\n"))
    assert parse_secrets(["password=@-"]) == {"password": CANARY}
    with pytest.raises(UsageError, match="only one --secret can read standard input"):
        parse_secrets(["a=@-", "b=@-"])


@pytest.mark.parametrize(
    ("specs", "message"),
    [
        ([f"={CANARY}"], "needs a field name"),
        (["password=@/no/such/file"], "--secret password: cannot read /no/such/file"),
        (["a=@/dev/null", "a=@/dev/null"], "--secret a is given twice"),
    ],
)
def test_secret_errors_never_echo_the_value(specs: list[str], message: str) -> None:
    with pytest.raises(UsageError, match=message) as info:
        parse_secrets(specs)
    assert CANARY not in str(info.value)


def test_secret_file_must_be_utf8(tmp_path: Path) -> None:
    (tmp_path / "bin").write_bytes(b"\xff\xfe")
    with pytest.raises(UsageError, match="is not UTF-8"):
        parse_secrets([f"key=@{tmp_path / 'bin'}"])


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("90s", 90), ("30m", 1800), ("1h", 3600), ("7d", 604800), ("2w", 1209600), ("1h30m", 5400)],
)
def test_durations(text: str, seconds: int) -> None:
    assert parse_duration(text) == dt.timedelta(seconds=seconds)


@pytest.mark.parametrize("text", ["", "1", "h", "1x", "1h 30m", "-1h", "0s", "1.5h"])
def test_bad_durations(text: str) -> None:
    with pytest.raises(UsageError):
        parse_duration(text)


NOW = dt.datetime(2025, 6, 1, 12, 0, tzinfo=dt.UTC)


def test_times() -> None:
    assert parse_time("2025-01-31T12:00:00Z", NOW) == dt.datetime(2025, 1, 31, 12, tzinfo=dt.UTC)
    offset = parse_time("2025-01-31T12:00:00+02:00", NOW)
    assert offset == dt.datetime(2025, 1, 31, 10, tzinfo=dt.UTC)
    assert parse_time("2025-01-31", NOW) == dt.datetime(2025, 1, 31, tzinfo=dt.UTC)  # naive means UTC
    assert parse_time("1h", NOW, relative=True) == NOW - dt.timedelta(hours=1)
    with pytest.raises(UsageError, match="not an RFC 3339 time"):
        parse_time("1h", NOW)  # a duration only where the flag allows it
    with pytest.raises(UsageError, match="or a duration"):
        parse_time("yesterday", NOW, relative=True)


def test_secret_from_a_closed_stdin_is_a_usage_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("sys.stdin", None)  # what Python makes of `<&-`
    with pytest.raises(UsageError, match=r"^--secret token=@- reads standard input, but it is closed$"):
        parse_secrets(["token=@-"])


def test_integers_a_request_cannot_carry_exactly_are_refused_naming_where() -> None:
    exact = 2**53 - 1
    assert parse_config([f"n={exact}", f"m=-{exact}"]) == {"n": exact, "m": -exact}
    cases = {
        "--config n": ([f"n={2**53 + 1}"], None),
        "--config n.a[1]": ([f'n={{"a": [1, {2**64}]}}'], None),
        "--config-json x": ([], f'{{"x": -{2**53 + 1}}}'),
        "--config big": ([f"big={10**400}"], None),
        "--config-json": ([], '{"a":' * 5000 + "1" + "}" * 5000),
        "--config deep": (["deep=" + "[" * 40 + "]" * 40], None),
    }
    for where, (pairs, doc) in cases.items():
        with pytest.raises(UsageError) as info:
            parse_config(pairs, doc)
        assert str(info.value).startswith(where), str(info.value)
    assert parse_config(['n="18446744073709551617"']) == {"n": "18446744073709551617"}  # as text, it is kept
