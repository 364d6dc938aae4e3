"""A production bring-up as a user does it: `broker init`, then `broker serve` with no edits.

The README's "Running it for real" is run as written, in bash -e; only the ports differ, through
the documented BROKER_LISTEN_* variables (which `broker init` also takes as its defaults).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.helpers import free_port

pytestmark = pytest.mark.e2e

README = Path(__file__).resolve().parents[2] / "README.md"
BROKER = [sys.executable, "-m", "broker.cli.broker"]
BIN = Path(sys.executable).parent  # where `broker` and `brokerctl` are installed


def readme_section_script(title: str) -> str:
    """The ```sh blocks of README's section `title`, up to its next heading, joined."""
    text = README.read_text()
    start = text.index(f"\n## {title}\n")
    end = re.compile(r"^#{2,3} ", re.MULTILINE).search(text, start + 4)
    section = text[start : end.start() if end else len(text)]
    blocks = re.findall(r"^```sh\n(.*?)^```$", section, re.MULTILINE | re.DOTALL)
    assert blocks, f"no ```sh block in README section {title!r}"
    return "".join(blocks)


def _listen_env() -> dict[str, str]:
    return {
        "BROKER_LISTEN_ADMIN": f"0.0.0.0:{free_port()}",
        "BROKER_LISTEN_RESOLVE": f"0.0.0.0:{free_port()}",
        "BROKER_METRICS_LISTEN": f"127.0.0.1:{free_port()}",
    }


def _env(extra: Mapping[str, str]) -> dict[str, str]:
    # The caller's own BROKER_* settings must not change what is tested.
    base = {
        k: v for k, v in os.environ.items() if not k.startswith("BROKER_") or k.startswith("BROKER_TEST_")
    }
    return {**base, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", **extra}


def broker(*args: str, env: Mapping[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*BROKER, *args], capture_output=True, text=True, timeout=60, check=False, env=_env(env), cwd=cwd
    )


@contextmanager
def serving(config: Path, env: Mapping[str, str], cwd: Path) -> Iterator[tuple[Path, Path]]:
    """`broker serve --config CONFIG` until SERVING; yields its (stdout, stderr) files; SIGTERM after."""
    out, err = cwd / "serve.out", cwd / "serve.err"
    with out.open("wb") as stdout, err.open("wb") as stderr:
        process = subprocess.Popen(
            [*BROKER, "serve", "--config", str(config)], stdout=stdout, stderr=stderr, env=_env(env), cwd=cwd
        )
    try:
        deadline = time.monotonic() + 20
        while broker("health", "--config", str(config), "--timeout", "2", env=env, cwd=cwd).returncode != 0:
            assert process.poll() is None, f"broker serve exited:\n{err.read_text()}"
            assert time.monotonic() < deadline, f"not SERVING in 20 s:\n{err.read_text()}"
            time.sleep(0.3)
        yield out, err
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0, err.read_text()


def test_the_readme_bring_up_runs_as_written(tmp_path: Path) -> None:
    script = readme_section_script("Running it for real")
    assert "broker init --dir broker-prod" in script and "brokerctl types" in script
    env = _env(_listen_env())
    # Files, not pipes: the backgrounded `broker serve` keeps its output open after bash exits.
    # A session of its own: that server is stopped with the whole group.
    out, err = tmp_path / "script.out", tmp_path / "script.err"
    with out.open("wb") as stdout_file, err.open("wb") as stderr_file:
        process = subprocess.Popen(
            ["bash", "-e", "-c", script],
            cwd=tmp_path,
            env=env,
            stdout=stdout_file,
            stderr=stderr_file,
            start_new_session=True,
        )
    try:
        process.wait(timeout=45)
    finally:
        os.killpg(process.pid, signal.SIGTERM)
    stdout, stderr = out.read_text(), err.read_text()
    assert process.returncode == 0, f"README steps failed:\n{stdout}\n{stderr}"
    root = tmp_path / "broker-prod"
    assert f"  broker serve --config {root}/broker.toml\n" in stdout
    assert f"export BROKER_ADDR=localhost:{env['BROKER_LISTEN_ADMIN'].rpartition(':')[2]} " in stdout
    assert "SERVING: (all) at 127.0.0.1:" in stdout
    assert re.search(r"^database\s", stdout, re.M), stdout  # `brokerctl types` listed the types


def test_init_then_serve_unedited_from_anywhere_and_what_a_user_gets_wrong(tmp_path: Path) -> None:
    listen = _listen_env()
    root, elsewhere = tmp_path / "prod", tmp_path / "elsewhere"
    elsewhere.mkdir()
    init = ["init", "--dir", str(root), "--host", "localhost", "--host", "broker.internal"]
    made = broker(*init, env=listen, cwd=tmp_path)
    assert made.returncode == 0, made.stderr
    layout = {p: p.read_bytes() for p in root.rglob("*") if p.is_file()}

    again = broker(*init, env=listen, cwd=tmp_path)
    assert again.returncode == 2 and again.stdout == ""
    assert again.stderr.startswith(f"broker: error: {root}/broker.toml exists (and 12 more of its files): ")
    assert {p: p.read_bytes() for p in root.rglob("*") if p.is_file()} == layout

    config = root / "broker.toml"
    for typo, message in [
        ("[resovle]\ncache_ttl_seconds = 5\n", "unknown section resovle; did you mean resolve?"),
        ("[resolve]\ncache_ttl = 5\n", "unknown key cache_ttl in [resolve]; did you mean cache_ttl_seconds?"),
    ]:
        wrong = root / "typo.toml"
        wrong.write_text(config.read_text() + typo)
        refused = broker("serve", "--config", str(wrong), env=listen, cwd=elsewhere)
        assert refused.returncode == 2
        assert refused.stderr == f"broker: error: config file {wrong}: {message}\n"

    with serving(config, {**listen, "BROKER_LOG_LEVL": "debug"}, elsewhere) as (out, err):
        assert "broker: warning: BROKER_LOG_LEVL is not a broker setting and is ignored; did you mean " in (
            err.read_text()
        )
        assert '"event": "unknown_environment_variable"' in out.read_text()
        assert (root / "broker.db").exists()  # relative to the file, not to the working directory

        admin = listen["BROKER_LISTEN_ADMIN"]
        busy = broker("serve", "--config", str(config), env=listen, cwd=elsewhere)
        assert busy.returncode == 2 and "Traceback" not in busy.stderr
        assert busy.stderr.endswith(
            f"broker: error: {admin} is in use (another broker?); "
            "choose another with listen.admin in the config file or BROKER_LISTEN_ADMIN\n"
        )
        metrics = listen["BROKER_METRICS_LISTEN"]
        other_ports = {**_listen_env(), "BROKER_METRICS_LISTEN": metrics}
        busy = broker("serve", "--config", str(config), env=other_ports, cwd=elsewhere)
        assert busy.returncode == 2 and busy.stderr.endswith(
            f"broker: error: {metrics} is in use (another broker?); "
            "choose another with metrics.listen in the config file or BROKER_METRICS_LISTEN\n"
        )

        taken = f"127.0.0.1:{admin.rpartition(':')[2]}"
        dev = [*BROKER, "dev", "--data-dir", str(tmp_path / "dev"), "--admin-addr", taken]
        dev += ["--resolve-addr", f"127.0.0.1:{free_port()}", "--metrics-addr", ""]
        result = subprocess.run(dev, capture_output=True, text=True, timeout=60, check=False, env=_env({}))
        assert result.returncode == 2 and "Traceback" not in result.stderr
        assert result.stderr.endswith(
            f"broker: error: {taken} is in use (another broker?); "
            "choose another with --admin-addr or make run ADMIN_ADDR=...\n"
        )
        assert "next, try" not in result.stderr  # the banner promises nothing that is not serving
