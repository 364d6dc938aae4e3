"""What every use-case needs to know about the call it serves."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from broker.model import AuditEvent, Outcome, Principal


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

    def audit_event(
        self,
        time: datetime,
        action: str,
        connection_id: str,
        outcome: Outcome = Outcome.SUCCEEDED,
        reason: str = "",
        details: dict[str, str] | None = None,
    ) -> AuditEvent:
        """The audit event for something this call did (work of the broker's own: `system_event`)."""
        return AuditEvent(
            time=time,
            tenant=self.tenant,
            actor=self.actor,
            action=action,
            outcome=outcome,
            connection_id=connection_id,
            reason=reason,
            request_id=self.request_id,
            peer=self.peer,
            details=details or {},
        )


def system_event(
    time: datetime,
    actor: str,
    tenant: str,
    connection_id: str,
    action: str,
    outcome: Outcome = Outcome.SUCCEEDED,
    reason: str = "",
    details: dict[str, str] | None = None,
) -> AuditEvent:
    """The audit event for work the broker did by itself (`actor` is `broker:<part>`): no caller,
    so no request id and no peer."""
    return AuditEvent(
        time=time,
        tenant=tenant,
        actor=actor,
        action=action,
        outcome=outcome,
        connection_id=connection_id,
        reason=reason,
        details=details or {},
    )
