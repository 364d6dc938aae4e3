"""What every use-case needs to know about the call it serves."""

from __future__ import annotations

from dataclasses import dataclass

from broker.model import Principal


@dataclass(frozen=True, slots=True)
class Call:
    """The verified caller plus what the audit trail records about the call."""

    principal: Principal
    request_id: str = ""
    peer: str = ""

    @property
    def tenant(self) -> str:
        return self.principal.tenant

    @property
    def actor(self) -> str:
        return self.principal.spiffe_id
