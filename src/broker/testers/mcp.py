"""MCP tool servers: the connection test, tool discovery (the work is in `_mcp_client`), and
the tool definitions as the broker keeps them: scrubbed, with a hash of the scrubbed form.

The `mcp` SDK takes over half a second to import, so this module does not import
it: the CLIs start without it, the broker's start-up loads it in a thread with
`preload()` before its listeners open (so the import never competes with the first
calls), and the first test or discovery loads it if that has not happened yet.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import importlib
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from broker.model import McpTool
from broker.scrub import Scrubber, distinct

if TYPE_CHECKING:
    from types import ModuleType

    from broker.egress import EgressPolicy
    from broker.model import TestResult
    from broker.testers.base import Target

_CLIENT = "broker.testers._mcp_client"


def _client() -> ModuleType:
    return importlib.import_module(_CLIENT)


class ToolChanged(Exception):
    """The server no longer describes a tool as it was approved (`current` None: it is gone)."""

    def __init__(self, name: str, current: McpTool | None) -> None:
        super().__init__(f"tool {name!r} changed since it was approved")
        self.name, self.current = name, current


class ToolError(Exception):
    """A call the server answered with a JSON-RPC error instead of a result, or whose answer the
    broker cannot take. `reason` goes into the audit trail; `message` (scrubbed, one bounded line)
    is what the executor is told; `arguments`: the server refused the arguments."""

    def __init__(self, reason: str, message: str, *, arguments: bool = False) -> None:
        super().__init__(message)
        self.reason, self.message, self.arguments = reason, message, arguments


@dataclass(frozen=True)
class ToolCall:
    """A tool's result, scrubbed: its content items as JSON objects, `isError`, structured content."""

    content: list[Any]
    is_error: bool
    structured: Any


def tool_definition_hash(
    name: str,
    description: str,
    input_schema: Mapping[str, Any],
    *,
    title: str = "",
    annotations: Mapping[str, Any] | None = None,
    output_schema: Mapping[str, Any] | None = None,
    execution: Mapping[str, Any] | None = None,
) -> str:
    """SHA-256 hex of the canonical JSON of a tool's definition: what the server presents that
    changes what a call does or how a caller should judge it.

    Keys as the MCP spec spells them; `title`, `annotations`, `outputSchema` and `execution`
    only when the server gave them, so a tool without them hashes exactly as before they were
    kept (approvals of such tools survive the upgrade). `icons` and `_meta` are not part of it:
    neither is kept (see `_mcp_client._to_tool`).
    """
    definition: dict[str, Any] = {"name": name, "description": description, "inputSchema": input_schema}
    if title:
        definition["title"] = title
    optional = {"annotations": annotations, "outputSchema": output_schema, "execution": execution}
    definition |= {key: value for key, value in optional.items() if value is not None}
    canonical = json.dumps(definition, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode()).hexdigest()


def hashed(tool: McpTool) -> McpTool:
    """`tool` with the hash of its definition as it stands."""
    digest = tool_definition_hash(
        tool.name,
        tool.description,
        tool.input_schema,
        title=tool.title,
        annotations=tool.annotations,
        output_schema=tool.output_schema,
        execution=tool.execution,
    )
    return dataclasses.replace(tool, definition_hash=digest)


def scrub_tools(tools: Iterable[McpTool], scrubber: Scrubber) -> tuple[list[McpTool], int]:
    """The tools with every secret form masked (every text the server wrote: name, description,
    title, schemas, annotations, execution), and how many had one.

    A scrubbed tool's hash is of its scrubbed form, so it stays the same from one refresh to the
    next (even across a secret rotation) and change detection works on what is stored. A tool
    whose name held a secret keeps the masked name; names that collide once masked get `#2`...
    """
    kept: dict[str, McpTool] = {}
    redacted = 0
    for tool in tools:
        masked = dataclasses.replace(
            tool,
            name=scrubber.text(tool.name),
            description=scrubber.text(tool.description),
            input_schema=scrubber.json(tool.input_schema),
            title=scrubber.text(tool.title),
            annotations=_scrubbed_json(tool.annotations, scrubber),
            output_schema=_scrubbed_json(tool.output_schema, scrubber),
            execution=_scrubbed_json(tool.execution, scrubber),
        )
        redacted += masked != tool
        masked = dataclasses.replace(masked, name=distinct(masked.name, kept))
        if masked != tool:
            tool = hashed(masked)
        kept[tool.name] = tool
    return list(kept.values()), redacted


def _scrubbed_json(value: dict[str, Any] | None, scrubber: Scrubber) -> dict[str, Any] | None:
    if value is None:
        return None
    scrubbed: dict[str, Any] = scrubber.json(value)
    return scrubbed


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


async def call_tool(
    target: Target, egress: EgressPolicy, name: str, arguments: dict[str, Any], approved_hash: str
) -> ToolCall:
    """Call an approved tool if its definition is unchanged (`_mcp_client.call_tool`)."""
    result: ToolCall = await _client().call_tool(target, egress, name, arguments, approved_hash)
    return result
