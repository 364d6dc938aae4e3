"""The master key directory (`master_key.dir`): one file per KEK and a marker naming the active one.

    <dir>/<kek-id>.key   base64 of 32 random bytes, mode 0600; the name is the key's id
    <dir>/active         the id of the key that wraps new data keys (written atomically)

Rotation adds a file and moves the marker; retiring a key removes its file. Every
key in the directory can unwrap. Names starting with a dot (Kubernetes' `..data`
links) and other names are ignored. Master keys never go into the database.
"""

from __future__ import annotations

import contextlib
import os
import re
from pathlib import Path

from broker import pki
from broker.crypto import Kek, KeyError_, Keyring
from broker.errors import ConfigError

ACTIVE = "active"
_KEY_FILE = re.compile(r"^([0-9a-f]{16})\.key$")


def _parse(path: Path) -> Kek:
    try:
        kek = Kek.from_base64(path.read_text())
    except OSError as exc:
        raise ConfigError(f"master_key.dir: cannot read {path}: {exc.strerror}") from None
    except KeyError_ as exc:
        raise ConfigError(f"master_key.dir: {path}: {exc}") from None
    if path.name != f"{kek.id}.key":
        raise ConfigError(f"master_key.dir: {path} holds key {kek.id}; its file must be named {kek.id}.key")
    return kek


def key_ids(directory: Path) -> list[str]:
    """Ids of the key files in the directory, sorted."""
    try:
        names = os.listdir(directory)
    except OSError as exc:
        raise ConfigError(f"master_key.dir: cannot read {directory}: {exc.strerror}") from None
    return sorted(m.group(1) for m in map(_KEY_FILE.match, names) if m)


def active_id(directory: Path) -> str:
    """The id named by the `active` marker."""
    marker = directory / ACTIVE
    try:
        kek_id = marker.read_text().strip()
    except FileNotFoundError:
        raise ConfigError(
            f"master_key.dir: {marker} is missing; create the directory with `broker keys init`"
        ) from None
    except OSError as exc:
        raise ConfigError(f"master_key.dir: cannot read {marker}: {exc.strerror}") from None
    if not re.fullmatch(r"[0-9a-f]{16}", kek_id):
        raise ConfigError(f"master_key.dir: {marker} must hold a key id (16 hex digits)")
    return kek_id


def load(directory: Path) -> Keyring:
    """Every key in the directory; the one the marker names is active."""
    active = active_id(directory)
    ids = key_ids(directory)
    if active not in ids:
        raise ConfigError(
            f"master_key.dir: the active key {active} has no file {directory / (active + '.key')}"
        )
    keys = {kek_id: _parse(directory / f"{kek_id}.key") for kek_id in ids}
    return Keyring(keys.pop(active), keys.values())


def refresh(directory: Path, keyring: Keyring) -> bool:
    """Add keys that appeared in the directory and follow the marker; True when the active key changed.

    Keys whose files were removed stay in memory until restart: a running broker
    never loses a key it may still need for what it has cached.
    """
    for kek_id in key_ids(directory):
        if kek_id not in keyring.ids:
            keyring.add(_parse(directory / f"{kek_id}.key"))
    active = active_id(directory)
    if active == keyring.active.id:
        return False
    if active not in keyring.ids:
        raise ConfigError(f"master_key.dir: the active key {active} has no file in {directory}")
    keyring.activate(keyring.get(active))
    return True


def add_key(directory: Path, text: str | None = None) -> Kek:
    """Write a key file (a new random key unless `text` is given) with mode 0600; not yet active."""
    text = pki.new_master_key() if text is None else text.strip() + "\n"
    try:
        kek = Kek.from_base64(text)
    except KeyError_ as exc:
        raise ConfigError(str(exc)) from None
    path = directory / f"{kek.id}.key"
    if not path.exists():
        pki.write_private(path, text.encode("ascii"))
        _sync_dir(directory)
    return kek


def set_active(directory: Path, kek_id: str) -> None:
    """Point the marker at `kek_id`: write a temporary file, fsync, rename over the marker."""
    if not (directory / f"{kek_id}.key").is_file():
        raise ConfigError(f"master_key.dir: no key file for {kek_id} in {directory}")
    tmp = directory / f".{ACTIVE}.tmp"
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    try:
        os.write(fd, (kek_id + "\n").encode("ascii"))
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, directory / ACTIVE)
    _sync_dir(directory)


def remove_key(directory: Path, kek_id: str) -> None:
    """Delete a key's file; refuses the active key."""
    if kek_id == active_id(directory):
        raise ConfigError(f"master key {kek_id} is the active key; rotate to a new key first")
    path = directory / f"{kek_id}.key"
    if not path.is_file():
        raise ConfigError(f"master_key.dir: no key file for {kek_id} in {directory}")
    path.unlink()
    _sync_dir(directory)


def init(directory: Path, imported: list[str]) -> Kek:
    """Create the directory (mode 0700) holding the imported keys, the first active; or one new key."""
    if directory.exists() and (directory / ACTIVE).exists():
        raise ConfigError(f"master_key.dir: {directory} is already set up (it has an active marker)")
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    keks = [add_key(directory, text) for text in imported] or [add_key(directory)]
    set_active(directory, keks[0].id)
    return keks[0]


def _sync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
