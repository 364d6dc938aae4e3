"""Start-up stays light: the broker's server module does not import the MCP SDK (half a second)."""

from __future__ import annotations

import subprocess
import sys


def test_importing_the_server_leaves_the_mcp_sdk_for_later() -> None:
    probe = "import sys, broker.server; print(sorted(m for m in sys.modules if m.split('.')[0] == 'mcp'))"
    argv = [sys.executable, "-c", probe]
    out = subprocess.run(argv, capture_output=True, text=True, check=True, timeout=60)
    assert out.stdout.strip() == "[]", out.stdout
