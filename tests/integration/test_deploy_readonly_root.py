"""The shipped broker.toml serves under a read-only root filesystem, as the image must.

No container engine runs here, so the test builds the same constraint with a user and
mount namespace (`unshare`): every mount is read-only except the data directory. The
broker starts from the Kubernetes ConfigMap's broker.toml (paths and ports swapped for
the test's), applies its migrations, answers `broker health` over mTLS and `/metrics`,
and stops cleanly on SIGTERM. Skipped where unprivileged user namespaces are off.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml

from broker import pki

pytestmark = pytest.mark.integration

CONFIGMAP = Path(__file__).resolve().parents[2] / "deploy" / "kubernetes" / "base" / "configmap.yaml"
PROBE = "spiffe://broker.local/tenant/ops/executor/probe"


def _userns_available() -> bool:
    try:
        return subprocess.run(["unshare", "-rm", "true"], capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _config(tmp_path: Path, ports: dict[str, int]) -> Path:
    text = yaml.safe_load(CONFIGMAP.read_text())["data"]["broker.toml"]
    etc = tmp_path / "etc"
    (etc / "tls").mkdir(parents=True)
    (etc / "probe").mkdir()
    (etc / "master-key").mkdir()
    ca, ca_key = pki.create_ca("test CA")
    server, server_key = pki.issue_server_cert(ca, ca_key, ["localhost", "127.0.0.1"])
    probe, probe_key = pki.issue_principal_cert(ca, ca_key, PROBE)
    for path, data in {
        "tls/tls.crt": server,
        "tls/tls.key": server_key,
        "tls/ca.crt": ca,
        "probe/tls.crt": probe,
        "probe/tls.key": probe_key,
        "master-key/master.key": pki.new_master_key().encode(),
    }.items():
        (etc / path).write_bytes(data)
    text = text.replace("/etc/broker/", f"{etc}/").replace("/var/lib/broker/", f"{tmp_path / 'data'}/")
    for name, default in (("admin", 50051), ("resolve", 50052), ("metrics", 9464)):
        text = text.replace(f'"0.0.0.0:{default}"', f'"127.0.0.1:{ports[name]}"')
    config = etc / "broker.toml"
    config.write_text(text)
    return config


@pytest.mark.skipif(not _userns_available(), reason="needs unprivileged user namespaces (unshare -rm)")
def test_broker_serves_with_a_read_only_root(tmp_path: Path) -> None:
    ports = {name: _free_port() for name in ("admin", "resolve", "metrics")}
    config = _config(tmp_path, ports)
    data = tmp_path / "data"
    data.mkdir()
    before = {p for p in tmp_path.rglob("*") if not p.is_relative_to(data)}
    broker = Path(sys.executable).parent / "broker"
    script = (
        'mount --bind "$DATA" "$DATA" && mount -o remount,bind,ro / '
        # Proof that the root really is read-only in here, before handing over.
        '&& ! touch "$DATA/../probe-write" 2>/dev/null '
        '&& exec "$BROKER" serve --config "$CONFIG"'
    )
    env = {**os.environ, "DATA": str(data), "BROKER": str(broker), "CONFIG": str(config)}
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    process = subprocess.Popen(
        ["unshare", "-rm", "--propagation", "private", "sh", "-c", script],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        # /metrics answers once start() has finished (the startup probe's signal).
        deadline = time.monotonic() + 20
        while True:
            try:
                reply = httpx.get(f"http://127.0.0.1:{ports['metrics']}/metrics", timeout=2)
                break
            except httpx.TransportError:
                assert process.poll() is None, process.communicate(timeout=5)[1].decode(errors="replace")
                assert time.monotonic() < deadline, "the broker did not start"
                time.sleep(0.1)
        assert reply.status_code == 200
        # The readiness probe's command, as the manifests run it (mTLS with [health] cert/key).
        health = [str(broker), "health", "--config", str(config), "--service", "broker.v1.ResolveService"]
        probe = subprocess.run([*health, "--timeout", "3"], capture_output=True, text=True, timeout=15)
        assert probe.returncode == 0 and probe.stdout.startswith("SERVING"), probe.stdout + probe.stderr
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=30)
        assert process.returncode == 0, stderr.decode(errors="replace")
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=10)
    assert (data / "broker.db").stat().st_size > 0
    after = {p for p in tmp_path.rglob("*") if not p.is_relative_to(data)}
    assert after == before, "the broker wrote outside its data directory"
