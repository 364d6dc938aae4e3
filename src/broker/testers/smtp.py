"""SMTP tester: greeting, EHLO, STARTTLS or implicit TLS, AUTH, QUIT. No mail is ever sent.

The host is resolved through the egress policy and aiosmtplib connects to the checked
address; the TLS context is pinned to the configured host name, so the certificate is
verified (and SNI sent) for the name the user typed, never for the IP, against `ssl_ca` when
the connection has one, else the system's CAs.
"""

from __future__ import annotations

import ssl
from collections.abc import Iterator
from contextlib import contextmanager, suppress

import aiosmtplib

from broker.egress import EgressPolicy
from broker.egress.tcp import UnusableCa, ca_tls_context
from broker.model import TestCategory, TestResult, TestStage
from broker.testers.base import Target, TestFailure, passed

# Server text is echoed into details; keep it short.
_MAX_TEXT = 200
# Placeholder for aiosmtplib's connect(); the EHLO we send names our address literal instead,
# which avoids a reverse-DNS lookup and does not reveal the broker's host name.
_PLACEHOLDER_NAME = "localhost"
# Addresses tried when a connection is refused; each may take the connect timeout.
_MAX_ATTEMPTS = 3
# AUTH mechanisms in the order tried. Over TLS the channel protects the password and PLAIN works
# with every password backend; in clear, CRAM-MD5 keeps the password itself off the wire.
_OVER_TLS = ("plain", "login", "cram-md5")
_IN_CLEAR = ("cram-md5", "plain", "login")
_AUTH = {
    "plain": aiosmtplib.SMTP.auth_plain,
    "login": aiosmtplib.SMTP.auth_login,
    "cram-md5": aiosmtplib.SMTP.auth_crammd5,
}
# Answers that refuse the mechanism, not the credentials (RFC 4954: unrecognised, too weak,
# needs encryption): only then is the next one tried. Anything else, 535 above all, is the
# server's verdict on the credentials; asking again with another mechanism would only count
# one more failed login against the account (fail2ban, lockouts) and may meet a closed connection.
_MECHANISM_REFUSED = frozenset({504, 534, 538})


async def test_smtp(target: Target, egress: EgressPolicy) -> TestResult:
    """Connect, EHLO, secure the channel per `encryption`, AUTH when credentials are set, QUIT."""
    config = target.config
    host, port, encryption = str(config["host"]), int(config["port"]), str(config["encryption"])
    username, password = str(config.get("username") or ""), target.secret("password")
    if bool(username) != bool(password):
        raise TestFailure(
            TestCategory.INVALID_CONFIG,
            TestStage.RESOLVE_ADDRESS,
            "username and password must be set together for SMTP AUTH",
        )
    try:
        # A trailing dot is valid DNS but would never match a certificate's name.
        tls = ca_tls_context(host.rstrip("."), config.get("ssl_ca") or None) if encryption != "none" else None
    except UnusableCa as exc:
        raise TestFailure(TestCategory.INVALID_CONFIG, TestStage.TLS, str(exc)) from None
    if username:
        # aiosmtplib composes the AUTH payloads itself; declare every one it may send.
        target.sent.smtp_auth(username, password)
    addresses = (await egress.resolve(host, port))[:_MAX_ATTEMPTS]
    for attempt, address in enumerate(addresses, start=1):
        details = {"endpoint": f"{host}:{port}", "address": str(address), "encryption": encryption}
        client = aiosmtplib.SMTP(
            hostname=str(address),
            port=port,
            use_tls=encryption == "ssl",
            start_tls=False,  # STARTTLS is ours to decide: never an opportunistic fallback
            tls_context=tls,
            local_hostname=_PLACEHOLDER_NAME,
            timeout=egress.settings.connect_timeout,
        )
        try:
            return await _session(
                client, host, encryption, username, password, details, bool(config.get("from_address"))
            )
        except TestFailure as failure:
            # Refused or unreachable means nothing was exchanged: the next answer (say IPv4
            # after IPv6) may work. Anything later is the server's real answer.
            if failure.result.category is not TestCategory.CONNECTION_REFUSED or attempt == len(addresses):
                raise
        finally:
            client.close()
    raise AssertionError("unreachable: the policy returns at least one address")


async def _session(
    client: aiosmtplib.SMTP,
    host: str,
    encryption: str,
    username: str,
    password: str,
    details: dict[str, str],
    has_sender: bool,
) -> TestResult:
    verified = ["tcp reachable"]
    not_verified = ["mail delivery (no message is sent)"]
    try:
        # An implicit-TLS handshake happens inside connect(): its failures belong to the TLS stage.
        with _step(TestStage.TLS if encryption == "ssl" else TestStage.CONNECT, host, details):
            greeting = await client.connect()
            details["greeting"] = _first_line(greeting.message)
            await _ehlo(client, details)
    except TestFailure as failure:
        raise _with_mode_hint(failure, encryption) from None
    verified.append("smtp greeting and EHLO")

    if encryption == "tls":
        if not client.supports_extension("starttls"):
            raise TestFailure(
                TestCategory.TLS_ERROR,
                TestStage.TLS,
                "server does not offer STARTTLS; not continuing unencrypted",
                details,
            )
        with _step(TestStage.TLS, host, details):
            try:
                await client.starttls(server_hostname=host)
            except aiosmtplib.SMTPResponseException as exc:
                message = f"server refused STARTTLS: {exc.code} {_text(exc.message)}"
                raise TestFailure(TestCategory.TLS_ERROR, TestStage.TLS, message, details) from None
            # RFC 3207: what the server said before TLS is forgotten; ask again.
            await _ehlo(client, details)
    if encryption in ("tls", "ssl"):
        ssl_object = client.get_transport_info("ssl_object")
        if isinstance(ssl_object, ssl.SSLObject):
            details["tls_version"] = ssl_object.version() or ""
        verified.append(
            f"{'STARTTLS' if encryption == 'tls' else 'implicit TLS'}, certificate valid for {host}"
        )
    else:
        details["starttls_offered"] = "yes" if client.supports_extension("starttls") else "no"
        not_verified.append("encryption (the channel is unencrypted)")

    stage = TestStage.CONNECT if encryption == "none" else TestStage.TLS
    if username:
        await _authenticate(client, host, username, password, details, encrypted=encryption != "none")
        verified.append("credentials (AUTH accepted)")
        stage = TestStage.AUTHENTICATE
    else:
        not_verified.append("credentials (none configured)")
    if has_sender:
        not_verified.append("sender address (no MAIL FROM is sent)")

    # Politeness only: the test has already succeeded.
    with suppress(aiosmtplib.SMTPException, OSError):
        await client.quit()
    return passed(
        f"SMTP server {host} answered{'' if not username else ' and accepted the credentials'}",
        stage,
        details,
        verified=tuple(verified),
        not_verified=tuple(not_verified),
    )


async def _ehlo(client: aiosmtplib.SMTP, details: dict[str, str]) -> None:
    response = await client.ehlo(hostname=_address_literal(client.get_transport_info("sockname")))
    # The first line of the EHLO reply is the server's own name.
    details["ehlo"] = _first_line(response.message)
    details["extensions"] = ",".join(sorted(client.esmtp_extensions))
    if client.server_auth_methods:
        details["auth_methods"] = ",".join(client.server_auth_methods)


async def _authenticate(
    client: aiosmtplib.SMTP, host: str, username: str, password: str, details: dict[str, str], encrypted: bool
) -> None:
    """AUTH with one mechanism the server offers; the next only when the server refuses that mechanism."""
    if not client.supports_extension("auth"):
        hint = " (it offers STARTTLS: try encryption tls)" if client.supports_extension("starttls") else ""
        # Sending mail with these credentials would fail the same way, so this is a failure.
        raise TestFailure(
            TestCategory.PROTOCOL_ERROR,
            TestStage.AUTHENTICATE,
            f"server does not offer AUTH, so the credentials cannot be used{hint}",
            details,
        )
    offered = client.supported_auth_methods
    mechanisms = [m for m in (_OVER_TLS if encrypted else _IN_CLEAR) if m in offered]
    if not mechanisms:
        raise TestFailure(
            TestCategory.UNSUPPORTED,
            TestStage.AUTHENTICATE,
            "server offers no AUTH mechanism the broker supports (PLAIN, LOGIN, CRAM-MD5)",
            details,
        )
    for mechanism in mechanisms:
        details["auth_mechanism"] = mechanism.upper()
        with _step(TestStage.AUTHENTICATE, host, details):
            try:
                await _AUTH[mechanism](client, username, password)
                return
            except aiosmtplib.SMTPAuthenticationError as exc:
                if exc.code not in _MECHANISM_REFUSED or mechanism == mechanisms[-1]:
                    raise


def _with_mode_hint(failure: TestFailure, encryption: str) -> TestFailure:
    """`failure` of the opening exchange, with a hint when it looks like the other kind of TLS.

    The two kinds fail in ways that name neither: a port that expects implicit TLS waits for a
    handshake in silence (a timeout), and a STARTTLS or plain port answers a handshake in text.
    """
    result = failure.result
    if encryption != "ssl" and result.category is TestCategory.TIMEOUT and "greeting" not in result.details:
        hint = "; if the port expects implicit TLS (usually 465), try encryption ssl"
    elif (
        encryption == "ssl"
        and result.category is TestCategory.TLS_ERROR
        and "WRONG_VERSION" in result.message
    ):
        hint = "; the port answered in plain text: if it expects STARTTLS (usually 587), try encryption tls"
    else:
        return failure
    return TestFailure(result.category, result.stage, result.message + hint, result.details)


@contextmanager
def _step(stage: TestStage, host: str, details: dict[str, str]) -> Iterator[None]:
    """Translate what aiosmtplib and ssl raise during one stage into a classified TestFailure."""
    try:
        yield
    except (aiosmtplib.SMTPException, OSError) as exc:
        category, message = _classify(exc, host)
        if category is TestCategory.TLS_ERROR:
            stage = TestStage.TLS
        raise TestFailure(category, stage, message, details) from None


def _classify(exc: BaseException, host: str) -> tuple[TestCategory, str]:
    # aiosmtplib wraps socket and TLS errors of the connect step; the cause says what happened.
    cause = exc.__cause__ if isinstance(exc, aiosmtplib.SMTPConnectError) and exc.__cause__ else exc
    if isinstance(cause, ssl.SSLCertVerificationError):
        return TestCategory.TLS_ERROR, f"certificate not valid for {host}: {cause.verify_message}"
    if isinstance(cause, ssl.SSLError):
        return TestCategory.TLS_ERROR, f"TLS handshake failed: {cause.reason or type(cause).__name__}"
    if isinstance(exc, aiosmtplib.SMTPTimeoutError | TimeoutError):
        return TestCategory.TIMEOUT, f"SMTP server did not answer in time ({_text(str(exc))})"
    if isinstance(exc, aiosmtplib.SMTPAuthenticationError) and exc.code == 538:
        # RFC 4954: the mechanism needs an encrypted channel; the credentials were never judged.
        return (
            TestCategory.PROTOCOL_ERROR,
            f"server requires encryption for AUTH (try encryption tls): {exc.code} {_text(exc.message)}",
        )
    if isinstance(exc, aiosmtplib.SMTPAuthenticationError):
        category = TestCategory.UNEXPECTED_RESPONSE if exc.code < 500 else TestCategory.AUTH_FAILED
        return category, f"server rejected the credentials: {exc.code} {_text(exc.message)}"
    if isinstance(exc, aiosmtplib.SMTPConnectResponseError):
        return (
            TestCategory.UNEXPECTED_RESPONSE,
            f"server refused the session: {exc.code} {_text(exc.message)}",
        )
    if isinstance(exc, aiosmtplib.SMTPHeloError):
        return TestCategory.UNEXPECTED_RESPONSE, f"server rejected EHLO: {exc.code} {_text(exc.message)}"
    if isinstance(exc, aiosmtplib.SMTPResponseException):
        return TestCategory.UNEXPECTED_RESPONSE, f"unexpected reply: {exc.code} {_text(exc.message)}"
    if isinstance(cause, ConnectionRefusedError):
        return TestCategory.CONNECTION_REFUSED, "connection refused"
    if isinstance(cause, aiosmtplib.SMTPServerDisconnected | ConnectionResetError | EOFError):
        return TestCategory.PROTOCOL_ERROR, "server closed the connection"
    if isinstance(cause, OSError) and cause is not exc:
        # Only the connect step wraps socket errors; nothing was exchanged yet.
        return TestCategory.CONNECTION_REFUSED, f"cannot connect: {cause.strerror or type(cause).__name__}"
    return TestCategory.PROTOCOL_ERROR, _text(str(exc)) or type(exc).__name__


def _address_literal(sockname: object) -> str:
    """Our end's address as an RFC 5321 address literal, for EHLO."""
    if isinstance(sockname, tuple) and sockname and isinstance(sockname[0], str):
        address = sockname[0]
        return f"[IPv6:{address}]" if ":" in address else f"[{address}]"
    return _PLACEHOLDER_NAME


def _first_line(text: str) -> str:
    return _text(text.splitlines()[0] if text else "")


def _text(text: str) -> str:
    return "".join(c if c.isprintable() else " " for c in text)[:_MAX_TEXT]
