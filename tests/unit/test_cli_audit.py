"""`brokerctl audit verify` / `audit export` and `broker audit fingerprint`, without a server."""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path
from typing import Any

import pytest

from broker._proto import broker_pb2 as pb
from broker.cli import broker as broker_cli
from broker.cli import brokerctl
from broker.cli._ctl_args import build_parser
from broker.crypto import Kek
from broker.service.fingerprint import fingerprint
from tests.unit.test_cli_brokerctl import FakeSession

ID1 = "conn_00000000000000000000000001"  # the shape of a connection id: an id, not a name


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch) -> Any:
    def install(**replies: Any) -> FakeSession:
        session = FakeSession(replies)
        monkeypatch.setattr(brokerctl, "open_session", lambda args: session)
        return session

    return install


def test_plain_audit_still_lists_and_subcommands_parse() -> None:
    parser = build_parser()
    assert parser.parse_args(["audit", "--since", "1h"]).audit_command is None
    assert parser.parse_args(["audit", "verify", "--json"]).audit_command == "verify"
    args = parser.parse_args(["audit", "export", "--since", "30d", "--until", "1d", "--connection", ID1])
    assert (args.audit_command, args.since, args.until, args.connection) == ("export", "30d", "1d", ID1)


def test_export_needs_since(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args(["audit", "export"])
    assert exit_info.value.code == 2 and "--since" in capsys.readouterr().err


def test_verify_exit_status_follows_the_verdict(fake: Any, capsys: pytest.CaptureFixture[str]) -> None:
    fake(VerifyAuditLog=pb.VerifyAuditLogResponse(ok=True, events_checked=12))
    assert brokerctl.main(["audit", "verify"]) == 0
    assert "ok" in capsys.readouterr().out

    broken = pb.VerifyAuditLogResponse(ok=False, events_checked=7, first_broken_id=7, problem="edited")
    session = fake(VerifyAuditLog=broken)
    assert brokerctl.main(["audit", "verify"]) == 1
    assert "BROKEN at event 7: edited" in capsys.readouterr().out
    assert session.admin.calls[0][0] == "VerifyAuditLog"

    fake(VerifyAuditLog=broken)
    assert brokerctl.main(["audit", "verify", "--json"]) == 1
    assert json.loads(capsys.readouterr().out)["first_broken_id"] == 7


def test_export_writes_one_json_object_per_line(fake: Any, capsys: pytest.CaptureFixture[str]) -> None:
    events = [
        pb.AuditEvent(
            id=i, actor="a", action="connection.resolve", connection_id=ID1, prev_hash="p", hash="h"
        )
        for i in (1, 2, 3)
    ]
    session = fake(ExportAuditEvents=iter(events))
    assert brokerctl.main(["audit", "export", "--since", "1h", "--until", "10m", "--connection", ID1]) == 0
    [(method, request)] = session.admin.calls
    assert method == "ExportAuditEvents" and request.connection_id == ID1
    assert request.HasField("start_time") and request.HasField("end_time")
    assert request.start_time.ToDatetime() < request.end_time.ToDatetime()
    captured = capsys.readouterr()
    lines = captured.out.splitlines()
    assert [json.loads(line)["id"] for line in lines] == [1, 2, 3]
    assert json.loads(lines[0])["connection_id"] == ID1 and json.loads(lines[0])["prev_hash"] == "p"
    assert "exported 3 events" in captured.err


def test_export_rejects_a_bad_time(fake: Any, capsys: pytest.CaptureFixture[str]) -> None:
    session = fake()
    assert brokerctl.main(["audit", "export", "--since", "yesterday-ish"]) == 2
    assert not session.admin.calls


def test_broker_audit_fingerprint_prints_and_checks(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    raw = bytes(range(32))
    (tmp_path / "master.key").write_text(base64.b64encode(raw).decode())
    expected = fingerprint(Kek(raw), "the-token")

    monkeypatch.setattr("sys.stdin", io.StringIO("the-token\n"))
    assert broker_cli.main(["audit", "fingerprint", "--data-dir", str(tmp_path)]) == 0
    assert capsys.readouterr().out.strip() == expected

    monkeypatch.setattr("sys.stdin", io.StringIO("the-token\n"))
    assert broker_cli.main(["audit", "fingerprint", "--data-dir", str(tmp_path), "--check", expected]) == 0
    assert capsys.readouterr().out.startswith("match")

    monkeypatch.setattr("sys.stdin", io.StringIO("another-token"))
    assert broker_cli.main(["audit", "fingerprint", "--data-dir", str(tmp_path), "--check", expected]) == 1
    assert capsys.readouterr().out.startswith("no match")

    monkeypatch.setattr("sys.stdin", io.StringIO("the-token"))
    assert broker_cli.main(["audit", "fingerprint", "--data-dir", str(tmp_path), "--check", "nonsense"]) == 2
    assert "not a fingerprint" in capsys.readouterr().err
