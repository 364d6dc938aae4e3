"""Audit seals: a MAC over the chain's tail under a key the database never holds.

The hash chain shows an edited or deleted event, unless whoever edited it also
recomputed every hash after it, which needs only write access to the database.
A seal closes that gap: every `audit.seal_interval_seconds` the broker takes the
newest event's id and hash and stores HMAC-SHA256 over them under a key derived
(HKDF-SHA256, info `SEAL_INFO`) from the active master key. A rewritten chain no
longer matches its seals, and a new seal cannot be made without the master key.

What it does not stop: seals deleted or relabelled, or a pruning checkpoint written in
place of the oldest events, by someone with write access (README, "The audit trail").
Each seal is also logged (`audit_sealed`), so the log pipeline holds a copy the database
cannot take back; and `unsealed_events` in the verification report says how many of the
newest events no seal covers yet.
"""

from __future__ import annotations

import hashlib
import hmac
from datetime import datetime

from broker.crypto import Kek, KeyError_, Keyring
from broker.model import AuditSeal, SealCheck

SEAL_INFO = b"broker audit seal v1"


def _mac(seal_key: bytes, last_id: int, last_hash: str) -> str:
    """HMAC-SHA256 (hex) of the tail."""
    return hmac.new(seal_key, f"{last_id}\n{last_hash}".encode(), hashlib.sha256).hexdigest()


def make_seal(kek: Kek, last_id: int, last_hash: str, now: datetime) -> AuditSeal:
    """A seal of the tail (last_id, last_hash) under `kek` (the active master key)."""
    return AuditSeal(last_id, last_hash, kek.id, _mac(kek.derive(SEAL_INFO), last_id, last_hash), now)


def checker(keyring: Keyring | None) -> SealCheck:
    """Judges seals with the keyring's keys: None for a key no longer (or never) configured."""
    keys: dict[str, bytes] = {}

    def check(seal: AuditSeal) -> bool | None:
        if keyring is None:
            return None
        try:
            kek = keyring.get(seal.kek_id)
        except KeyError_:
            return None
        if seal.kek_id not in keys:
            keys[seal.kek_id] = kek.derive(SEAL_INFO)
        return hmac.compare_digest(_mac(keys[seal.kek_id], seal.last_id, seal.last_hash), seal.mac)

    return check
