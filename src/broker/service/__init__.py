"""Use-cases, no gRPC: the public face of the service layer.

Each service is given its collaborators at construction (`broker.server.build_services`
builds them in order) and names the store roles it uses (`broker.store.protocols`).
Helpers the services share among themselves (`lookup`, `paging`, `sealing`, ...) stay
in their modules.

Each name is imported from its module when first asked for, so importing one service
module (`broker keys` imports `service/keys.py`) does not load every use-case.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from broker.service.access import AccessService
    from broker.service.alerts import AlertSender, parse_target
    from broker.service.audit import AuditLog
    from broker.service.cache import ResolveCache
    from broker.service.connections import Clock, ConnectionPatch, ConnectionService, NewConnection, utc_now
    from broker.service.context import Call
    from broker.service.denials import DenialAudit
    from broker.service.keycheck import verify_keyring
    from broker.service.keys import MasterKeys
    from broker.service.leases import LeaseService
    from broker.service.monitor import Monitor
    from broker.service.oauth import DraftAuthorization, OAuthService
    from broker.service.proxy import ProxyService
    from broker.service.ratelimit import Limit, RateLimits
    from broker.service.rebind import rebind_legacy
    from broker.service.replicas import ReplicaChanges
    from broker.service.resolve import Released, Resolver
    from broker.service.testing import TestingService
    from broker.service.tokens import OAuthSettings, TokenRefresher
    from broker.service.upstream import UpstreamRequest

# Public name -> the module that defines it.
_MODULES = {
    "AccessService": "access",
    "AlertSender": "alerts",
    "AuditLog": "audit",
    "Call": "context",
    "Clock": "connections",
    "ConnectionPatch": "connections",
    "ConnectionService": "connections",
    "DenialAudit": "denials",
    "DraftAuthorization": "oauth",
    "LeaseService": "leases",
    "Limit": "ratelimit",
    "MasterKeys": "keys",
    "Monitor": "monitor",
    "NewConnection": "connections",
    "OAuthService": "oauth",
    "OAuthSettings": "tokens",
    "parse_target": "alerts",
    "ProxyService": "proxy",
    "RateLimits": "ratelimit",
    "rebind_legacy": "rebind",
    "Released": "resolve",
    "ReplicaChanges": "replicas",
    "ResolveCache": "cache",
    "Resolver": "resolve",
    "TestingService": "testing",
    "TokenRefresher": "tokens",
    "UpstreamRequest": "upstream",
    "utc_now": "connections",
    "verify_keyring": "keycheck",
}

__all__ = [
    "AccessService",
    "AlertSender",
    "AuditLog",
    "Call",
    "Clock",
    "ConnectionPatch",
    "ConnectionService",
    "DenialAudit",
    "DraftAuthorization",
    "LeaseService",
    "Limit",
    "MasterKeys",
    "Monitor",
    "NewConnection",
    "OAuthService",
    "OAuthSettings",
    "ProxyService",
    "RateLimits",
    "Released",
    "ReplicaChanges",
    "ResolveCache",
    "Resolver",
    "TestingService",
    "TokenRefresher",
    "UpstreamRequest",
    "parse_target",
    "rebind_legacy",
    "utc_now",
    "verify_keyring",
]


def __getattr__(name: str) -> object:
    module = _MODULES.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value  # asked once
    return value
