"""`broker keys ...`: master-key rotation from the command line.

    init     create master_key.dir from existing key files (or one new key)
    rotate   add a new key to master_key.dir and make it active
    rewrap   re-wrap every stored data key under the active key (resumable)
    status   what each key wraps, and how many encryptions it has made
    retire   delete an old key's file, only when nothing uses it any more
    rebind   re-seal connections of an older envelope format that the start-up pass left alone

They work on the store file directly and may run next to a running broker (the
store serialises writers; the rewrap changes a row only if it still holds what
was read). A running broker in directory mode follows the `active` marker within
a few seconds (it logs `master_key_activated`); no restart or signal is needed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sqlite3
import sys
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from pathlib import Path
from typing import Any

from broker import keydir
from broker.config import Settings
from broker.errors import BrokerError, ConfigError
from broker.store import Store

PROG = "broker keys"


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """The `keys` command group."""
    keys = sub.add_parser(
        "keys",
        help="rotate, re-wrap and retire master keys (needs master_key.dir)",
        description="Master-key rotation. The data is never re-encrypted: rotation adds a key, "
        "rewrap wraps each data key again under it, retire deletes an old key nothing uses.",
    )
    ksub = keys.add_subparsers(dest="keys_command", metavar="ACTION", required=True)

    def command(name: str, help: str) -> argparse.ArgumentParser:
        p = ksub.add_parser(name, help=help, description=help)
        p.add_argument(
            "--config", type=Path, required=True, metavar="FILE", help="the broker's TOML settings"
        )
        return p

    p = command(
        "init", "create master_key.dir holding existing key files (the first is active), or one new key"
    )
    p.add_argument("--import", dest="imports", type=Path, action="append", default=[], metavar="KEYFILE")
    command("rotate", "add a new master key to master_key.dir and make it active")
    p = command("rewrap", "re-wrap every stored data key under the active master key")
    p.add_argument("--batch", type=int, default=500, help="rows per transaction (default 500)")
    p.add_argument(
        "--pause",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="pause between batches, to go easy on a busy store (default 0, at most 10)",
    )
    command("status", "show the active key and, per key, the data keys it wraps and its encryption count")
    p = command("retire", "delete a master key's file; refused while anything still uses that key")
    p.add_argument("kek_id", metavar="ID")
    command(
        "rebind",
        "re-seal connections of an older envelope format that the broker's start left failing closed "
        "(logged rebind_refused), bound to what they hold now: only for rows you know are genuine",
    )


def run(args: argparse.Namespace) -> int:
    """Run one `broker keys` action; ConfigError and ValueError propagate to the caller."""
    settings = Settings.load(args.config)
    action = args.keys_command
    if action == "init":
        return _init(settings, args.imports)
    if action == "rebind":  # any master-key mode
        return _on_store(_rebind(settings))
    key_dir = _require_dir(settings)
    if action == "rotate":
        return _rotate(settings, key_dir)
    if action == "rewrap":
        if not 0 <= args.pause <= 10:
            raise ValueError("--pause must be between 0 and 10 seconds")
        return _on_store(_rewrap(settings, args.batch, args.pause))
    if action == "status":
        return _on_store(_status(settings))
    return _on_store(_retire(settings, key_dir, args.kek_id))


def _on_store(action: Coroutine[Any, Any, int]) -> int:
    """Run an action on the store; a store that stays busy or unreachable is a one-line error
    (exit 1, the action can be run again: each is resumable or read-only), not a traceback."""
    try:
        return asyncio.run(action)
    except BrokerError as exc:  # Unavailable: busy past the timeout, or the database unreachable
        message = exc.message
    except sqlite3.OperationalError as exc:  # opening: a pending migration waits for the write lock
        if not exc.sqlite_errorname.startswith("SQLITE_BUSY"):
            raise
        message = "the database is busy"
    print(f"{PROG}: error: {message}; run the command again", file=sys.stderr)
    return 1


@contextlib.asynccontextmanager
async def opened_store(settings: Settings) -> AsyncIterator[Store]:
    """The store the broker uses (SQLite file or PostgreSQL), open for the block, closed after it."""
    from broker.store.open import store_for

    store = store_for(settings)
    await store.open()
    try:
        yield store
    finally:
        await store.close()


def _require_dir(settings: Settings) -> Path:
    if settings.master_key_dir is None:
        raise ConfigError(
            "master_key.dir is not set: this broker reads a single master key. Create a key directory "
            "with `broker keys init --config FILE --import <your key file>`, set master_key.dir to it "
            "and remove master_key.file"
        )
    return settings.master_key_dir


def _init(settings: Settings, imports: list[Path]) -> int:
    key_dir = _require_dir(settings)
    texts = []
    for path in imports:
        try:
            texts.append(path.read_text())
        except OSError as exc:
            raise ConfigError(f"--import: cannot read {path}: {exc.strerror}") from None
    kek = keydir.init(key_dir, texts)
    print(
        f"{PROG}: created {key_dir} with {len(keydir.key_ids(key_dir))} key(s); active: {kek.id}",
        file=sys.stderr,
    )
    print(kek.id)
    return 0


def _rotate(settings: Settings, key_dir: Path) -> int:
    previous = settings.load_keyring().active.id
    kek = keydir.add_key(key_dir)
    keydir.set_active(key_dir, kek.id)
    print(
        f"{PROG}: {kek.id} is now the active master key (was {previous}). Running brokers switch "
        "within seconds (they log master_key_activated); then run `broker keys rewrap`.",
        file=sys.stderr,
    )
    print(kek.id)
    return 0


def _progress(started: float) -> Callable[[int, int], None]:
    def show(done: int, total: int) -> None:
        width = 30
        filled = width * done // total if total else width
        rate = done / max(time.monotonic() - started, 1e-6)
        bar = "#" * filled + "." * (width - filled)
        print(f"\r{PROG}: rewrap [{bar}] {done}/{total} ({rate:.0f}/s)", end="", file=sys.stderr, flush=True)

    return show


async def _rewrap(settings: Settings, batch: int, pause: float) -> int:
    from broker.service.keys import key_status, rewrap_all

    keyring = settings.load_keyring()
    async with opened_store(settings) as store:
        report = await rewrap_all(
            store, keyring, batch=batch, progress=_progress(time.monotonic()), pause=pause
        )
        status = await key_status(store, keyring)
    print(file=sys.stderr)
    print(
        f"{PROG}: re-wrapped {report.rewrapped} data key(s) under {keyring.active.id}; "
        f"{report.skipped} changed meanwhile (re-sealed or removed by the broker); "
        f"{len(report.failed)} failed",
        file=sys.stderr,
    )
    for where in report.failed:
        print(
            f"{PROG}: cannot unwrap the data key of {where} (tampered, or its key is missing)",
            file=sys.stderr,
        )
    _print_usage(status.active, status.deks, status.wraps)
    left = sum(n for kek_id, n in status.deks.items() if kek_id != status.active)
    if left:
        print(f"{PROG}: {left} data key(s) still use older keys; run rewrap again", file=sys.stderr)
    return 1 if report.failed or left else 0


async def _rebind(settings: Settings) -> int:
    from broker.service.connections import utc_now
    from broker.service.rebind import rebind_legacy

    keyring = settings.load_keyring()
    async with opened_store(settings) as store:
        report = await rebind_legacy(store, store, keyring, utc_now, vouched=True)
    print(f"{PROG}: re-sealed {report.rebound} connection(s) in the current format")
    for where in report.failed:
        print(f"{PROG}: cannot open the secrets of {where} (tampered, or its key is gone)", file=sys.stderr)
    if report.rebound:
        print(f"{PROG}: a running broker on SQLite sees them after a restart", file=sys.stderr)
    return 1 if report.failed else 0


async def _status(settings: Settings) -> int:
    from broker.service.keys import key_status

    keyring = settings.load_keyring()
    async with opened_store(settings) as store:
        status = await key_status(store, keyring)
    _print_usage(status.active, status.deks, status.wraps, status.available)
    return 0


def _print_usage(
    active: str, deks: dict[str, int], wraps: dict[str, int], available: frozenset[str] | None = None
) -> None:
    ids = sorted(set(deks) | set(available or ()) | ({active} if available is not None else set()))
    print(f"{'kek_id':<18}{'state':<10}{'data_keys':>11}{'wraps':>14}")
    for kek_id in ids:
        if kek_id == active:
            state = "active"
        elif available is not None and kek_id not in available:
            state = "MISSING"
        else:
            state = "old"
        print(f"{kek_id:<18}{state:<10}{deks.get(kek_id, 0):>11}{wraps.get(kek_id, 0):>14}")


async def _retire(settings: Settings, key_dir: Path, kek_id: str) -> int:
    from broker.service.keys import key_status

    keyring = settings.load_keyring()
    if kek_id == keyring.active.id:
        raise ConfigError(f"master key {kek_id} is the active key; rotate to a new key first")
    if kek_id not in keydir.key_ids(key_dir):
        raise ConfigError(f"no key file for {kek_id} in {key_dir}")
    async with opened_store(settings) as store:
        in_use = (await key_status(store, keyring)).deks.get(kek_id, 0)
        anchors = await store.audit_anchors()
    if in_use:
        print(
            f"{PROG}: refusing to retire {kek_id}: {in_use} stored data key(s) still use it; "
            "run `broker keys rewrap` first",
            file=sys.stderr,
        )
        return 1
    signed = [
        what
        for what, anchor in (("seal", anchors.seal), ("checkpoint", anchors.checkpoint))
        if anchor is not None and anchor.kek_id == kek_id
    ]
    if signed:
        # Without the key that signed the newest anchor, verification could no longer check it.
        print(
            f"{PROG}: refusing to retire {kek_id}: the audit trail's newest {' and '.join(signed)} "
            "is signed under it; a running broker re-signs it under the active key within "
            "audit.seal_interval_seconds: start one (or wait for it), then retry",
            file=sys.stderr,
        )
        return 1
    keydir.remove_key(key_dir, kek_id)
    print(f"{PROG}: retired {kek_id}: its key file is deleted", file=sys.stderr)
    return 0
