"""The audit chain's anchors: seals and signed checkpoints, under a key the database never holds.

The hash chain shows an edited or deleted event, unless whoever edited it also
recomputed every hash after it, which needs only write access to the database. The
anchors close that gap with HMAC-SHA256 under a key derived (HKDF-SHA256, info
`SEAL_INFO`) from a master key:

- A **seal** MACs the chain's tail (the newest event's id and hash) and the time it was
  made. Because each event's hash covers every event before it, one seal that verifies
  vouches for the whole history up to its event. Every `audit.seal_interval_seconds` the
  broker seals a tail that moved, or else re-signs the newest seal in place (its time, under
  the active master key). So while a broker runs, the newest seal is never older than a few
  intervals: a newest seal that is older means newer seals were deleted (and the events
  after the old one may have been rewritten), or sealing is failing; one under a master key
  not configured was relabelled (or its key removed too early). Verification reports both
  (`stale_seal_problem`).
- A **checkpoint**, written when pruning deletes the oldest events, is signed over all its
  fields, including the time of the newest event it pruned. Verification starts from the
  newest checkpoint, so one that is unsigned, forged, or pruned events younger than the
  minimum retention period fails it.

The broker never extends or re-signs an anchor it cannot verify: that would vouch for a
chain someone else rewrote. What anchors cannot stop, someone with write access cutting off
the newest events together with their seals, or replacing the whole log, is seen only from
outside the database: each new seal is also logged (`audit_sealed`), and verification
reports `sealed_through_id` to compare with the newest such line (README, "The audit trail").
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import replace
from datetime import UTC, datetime, timedelta

from broker.crypto import Kek, KeyError_, Keyring
from broker.model import AuditCheckpoint, AuditSeal

SEAL_INFO = b"broker audit seal v1"
SEAL_FORMAT = 2
# A newest seal older than this many intervals (plus clock skew between replicas) was left behind.
STALE_AFTER_INTERVALS = 3
CLOCK_SKEW = timedelta(seconds=60)

PROBLEM_NO_SEAL = "no seal covers the chain: seals were deleted, or sealing is failing (audit_seal_failed)"
PROBLEM_SEAL_UNCHECKABLE = (
    "the newest seal was made under a master key that is not configured: it was relabelled,"
    " or its key was removed before the broker re-signed the seal under the active one"
)
PROBLEM_SEAL_FORGED = "the newest seal does not verify under its master key: it was forged or edited"
PROBLEM_SEAL_AHEAD = (
    "the newest seal is dated ahead of this broker's clock by more than the skew allowed:"
    " a replica's clock is wrong"
)
PROBLEM_SEAL_STALE = (
    "the newest seal is older than the broker lets it become: newer seals were deleted,"
    " or sealing is failing (audit_seal_failed, audit_seal_refused)"
)
PROBLEM_CHECKPOINT_UNSIGNED = (
    "the checkpoint the chain starts from carries no signature: it was written without the broker"
)
PROBLEM_CHECKPOINT_UNCHECKABLE = (
    "the checkpoint the chain starts from was signed under a master key that is not configured"
)
PROBLEM_CHECKPOINT_FORGED = (
    "the checkpoint the chain starts from does not verify under its master key: forged or edited"
)
PROBLEM_CHECKPOINT_TOO_YOUNG = (
    "the checkpoint the chain starts from pruned events younger than the minimum retention period"
)


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def _micros(value: datetime) -> int:
    """Microseconds since the epoch: what the store keeps of a time, so a MAC survives the round trip."""
    return (value - _EPOCH) // timedelta(microseconds=1)


def _hmac(key: bytes, text: str) -> str:
    return hmac.new(key, text.encode(), hashlib.sha256).hexdigest()


def _seal_text(seal: AuditSeal) -> str:
    if seal.format == 1:
        return f"{seal.last_id}\n{seal.last_hash}"
    return f"seal {seal.format}\n{seal.last_id}\n{seal.last_hash}\n{_micros(seal.sealed_at)}"


def _checkpoint_text(checkpoint: AuditCheckpoint) -> str:
    newest = -1 if checkpoint.newest_pruned_at is None else _micros(checkpoint.newest_pruned_at)
    return (
        f"checkpoint 1\n{checkpoint.last_id}\n{checkpoint.last_hash}\n{checkpoint.pruned_count}"
        f"\n{_micros(checkpoint.created_at)}\n{newest}"
    )


def make_seal(kek: Kek, last_id: int, last_hash: str, now: datetime) -> AuditSeal:
    """A seal of the tail (last_id, last_hash) made at `now` under `kek` (the active master key)."""
    seal = AuditSeal(last_id, last_hash, kek.id, "", now, SEAL_FORMAT)
    return replace(seal, mac=_hmac(kek.derive(SEAL_INFO), _seal_text(seal)))


class Anchors:
    """Judges seals and signs checkpoints with the keyring's keys (`model.AnchorKeys`).

    Without a keyring nothing can be judged: every seal is unverifiable and checkpoints pass
    (such a broker makes no anchors either).
    """

    def __init__(self, keyring: Keyring | None, min_retention: timedelta) -> None:
        self._keyring = keyring
        self._min_retention = min_retention
        self._keys: dict[str, bytes] = {}

    def _verify(self, kek_id: str, mac: str, text: str) -> bool | None:
        key = self._key(kek_id)
        if key is None:
            return None
        # compare_digest refuses non-ASCII text: a MAC edited into any is simply wrong.
        return mac.isascii() and hmac.compare_digest(_hmac(key, text), mac)

    def _key(self, kek_id: str) -> bytes | None:
        if kek_id not in self._keys:
            if self._keyring is None:
                return None
            try:
                self._keys[kek_id] = self._keyring.get(kek_id).derive(SEAL_INFO)
            except KeyError_:
                return None
        return self._keys[kek_id]

    def seal(self, seal: AuditSeal) -> bool | None:
        if seal.format not in (1, SEAL_FORMAT):
            return False  # no broker writes another format (0: the store could not read the row)
        return self._verify(seal.kek_id, seal.mac, _seal_text(seal))

    def checkpoint(self, checkpoint: AuditCheckpoint) -> str:
        if self._keyring is None:
            return ""
        if checkpoint.mac is None or checkpoint.kek_id is None or checkpoint.newest_pruned_at is None:
            return PROBLEM_CHECKPOINT_UNSIGNED
        verdict = self._verify(checkpoint.kek_id, checkpoint.mac, _checkpoint_text(checkpoint))
        if verdict is None:
            return PROBLEM_CHECKPOINT_UNCHECKABLE
        if not verdict:
            return PROBLEM_CHECKPOINT_FORGED
        if checkpoint.newest_pruned_at > checkpoint.created_at - self._min_retention:
            return PROBLEM_CHECKPOINT_TOO_YOUNG
        return ""

    def sign_checkpoint(self, checkpoint: AuditCheckpoint) -> AuditCheckpoint:
        """`checkpoint` signed under the active master key (unsigned without a keyring)."""
        if self._keyring is None:
            return checkpoint
        kek = self._keyring.active
        return replace(
            checkpoint, kek_id=kek.id, mac=_hmac(kek.derive(SEAL_INFO), _checkpoint_text(checkpoint))
        )

    def stale_seal_problem(self, newest: AuditSeal | None, now: datetime, interval_seconds: float) -> str:
        """What is wrong with the newest seal of a chain that has events ("" when nothing is).

        It must exist, verify, and be of a format that MACs its time, made within
        `STALE_AFTER_INTERVALS` intervals (plus clock skew) before `now` and not after it.
        """
        if self._keyring is None:
            return ""
        if newest is None:
            return PROBLEM_NO_SEAL
        verdict = self.seal(newest)
        if verdict is None:
            return PROBLEM_SEAL_UNCHECKABLE
        if not verdict:
            return PROBLEM_SEAL_FORGED
        if newest.sealed_at > now + CLOCK_SKEW:
            return PROBLEM_SEAL_AHEAD
        oldest_fresh = now - STALE_AFTER_INTERVALS * timedelta(seconds=interval_seconds) - CLOCK_SKEW
        if newest.format < SEAL_FORMAT or newest.sealed_at < oldest_fresh:
            return PROBLEM_SEAL_STALE
        return ""
