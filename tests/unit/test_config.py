"""Settings: TOML plus BROKER_* overrides; every error names the setting."""

from __future__ import annotations

import base64
from pathlib import Path

import pytest

from broker.config import Settings
from broker.egress import EgressSettings
from broker.errors import ConfigError

MINIMAL = """
[tls]
cert = "tls/server.pem"
key = "tls/server-key.pem"
client_ca = "tls/ca.pem"
[storage]
path = "data/broker.db"
[master_key]
file = "master.key"
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "broker.toml"
    path.write_text(text)
    return path


def test_minimal_file_with_defaults_and_relative_paths(tmp_path: Path) -> None:
    settings = Settings.load(write(tmp_path, MINIMAL), environ={})
    assert settings.tls.cert == tmp_path / "tls" / "server.pem"
    assert settings.storage_path == tmp_path / "data" / "broker.db"
    assert settings.admin_addr == "127.0.0.1:50051" and settings.resolve_addr == "127.0.0.1:50052"
    assert settings.trust_domain == "broker.local" and settings.cache_ttl_seconds == 60
    assert settings.grace_seconds == 20.0 and settings.reflection is True


def test_environment_overrides_the_file(tmp_path: Path) -> None:
    env = {
        "BROKER_LISTEN_ADMIN": "0.0.0.0:6000",
        "BROKER_STORAGE_PATH": "/var/lib/broker/broker.db",
        "BROKER_RESOLVE_CACHE_TTL_SECONDS": "5",
        "BROKER_SERVER_REFLECTION": "false",
        "BROKER_LOG_LEVEL": "WARNING",
    }
    settings = Settings.load(write(tmp_path, MINIMAL), environ=env)
    assert settings.admin_addr == "0.0.0.0:6000"
    assert settings.storage_path == Path("/var/lib/broker/broker.db")
    assert (
        settings.cache_ttl_seconds == 5 and settings.reflection is False and settings.log_level == "warning"
    )


@pytest.mark.parametrize(
    ("extra", "env", "names"),
    [
        ("", {"BROKER_LISTEN_ADMIN": "nonsense"}, "listen.admin"),
        ("", {"BROKER_RESOLVE_CACHE_TTL_SECONDS": "soon"}, "BROKER_RESOLVE_CACHE_TTL_SECONDS"),
        ("[server]\ngrace_seconds = -1\n", {}, "server.grace_seconds"),
        ("[log]\nlevel = 'loud'\n", {}, "log.level"),
        ("trust_domain = 'spiffe://x'\n", {}, "trust_domain"),
        ("", {"BROKER_SERVER_REFLECTION": "maybe"}, "BROKER_SERVER_REFLECTION"),
    ],
)
def test_errors_name_the_setting(tmp_path: Path, extra: str, env: dict[str, str], names: str) -> None:
    with pytest.raises(ConfigError, match=names):
        Settings.load(write(tmp_path, extra + MINIMAL), environ=env)


def test_missing_required_settings_and_bad_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"tls\.cert is required"):
        Settings.load(write(tmp_path, "[storage]\npath = 'x'\n"), environ={})
    with pytest.raises(ConfigError, match=r"broker\.toml"):
        Settings.load(write(tmp_path, "this is = = not toml"), environ={})
    with pytest.raises(ConfigError, match=r"cannot read|No such file"):
        Settings.load(tmp_path / "absent.toml", environ={})


def test_master_key_from_environment_is_preferred_and_never_printed(tmp_path: Path) -> None:
    key = base64.b64encode(bytes(range(32))).decode()
    settings = Settings.load(write(tmp_path, MINIMAL), environ={"BROKER_MASTER_KEY": key})
    assert key not in repr(settings)
    assert settings.load_keyring().active.id  # parsed from the variable, the file does not exist
    with pytest.raises(ConfigError, match="BROKER_MASTER_KEY"):
        Settings.load(write(tmp_path, MINIMAL), environ={"BROKER_MASTER_KEY": "short"}).load_keyring()


def test_the_shipped_example_config_loads() -> None:
    example = Path(__file__).resolve().parents[2] / "deploy" / "broker.example.toml"
    settings = Settings.load(example, environ={})
    assert settings.admin_addr == "0.0.0.0:50051"
    assert settings.master_key_file == Path("/etc/broker/master-key/master.key")


def test_wrong_role_limits_have_defaults_and_can_be_set(tmp_path: Path) -> None:
    defaults = Settings.load(write(tmp_path, MINIMAL), environ={})
    assert defaults.denied_audits_per_minute == 10
    assert (defaults.monitor.wrong_role, defaults.monitor.wrong_role_window_seconds) == (20, 60)
    section = "\n[limits]\ndenied_audits_per_minute = 3\n[monitor]\nwrong_role = 0\n"
    settings = Settings.load(write(tmp_path, MINIMAL + section), environ={})
    assert settings.denied_audits_per_minute == 3 and settings.monitor.wrong_role == 0
    with pytest.raises(ConfigError, match="WRONG_ROLE_WINDOW_SECONDS"):
        Settings.load(write(tmp_path, MINIMAL), environ={"BROKER_MONITOR_WRONG_ROLE_WINDOW_SECONDS": "0"})


def test_egress_defaults_block_loopback_and_dev_allows_it(tmp_path: Path) -> None:
    egress = Settings.load(write(tmp_path, MINIMAL), environ={}).egress
    assert egress == EgressSettings()
    assert egress.allow_loopback is False and egress.allow_private is True
    assert Settings.for_dev(tmp_path, "127.0.0.1:1", "127.0.0.1:2").egress.allow_loopback is True


def test_egress_section_and_environment_overrides(tmp_path: Path) -> None:
    section = """
[egress]
allow_loopback = true
allow_private = false
allow_cidrs = ["10.1.0.0/16", "fd00::/8"]
deny_cidrs = ["10.1.2.0/24"]
allow_hosts = ["api.example.com", "*.internal.example"]
connect_timeout = 2
total_timeout = 9.5
max_response_bytes = 4096
max_redirects = 0
"""
    egress = Settings.load(write(tmp_path, MINIMAL + section), environ={}).egress
    assert egress == EgressSettings(
        allow_loopback=True,
        allow_private=False,
        allow_cidrs=("10.1.0.0/16", "fd00::/8"),
        deny_cidrs=("10.1.2.0/24",),
        allow_hosts=("api.example.com", "*.internal.example"),
        connect_timeout=2.0,
        total_timeout=9.5,
        max_response_bytes=4096,
        max_redirects=0,
    )
    env = {
        "BROKER_EGRESS_ALLOW_LOOPBACK": "false",
        "BROKER_EGRESS_DENY_CIDRS": " 192.168.0.0/16, 127.0.0.2 ,",
        "BROKER_EGRESS_ALLOW_HOSTS": "",
        "BROKER_EGRESS_MAX_REDIRECTS": "5",
    }
    egress = Settings.load(write(tmp_path, MINIMAL + section), environ=env).egress
    assert egress.allow_loopback is False and egress.max_redirects == 5
    assert egress.deny_cidrs == ("192.168.0.0/16", "127.0.0.2") and egress.allow_hosts == ()
    assert egress.allow_cidrs == ("10.1.0.0/16", "fd00::/8")  # not overridden: from the file


@pytest.mark.parametrize(
    ("section", "env", "message"),
    [
        ("deny_cidrs = ['10.0.0.0/33']", {}, r"egress\.deny_cidrs: '10\.0\.0\.0/33' is not an IP network"),
        ("allow_cidrs = 'x'", {}, r"egress\.allow_cidrs must be a list of strings"),
        ("allow_cidrs = [1]", {}, r"egress\.allow_cidrs must be a list of strings"),
        ("", {"BROKER_EGRESS_ALLOW_CIDRS": "10.0.0.0/8,bogus"}, r"BROKER_EGRESS_ALLOW_CIDRS: 'bogus'"),
        ("allow_hosts = ['evil@host']", {}, r"egress\.allow_hosts: 'evil@host'"),
        ("allow_loopback = 'perhaps'", {}, r"egress\.allow_loopback must be true or false"),
        ("", {"BROKER_EGRESS_ALLOW_PRIVATE": "2"}, r"BROKER_EGRESS_ALLOW_PRIVATE must be true or false"),
        ("connect_timeout = 0", {}, r"egress\.connect_timeout must be between"),
        ("connect_timeout = 20\ntotal_timeout = 10", {}, r"egress\.connect_timeout must not exceed"),
        ("max_response_bytes = 1.5", {}, r"egress\.max_response_bytes must be a whole number"),
        ("", {"BROKER_EGRESS_MAX_REDIRECTS": "99"}, r"BROKER_EGRESS_MAX_REDIRECTS must be between 0 and 20"),
    ],
)
def test_egress_errors_name_the_setting(
    tmp_path: Path, section: str, env: dict[str, str], message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        Settings.load(write(tmp_path, MINIMAL + "[egress]\n" + section + "\n"), environ=env)


def test_storage_url_selects_postgresql_and_is_never_echoed(tmp_path: Path) -> None:
    from broker.store.open import store_for
    from broker.store.postgres import PostgresStore
    from broker.store.sqlite import SqliteStore

    no_path = MINIMAL.replace('[storage]\npath = "data/broker.db"\n', "[storage]\npool_max = 4\n")
    url = "postgresql://broker:s3cret-pw@db.internal:5432/broker"
    settings = Settings.load(write(tmp_path, no_path), environ={"BROKER_STORAGE_URL": url})
    assert settings.storage_url == url and settings.storage_path is None
    assert (settings.storage_pool_min, settings.storage_pool_max) == (1, 4)
    assert "s3cret-pw" not in repr(settings)
    store = store_for(settings)
    assert isinstance(store, PostgresStore) and "s3cret-pw" not in repr(store)

    default = Settings.load(write(tmp_path, MINIMAL), environ={"BROKER_STORAGE_URL": ""})
    assert default.storage_url is None and isinstance(store_for(default), SqliteStore)
    with pytest.raises(ConfigError, match=r"storage\.path is required"):
        Settings.load(write(tmp_path, no_path), environ={})
    with pytest.raises(ConfigError, match="BROKER_STORAGE_URL must be a postgresql:// URL") as raised:
        Settings.load(write(tmp_path, MINIMAL), environ={"BROKER_STORAGE_URL": "mysql://u:s3cret-pw@h/db"})
    assert "s3cret-pw" not in str(raised.value)
    with pytest.raises(ConfigError, match=r"storage\.pool_min must not exceed storage\.pool_max"):
        Settings.load(write(tmp_path, MINIMAL), environ={"BROKER_STORAGE_POOL_MIN": "20"})


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[resovle]\ncache_ttl_seconds = 5\n", "unknown section resovle; did you mean resolve?"),
        (
            "[resolve]\ncache_ttl = 5\n",
            r"unknown key cache_ttl in \[resolve\]; did you mean cache_ttl_seconds\?",
        ),
        ("trust_domian = 'x'\n", "unknown key trust_domian; did you mean trust_domain?"),
        ("[health]\nservername = 'x'\n", "did you mean server_name?"),
        (
            "[resolve]\nzzz = 1\n",
            r"unknown key zzz in \[resolve\]; valid keys: cache_entries, cache_ttl_seconds, superseded",
        ),
        ("[qqqq]\nx = 1\n", "unknown section qqqq; valid: audit, egress, "),
    ],
)
def test_an_unknown_key_in_the_file_names_it_and_the_nearest_valid_one(
    tmp_path: Path, text: str, message: str
) -> None:
    # The typo comes first in the file: its error wins over what the typo leaves missing.
    with pytest.raises(ConfigError, match=message) as raised:
        Settings.load(write(tmp_path, text + MINIMAL), environ={})
    assert str(raised.value).startswith(f"config file {tmp_path / 'broker.toml'}: ")


def test_a_typo_is_reported_even_when_it_leaves_a_required_setting_missing(tmp_path: Path) -> None:
    text = MINIMAL.replace("[tls]", "[tsl]")
    with pytest.raises(ConfigError, match=r"unknown section tsl; did you mean tls\?"):
        Settings.load(write(tmp_path, text), environ={})
    # A key written below the wrong header: TOML puts it in that section.
    with pytest.raises(ConfigError, match=r"trust_domain belongs at the top of the file"):
        Settings.load(write(tmp_path, MINIMAL + 'trust_domain = "example.org"\n'), environ={})
    with pytest.raises(ConfigError, match=r"unknown key level in \[master_key\]; it belongs in \[log\]"):
        Settings.load(write(tmp_path, MINIMAL + 'level = "debug"\n'), environ={})


def test_keys_read_only_in_some_cases_are_valid_too(tmp_path: Path) -> None:
    text = MINIMAL.replace('path = "data/broker.db"', 'path = "data/broker.db"\nurl = ""\npool_min = 1')
    text += "old_files = []\noperators = []\n"  # still in [master_key]
    text += '[health]\nserver_name = "broker.internal"\n[monitor]\nalert_webhook = "ops/conn_1"\n'
    settings = Settings.load(write(tmp_path, text), environ={})
    assert settings.health_server_name == "broker.internal" and settings.monitor.alert_webhook == "ops/conn_1"
    dir_mode = MINIMAL.replace('file = "master.key"', 'dir = "keys"')
    assert Settings.load(write(tmp_path, dir_mode), environ={}).master_key_dir == tmp_path / "keys"


def test_unknown_broker_variables_are_warned_about_not_fatal(tmp_path: Path) -> None:
    env = {
        "BROKER_LOG_LEVL": "debug",
        "BROKER_FOO": "1",
        "BROKER_LISTEN_ADMIN": "127.0.0.1:1",  # a setting
        "BROKER_MASTER_KEY": base64.b64encode(bytes(32)).decode(),  # the key itself
        "BROKER_ADDR": "broker.internal:50051",  # read by brokerctl
        "BROKER_SERVER_NAME": "broker.internal",
        "BROKER_EXECUTOR_KEY": "x.pem",
        "BROKER_TEST_POSTGRES_DSN": "postgresql://x",  # the test suite's
        "BROKER_BENCH_POSTGRES_DSN": "postgresql://x",
        "PATH": "/bin",
    }
    settings = Settings.load(write(tmp_path, MINIMAL), environ=env)
    assert settings.admin_addr == "127.0.0.1:1" and settings.log_level == "info"
    assert settings.unknown_variables == (("BROKER_FOO", ""), ("BROKER_LOG_LEVL", "BROKER_LOG_LEVEL"))
    assert settings.warnings() == [
        "BROKER_FOO is not a broker setting and is ignored",
        "BROKER_LOG_LEVL is not a broker setting and is ignored; did you mean BROKER_LOG_LEVEL?",
    ]
    assert Settings.load(write(tmp_path, MINIMAL), environ={}).unknown_variables == ()


def test_old_master_key_files_from_the_environment(tmp_path: Path) -> None:
    env = {"BROKER_MASTER_KEY_OLD_FILES": "old1.key, /keys/old2.key"}
    settings = Settings.load(write(tmp_path, MINIMAL), environ=env)
    assert settings.old_master_key_files == (tmp_path / "old1.key", Path("/keys/old2.key"))
    with pytest.raises(ConfigError, match=r"master_key\.old_files must be a list of paths"):
        Settings.load(write(tmp_path, MINIMAL.replace('file = "master.key"', "old_files = 3")), environ={})


@pytest.mark.parametrize(
    ("section", "env", "message"),
    [
        ("cache_entries = 0", {}, r"resolve\.cache_entries must be between 1 and"),
        ("cache_entries = -5", {}, r"resolve\.cache_entries must be between 1 and"),
        ("cache_entries = 2.5", {}, r"resolve\.cache_entries must be a whole number"),
        ("cache_entries = 'many'", {}, r"resolve\.cache_entries must be a number"),
        ("", {"BROKER_RESOLVE_CACHE_ENTRIES": "0"}, r"BROKER_RESOLVE_CACHE_ENTRIES must be between 1 and"),
    ],
)
def test_the_resolve_cache_bound_is_a_positive_whole_number(
    tmp_path: Path, section: str, env: dict[str, str], message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        Settings.load(write(tmp_path, MINIMAL + "[resolve]\n" + section + "\n"), environ=env)


def test_the_resolve_cache_bound_defaults_to_100k_and_is_set_by_file_or_variable(tmp_path: Path) -> None:
    assert Settings.load(write(tmp_path, MINIMAL), environ={}).resolve_cache_entries == 100_000
    in_file = Settings.load(write(tmp_path, MINIMAL + "[resolve]\ncache_entries = 5000\n"), environ={})
    assert in_file.resolve_cache_entries == 5000
    by_env = Settings.load(write(tmp_path, MINIMAL), environ={"BROKER_RESOLVE_CACHE_ENTRIES": "20000"})
    assert by_env.resolve_cache_entries == 20000


def test_key_files_open_to_other_users_are_warned_about(tmp_path: Path) -> None:
    # Group read is how Kubernetes hands a secret to the pod's fsGroup (deploy/ uses 0440): fine.
    (tmp_path / "tls").mkdir()
    tls_key, master = tmp_path / "tls" / "server-key.pem", tmp_path / "master.key"
    for path in (tls_key, master):
        path.write_text("x")
    settings = Settings.load(write(tmp_path, MINIMAL), environ={})
    for mode in (0o600, 0o640, 0o440, 0o400):
        tls_key.chmod(mode)
        master.chmod(mode)
        assert settings.warnings() == [], oct(mode)
    tls_key.chmod(0o644)
    master.chmod(0o660)
    assert settings.warnings() == [
        f"tls.key: {tls_key} is open to other users (mode 0644); make it 0600 or 0640",
        f"master_key.file: {master} is open to other users (mode 0660); make it 0600 or 0640",
    ]
    keys = tmp_path / "keys"
    keys.mkdir()
    (keys / "0123456789abcdef.key").write_text("x")
    (keys / "0123456789abcdef.key").chmod(0o604)
    in_dir = Settings.load(
        write(tmp_path, MINIMAL.replace('file = "master.key"', 'dir = "keys"')), environ={}
    )
    assert in_dir.warnings()[1:] == [
        f"master_key.dir: {keys / '0123456789abcdef.key'} is open to other users (mode 0604);"
        " make it 0600 or 0640"
    ]
