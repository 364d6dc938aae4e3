"""Testers by connection type. Each module owns one kind of connection."""

from __future__ import annotations

from broker.testers import database, http, mcp, reachability, smtp, webhook
from broker.testers.base import Tester

TESTERS: dict[str, Tester] = {
    "database": database.test_database,
    "http": http.test_http,
    "api_key": http.test_api_key,
    "oauth2": http.test_oauth2,
    "webhook": webhook.test_webhook,
    "smtp": smtp.test_smtp,
    "mcp": mcp.test_mcp,
    "ssh": reachability.test_ssh,
    "aws": reachability.test_aws,
    "gcp": reachability.test_gcp,
    "azure": reachability.test_azure,
}
