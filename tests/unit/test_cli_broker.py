"""The `broker` command without a running server: keygen, certs, and how dev/serve hand over."""

from __future__ import annotations

import base64
import stat
from pathlib import Path

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


def test_dev_creates_the_layout_prints_a_banner_and_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    ran: list[Settings] = []

    def fake_run(settings: Settings) -> int:
        ran.append(settings)
        return 0

    monkeypatch.setattr(cli, "_run", fake_run)
    data = tmp_path / "dev"
    argv = [
        "dev",
        "--data-dir",
        str(data),
        "--admin-addr",
        "127.0.0.1:7001",
        "--resolve-addr",
        "127.0.0.1:7002",
    ]
    assert cli.main(argv) == 0
    assert ran == [Settings.for_dev(data, "127.0.0.1:7001", "127.0.0.1:7002")]
    assert (data / "master.key").exists() and (data / "tls/admin.pem").exists()
    err = capsys.readouterr().err
    assert str(data.resolve()) in err and "127.0.0.1:7001" in err and "127.0.0.1:7002" in err
    assert f"brokerctl --data-dir {data} --addr 127.0.0.1:7001 types" in err
    assert (data / "master.key").read_text() not in err


def test_run_config_error_is_reported_with_status_2(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def bad_key(settings: Settings) -> int:
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

    def fake_run(settings: Settings) -> int:
        ran.append(settings)
        return 7

    monkeypatch.setattr(cli, "_run", fake_run)
    assert cli.main(["serve", "--config", str(tmp_path / "broker.toml")]) == 7
    assert ran[0].storage_path == tmp_path / "b.db"


def test_command_is_required(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        cli.main([])
    assert info.value.code == 2
