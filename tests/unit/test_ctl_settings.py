"""brokerctl's connection settings (flags > BROKER_* > profile > dev defaults) and its failure hints."""

from __future__ import annotations

from pathlib import Path

import pytest

from broker.cli._ctl_args import build_parser
from broker.cli._ctl_settings import CtlSettings, profile_file, resolve
from broker.cli._hints import BROKERCTL, HEALTH, Failure, classify, connection_hint
from broker.cli._input import UsageError
from broker.cli._rpc import ClientTls
from broker.config import CLIENT_VARIABLES, Settings

DEV_TLS = Path(".broker-dev") / "tls"

# Details texts as grpc 1.85 reports them (captured against `broker dev`).
MISMATCH = (
    "failed to connect to all addresses; last error: UNKNOWN: ipv4:127.0.0.1:47051: Custom verification "
    "check failed with error: UNAUTHENTICATED: Hostname Verification Check failed."
)
UNKNOWN_CA = (
    "failed to connect to all addresses; last error: UNKNOWN: ipv4:127.0.0.1:47051: Tls handshake failed "
    "(TSI_PROTOCOL_FAILURE): SSL_ERROR_SSL: error:1000007d:SSL routines:OPENSSL_internal:"
    "CERTIFICATE_VERIFY_FAILED: unable to get local issuer certificate: OK"
)
REFUSED = (
    "failed to connect to all addresses; last error: UNKNOWN: ipv4:127.0.0.1:50051: "
    "Failed to connect to remote host: Connection refused"
)
DNS = (
    "errors resolving nonexistent.invalid:50051: [field:hostname lookup error:address lookup failed for "
    "nonexistent.invalid:50051: Domain name not found]"
)
CLOSED = "failed to connect to all addresses; last error: UNAVAILABLE: ipv4:127.0.0.1:47051: Socket closed"
BAD_FILES = (
    "failed to connect to all addresses; last error: UNKNOWN: ipv4:127.0.0.1:47051: "
    "Failed to create security handshaker."
)
NOT_TLS = (
    "failed to connect to all addresses; last error: UNKNOWN: ipv4:127.0.0.1:47060: Tls handshake failed "
    "(TSI_PROTOCOL_FAILURE): SSL_ERROR_SSL: error:100000f7:SSL routines:OPENSSL_internal:"
    "WRONG_VERSION_NUMBER: Invalid certificate verification context: OK"
)


def settings(
    tmp_path: Path, *flags: str, env: dict[str, str] | None = None, profiles: str | None = None
) -> CtlSettings:
    """`resolve` for `brokerctl FLAGS types` with ENV and, when given, a profile file holding PROFILES."""
    path = tmp_path / "conf" / "brokerctl.toml"
    if profiles is not None:
        path.parent.mkdir(exist_ok=True)
        path.write_text(profiles)
    return resolve(build_parser().parse_args([*flags, "types"]), env or {}, path)


def usage_error(
    tmp_path: Path, *flags: str, env: dict[str, str] | None = None, profiles: str | None = None
) -> str:
    with pytest.raises(UsageError) as info:
        settings(tmp_path, *flags, env=env, profiles=profiles)
    return str(info.value)


def tls(folder: Path, stem: str) -> ClientTls:
    return ClientTls(folder / "ca.pem", folder / f"{stem}.pem", folder / f"{stem}-key.pem")


# ------------------------------------------------------------------ layers


def test_nothing_given_means_the_broker_dev_layout(tmp_path: Path) -> None:
    assert settings(tmp_path) == CtlSettings(
        addr="127.0.0.1:50051",
        resolve_addr="127.0.0.1:50052",
        admin=tls(DEV_TLS, "admin"),
        executor=tls(DEV_TLS, "executor"),
        server_name=None,
        timeout=10.0,
    )


PROD = """
[profiles.prod]
addr = "profile:1"
resolve_addr = "profile:2"
ca = "prod/ca.pem"
cert = "prod/admin.pem"
key = "prod/admin-key.pem"
executor_cert = "/abs/executor.pem"
executor_key = "/abs/executor-key.pem"
server_name = "profile.example"
timeout = 7
"""


def test_a_profile_sets_everything_with_paths_relative_to_its_file(tmp_path: Path) -> None:
    got = settings(tmp_path, "--profile", "prod", profiles=PROD)
    prod = tmp_path / "conf" / "prod"
    assert got == CtlSettings(
        addr="profile:1",
        resolve_addr="profile:2",
        admin=ClientTls(prod / "ca.pem", prod / "admin.pem", prod / "admin-key.pem"),
        executor=ClientTls(prod / "ca.pem", Path("/abs/executor.pem"), Path("/abs/executor-key.pem")),
        server_name="profile.example",
        timeout=7.0,
    )


def test_variables_override_the_profile_and_flags_override_both(tmp_path: Path) -> None:
    env = {
        "BROKER_ADDR": "env:1",
        "BROKER_RESOLVE_ADDR": "env:2",
        "BROKER_SERVER_NAME": "env.example",
        "BROKER_TIMEOUT": "3.5",
        "BROKER_CA": "env-ca.pem",
        "BROKER_PROFILE": "prod",
    }
    got = settings(tmp_path, env=env, profiles=PROD)
    assert (got.addr, got.resolve_addr, got.server_name, got.timeout) == (
        "env:1",
        "env:2",
        "env.example",
        3.5,
    )
    assert got.admin.ca == Path("env-ca.pem")
    assert got.admin.cert == tmp_path / "conf" / "prod" / "admin.pem"  # not in env: the profile's
    flags = ("--addr", "flag:1", "--server-name", "flag.example", "--timeout", "2", "--ca", "flag-ca.pem")
    got = settings(tmp_path, *flags, env=env, profiles=PROD)
    assert (got.addr, got.resolve_addr, got.server_name, got.timeout) == (
        "flag:1",
        "env:2",
        "flag.example",
        2.0,
    )
    assert got.admin.ca == got.executor.ca == Path("flag-ca.pem")


def test_a_data_dir_stands_for_its_tls_files_at_its_own_layer(tmp_path: Path) -> None:
    env = {"BROKER_CA": "env-ca.pem", "BROKER_DATA_DIR": "env-dev"}
    # The variable's own CA wins over the variable's data dir, which gives the rest.
    got = settings(tmp_path, env=env)
    assert got.admin == ClientTls(
        Path("env-ca.pem"), Path("env-dev/tls/admin.pem"), Path("env-dev/tls/admin-key.pem")
    )
    # --data-dir is the whole dev layout on the command line: it beats every variable.
    assert settings(tmp_path, "--data-dir", "d", env=env).admin == tls(Path("d/tls"), "admin")
    profile = '[profiles.p]\ndata_dir = "dev"\n'
    assert settings(tmp_path, "--profile", "p", profiles=profile).executor == tls(
        tmp_path / "conf" / "dev" / "tls", "executor"
    )


def test_cert_flags_name_this_commands_identity_variables_name_each_one(tmp_path: Path) -> None:
    got = settings(tmp_path, "--cert", "c.pem", "--key", "k.pem")
    assert got.admin.cert == got.executor.cert == Path("c.pem")
    assert got.admin.key == got.executor.key == Path("k.pem")
    env = {
        "BROKER_CERT": "a.pem",
        "BROKER_KEY": "a-key.pem",
        "BROKER_EXECUTOR_CERT": "e.pem",
        "BROKER_EXECUTOR_KEY": "e-key.pem",
    }
    got = settings(tmp_path, env=env)
    assert (got.admin.cert, got.admin.key) == (Path("a.pem"), Path("a-key.pem"))
    assert (got.executor.cert, got.executor.key) == (Path("e.pem"), Path("e-key.pem"))


def test_home_is_expanded_and_empty_variables_count_as_unset(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    got = settings(tmp_path, env={"BROKER_CA": "~/ca.pem", "BROKER_ADDR": ""})
    assert got.admin.ca == tmp_path / "home" / "ca.pem" and got.addr == "127.0.0.1:50051"
    got = settings(tmp_path, "--profile", "p", profiles='[profiles.p]\nca = "~/p.pem"\n')
    assert got.admin.ca == tmp_path / "home" / "p.pem"


def test_the_profile_comes_from_the_flag_then_the_variable_then_the_files_default(tmp_path: Path) -> None:
    text = (
        'default = "a"\n[profiles.a]\naddr = "a:1"\n[profiles.b]\naddr = "b:1"\n[profiles.c]\naddr = "c:1"\n'
    )
    assert settings(tmp_path, profiles=text).addr == "a:1"
    assert settings(tmp_path, env={"BROKER_PROFILE": "b"}, profiles=text).addr == "b:1"
    assert settings(tmp_path, "--profile", "c", env={"BROKER_PROFILE": "b"}, profiles=text).addr == "c:1"


def test_the_profile_file_follows_xdg_config_home() -> None:
    assert profile_file({"XDG_CONFIG_HOME": "/x", "HOME": "/h"}) == Path("/x/broker/brokerctl.toml")
    # A relative XDG_CONFIG_HOME is ignored, as the XDG spec says.
    assert profile_file({"XDG_CONFIG_HOME": "rel", "HOME": "/h"}) == Path("/h/.config/broker/brokerctl.toml")
    assert profile_file({"HOME": "/h"}) == Path("/h/.config/broker/brokerctl.toml")


def test_no_client_variable_changes_a_server_setting() -> None:
    # `broker serve` reads BROKER_<SECTION>_<KEY>, maybe in the same shell: brokerctl's must not be one.
    required = {
        "BROKER_TLS_CERT": "s.pem",
        "BROKER_TLS_KEY": "s-key.pem",
        "BROKER_TLS_CLIENT_CA": "ca.pem",
        "BROKER_STORAGE_PATH": "b.db",
    }
    with_client = {**required, **{variable: "x" for variable in CLIENT_VARIABLES}}
    assert Settings.load(None, with_client) == Settings.load(None, required)


# ------------------------------------------------------------------ errors


def test_an_unknown_profile_is_named_with_the_nearest_and_the_known_ones(tmp_path: Path) -> None:
    text = '[profiles.prod]\naddr = "a:1"\n[profiles.staging]\naddr = "b:1"\n'
    message = usage_error(tmp_path, "--profile", "prd", profiles=text)
    path = tmp_path / "conf" / "brokerctl.toml"
    assert (
        message
        == f"{path} has no profile 'prd' (--profile prd); did you mean 'prod'?; its profiles: prod, staging"
    )
    message = usage_error(tmp_path, env={"BROKER_PROFILE": "zzz"}, profiles=text)
    assert "no profile 'zzz' (BROKER_PROFILE=zzz)" in message and "did you mean" not in message
    assert "no profile 'gone' (default = 'gone')" in usage_error(tmp_path, profiles='default = "gone"\n')


def test_asking_for_a_profile_without_a_file_says_where_the_file_goes(tmp_path: Path) -> None:
    message = usage_error(tmp_path, "--profile", "prod")
    assert message.startswith(
        f"--profile prod: there is no profile file {tmp_path / 'conf' / 'brokerctl.toml'}"
    )
    assert "[profiles.prod]" in message


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('[profiles.prod]\nadr = "x:1"\n', "unknown key 'adr' in [profiles.prod]; did you mean 'addr'?"),
        ('defualt = "prod"\n', "unknown key 'defualt'; did you mean 'default'?"),
        ('[profiles.prod]\ntimeout = "soon"\n', "profiles.prod.timeout must be a number of seconds"),
        ("[profiles.prod]\naddr = 5\n", "profiles.prod.addr must be a non-empty string"),
        ("profiles = 1\n", "profiles must be a table of [profiles.NAME] tables"),
        ('[profiles.prod]\ncert = "c.pem"\n', "profiles.prod.cert is set but profiles.prod.key is not"),
        ("[profiles.prod]\ntimeout = 0\n", "profiles.prod.timeout must be a positive number of seconds"),
        ("[profiles.prod\n", "is not valid TOML: "),
    ],
)
def test_a_bad_profile_file_is_a_usage_error_naming_the_file_and_key(
    tmp_path: Path, text: str, expected: str
) -> None:
    # Every profile is checked, even when none is asked for: a typo shows before it matters.
    message = usage_error(tmp_path, profiles=text)
    assert str(tmp_path / "conf" / "brokerctl.toml") in message and expected in message


def test_an_unreadable_profile_file_is_a_usage_error(tmp_path: Path) -> None:
    (tmp_path / "conf" / "brokerctl.toml").mkdir(parents=True)
    assert "cannot read the profile file" in usage_error(tmp_path)


@pytest.mark.parametrize(
    ("flags", "env", "expected"),
    [
        ((), {"BROKER_CERT": "c.pem"}, "BROKER_CERT is set but BROKER_KEY is not"),
        ((), {"BROKER_EXECUTOR_KEY": "k.pem"}, "BROKER_EXECUTOR_KEY is set but BROKER_EXECUTOR_CERT is not"),
        (("--key", "k.pem"), {}, "--key is set but --cert is not"),
        ((), {"BROKER_TIMEOUT": "ten"}, "BROKER_TIMEOUT must be a positive number of seconds, not 'ten'"),
        (("--timeout", "0"), {}, "--timeout must be a positive number of seconds"),
        (("--timeout", "nan"), {}, "--timeout must be a positive number of seconds"),
    ],
)
def test_half_an_identity_or_a_bad_timeout_is_a_usage_error(
    tmp_path: Path, flags: tuple[str, ...], env: dict[str, str], expected: str
) -> None:
    assert expected in usage_error(tmp_path, *flags, env=env)


# ------------------------------------------------------------------ hints


@pytest.mark.parametrize(
    ("details", "failure"),
    [
        (MISMATCH, Failure.HOST_NAME),
        ("Peer name wrong.example is not in peer certificate", Failure.HOST_NAME),
        (UNKNOWN_CA, Failure.HANDSHAKE),
        (REFUSED, Failure.REFUSED),
        (DNS, Failure.DNS),
        (CLOSED, Failure.CLOSED),
        (BAD_FILES, Failure.CLIENT_FILES),
        (NOT_TLS, Failure.NOT_TLS),
        ("failed to connect to all addresses; last error: UNKNOWN: No route to host", Failure.UNREACHABLE),
        # The broker itself said UNAVAILABLE: its message is the whole story.
        ("the broker is shutting down; retry (another replica or in a moment)", None),
    ],
)
def test_each_transport_failure_is_told_apart(details: str, failure: Failure | None) -> None:
    assert classify("UNAVAILABLE", details) is failure


def test_a_timeout_says_timeout_and_other_codes_get_no_hint() -> None:
    assert classify("DEADLINE_EXCEEDED", "Deadline Exceeded") is Failure.TIMEOUT
    hint = connection_hint("DEADLINE_EXCEEDED", "Deadline Exceeded", "10.1.2.3:6051", 2.5, BROKERCTL)
    assert hint is not None and hint.startswith("no answer from 10.1.2.3:6051 within 2.5 s (timeout)")
    assert "--timeout (BROKER_TIMEOUT)" in hint
    assert connection_hint("NOT_FOUND", REFUSED, "10.1.2.3:6051", 2.5, BROKERCTL) is None
    # The broker's own DEADLINE_EXCEEDED (a proxied MCP tool or HTTP call was too slow) reached us.
    broker_said = "the upstream did not answer before the call's deadline"
    assert connection_hint("DEADLINE_EXCEEDED", broker_said, "10.1.2.3:6051", 2.5, BROKERCTL) is None


def test_only_the_dev_default_address_suggests_make_run() -> None:
    for addr in ("127.0.0.1:50051", "127.0.0.1:50052"):
        hint = connection_hint("UNAVAILABLE", REFUSED, addr, 10, BROKERCTL)
        assert hint is not None and f"nothing is listening on {addr}, the `broker dev` default" in hint
        assert "`make run`" in hint
    hint = connection_hint("UNAVAILABLE", REFUSED, "127.0.0.1:6051", 10, BROKERCTL)
    assert hint == (
        "nothing is listening on 127.0.0.1:6051 (connection refused): check the address "
        "(--addr, BROKER_ADDR or the profile's addr; --resolve-addr for `resolve`)"
    )


def test_a_host_name_mismatch_points_at_server_name_and_at_issuing_a_certificate() -> None:
    hint = connection_hint("UNAVAILABLE", MISMATCH, "broker.internal:50051", 10, BROKERCTL)
    assert hint is not None
    assert "pass --server-name (BROKER_SERVER_NAME, or server_name in the profile)" in hint
    assert "`broker init --host broker.internal` or `broker certs server --host broker.internal`" in hint
    # `broker health` names its own options, in the same sentences.
    # With a server name given, that is the name checked, and the one to issue a certificate for.
    named = connection_hint("UNAVAILABLE", MISMATCH, "10.0.0.5:50051", 10, BROKERCTL, "broker.internal")
    assert named is not None and "does not hold broker.internal (the server name given)" in named
    assert "`broker certs server --host broker.internal`" in named and "10.0.0.5`" not in named
    health = connection_hint("UNAVAILABLE", MISMATCH, "broker.internal:50052", 5, HEALTH)
    assert health is not None and "pass --server-name with a name it holds" in health


def test_a_dns_failure_names_the_host() -> None:
    hint = connection_hint("UNAVAILABLE", DNS, "nonexistent.invalid:50051", 10, BROKERCTL)
    assert hint is not None and hint.startswith("the host name nonexistent.invalid did not resolve (DNS)")
