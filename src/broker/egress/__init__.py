"""The one outbound policy: every connection made on a user's behalf goes through it.

Addresses are checked after resolution, every DNS answer is checked, and the
connection goes to the checked address (TLS still verifies the hostname), so
DNS rebinding cannot slip a blocked address through.
"""

from broker.egress.policy import Blocked, DnsFailure, EgressPolicy, EgressSettings

__all__ = ["Blocked", "DnsFailure", "EgressPolicy", "EgressSettings"]
