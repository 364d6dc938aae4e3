"""The MCP tester against a real MCP server (the SDK's own) on loopback."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from broker import catalog, pki
from broker.catalog import MAX_JSON_DEPTH
from broker.egress import EgressPolicy, EgressSettings
from broker.model import McpTool, TestCategory, TestResult, TestStage
from broker.sensitive import SecretFields
from broker.testers import Target, run_discovery, run_tester
from broker.testers import _mcp_client as mcp_tester
from tests.helpers import free_port
from tests.mcpserver import SCHEMA, SERVER_NAME, SERVER_VERSION, McpTestServer, running

pytestmark = pytest.mark.integration

TOKEN = "mcp-token-0123456789-secret"


@pytest.fixture
def server() -> Iterator[McpTestServer]:
    with running() as started:
        yield started


@pytest.fixture
def json_server() -> Iterator[McpTestServer]:
    with running(json_response=True) as started:
        yield started


@pytest.fixture
def auth_server() -> Iterator[McpTestServer]:
    with running(token=TOKEN) as started:
        yield started


def _policy(**settings: Any) -> EgressPolicy:
    return EgressPolicy(EgressSettings(**{"allow_loopback": True, **settings}))


def _target(url: str, secrets: dict[str, str] | None = None, **config: Any) -> Target:
    valid = catalog.validate("mcp", "", {"server_url": url, **config}, secrets or {})
    return Target(valid.type, valid.provider, valid.config, SecretFields(valid.secrets))


async def _discover(target: Target, policy: EgressPolicy | None = None) -> tuple[TestResult, list[McpTool]]:
    """Discovery under the shared runner, the way the service calls it."""
    return await run_discovery(mcp_tester.discover_tools, target, policy or _policy())


async def _test(target: Target, policy: EgressPolicy | None = None) -> TestResult:
    return await run_tester(mcp_tester.test_mcp, target, policy or _policy())


def _assert_all_tools(result: TestResult, tools: list[McpTool]) -> None:
    assert result.success, result
    assert result.category is TestCategory.OK
    assert result.stage is TestStage.SAMPLE_OPERATION
    assert result.details["server_name"] == SERVER_NAME
    assert result.details["server_version"] == SERVER_VERSION
    assert result.details["protocol_version"]
    assert result.details["tool_count"] == "25"
    assert result.details["pages"] == "3"
    assert sorted(t.name for t in tools) == [f"tool_{i:02d}" for i in range(25)]
    first = next(t for t in tools if t.name == "tool_00")
    assert first.description == "Tool number 0."
    assert first.input_schema == SCHEMA
    assert len(first.definition_hash) == 64


async def test_streamable_http_sse_responses(server: McpTestServer) -> None:
    result, tools = await _discover(_target(server.url))

    _assert_all_tools(result, tools)
    assert server.list_calls == 3
    posts = [r for r in server.responses if r.method == "POST" and r.status == 200]
    assert posts and all(r.content_type.startswith("text/event-stream") for r in posts)


async def test_streamable_http_json_responses(json_server: McpTestServer) -> None:
    result, tools = await _discover(_target(json_server.url))

    _assert_all_tools(result, tools)
    posts = [r for r in json_server.responses if r.method == "POST" and r.status == 200]
    assert posts and all(r.content_type.startswith("application/json") for r in posts)


async def test_session_is_closed_with_delete(server: McpTestServer) -> None:
    result = await _test(_target(server.url))

    assert result.success, result
    session_ids = {s.session_id for s in server.seen if s.session_id}
    assert len(session_ids) == 1
    deletes = [s for s in server.seen if s.method == "DELETE"]
    assert [d.session_id for d in deletes] == list(session_ids)
    assert result.details["session_closed"] == "true"


async def test_legacy_sse_transport(server: McpTestServer) -> None:
    result, tools = await _discover(_target(server.sse_url, transport="sse"))

    _assert_all_tools(result, tools)
    assert result.details["transport"] == "sse"
    assert any(s.method == "GET" and s.path == "/sse" for s in server.seen)
    assert any(s.method == "POST" and s.path == "/messages/" for s in server.seen)
    assert not any(s.path == "/mcp" for s in server.seen)
    # The client hung up its event stream, so the server's session ended.
    for _ in range(100):
        if server.legacy_streams_closed:
            break
        await asyncio.sleep(0.02)
    assert server.legacy_streams_closed == 1


async def test_bearer_token_accepted(auth_server: McpTestServer) -> None:
    result = await _test(_target(auth_server.url, {"token": TOKEN}, auth_type="bearer"))

    assert result.success, result
    assert "credentials" in result.verified


async def test_bad_token_is_auth_failed(auth_server: McpTestServer) -> None:
    wrong = "wrong-token-987654321"
    result = await _test(_target(auth_server.url, {"token": wrong}, auth_type="bearer"))

    assert result.category is TestCategory.AUTH_FAILED, result
    assert result.stage is TestStage.AUTHENTICATE
    assert result.details["http_status"] == "401"
    assert wrong not in result.message and wrong not in str(result.details)


async def test_missing_token_on_legacy_sse_is_auth_failed(auth_server: McpTestServer) -> None:
    result = await _test(_target(auth_server.sse_url, transport="sse"))

    assert result.category is TestCategory.AUTH_FAILED, result
    assert result.details["http_status"] == "401"


async def test_html_page_is_protocol_error(server: McpTestServer) -> None:
    result = await _test(_target(f"{server.base}/html"))

    assert result.category is TestCategory.PROTOCOL_ERROR, result
    assert result.details["content_type"] == "text/html"
    assert "not an MCP server" in result.message


async def test_json_that_is_not_jsonrpc_is_protocol_error(server: McpTestServer) -> None:
    result = await _test(_target(f"{server.base}/notjsonrpc"))

    assert result.category is TestCategory.PROTOCOL_ERROR, result
    assert not result.success


async def test_unknown_path_is_not_found(server: McpTestServer) -> None:
    result = await _test(_target(f"{server.base}/nothing-here"))

    assert result.category is TestCategory.NOT_FOUND, result
    assert result.details["http_status"] == "404"


async def test_closed_port_is_connection_refused() -> None:
    result = await _test(_target(f"http://127.0.0.1:{free_port()}/mcp"))

    assert result.category is TestCategory.CONNECTION_REFUSED, result
    assert result.stage is TestStage.CONNECT


@pytest.mark.parametrize("transport", ["streamable_http", "sse"])
async def test_silent_server_is_timeout(transport: str) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        port = listener.getsockname()[1]

        result = await _test(
            _target(f"http://127.0.0.1:{port}/mcp", timeout_seconds=0.5, transport=transport)
        )

    assert result.category is TestCategory.TIMEOUT, result


@pytest.mark.parametrize("transport", ["streamable_http", "sse"])
async def test_runner_total_timeout_cancels_the_sdk(transport: str) -> None:
    # The runner's asyncio timeout must get through the SDK's anyio task groups.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        port = listener.getsockname()[1]
        target = _target(f"http://127.0.0.1:{port}/mcp", timeout_seconds=30, transport=transport)

        started = time.monotonic()
        result = await _test(target, _policy(total_timeout=0.5))

    assert result.category is TestCategory.TIMEOUT, result
    assert time.monotonic() - started < 5


async def test_loopback_blocked_sends_nothing(server: McpTestServer) -> None:
    result, tools = await _discover(_target(server.url), _policy(allow_loopback=False))

    assert result.category is TestCategory.BLOCKED_BY_POLICY, result
    assert result.stage is TestStage.RESOLVE_ADDRESS
    assert tools == []
    assert server.seen == []


async def test_tls_to_plain_server_is_tls_error(server: McpTestServer) -> None:
    result = await _test(_target(f"https://127.0.0.1:{server.port}/mcp"))

    assert result.category is TestCategory.TLS_ERROR, result
    assert result.stage is TestStage.TLS


async def test_untrusted_certificate_is_tls_error(tmp_path: Path) -> None:
    ca, ca_key = pki.create_ca("not a trusted CA")
    cert, key = pki.issue_server_cert(ca, ca_key, ["127.0.0.1"])
    certfile, keyfile = tmp_path / "server.pem", tmp_path / "server.key"
    certfile.write_bytes(cert)
    keyfile.write_bytes(key)
    with running(tls=(str(certfile), str(keyfile))) as tls_server:
        result = await _test(_target(tls_server.url))

        assert result.category is TestCategory.TLS_ERROR, result
        assert result.stage is TestStage.TLS
        assert not any(s.path == "/mcp" for s in tls_server.seen)


async def test_hash_changes_only_when_a_definition_changes(server: McpTestServer) -> None:
    _, before = await _discover(_target(server.url))
    _, again = await _discover(_target(server.url))
    server.descriptions["tool_07"] = "Tool number 7, now also deletes everything."
    _, after = await _discover(_target(server.url))

    hashes = [{t.name: t.definition_hash for t in tools} for tools in (before, again, after)]
    assert hashes[0] == hashes[1]
    changed = {name for name in hashes[0] if hashes[0][name] != hashes[2][name]}
    assert changed == {"tool_07"}


def test_definition_hash_is_canonical_json() -> None:
    digest = mcp_tester.tool_definition_hash("t", "é", {"b": 1, "a": [1, 2]})
    canonical = '{"description":"é","inputSchema":{"a":[1,2],"b":1},"name":"t"}'
    assert digest == hashlib.sha256(canonical.encode()).hexdigest()
    assert digest != mcp_tester.tool_definition_hash("t", "e", {"b": 1, "a": [1, 2]})


async def test_forbidden_is_permission_denied() -> None:
    with running(token=TOKEN, reject_status=403) as forbidding:
        result = await _test(_target(forbidding.url, {"token": TOKEN + "x"}, auth_type="bearer"))

    assert result.category is TestCategory.PERMISSION_DENIED, result
    assert result.details["http_status"] == "403"


async def test_api_key_and_basic_auth_headers_are_sent(server: McpTestServer) -> None:
    api_key = _target(
        server.url, {"api_key": "key-0123456789"}, auth_type="api_key", api_key_header="X-Mcp-Key"
    )
    basic = _target(server.url, {"password": "pw-0123456789"}, auth_type="basic", username="robot")

    assert (await _test(api_key)).success
    assert (await _test(basic)).success

    keys = {s.headers.get("x-mcp-key") for s in server.seen}
    assert "key-0123456789" in keys
    expected = "Basic " + base64.b64encode(b"robot:pw-0123456789").decode()
    assert expected in {s.headers.get("authorization") for s in server.seen}


async def test_legacy_sse_blocked_sends_nothing(server: McpTestServer) -> None:
    result = await _test(_target(server.sse_url, transport="sse"), _policy(allow_loopback=False))

    assert result.category is TestCategory.BLOCKED_BY_POLICY, result
    assert server.seen == []


async def test_environment_proxy_is_not_used(server: McpTestServer, monkeypatch: pytest.MonkeyPatch) -> None:
    # A proxy from the environment would carry the traffic past the egress policy; it must be ignored.
    dead = f"http://127.0.0.1:{free_port()}"
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "all_proxy"):
        monkeypatch.setenv(name, dead)

    for target in (_target(server.url), _target(server.sse_url, transport="sse")):
        assert (await _test(target)).success


async def test_too_many_pages_is_unexpected_response() -> None:
    with running(tool_count=mcp_tester.MAX_PAGES + 5, page_size=1) as paging:
        result, tools = await _discover(_target(paging.url))

    assert result.category is TestCategory.UNEXPECTED_RESPONSE, result
    assert result.stage is TestStage.SAMPLE_OPERATION
    assert tools == []
    assert paging.list_calls == mcp_tester.MAX_PAGES


async def test_repeated_cursor_is_protocol_error() -> None:
    with running(loop_cursor=True) as looping:
        result = await _test(_target(looping.url))

    assert result.category is TestCategory.PROTOCOL_ERROR, result
    assert "cursor" in result.message
    assert looping.list_calls == 2


async def test_oversized_response_is_unexpected_response(server: McpTestServer) -> None:
    result = await _test(_target(server.url), _policy(max_response_bytes=1500))

    assert result.category is TestCategory.UNEXPECTED_RESPONSE, result
    assert "too large" in result.message


async def test_a_tool_described_deeper_than_the_brokers_clients_can_read_fails_discovery() -> None:
    """Stored, it would make every tool listing unreadable to a protobuf client (100 messages deep)."""
    deep: dict[str, Any] = {"type": "object"}
    for _ in range(MAX_JSON_DEPTH // 2 + 1):  # two JSON levels each: {"properties": {"a": ...}}
        deep = {"type": "object", "properties": {"a": deep}}
    with running(tool_count=2, metadata={"tool_01": {"output_schema": deep}}) as server:
        result, tools = await _discover(_target(server.url))
    assert not result.success and result.category is TestCategory.PROTOCOL_ERROR
    assert "'tool_01'" in result.message and f"more than {MAX_JSON_DEPTH} levels" in result.message
    assert tools == []
