"""The SCRAM-SHA-256 verifier a lease's password reaches PostgreSQL as, against RFC 7677's example
exchange: the stored and server keys it holds must check that exchange's proof and signature."""

from __future__ import annotations

import base64
import hashlib
import hmac

import pytest

from broker.dbusers._postgres import scram_verifier

# RFC 7677, section 3: user "user", password "pencil".
SALT = "W22ZaJ0SNY7soEsUEjb6gQ=="
NONCE = "rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0"
AUTH_MESSAGE = f"n=user,r=rOprNGfwEbeRWgbNEkqO,r={NONCE},s={SALT},i=4096,c=biws,r={NONCE}".encode()
CLIENT_PROOF = "dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ="
SERVER_SIGNATURE = "6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4="


def test_the_verifier_checks_rfc_7677s_exchange() -> None:
    verifier = scram_verifier("pencil", salt=base64.b64decode(SALT))
    mechanism, iterations_salt, keys = verifier.split("$")
    assert (mechanism, iterations_salt) == ("SCRAM-SHA-256", f"4096:{SALT}")
    stored_key, server_key = (base64.b64decode(key) for key in keys.split(":"))
    signature = hmac.new(server_key, AUTH_MESSAGE, hashlib.sha256).digest()
    assert base64.b64encode(signature).decode() == SERVER_SIGNATURE
    # The server's check of the client's proof: recover the client key, hash it, compare.
    client_signature = hmac.new(stored_key, AUTH_MESSAGE, hashlib.sha256).digest()
    client_key = bytes(a ^ b for a, b in zip(base64.b64decode(CLIENT_PROOF), client_signature, strict=True))
    assert hashlib.sha256(client_key).digest() == stored_key


def test_each_verifier_has_its_own_salt_and_never_holds_the_password() -> None:
    password = "pencil-and-paper"
    first, second = scram_verifier(password), scram_verifier(password)
    assert first != second and password not in first


@pytest.mark.parametrize("password", ["pässword", "tab\there", "new\nline"])
def test_a_password_saslprep_could_change_is_refused(password: str) -> None:
    with pytest.raises(ValueError, match="printable ASCII"):
        scram_verifier(password)
