"""The README's SDK example runs as written: its ```python block, unchanged but for the Resolve
port, against a real `broker dev` set up the way the walk-through does it."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.devbroker import DevBroker
from tests.httpservers import Answer, serve

pytestmark = pytest.mark.e2e

README = (Path(__file__).resolve().parents[2] / "README.md").read_text()
DEV_RESOLVE_ADDR = "127.0.0.1:50052"  # what `make run` serves on; the test's broker has a free port
EXECUTOR = "spiffe://broker.local/tenant/default/executor/demo"


def python_example(heading: str) -> str:
    """The one ```python block of the README's section `heading`."""
    section = README.split(f"## {heading}", 1)[1].split("\n## ", 1)[0]
    (block,) = re.findall(r"^```python\n(.*?)^```$", section, re.DOTALL | re.MULTILINE)
    return str(block)


def run_example(example: str, dev_broker: DevBroker, folder: Path) -> subprocess.CompletedProcess[str]:
    """The example as written, but for the Resolve port (the test's broker has a free one)."""
    assert DEV_RESOLVE_ADDR in example
    return subprocess.run(
        [sys.executable, "-c", example.replace(DEV_RESOLVE_ADDR, dev_broker.resolve_addr)],
        cwd=folder,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def walkthrough_password() -> str:
    (password,) = re.findall(r"^printf '([^']+)' > \.broker-dev/pw\.txt", README, re.MULTILINE)
    return str(password)


def test_the_readme_sdk_example_prints_the_secret(dev_broker: DevBroker, tmp_path: Path) -> None:
    # The example's paths are relative to the folder `make run` serves from: `.broker-dev/`.
    (tmp_path / ".broker-dev").symlink_to(dev_broker.data_dir, target_is_directory=True)
    password = walkthrough_password()
    (dev_broker.data_dir / "pw.txt").write_text(password)
    created, _ = dev_broker.ok(
        "create", "analytics-db", "--type", "database",
        "--config", "driver=postgresql", "--config", "host=db.internal",
        "--config", "database=analytics", "--config", "username=reporter",
        "--secret", f"password=@{dev_broker.data_dir / 'pw.txt'}", "--label", "team=data",
    )  # fmt: skip
    dev_broker.ok("grant", created["id"], EXECUTOR, "--expires-in", "7d")

    ran = run_example(python_example("Executors: the SDK"), dev_broker, tmp_path)
    assert (ran.returncode, ran.stdout) == (0, password + "\n"), ran.stderr

    audit, _ = dev_broker.ok("audit", "--action", "connection.resolve")
    (event,) = audit["events"]
    assert (event["actor"], event["outcome"], event["details"]["purpose"]) == (
        EXECUTOR,
        "allowed",
        "nightly report",
    )


def test_the_readme_proxy_example_calls_through_the_broker(dev_broker: DevBroker, tmp_path: Path) -> None:
    (tmp_path / ".broker-dev").symlink_to(dev_broker.data_dir, target_is_directory=True)
    (dev_broker.data_dir / "key.txt").write_text("ghp-readme-example-1234")
    # The example's `github` connection, pointed at a local stand-in for the GitHub API.
    with serve(lambda seen: Answer.json({"login": "octocat", "auth": seen.headers["authorization"]})) as api:
        dev_broker.ok(
            "create", "github", "--type", "api_key", "--provider", "github",
            "--config", f"base_url={api.url}", "--secret", f"api_key=@{dev_broker.data_dir / 'key.txt'}",
        )  # fmt: skip
        dev_broker.ok("grant", "github", EXECUTOR, "--mode", "proxy", "--method", "GET", "--path", "/user")
        ran = run_example(python_example("Proxy mode"), dev_broker, tmp_path)
    assert (ran.returncode, ran.stdout) == (0, "{'login': 'octocat', 'auth': '[redacted]'}\n"), ran.stderr
    [seen] = api.requests
    assert seen.path == "/user" and seen.headers["authorization"] == "Bearer ghp-readme-example-1234"
