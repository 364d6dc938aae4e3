"""Start-up check that the configured master key can open what the store holds.

A sealed canary is kept in the store's meta table. Starting with a different
master key would otherwise look healthy until the first Resolve failed.
"""

from __future__ import annotations

import base64
import json
import os

from broker import crypto
from broker.crypto import Binding, DecryptionFailed, Keyring
from broker.errors import ConfigError
from broker.store import KeyStore

_META_KEY = "keycheck"
_BINDING = Binding(tenant="", connection_id="broker-keycheck", secret_version=0)


async def verify_keyring(store: KeyStore, keyring: Keyring) -> None:
    """Raise `ConfigError` unless the keyring opens the canary and holds every KEK in use."""
    missing = set(await store.deks_by_kek()) - keyring.ids
    if missing:
        raise ConfigError(
            "the store holds data keys wrapped by master key(s) "
            f"{', '.join(sorted(missing))} that are not configured: wrong master key?"
        )
    raw = await store.get_meta(_META_KEY)
    if raw is None:
        await store.put_meta(_META_KEY, _encode(crypto.seal(keyring, os.urandom(16), _BINDING)))
        return
    try:
        # The canary has no destination: the format it was sealed in does not matter.
        crypto.open(keyring, _decode(raw), _BINDING, formats=crypto.FORMATS)
    except (DecryptionFailed, ValueError, KeyError):
        raise ConfigError(
            "the master key cannot open this store's key check: it is not the key this store was created with"
        ) from None


async def canary_kek_id(store: KeyStore) -> str | None:
    """The master key that wraps the key-check canary's data key (None before the first start)."""
    raw = await store.get_meta(_META_KEY)
    return None if raw is None else _decode(raw).kek_id


async def rewrap_canary(store: KeyStore, keyring: Keyring) -> bool:
    """Re-wrap the canary's data key under the active key (master-key rotation); True if it changed."""
    raw = await store.get_meta(_META_KEY)
    if raw is None:
        return False
    sealed = _decode(raw)
    if sealed.kek_id == keyring.active.id:
        return False
    try:
        rewrapped = crypto.rewrap(keyring, sealed, _BINDING)
    except DecryptionFailed:
        raise ConfigError(
            f"the key-check canary is wrapped by master key {sealed.kek_id}, which is not configured"
            " (or not the key it was): configure it, as start-up would ask too, and re-wrap again"
        ) from None
    await store.put_meta(_META_KEY, _encode(rewrapped))
    return True


def _encode(sealed: crypto.Sealed) -> bytes:
    return json.dumps(
        {
            "kek_id": sealed.kek_id,
            "ciphertext": base64.b64encode(sealed.ciphertext).decode(),
            "wrapped_dek": base64.b64encode(sealed.wrapped_dek).decode(),
        }
    ).encode()


def _decode(raw: bytes) -> crypto.Sealed:
    doc = json.loads(raw)
    return crypto.Sealed(
        ciphertext=base64.b64decode(doc["ciphertext"]),
        wrapped_dek=base64.b64decode(doc["wrapped_dek"]),
        kek_id=doc["kek_id"],
    )
