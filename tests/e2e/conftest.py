"""Fixtures for the e2e tests: a `broker dev` per test (tests/devbroker.py)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.devbroker import DevBroker, start_dev_broker


@pytest.fixture
def dev_broker(tmp_path: Path) -> Iterator[DevBroker]:
    yield from start_dev_broker(tmp_path)
