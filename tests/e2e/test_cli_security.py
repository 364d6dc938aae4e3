"""`brokerctl security events` and `brokerctl reinstate` against `broker dev`, as a user would."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from tests.devbroker import DevBroker
from tests.devbroker import write as _write
from tests.helpers import free_port

pytestmark = pytest.mark.e2e

FAILED_TESTS = 5  # the default of [monitor] failed_tests


def test_suspension_by_failed_tests_then_reinstate(dev_broker: DevBroker, tmp_path: Path) -> None:
    password = _write(tmp_path / "pw", "pw-security-e2e")
    created, _ = dev_broker.ok(
        "create", "bastion", "--type", "ssh", "--config", "host=127.0.0.1", "--config", f"port={free_port()}",
        "--config", "username=u", "--secret", f"password=@{password}",
    )  # fmt: skip
    for _ in range(FAILED_TESTS):
        assert dev_broker.ctl("test", "bastion").returncode == 1
    events, _ = dev_broker.ok("security", "events", "--rule", "failed_tests", "--since", "1h")
    (event,) = events["events"]
    assert event["action"] == "connection_suspended" and event["connection_id"] == created["id"]
    got, _ = dev_broker.ok("get", created["id"])
    assert got["status"] == "CONNECTION_STATUS_SUSPENDED"

    human = subprocess.run(
        [*dev_broker.ctl_argv(json_output=False), "security", "events", "--connection", created["id"]],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert human.returncode == 0 and "failed_tests" in human.stdout and "SEVERITY" in human.stdout

    reinstated, _ = dev_broker.ok("reinstate", created["id"], "--reason", "port fixed")
    assert reinstated["status"] == "CONNECTION_STATUS_ACTIVE"
    audit, _ = dev_broker.ok("audit", "--action", "connection.reinstate")
    assert [e["reason"] for e in audit["events"]] == ["port fixed"]
    assert "pw-security-e2e" not in dev_broker.logs() and "pw-security-e2e" not in json.dumps(events)
