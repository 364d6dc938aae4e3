"""`metrics.set_connection_counts`: a (type, status) pair that is no longer counted reads 0.

Zeroed, not removed, so the same code is right in one process and in the multiprocess mode of
`broker serve --workers`, where a label set cannot be removed from the shared files.
"""

from __future__ import annotations

from broker import metrics


def _value(type_: str, status: str) -> float | None:
    return metrics.REGISTRY.get_sample_value("broker_connections", {"type": type_, "status": status})


def test_a_pair_no_longer_counted_reads_zero_and_others_keep_their_counts() -> None:
    metrics.set_connection_counts({("unit-http", "active"): 3, ("unit-http", "suspended"): 1})
    assert _value("unit-http", "active") == 3 and _value("unit-http", "suspended") == 1
    metrics.set_connection_counts({("unit-http", "active"): 4})
    assert _value("unit-http", "active") == 4
    assert _value("unit-http", "suspended") == 0
    metrics.set_connection_counts({})
    assert _value("unit-http", "active") == 0
