"""Which class of rate limit each RPC takes a token of (`broker.service.ratelimit`).

`CallInterceptor` takes the token once the caller is authenticated, before the servicer runs,
so a refusal is mapped to RESOURCE_EXHAUSTED (with a RetryInfo hint) in the one error mapping.
It is not an interceptor of its own: a second layer per call was measurable on Resolve.
"""

from __future__ import annotations

# Method name -> class of call. Reads are not limited.
CLASSES = {
    "Resolve": "resolve",
    "ProxyHttp": "proxy",
    "ProxyHttpStream": "proxy",
    "CallMcpTool": "proxy",
    # Each makes a statement run on a database: paced like Resolve.
    "RenewLease": "resolve",
    "RevokeLease": "resolve",
    "TestConnection": "test",
    "DiscoverMcpTools": "test",
    "RefreshMcpTools": "test",
    **{
        name: "admin_write"
        for name in (
            "CreateConnection",
            "UpdateConnection",
            "DeleteConnection",
            "RestoreConnection",
            "PurgeConnection",
            "RevokeConnection",
            "ReinstateConnection",
            "GrantAccess",
            "RevokeAccess",
            "BeginAuthorization",
            "CompleteAuthorization",
            "RevokeLeases",
        )
    },
}
