"""`brokerctl audit verify` and `audit export` against a real `broker dev`, as an operator would run them."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

from tests.devbroker import DevBroker


def test_verify_then_export_then_catch_an_edit(dev_broker: DevBroker, tmp_path: Path) -> None:
    secret = tmp_path / "pw.txt"
    secret.write_text("e2e-audit-pw\n")
    config = ["--config", "driver=postgresql", "--config", "host=db", "--config", "database=app"]
    for name in ("audit-a", "audit-b"):
        dev_broker.ok(
            "create",
            name,
            "--type",
            "database",
            *config,
            "--config",
            "username=app",
            "--secret",
            f"password=@{secret}",
        )

    report, _ = dev_broker.ok("audit", "verify")
    assert report["ok"] is True and int(report["events_checked"]) == 2

    export = dev_broker.ctl("audit", "export", "--since", "1h")
    assert export.returncode == 0, export.stderr
    lines = [json.loads(line) for line in export.stdout.splitlines()]
    assert [e["action"] for e in lines] == ["connection.create", "connection.create"]
    assert lines[1]["prev_hash"] == lines[0]["hash"] and "e2e-audit-pw" not in export.stdout
    assert "exported 2 events" in export.stderr

    with sqlite3.connect(dev_broker.data_dir / "broker.db") as db:
        db.execute("UPDATE audit_events SET actor = 'someone else' WHERE id = 2")
    db.close()
    broken = dev_broker.ctl("audit", "verify")
    assert broken.returncode == 1
    assert json.loads(broken.stdout)["first_broken_id"] == 2
