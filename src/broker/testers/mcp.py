"""MCP tool servers: the connection test and tool discovery (the work is in `_mcp_client`).

The `mcp` SDK takes over half a second to import, so this module does not import
it: the broker and the CLIs start without it, `preload()` loads it in a thread
once the broker serves, and the first test or discovery loads it if that has not
happened yet.
"""

from __future__ import annotations

import asyncio
import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from types import ModuleType

    from broker.egress import EgressPolicy
    from broker.model import McpTool, TestResult
    from broker.testers.base import Target

_CLIENT = "broker.testers._mcp_client"


def _client() -> ModuleType:
    return importlib.import_module(_CLIENT)


async def preload() -> None:
    """Import the MCP client off the event loop, so no call waits for it later."""
    await asyncio.to_thread(_client)


async def discover_tools(target: Target, egress: EgressPolicy) -> tuple[TestResult, list[McpTool]]:
    """Connect, initialize, list every tool and close the session (`_mcp_client.discover_tools`)."""
    result: tuple[TestResult, list[McpTool]] = await _client().discover_tools(target, egress)
    return result


async def test_mcp(target: Target, egress: EgressPolicy) -> TestResult:
    """Test an MCP connection: initialize, list every tool, close the session."""
    result: TestResult = await _client().test_mcp(target, egress)
    return result
