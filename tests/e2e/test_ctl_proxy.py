"""`brokerctl grant --mode proxy` and `brokerctl proxy` against a real `broker dev`."""

from __future__ import annotations

import json
from pathlib import Path

from tests.devbroker import DevBroker
from tests.devbroker import write as _write
from tests.httpservers import Answer, serve

EXECUTOR = "spiffe://broker.local/tenant/default/executor/demo"


def test_a_proxy_grant_goes_through_the_proxy_and_never_resolves(
    dev_broker: DevBroker, tmp_path: Path
) -> None:
    with serve(lambda seen: Answer.json({"ok": True})) as upstream:
        token = _write(tmp_path / "token", "tok-e2e-7788")
        config = ["--config", f"base_url={upstream.url}", "--config", "auth_type=bearer"]
        dev_broker.ok("create", "api", "--type", "http", *config, "--secret", f"token=@{token}")
        grant = dev_broker.ok(
            "grant", "api", EXECUTOR, "--mode", "proxy", "--method", "get", "--path", "/v1/"
        )[0]
        assert grant["mode"] == "GRANT_MODE_PROXY" and grant["scope"] == {
            "methods": ["GET"],
            "path_prefixes": ["/v1/"],
        }

        resolved = dev_broker.ctl("resolve", "api")
        assert resolved.returncode == 1 and json.loads(resolved.stderr)["code"] == "PERMISSION_DENIED"
        outside = dev_broker.ctl("proxy", "api", "DELETE", "/v1/x")
        assert outside.returncode == 1 and "scope" in json.loads(outside.stderr)["message"]
        # `broker dev` lets the egress policy reach loopback, so the call is made.
        made = dev_broker.ctl("proxy", "api", "GET", "/v1/x", "--query", "a=1", json_output=False)
        assert made.returncode == 0 and made.stdout == '{"ok": true}'
    [seen] = upstream.requests
    assert seen.path == "/v1/x?a=1" and seen.headers["authorization"] == "Bearer tok-e2e-7788"
    table = dev_broker.ctl("grants", json_output=False).stdout
    assert "proxy" in table and "methods=GET paths=/v1/" in table
