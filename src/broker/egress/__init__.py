"""The one outbound policy: every connection made on a user's behalf goes through it.

Host names are parsed the way the operating system would read them, addresses are
checked after resolution, every DNS answer is checked, and the connection goes to
the checked address (TLS still verifies the host name), so DNS rebinding cannot
slip a blocked address through.

    policy.py     EgressSettings, EgressPolicy (check_url, check_host, check_address, resolve)
    addresses.py  which ranges are always blocked, loopback, private, public
    hosts.py      parse_host, parse_url: what the user typed, normalised
    tcp.py        open_connection, resolve_one, pinned_tls_context (drivers, SMTP)
    http.py       http_client, request (checked redirects), read_body (byte cap), body_chunks

A user-given URL is read by `EgressPolicy.check_url` before any HTTP client sees it,
and the client gets the URL with the host in standard form (`Url.text`): an odd
spelling of an address is judged as that address on every path.
"""

from broker.egress.errors import Blocked, DnsFailure, InvalidTarget, ResponseTooLarge, UnreadableBody
from broker.egress.hosts import Url, parse_host, parse_url
from broker.egress.policy import EgressPolicy, EgressSettings

__all__ = [
    "Blocked",
    "DnsFailure",
    "EgressPolicy",
    "EgressSettings",
    "InvalidTarget",
    "ResponseTooLarge",
    "UnreadableBody",
    "Url",
    "parse_host",
    "parse_url",
]
