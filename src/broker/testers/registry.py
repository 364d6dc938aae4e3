"""Testers by connection type. Each module owns one kind of connection."""

from __future__ import annotations

from broker.testers.base import Tester

TESTERS: dict[str, Tester] = {}
