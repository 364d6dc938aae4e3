"""Nothing heavy after SERVING: the MCP SDK is imported before the listeners open, so its import
(about a second holding the GIL) never competes with the first calls."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

# A fresh interpreter (the suite's own has imported everything by now): start a broker, and as
# soon as start() returns (SERVING) list which heavy modules are loaded; then stop.
_PROBE = """
import asyncio, sys, tempfile
from pathlib import Path
from broker import pki
from broker.server import Broker
from tests.conftest import Identity, TestPki, write_settings

async def main():
    ca, ca_key = pki.create_ca("probe CA")
    test_pki = TestPki(ca, ca_key, Identity(*pki.issue_server_cert(ca, ca_key, ["127.0.0.1"])))
    with tempfile.TemporaryDirectory() as tmp:
        before = "mcp" in sys.modules
        broker = Broker(write_settings(Path(tmp), test_pki, log_level="warning"))
        await broker.start()
        loaded = sorted(m for m in ("mcp", "broker.testers._mcp_client") if m in sys.modules)
        await broker.stop(grace=0)
    print(before, ",".join(loaded))

asyncio.run(main())
"""


def test_the_mcp_sdk_is_loaded_by_the_time_the_broker_serves() -> None:
    out = subprocess.run(
        [sys.executable, "-c", _PROBE], capture_output=True, text=True, check=True, timeout=60, cwd=ROOT
    )
    assert out.stdout.splitlines()[-1].split() == ["False", "broker.testers._mcp_client,mcp"], out.stdout
