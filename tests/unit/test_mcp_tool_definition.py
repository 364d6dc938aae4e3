"""The definition hash an approval pins (`testers.mcp.tool_definition_hash`): what it covers, its
canonical form, and that a tool with none of the newer keys hashes exactly as it always did."""

from __future__ import annotations

from typing import Any

from broker.model import McpTool
from broker.scrub import MASK, Scrubber
from broker.testers.mcp import hashed, scrub_tools, tool_definition_hash

SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {"x": {"type": "integer", "description": "a number"}},
    "required": ["x"],
}
# Computed by the function before it covered title, annotations, outputSchema and execution
# (name, description and inputSchema only): stored approvals of such tools must still match.
VECTORS = [
    (
        ("tool_00", "Tool number 0.", SCHEMA),
        "2f6fec7db680b0ec97d7febc1eccb799e76d8375d3a119a8a975e69edcf52861",
    ),
    (
        ("tool_02", "Tool number 2.", SCHEMA),
        "e6521d4f32cf445be0d15e7940daa5cb215e981408cd17d218b6ce537931a0de",
    ),
    (
        ("lookup", "Finds — a thing", {"type": "object"}),
        "6bd7f72cda9af235d115ea95ae87ac2669b1a44d2a246cfdcfba0727a4220365",
    ),
]


def test_a_tool_without_the_newer_keys_hashes_as_before() -> None:
    for (name, description, schema), expected in VECTORS:
        assert tool_definition_hash(name, description, schema) == expected
        # Absent and empty are the same statement: no title, no annotations, no execution.
        assert tool_definition_hash(name, description, schema, title="") == expected
        assert hashed(McpTool(name, description, schema, "")).definition_hash == expected


def test_each_newer_key_is_covered_and_the_form_is_canonical() -> None:
    base = tool_definition_hash("t", "d", SCHEMA)
    variants = {
        "title": {"title": "T"},
        "annotations": {"annotations": {"destructiveHint": False}},
        "annotations changed": {"annotations": {"destructiveHint": True}},
        "empty annotations": {"annotations": {}},
        "outputSchema": {"output_schema": {"type": "object"}},
        "execution": {"execution": {"taskSupport": "required"}},
    }
    hashes = {key: tool_definition_hash("t", "d", SCHEMA, **extra) for key, extra in variants.items()}
    assert base not in hashes.values() and len(set(hashes.values())) == len(variants)
    # Key order is not part of the definition.
    shuffled = {"openWorldHint": True, "readOnlyHint": False}
    assert tool_definition_hash("t", "d", SCHEMA, annotations=shuffled) == tool_definition_hash(
        "t", "d", SCHEMA, annotations=dict(reversed(shuffled.items()))
    )


def test_a_task_required_tool_says_why_it_is_not_callable() -> None:
    for support, callable_ in (("", True), ("forbidden", True), ("optional", True), ("required", False)):
        tool = McpTool("t", "d", SCHEMA, "", execution={"taskSupport": support} if support else None)
        assert tool.task_support == support
        assert (tool.not_callable == "") is callable_
    assert (
        "does not run MCP tasks"
        in McpTool("t", "d", SCHEMA, "", execution={"taskSupport": "required"}).not_callable
    )


def test_the_title_annotations_and_output_schema_are_scrubbed_and_hashed_scrubbed() -> None:
    secret = "tok-meta-4411"
    leaky = hashed(
        McpTool(
            "t",
            "d",
            SCHEMA,
            "",
            title=f"Uses {secret}",
            annotations={"title": f"With {secret}", "readOnlyHint": True},
            output_schema={"type": "object", "properties": {secret: {"type": "string"}}},
            execution={"taskSupport": "optional"},
        )
    )
    [masked], redacted = scrub_tools([leaky], Scrubber([secret]))
    assert redacted == 1
    assert masked.title == f"Uses {MASK}"
    assert masked.annotations == {"title": f"With {MASK}", "readOnlyHint": True}
    assert masked.output_schema == {"type": "object", "properties": {MASK: {"type": "string"}}}
    assert masked.execution == {"taskSupport": "optional"}
    assert masked.definition_hash == hashed(masked).definition_hash != leaky.definition_hash
    assert secret not in repr(masked)
