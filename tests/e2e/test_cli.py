"""End to end, as a user would: `broker dev` in a subprocess, driven by `brokerctl --json`.

A canary password goes in through `--secret password=@file` and must come out only
through `resolve`: never in list or audit output, the server's logs, or the database file.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from broker import keydir, pki
from broker.client import SyncResolveClient
from tests import mcpserver, oauthserver
from tests.devbroker import DevBroker, wait_until_serving
from tests.devbroker import write as _write
from tests.helpers import free_port

pytestmark = pytest.mark.e2e

CANARY = "canary-e2e-4b1f9c0d-do-not-leak"
EXECUTOR = "spiffe://broker.local/tenant/default/executor/demo"
ADMIN = "spiffe://broker.local/tenant/default/admin/cli"
STOP_TIMEOUT = 25.0


def test_secret_lifecycle_through_the_cli(dev_broker: DevBroker, tmp_path: Path) -> None:
    secret_file = tmp_path / "password.txt"
    secret_file.write_text(CANARY + "\n")
    seen: list[str] = []  # every byte brokerctl printed, except resolve's

    types, raw = dev_broker.ok("types")
    assert "database" in {t["name"] for t in types["types"]}

    created, raw = dev_broker.ok(
        "create",
        "e2e-db",
        "--type",
        "database",
        "--config",
        "driver=postgresql",
        "--config",
        "host=db.internal",
        "--config",
        "database=app",
        "--config",
        "username=app",
        "--secret",
        f"password=@{secret_file}",
        "--label",
        "suite=e2e",
    )
    seen.append(raw)
    connection_id = created["id"]
    assert created["secret_fields"] == ["password"]

    listed, raw = dev_broker.ok("list")
    seen.append(raw)
    assert [c["id"] for c in listed["connections"]] == [connection_id]

    got, raw = dev_broker.ok("get", connection_id)
    seen.append(raw)
    assert got["name"] == "e2e-db"

    grant, raw = dev_broker.ok("grant", connection_id, EXECUTOR, "--expires-in", "1h")
    seen.append(raw)
    assert grant["principal"] == EXECUTOR

    resolved, _ = dev_broker.ok("resolve", connection_id, "--purpose", "e2e test")
    assert resolved["secrets"] == {"password": CANARY}
    by_name, _ = dev_broker.ok("resolve", "e2e-db", "--by-name")
    assert by_name["connection_id"] == connection_id

    # The executor SDK sees the same thing through its own channel.
    tls = dev_broker.data_dir / "tls"
    with SyncResolveClient(
        dev_broker.resolve_addr, ca=tls / "ca.pem", cert=tls / "executor.pem", key=tls / "executor-key.pem"
    ) as client:
        assert client.resolve(name="e2e-db", purpose="sdk").secrets == {"password": CANARY}

    audit, raw = dev_broker.ok("audit", "--connection", connection_id)
    seen.append(raw)
    actors = {e.get("actor") for e in audit["events"]}
    assert len(audit["events"]) >= 3, audit  # create, grant, resolve at least
    assert ADMIN in actors and EXECUTOR in actors, actors

    grants, raw = dev_broker.ok("grants", "--connection", connection_id)
    seen.append(raw)
    assert [g["principal"] for g in grants["grants"]] == [EXECUTOR]

    # A bad request gets a field-level error and leaks nothing.
    bad = dev_broker.ctl("create", "bad-db", "--type", "database", "--secret", f"password=@{secret_file}")
    assert bad.returncode == 1 and "INVALID_ARGUMENT" in bad.stderr
    seen.append(bad.stdout + bad.stderr)

    for text in seen:
        assert CANARY not in text

    dev_broker.process.send_signal(signal.SIGTERM)
    assert dev_broker.process.wait(timeout=STOP_TIMEOUT) == 0, dev_broker.logs()
    assert CANARY not in dev_broker.logs()
    for path in dev_broker.data_dir.glob("broker.db*"):
        assert CANARY.encode() not in path.read_bytes(), path.name


def test_testing_and_mcp_tools_through_the_cli(dev_broker: DevBroker, tmp_path: Path) -> None:
    """`broker dev` allows loopback, so a local MCP server is reachable; metadata never is."""
    token = "e2e-mcp-token-5f1c2a9b"
    with mcpserver.running(token=token) as server:
        dev_broker.ok(
            "create", "tools", "--type", "mcp", "--config", f"server_url={server.url}",
            "--config", "auth_type=bearer", "--secret", f"token={token}", "--test",
        )  # fmt: skip
        plain = dev_broker.ctl("test", "tools")
        assert plain.returncode == 0, plain.stderr
        result = json.loads(plain.stdout)
        assert result["success"] and result["details"]["server_name"] == mcpserver.SERVER_NAME

        refreshed, raw = dev_broker.ok("mcp", "refresh", "tools")
        assert len(refreshed["added"]) == 25
        tools, raw = dev_broker.ok("mcp", "tools", "tools")
        assert len(tools["tools"]) == 25 and token not in raw

        human = subprocess.run(
            [*dev_broker.ctl_argv(json_output=False), "mcp", "tools", "tools"],
            capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
        assert human.returncode == 0 and "tool_00" in human.stdout and "PARAMETERS" in human.stdout

    blocked = dev_broker.ctl(
        "test", "--draft", "--type", "http", "--config", "base_url=http://169.254.169.254/latest/meta-data/"
    )
    assert blocked.returncode == 1
    assert json.loads(blocked.stdout)["category"] == "TEST_CATEGORY_BLOCKED_BY_POLICY"
    password = _write(tmp_path / "pw", "pw-123456")
    failing = dev_broker.ctl(
        "create", "refused", "--type", "ssh", "--config", "host=127.0.0.1", "--config", f"port={free_port()}",
        "--config", "username=u", "--secret", f"password=@{password}", "--test",
    )  # fmt: skip
    assert failing.returncode == 1 and "FAILED_PRECONDITION" in failing.stderr
    assert "connection_refused" in failing.stderr
    listed, _ = dev_broker.ok("list", "--name-prefix", "refused")
    assert listed.get("connections", []) == []
    assert token not in dev_broker.logs()


def test_oauth_connect_through_the_browser_redirect(dev_broker: DevBroker, tmp_path: Path) -> None:
    """`brokerctl oauth connect` prints the URL, catches the redirect on loopback, and completes."""
    with oauthserver.running() as server:
        secret = _write(tmp_path / "client-secret", server.client_secret)
        argv = [
            *dev_broker.ctl_argv(), "oauth", "connect", "calendar", "--provider", "custom",
            "--config", f"client_id={server.client_id}", "--config", f"authorize_url={server.authorize_url}",
            "--config", f"token_url={server.token_url}", "--secret", f"client_secret=@{secret}",
            "--scope", "calendar", "--wait", "30",
        ]  # fmt: skip
        process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            url = ""
            assert process.stderr is not None
            for line in process.stderr:
                if line.strip().startswith("http"):
                    url = line.strip()
                    break
            assert url.startswith(server.authorize_url)
            # The browser: the provider approves and redirects to brokerctl's loopback listener.
            landed = httpx.get(url, follow_redirects=True, timeout=10)
            assert landed.status_code == 200 and "close this window" in landed.text
            out, err = process.communicate(timeout=30)
        finally:
            if process.poll() is None:
                process.kill()
                process.communicate()
        assert process.returncode == 0, err
        created = json.loads(out)
        assert created["type"] == "oauth2" and created["status"] == "CONNECTION_STATUS_ACTIVE"
        assert server.client_secret not in out + err
        assert server.token_requests["authorization_code"] == 1


def test_master_key_rotation_through_brokerctl(tmp_path: Path) -> None:
    """`broker serve` with a key directory and the dev admin as operator; `brokerctl keys rotate`."""
    data_dir = tmp_path / "dev"
    pki.ensure_dev_layout(data_dir)
    tls, key_dir = data_dir / "tls", tmp_path / "keys"
    old = keydir.init(key_dir, [])
    admin, resolve = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
    config = _write(
        tmp_path / "broker.toml",
        f'[listen]\nadmin = "{admin}"\nresolve = "{resolve}"\n'
        f'[tls]\ncert = "{tls / "server.pem"}"\nkey = "{tls / "server-key.pem"}"\n'
        f'client_ca = "{tls / "ca.pem"}"\n[storage]\npath = "{tmp_path / "broker.db"}"\n'
        f'[master_key]\ndir = "{key_dir}"\noperators = ["{ADMIN}"]\n[metrics]\nlisten = ""\n',
    )
    stdout, stderr = tmp_path / "broker.out", tmp_path / "broker.err"
    argv = [sys.executable, "-m", "broker.cli.broker", "serve", "--config", str(config)]
    with stdout.open("wb") as out, stderr.open("wb") as err:
        process = subprocess.Popen(argv, stdout=out, stderr=err, cwd=tmp_path)
    broker = DevBroker(process, data_dir, admin, resolve, stdout, stderr)
    try:
        wait_until_serving(broker)
        rotated, raw = broker.ok("keys", "rotate")
        assert rotated["previous_kek_id"] == old.id and rotated["active_kek_id"] != old.id
        assert keydir.active_id(key_dir) == rotated["active_kek_id"]
        assert rotated["deks_by_kek"] == {old.id: 1}  # the store's key-check canary
        assert "broker keys rewrap" in raw

        text = subprocess.run(
            [*broker.ctl_argv(json_output=False), "keys", "rotate"],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert text.returncode == 0, text.stderr
        newest = keydir.active_id(key_dir)
        assert text.stdout.splitlines()[:2] == [
            f"active key:    {newest}",
            f"previous key:  {rotated['active_kek_id']}",
        ]
        events, _ = broker.ok("audit", "--action", "master_key.rotate")
        assert [e["details"]["kek_id"] for e in events["events"]] == [newest, rotated["active_kek_id"]]
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=10)


def test_lease_commands_exit_statuses(dev_broker: DevBroker) -> None:
    # No dynamic connection needed: the listing, the refusals and their statuses, as for other commands.
    listed, _ = dev_broker.ok("leases", "--state", "active")
    assert listed == {}  # no leases: proto3 JSON leaves the empty list out
    table = dev_broker.ctl("leases", json_output=False)
    assert table.returncode == 0 and table.stdout.split()[:3] == ["ID", "CONNECTION", "PRINCIPAL"]
    unknown = dev_broker.ctl("lease", "revoke", "lease_nope")
    assert unknown.returncode == 1 and json.loads(unknown.stderr)["code"] == "NOT_FOUND"
    nothing = dev_broker.ctl("leases", "revoke")
    assert nothing.returncode == 2 and json.loads(nothing.stderr)["code"] == "USAGE"
    bad_state = dev_broker.ctl("leases", "--state", "gone")
    assert bad_state.returncode == 2 and json.loads(bad_state.stderr)["code"] == "USAGE"
    unknown_connection = dev_broker.ctl("leases", "revoke", "--connection", "no-such-db")
    assert unknown_connection.returncode == 1 and json.loads(unknown_connection.stderr)["code"] == "NOT_FOUND"
    queued, _ = dev_broker.ok("leases", "revoke", "--run-id", "nobody")
    assert queued == {"revoked": 0}


def test_ungrant_all_cuts_a_principal_off_every_connection(dev_broker: DevBroker, tmp_path: Path) -> None:
    other = "spiffe://broker.local/tenant/default/executor/other"
    password = f"password=@{_write(tmp_path / 'pw', 'pw')}"
    config = ["--type", "database", "--config", "driver=postgresql", "--config", "host=db.internal"]
    config += ["--config", "database=app", "--config", "username=app", "--secret", password]
    names = [f"cut-{i}" for i in range(3)]
    for name in names:
        dev_broker.ok("create", name, *config)
        dev_broker.ok("grant", name, EXECUTOR)
        assert dev_broker.ok("resolve", name)[0]["secrets"] == {"password": "pw"}
    dev_broker.ok("grant", names[0], other)

    cut = dev_broker.ctl("ungrant", "--all", EXECUTOR, json_output=False)
    assert (cut.returncode, cut.stdout) == (
        0,
        f"{EXECUTOR} can no longer use any connection: removed 3 grants; its leases end with them\n",
    )
    for name in names:
        refused = dev_broker.ctl("resolve", name)
        assert refused.returncode == 1 and json.loads(refused.stderr)["code"] == "PERMISSION_DENIED"
    assert "grants" not in dev_broker.ok("grants", "--principal", EXECUTOR)[0]  # none left
    kept = dev_broker.ok("grants", "--principal", other)[0]["grants"]
    assert [g["principal"] for g in kept] == [other]
    audit = dev_broker.ok("audit", "--action", "grant.revoke")[0]["events"]
    assert len(audit) == 3 and {e["details"]["every_connection"] for e in audit} == {"true"}

    # Again: nothing left is no error, and a script reads the 0.
    assert dev_broker.ok("ungrant", "--all", EXECUTOR)[0] == {"grants_removed": 0}
    again = dev_broker.ctl("ungrant", "--all", EXECUTOR, json_output=False)
    assert again.stdout == f"{EXECUTOR} held no grants; nothing removed\n"
    # A malformed principal: the broker names the field; a connection with --all: usage.
    bad = dev_broker.ctl("ungrant", "--all", "demo")
    assert bad.returncode == 1
    assert [v["field"] for v in json.loads(bad.stderr)["violations"]] == ["principal"]
    both = dev_broker.ctl("ungrant", "--all", names[1], other)
    assert both.returncode == 2 and json.loads(both.stderr)["code"] == "USAGE"
    assert [g["principal"] for g in dev_broker.ok("grants")[0]["grants"]] == [other]


def test_numbers_and_invisible_characters_arrive_and_show_as_typed(
    dev_broker: DevBroker, tmp_path: Path
) -> None:
    exact = 2**53 - 1  # the largest integer a request's number (a double) carries exactly
    key = ["--type", "custom", "--secret", f"k=@{_write(tmp_path / 'k', 'v')}"]
    created, _ = dev_broker.ok(
        "create", "ids", *key, "--config", f"account={exact}", "--config-json", f'{{"n": [-{exact}, 0.5]}}'
    )
    assert created["config"] == {"account": exact, "n": [-exact, 0.5]}
    assert type(created["config"]["account"]) is int

    # An integer a double cannot hold is refused before anything is sent, naming where it is.
    refusals = {
        "--config account": ("create", "ids2", *key, "--config", f"account={2**53 + 1}"),
        "--config-json n[1]": ("update", "ids", "--config-json", f'{{"n": [1, {2**70}]}}'),
        "--config huge": ("update", "ids", "--config", f"huge={10**400}"),
        "--config-json": ("update", "ids", "--config-json", "[" * 5000 + "]" * 5000),
        "--config deep": ("update", "ids", "--config", "deep=" + '{"a":' * 40 + "1" + "}" * 40),
        "--config-json a.a": ("update", "ids", "--config-json", '{"a":' * 900 + "1" + "}" * 900),
    }
    for where, argv in refusals.items():
        refused = dev_broker.ctl(*argv)
        error = json.loads(refused.stderr)
        assert (refused.returncode, error["code"]) == (2, "USAGE"), refused.stderr
        assert error["message"].startswith(where) or f" {where}" in error["message"], error["message"]
        assert "Traceback" not in refused.stderr

    # What reaches the broker anyway (a float beyond 2**53, half a port) is INVALID_ARGUMENT naming the field.
    beyond = dev_broker.ctl("update", "ids", "--config", "account=1e300")
    assert beyond.returncode == 1
    assert [v["field"] for v in json.loads(beyond.stderr)["violations"]] == ["config.account"]
    half = dev_broker.ctl(
        "create", "db", "--type", "database", "--config", "driver=postgresql", "--config", "host=db.internal",
        "--config", "database=app", "--config", "username=app", "--config", "port=5432.5",
        "--secret", f"password=@{_write(tmp_path / 'pw', 'pw')}",
    )  # fmt: skip
    assert half.returncode == 1
    assert {v["field"]: v["description"] for v in json.loads(half.stderr)["violations"]} == {
        "config.port": "must be an integer"
    }
    assert dev_broker.ok("get", "ids")[0]["config"] == {"account": exact, "n": [-exact, 0.5]}
    assert [c["name"] for c in dev_broker.ok("list")[0]["connections"]] == ["ids"]

    # A zero-width space makes "ops\u200bteam" look like "opsteam": shown escaped, and refused in a label.
    dev_broker.ok("update", "ids", "--config", "owner=ops\u200bteam\u200e")
    shown = dev_broker.ctl("get", "ids", json_output=False)
    assert shown.returncode == 0 and "ops\\u200bteam\\u200e" in shown.stdout, shown.stdout
    assert "\u200b" not in shown.stdout and "\u200e" not in shown.stdout
    label = dev_broker.ctl("update", "ids", "--label", "team=ops\u200b")
    assert label.returncode == 1
    assert [v["field"] for v in json.loads(label.stderr)["violations"]] == ["labels.team"]
