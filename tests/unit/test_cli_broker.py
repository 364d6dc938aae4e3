"""The `broker` command without a running server: keygen, certs, and how dev/serve hand over."""

from __future__ import annotations

import base64
import stat
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from cryptography import x509

from broker.cli import broker as cli
from broker.config import Settings
from broker.crypto import Kek
from broker.errors import ConfigError


def test_keygen_prints_a_32_byte_key(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["keygen"]) == 0
    out = capsys.readouterr().out
    assert out.endswith("\n") and out.count("\n") == 1
    assert len(base64.b64decode(out.strip(), validate=True)) == 32
    Kek.from_base64(out)


def test_keygen_out_is_private_and_never_overwritten(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "master.key"
    assert cli.main(["keygen", "--out", str(path)]) == 0
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    key = path.read_text()
    Kek.from_base64(key)
    assert capsys.readouterr().out == ""  # the key went to the file only
    assert cli.main(["keygen", "--out", str(path)]) == 2
    assert "refusing to overwrite" in capsys.readouterr().err
    assert path.read_text() == key


def test_certs_init_issue_and_server(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ca_dir = tmp_path / "ca"
    assert cli.main(["certs", "init", "--dir", str(ca_dir)]) == 0
    ca = x509.load_pem_x509_certificate((ca_dir / "ca.pem").read_bytes())
    assert stat.S_IMODE((ca_dir / "ca-key.pem").stat().st_mode) == 0o600

    spiffe_id = "spiffe://example.org/tenant/t1/executor/runner"
    out = tmp_path / "runner"
    argv = [
        "certs",
        "issue",
        "--ca-dir",
        str(ca_dir),
        "--principal",
        spiffe_id,
        "--out",
        str(out),
        "--days",
        "7",
    ]
    assert cli.main(argv) == 0
    cert = x509.load_pem_x509_certificate((tmp_path / "runner.pem").read_bytes())
    cert.verify_directly_issued_by(ca)
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.UniformResourceIdentifier) == [spiffe_id]
    assert stat.S_IMODE((tmp_path / "runner-key.pem").stat().st_mode) == 0o600

    argv = ["certs", "server", "--ca-dir", str(ca_dir), "--host", "broker.internal", "--host", "10.0.0.5"]
    assert cli.main([*argv, "--out", str(tmp_path / "server")]) == 0
    server = x509.load_pem_x509_certificate((tmp_path / "server.pem").read_bytes())
    server.verify_directly_issued_by(ca)
    assert cli.main(["certs", "init", "--dir", str(ca_dir)]) == 2  # a CA is never replaced
    assert "refusing to overwrite" in capsys.readouterr().err


def test_certs_issue_rejects_a_bad_principal(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["certs", "init", "--dir", str(tmp_path)]) == 0
    out = tmp_path / "p"
    argv = ["certs", "issue", "--ca-dir", str(tmp_path), "--principal", "spiffe://x/admin", "--out", str(out)]
    assert cli.main(argv) == 2
    assert "broker: error: invalid principal" in capsys.readouterr().err
    assert not (tmp_path / "p.pem").exists() and not (tmp_path / "p-key.pem").exists()


def test_certs_issue_without_a_ca(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["certs", "issue", "--ca-dir", str(tmp_path), "--principal", "spiffe://x/tenant/t/admin/a"]
    assert cli.main([*argv, "--out", str(tmp_path / "p")]) == 2
    assert "ca.pem: No such file" in capsys.readouterr().err


def test_dev_creates_the_layout_runs_and_prints_the_banner_once_serving(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    ran: list[Settings] = []
    before_serving: list[str] = []

    def fake_run(settings: Settings, on_serving: Callable[[Any], None] | None, dev: bool) -> int:
        ran.append(settings)
        before_serving.append(capsys.readouterr().err)
        assert on_serving is not None and dev
        on_serving(SimpleNamespace(admin_port=7001, resolve_port=7002))
        return 0

    monkeypatch.setattr(cli, "_run", fake_run)
    data = tmp_path / "dev"
    argv = ["dev", "--data-dir", str(data), "--admin-addr", "127.0.0.1:0", "--resolve-addr", "127.0.0.1:0"]
    assert cli.main(argv) == 0
    assert ran == [Settings.for_dev(data, "127.0.0.1:0", "127.0.0.1:0")]
    assert (data / "master.key").exists() and (data / "tls/admin.pem").exists()
    assert before_serving == [""]  # nothing promised before the listeners are bound
    err = capsys.readouterr().err
    assert str(data.resolve()) in err and "127.0.0.1:7001" in err and "127.0.0.1:7002" in err
    assert f"brokerctl --data-dir {data} --addr 127.0.0.1:7001 --resolve-addr 127.0.0.1:7002 types" in err
    assert (data / "master.key").read_text() not in err


@pytest.mark.parametrize(
    ("setting", "advice"),
    [
        ("listen.admin", "--admin-addr or make run ADMIN_ADDR=..."),
        ("listen.resolve", "--resolve-addr or make run RESOLVE_ADDR=..."),
        ("metrics.listen", "--metrics-addr or make run METRICS_ADDR=..."),
    ],
)
def test_a_busy_address_names_the_flag_for_dev_and_the_setting_for_serve(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    setting: str,
    advice: str,
) -> None:
    from broker import server

    def busy(settings: Settings, on_serving: object = None) -> int:
        raise server.ListenError(setting, "127.0.0.1:50051", "in use")

    monkeypatch.setattr(server, "run", busy)
    assert cli.main(["dev", "--data-dir", str(tmp_path)]) == 2
    expected = f"broker: error: 127.0.0.1:50051 is in use (another broker?); choose another with {advice}\n"
    assert capsys.readouterr().err == expected
    config = tmp_path / "broker.toml"
    config.write_text(
        '[tls]\ncert = "s.pem"\nkey = "k.pem"\nclient_ca = "ca.pem"\n[storage]\npath = "b.db"\n'
    )
    assert cli.main(["serve", "--config", str(config)]) == 2
    variable = "BROKER_" + setting.replace(".", "_").upper()
    assert capsys.readouterr().err.endswith(
        f"choose another with {setting} in the config file or {variable}\n"
    )


def test_run_config_error_is_reported_with_status_2(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def bad_key(settings: Settings, *_: object) -> int:
        raise ConfigError("master_key.file: a master key must be base64 text")

    monkeypatch.setattr(cli, "_run", bad_key)
    assert cli.main(["dev", "--data-dir", str(tmp_path)]) == 2
    assert capsys.readouterr().err.endswith(
        "broker: error: master_key.file: a master key must be base64 text\n"
    )


def test_serve_with_a_missing_config_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["serve", "--config", str(tmp_path / "nope.toml")]) == 2
    assert "broker: error: config file" in capsys.readouterr().err


def test_serve_loads_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "broker.toml").write_text(
        '[tls]\ncert = "s.pem"\nkey = "s-key.pem"\nclient_ca = "ca.pem"\n[storage]\npath = "b.db"\n'
    )
    ran: list[Settings] = []

    def fake_run(settings: Settings, *_: object) -> int:
        ran.append(settings)
        return 7

    monkeypatch.setattr(cli, "_run", fake_run)
    assert cli.main(["serve", "--config", str(tmp_path / "broker.toml")]) == 7
    assert ran[0].storage_path == tmp_path / "b.db"


def test_command_is_required(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        cli.main([])
    assert info.value.code == 2


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _sans(path: Path) -> list[str]:
    cert = x509.load_pem_x509_certificate(path.read_bytes())
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return [str(getattr(n, "value", n)) for n in names]


@pytest.fixture
def no_listen_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("BROKER_LISTEN_ADMIN", "BROKER_LISTEN_RESOLVE", "BROKER_METRICS_LISTEN"):
        monkeypatch.delenv(name, raising=False)


@pytest.mark.usefixtures("no_listen_variables")
def test_init_writes_a_layout_the_broker_loads_as_it_is(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    argv = ["init", "--dir", "prod", "--host", "broker.internal", "--host", "10.0.0.5"]
    assert cli.main(argv) == 0
    root = tmp_path / "prod"
    out = capsys.readouterr().out
    settings = Settings.load(root / "broker.toml", environ={})
    assert settings.admin_addr == "0.0.0.0:50051" and settings.resolve_addr == "0.0.0.0:50052"
    assert settings.metrics_listen == "127.0.0.1:9464" and settings.storage_path == root / "broker.db"
    assert settings.tls.cert == root / "tls/server.pem" and settings.tls.client_ca == root / "tls/ca.pem"
    assert settings.master_key_dir == root / "master-keys" and settings.master_key_file is None
    admin = "spiffe://broker.local/tenant/default/admin/admin"
    assert settings.master_key_operators == (admin,)
    assert (settings.health_cert, settings.health_key) == (root / "tls/probe.pem", root / "tls/probe-key.pem")
    assert settings.health_server_name == "broker.internal"
    assert len(settings.load_keyring().ids) == 1
    # Every path in the file is relative: the folder can move.
    assert str(tmp_path) not in (root / "broker.toml").read_text()

    assert _sans(root / "tls/server.pem") == ["broker.internal", "10.0.0.5"]  # no localhost without --local
    assert _sans(root / "tls/admin.pem") == [admin]
    assert _sans(root / "tls/executor.pem") == ["spiffe://broker.local/tenant/default/executor/executor"]
    assert _sans(root / "tls/probe.pem") == ["spiffe://broker.local/probe/broker"]
    ca = x509.load_pem_x509_certificate((root / "tls/ca.pem").read_bytes())
    for name in ("server", "admin", "executor", "probe"):
        x509.load_pem_x509_certificate((root / f"tls/{name}.pem").read_bytes()).verify_directly_issued_by(ca)
    for folder in (root, root / "tls", root / "master-keys"):
        assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    for key in [*root.glob("tls/*-key.pem"), *root.glob("master-keys/*.key")]:
        assert stat.S_IMODE(key.stat().st_mode) == 0o600

    exports = (
        f"export BROKER_ADDR=broker.internal:50051 BROKER_RESOLVE_ADDR=broker.internal:50052 "
        f"BROKER_CA={root}/tls/ca.pem BROKER_CERT={root}/tls/admin.pem BROKER_KEY={root}/tls/admin-key.pem "
        f"BROKER_EXECUTOR_CERT={root}/tls/executor.pem BROKER_EXECUTOR_KEY={root}/tls/executor-key.pem"
    )
    assert f"  broker serve --config {root}/broker.toml\n" in out
    assert f"  {exports}\n" in out and f"  broker health --config {root}/broker.toml" in out
    assert (root / "brokerctl.env").read_text().endswith(f"\n{exports}\n")


@pytest.mark.usefixtures("no_listen_variables")
def test_init_local_trust_domain_tenant_and_listen_variables(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["init", "--dir", str(tmp_path / "a"), "--host", "broker.internal", "--local"]
    assert cli.main([*argv, "--trust-domain", "example.org", "--tenant", "acme"]) == 0
    settings = Settings.load(tmp_path / "a/broker.toml", environ={})
    assert settings.admin_addr == "127.0.0.1:50051" and settings.trust_domain == "example.org"
    assert settings.master_key_operators == ("spiffe://example.org/tenant/acme/admin/admin",)
    assert _sans(tmp_path / "a/tls/server.pem") == ["broker.internal", "localhost", "127.0.0.1"]
    assert (
        "export BROKER_ADDR=127.0.0.1:50051 BROKER_RESOLVE_ADDR=127.0.0.1:50052 " in capsys.readouterr().out
    )

    # The listen variables `serve` would apply are what init writes (the flags win over them).
    monkeypatch.setenv("BROKER_LISTEN_ADMIN", "0.0.0.0:6051")
    monkeypatch.setenv("BROKER_METRICS_LISTEN", "")
    argv = ["init", "--dir", str(tmp_path / "b"), "--host", "b.internal", "--resolve-addr", "0.0.0.0:6052"]
    assert cli.main(argv) == 0
    settings = Settings.load(tmp_path / "b/broker.toml", environ={})
    assert (settings.admin_addr, settings.resolve_addr) == ("0.0.0.0:6051", "0.0.0.0:6052")
    assert settings.metrics_listen == "127.0.0.1:9464"  # an empty variable is no choice
    assert "BROKER_ADDR=b.internal:6051 BROKER_RESOLVE_ADDR=b.internal:6052 " in capsys.readouterr().out


@pytest.mark.usefixtures("no_listen_variables")
def test_init_refuses_an_existing_layout_and_changes_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = tmp_path / "prod"
    assert cli.main(["init", "--dir", str(root), "--host", "broker.internal"]) == 0
    before = _files(root)
    capsys.readouterr()
    assert cli.main(["init", "--dir", str(root), "--host", "other.internal"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"broker: error: {root}/broker.toml exists (and 12 more of its files): refusing")
    assert _files(root) == before

    # One file of a layout is enough to refuse, and nothing else is written.
    lone = tmp_path / "lone"
    (lone / "tls").mkdir(parents=True)
    (lone / "tls/server.pem").write_text("mine")
    assert cli.main(["init", "--dir", str(lone), "--host", "broker.internal"]) == 2
    assert f"{lone}/tls/server.pem exists: refusing" in capsys.readouterr().err
    assert _files(lone) == {"tls/server.pem": b"mine"} and not (lone / "master-keys").exists()


@pytest.mark.usefixtures("no_listen_variables")
@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--host", "bad host"], "invalid host name 'bad host'"),
        (["--host", "b.internal", "--tenant", "a/b"], "--tenant 'a/b': use 1 to 128 letters, digits"),
        (["--host", "b.internal", "--tenant", ".."], "--tenant '..': use"),
        (["--host", "b.internal", "--trust-domain", "a:b"], "--trust-domain 'a:b': use letters, digits"),
        (["--host", "b.internal", "--admin-addr", "nonsense"], "listen.admin must be host:port"),
    ],
)
def test_init_with_a_bad_value_writes_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], flags: list[str], message: str
) -> None:
    assert cli.main(["init", "--dir", str(tmp_path / "prod"), *flags]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "prod").exists()
