"""The health, drain, handshake and TLS-reload settings: defaults, file, environment, and bounds."""

from __future__ import annotations

from pathlib import Path

import pytest

from broker.config import Settings
from broker.errors import ConfigError
from tests.unit.test_config import MINIMAL, write


def test_defaults(tmp_path: Path) -> None:
    settings = Settings.load(write(tmp_path, MINIMAL), environ={})
    assert settings.health_probe_seconds == 5.0 and settings.tls_reload_seconds == 5.0
    assert settings.drain_delay_seconds == 1.0 and settings.handshake_timeout_seconds == 10.0
    assert settings.max_connection_age_seconds == 3600.0
    assert settings.health_cert is None and settings.health_key is None


def test_file_and_environment(tmp_path: Path) -> None:
    text = MINIMAL.replace("[storage]", "reload_interval_seconds = 0\n[storage]")
    text += '[health]\nstore_probe_seconds = 2\ncert = "probe/p.pem"\nkey = "probe/p-key.pem"\n'
    text += "[server]\ndrain_delay_seconds = 4\nhandshake_timeout_seconds = 3\n"
    environ = {"BROKER_HEALTH_STORE_PROBE_SECONDS": "0.5", "BROKER_SERVER_HANDSHAKE_TIMEOUT_SECONDS": "2.5"}
    settings = Settings.load(write(tmp_path, text), environ=environ)
    assert settings.tls_reload_seconds == 0 and settings.drain_delay_seconds == 4
    assert settings.handshake_timeout_seconds == 2.5
    assert settings.health_probe_seconds == 0.5
    assert settings.health_cert == tmp_path / "probe" / "p.pem"
    assert settings.health_key == tmp_path / "probe" / "p-key.pem"


@pytest.mark.parametrize(
    ("variable", "value", "named"),
    [
        ("BROKER_HEALTH_STORE_PROBE_SECONDS", "0", "BROKER_HEALTH_STORE_PROBE_SECONDS"),
        ("BROKER_TLS_RELOAD_INTERVAL_SECONDS", "-1", "BROKER_TLS_RELOAD_INTERVAL_SECONDS"),
        ("BROKER_SERVER_DRAIN_DELAY_SECONDS", "soon", "BROKER_SERVER_DRAIN_DELAY_SECONDS"),
        ("BROKER_SERVER_HANDSHAKE_TIMEOUT_SECONDS", "0", "BROKER_SERVER_HANDSHAKE_TIMEOUT_SECONDS"),
        ("BROKER_SERVER_MAX_CONNECTION_AGE_SECONDS", "0.5", "BROKER_SERVER_MAX_CONNECTION_AGE_SECONDS"),
        ("BROKER_HEALTH_CERT", " ", "BROKER_HEALTH_CERT"),
    ],
)
def test_bad_values_name_the_setting(tmp_path: Path, variable: str, value: str, named: str) -> None:
    with pytest.raises(ConfigError, match=named):
        Settings.load(write(tmp_path, MINIMAL), environ={variable: value})
