"""What an admin reads when an MCP connection's `oauth_connection` is for another URL.

The usual mistake with development servers is one URL spelled two ways (`localhost` and
`127.0.0.1`): the refusal must show both, within the bounded size of a field violation, so the
admin sees the difference without reading the oauth2 connection.
"""

from __future__ import annotations

import grpc
import pytest

from broker._proto import broker_pb2 as pb
from broker.errors import MAX_DESCRIPTION_CHARS
from tests.conftest import Running
from tests.helpers import field_violations, rpc_error, struct
from tests.integration import test_mcp_oauth_link as link
from tests.integration.test_oauth_flow import authorize

pytestmark = pytest.mark.integration

start, clock, broker, servers = link.start, link.clock, link.broker, link.servers


async def test_a_link_for_another_spelling_of_the_url_names_both_unclipped(
    broker: Running, servers: link.Servers
) -> None:
    oauth = await authorize(broker, servers.auth, resource=[servers.mcp.url])
    other = servers.mcp.url.replace("127.0.0.1", "localhost")
    config = {"server_url": other, "auth_type": "oauth2", "oauth_connection": "calendar"}
    request = pb.CreateConnectionRequest(name="t", type="mcp", config=struct(config))
    error = await rpc_error(broker.admin().CreateConnection(request))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    said = field_violations(error)["config.oauth_connection"]
    assert servers.mcp.url in said and other in said and oauth.id in said, said
    assert len(said) < MAX_DESCRIPTION_CHARS and not said.endswith("..."), said
