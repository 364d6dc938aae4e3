"""gRPC adapters only: servicers, identity from the peer certificate, the interceptors, and
proto <-> domain conversion. The only layer (with server.py, client.py, cli/) that imports grpc.

The public face is what `broker.server` puts on a listener; `convert`, `identity` and the
handler wrapping stay in their modules.
"""

from broker.api.admin import AdminServicer
from broker.api.drain import DrainGate, stop_listeners
from broker.api.interceptors import CallInterceptor, current_call
from broker.api.proxy import ProxyServicer
from broker.api.resolve import ResolveServicer, resolve_public_part

__all__ = [
    "AdminServicer",
    "CallInterceptor",
    "DrainGate",
    "ProxyServicer",
    "ResolveServicer",
    "current_call",
    "resolve_public_part",
    "stop_listeners",
]
