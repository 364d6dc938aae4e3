"""The broker refuses to start without a usable master key or TLS files, and says why."""

from __future__ import annotations

import base64
import os
from collections.abc import Callable
from pathlib import Path

import pytest

from broker.errors import ConfigError
from broker.server import Broker
from tests.conftest import TestPki, write_settings
from tests.helpers import db_request


async def test_refuses_a_different_master_key_for_an_existing_store(
    tmp_path: Path, test_pki: TestPki, make_broker: Callable[..., object]
) -> None:
    running = await make_broker()  # type: ignore[misc]
    await running.admin().CreateConnection(db_request())
    await running.close()
    await running.broker.stop(grace=0)

    (tmp_path / "master.key").write_text(base64.b64encode(os.urandom(32)).decode())
    broker = Broker(write_settings(tmp_path, test_pki))
    with pytest.raises(ConfigError, match=r"wrong master key|not the key this store was created with"):
        await broker.start()


async def test_refuses_a_store_whose_key_check_it_cannot_open(tmp_path: Path, test_pki: TestPki) -> None:
    first = Broker(write_settings(tmp_path, test_pki))
    await first.start()
    await first.stop(grace=0)  # empty store: only the key check is sealed
    (tmp_path / "master.key").write_text(base64.b64encode(os.urandom(32)).decode())
    with pytest.raises(ConfigError, match="not the key this store was created with"):
        await Broker(write_settings(tmp_path, test_pki)).start()


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("not base64 at all!", "base64"),
        (base64.b64encode(b"short").decode(), "32 bytes"),
        ("", "base64|32 bytes"),
    ],
)
async def test_refuses_a_malformed_master_key(
    tmp_path: Path, test_pki: TestPki, content: str, message: str
) -> None:
    key_file = tmp_path / "master.key"
    key_file.write_text(content)
    with pytest.raises(ConfigError, match=message):
        await Broker(write_settings(tmp_path, test_pki)).start()
    assert not (tmp_path / "broker.db").exists()  # refused before touching the store


async def test_refuses_to_start_without_a_master_key(tmp_path: Path, test_pki: TestPki) -> None:
    with pytest.raises(ConfigError, match="no master key"):
        await Broker(write_settings(tmp_path, test_pki, master_key_file=None)).start()
    missing = write_settings(tmp_path, test_pki, master_key_file=tmp_path / "nope.key")
    with pytest.raises(ConfigError, match="cannot read"):
        await Broker(missing).start()


async def test_refuses_missing_tls_files(tmp_path: Path, test_pki: TestPki) -> None:
    settings = write_settings(tmp_path, test_pki)
    settings.tls.client_ca.unlink()
    with pytest.raises(ConfigError, match=r"tls\.client_ca"):
        await Broker(settings).start()


async def test_refuses_an_address_in_use(
    make_broker: Callable[..., object], tmp_path: Path, test_pki: TestPki
) -> None:
    running = await make_broker()  # type: ignore[misc]
    taken = f"127.0.0.1:{running.broker.admin_port}"
    other = tmp_path / "other"
    other.mkdir()
    in_use = rf"^{taken} is in use \(another broker\?\); choose another with listen\.admin"
    with pytest.raises(ConfigError, match=in_use):
        await Broker(write_settings(other, test_pki, admin_addr=taken)).start()
    await running.broker.stop(grace=0)
