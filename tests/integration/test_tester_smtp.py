"""The SMTP tester against real aiosmtpd servers on loopback: plain, STARTTLS and implicit TLS."""

from __future__ import annotations

import asyncio
import socket
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.smtp import SMTP, AuthResult, LoginPassword

from broker import catalog, pki
from broker.egress import EgressPolicy, EgressSettings
from broker.model import TestCategory, TestResult, TestStage
from broker.sensitive import SecretFields
from broker.testers import Target, run_tester
from broker.testers import smtp as smtp_tester

pytestmark = pytest.mark.integration

USER = "mailer"
PASSWORD = "s3cret-smtp-pa55word"
SERVER_NAME = "mail.test"


@dataclass
class Recorder:
    """aiosmtpd handler and authenticator that remember what clients did."""

    logins: list[tuple[str, str]] = field(default_factory=list)
    mail_commands: int = 0
    data_commands: int = 0
    connections: int = 0

    async def handle_MAIL(self, server: Any, session: Any, envelope: Any, address: str, options: Any) -> str:
        self.mail_commands += 1
        return "250 OK"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        self.data_commands += 1
        return "250 OK"

    def authenticate(self, server: Any, session: Any, envelope: Any, mechanism: str, data: Any) -> AuthResult:
        assert isinstance(data, LoginPassword)
        login = (data.login.decode(), data.password.decode())
        self.logins.append(login)
        # handled=False: aiosmtpd then answers "535 5.7.8" itself.
        return AuthResult(success=login == (USER, PASSWORD), handled=False)


@dataclass
class CramMd5Refused(Recorder):
    """Advertises CRAM-MD5 but refuses it with 504, as servers whose password store cannot do it do."""

    refused: int = 0

    async def auth_CRAM__MD5(self, server: SMTP, args: list[str]) -> None:
        self.refused += 1
        await server.push("504 5.5.4 CRAM-MD5 not available")


@dataclass
class EncryptionRequired(Recorder):
    """Offers AUTH in clear but answers every mechanism with 538, as RFC 4954 lets a server do."""

    async def auth_PLAIN(self, server: SMTP, args: list[str]) -> None:
        await server.push("538 5.7.11 Encryption required for requested authentication mechanism")

    async def auth_LOGIN(self, server: SMTP, args: list[str]) -> None:
        await server.push("538 5.7.11 Encryption required for requested authentication mechanism")


class ClosingSMTP(SMTP):
    """aiosmtpd that closes the connection after a rejected AUTH, as some servers do."""

    async def smtp_AUTH(self, arg: str) -> None:
        await super().smtp_AUTH(arg)
        if self.session is not None and not self.session.authenticated and self.transport is not None:
            self.transport.close()


@dataclass(frozen=True)
class Tls:
    cafile: str
    server: ssl.SSLContext
    wrong_name: ssl.SSLContext


def _server_context(ca: bytes, ca_key: bytes, host: str, folder: Path) -> ssl.SSLContext:
    cert, key = pki.issue_server_cert(ca, ca_key, [host])
    (folder / f"{host}.crt").write_bytes(cert)
    (folder / f"{host}.key").write_bytes(key)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(folder / f"{host}.crt", folder / f"{host}.key")
    return context


@pytest.fixture
def tls(tmp_path: Path) -> Tls:
    """A CA (for a connection's `ssl_ca`) and server contexts for localhost and another name."""
    ca, ca_key = pki.create_ca("smtp test CA")
    cafile = tmp_path / "ca.pem"
    cafile.write_bytes(ca)
    return Tls(
        str(cafile),
        _server_context(ca, ca_key, "localhost", tmp_path),
        _server_context(ca, ca_key, "elsewhere.test", tmp_path),
    )


Server = Callable[..., Awaitable[int]]


@pytest.fixture
async def smtp_server(recorder: Recorder) -> AsyncIterator[Server]:
    """Start aiosmtpd servers on free loopback ports; returns the port."""
    loop = asyncio.get_running_loop()
    servers: list[asyncio.Server] = []

    async def start(
        *,
        starttls: ssl.SSLContext | None = None,
        implicit: ssl.SSLContext | None = None,
        auth_require_tls: bool = True,
        handler: Recorder | None = None,
        close_after_failed_auth: bool = False,
    ) -> int:
        handler = handler or recorder

        def factory() -> SMTP:
            handler.connections += 1
            return (ClosingSMTP if close_after_failed_auth else SMTP)(
                handler,
                hostname=SERVER_NAME,
                ident="test-smtpd",
                tls_context=starttls,
                authenticator=handler.authenticate,
                auth_require_tls=auth_require_tls,
                loop=loop,
            )

        server = await loop.create_server(factory, "127.0.0.1", 0, ssl=implicit)
        servers.append(server)
        return int(server.sockets[0].getsockname()[1])

    yield start
    for server in servers:
        server.close()
        await server.wait_closed()


@pytest.fixture
def recorder() -> Recorder:
    return Recorder()


async def _loopback(host: str, port: int) -> Sequence[str]:
    # "localhost" may resolve to ::1 first on some machines; the servers listen on 127.0.0.1.
    return ["127.0.0.1"]


def _policy(**settings: Any) -> EgressPolicy:
    return EgressPolicy(EgressSettings(**{"allow_loopback": True, **settings}), resolver=_loopback)


async def _test(
    port: int, encryption: str, *, credentials: bool = True, ssl_ca: str | None = None, **settings: Any
) -> TestResult:
    config: dict[str, Any] = {
        "host": "localhost",
        "port": port,
        "encryption": encryption,
        "from_address": "robot@example.com",
    }
    if ssl_ca:
        config["ssl_ca"] = ssl_ca
    secrets = {}
    if credentials:
        config["username"] = USER
        secrets["password"] = PASSWORD
    return await _run(config, secrets, _policy(**settings))


async def _run(config: dict[str, Any], secrets: dict[str, str], policy: EgressPolicy) -> TestResult:
    valid = catalog.validate("smtp", "", config, secrets)
    target = Target(valid.type, valid.provider, valid.config, SecretFields(valid.secrets))
    return await run_tester(smtp_tester.test_smtp, target, policy)


def _assert_no_mail(recorder: Recorder) -> None:
    assert recorder.mail_commands == 0
    assert recorder.data_commands == 0


def _assert_no_secret(result: TestResult) -> None:
    assert PASSWORD not in result.message
    assert all(PASSWORD not in value for value in result.details.values())


async def test_plain_with_auth(smtp_server: Server, recorder: Recorder) -> None:
    port = await smtp_server(auth_require_tls=False)

    result = await _test(port, "none")

    assert result.success, result
    assert result.category is TestCategory.OK
    assert result.stage is TestStage.AUTHENTICATE
    assert recorder.logins == [(USER, PASSWORD)]
    assert result.details["ehlo"] == SERVER_NAME
    assert "test-smtpd" in result.details["greeting"]
    assert result.details["starttls_offered"] == "no"
    assert "credentials (AUTH accepted)" in result.verified
    assert "encryption (the channel is unencrypted)" in result.not_verified
    assert "sender address (no MAIL FROM is sent)" in result.not_verified
    _assert_no_mail(recorder)


async def test_plain_without_credentials(smtp_server: Server, recorder: Recorder) -> None:
    port = await smtp_server(auth_require_tls=False)

    result = await _test(port, "none", credentials=False)

    assert result.success, result
    assert result.stage is TestStage.CONNECT
    assert "credentials (none configured)" in result.not_verified
    assert recorder.logins == []
    _assert_no_mail(recorder)


async def test_starttls_with_auth(smtp_server: Server, recorder: Recorder, tls: Tls) -> None:
    # auth_require_tls: the server offers AUTH only once the channel is encrypted.
    port = await smtp_server(starttls=tls.server)

    result = await _test(port, "tls", ssl_ca=tls.cafile)

    assert result.success, result
    assert result.stage is TestStage.AUTHENTICATE
    assert result.details["tls_version"].startswith("TLS")
    assert "STARTTLS, certificate valid for localhost" in result.verified
    assert recorder.logins == [(USER, PASSWORD)]
    _assert_no_mail(recorder)


async def test_implicit_tls_with_auth(smtp_server: Server, recorder: Recorder, tls: Tls) -> None:
    # aiosmtpd only counts STARTTLS as TLS for auth_require_tls, not a TLS listener.
    port = await smtp_server(implicit=tls.server, auth_require_tls=False)

    result = await _test(port, "ssl", ssl_ca=tls.cafile)

    assert result.success, result
    assert result.stage is TestStage.AUTHENTICATE
    assert result.details["tls_version"].startswith("TLS")
    assert "implicit TLS, certificate valid for localhost" in result.verified
    assert recorder.logins == [(USER, PASSWORD)]
    _assert_no_mail(recorder)


async def test_wrong_password_is_auth_failed(smtp_server: Server, recorder: Recorder) -> None:
    port = await smtp_server(auth_require_tls=False)
    config = {"host": "localhost", "port": port, "encryption": "none", "username": USER}

    result = await _run(config, {"password": "not-the-password"}, _policy())

    assert not result.success
    assert result.category is TestCategory.AUTH_FAILED
    assert result.stage is TestStage.AUTHENTICATE
    assert "535" in result.message
    assert "not-the-password" not in result.message
    # One rejected login, not one per mechanism offered (aiosmtpd offers LOGIN and PLAIN): each
    # failure counts against the account on a real server (Exim logs one per mechanism).
    assert recorder.logins == [(USER, "not-the-password")]
    _assert_no_mail(recorder)


@pytest.mark.parametrize("encryption", ["none", "tls"])
async def test_server_closing_after_a_rejected_login_is_auth_failed(
    encryption: str, smtp_server: Server, recorder: Recorder, tls: Tls
) -> None:
    # Was protocol_error "server closed the connection": the 535 was lost to a second mechanism's try.
    port = await smtp_server(
        starttls=tls.server if encryption == "tls" else None,
        auth_require_tls=encryption == "tls",
        close_after_failed_auth=True,
    )
    config = {
        "host": "localhost",
        "port": port,
        "encryption": encryption,
        "username": USER,
        "ssl_ca": tls.cafile,
    }

    result = await _run(config, {"password": "not-the-password"}, _policy())

    assert result.category is TestCategory.AUTH_FAILED, result
    assert result.stage is TestStage.AUTHENTICATE
    assert "535" in result.message
    assert len(recorder.logins) == 1


async def test_encryption_required_for_auth_is_not_auth_failed(smtp_server: Server) -> None:
    # Was auth_failed "server rejected the credentials: 538 ...": the password was never checked.
    handler = EncryptionRequired()
    port = await smtp_server(auth_require_tls=False, handler=handler)

    result = await _test(port, "none")

    assert result.category is TestCategory.PROTOCOL_ERROR, result
    assert result.stage is TestStage.AUTHENTICATE
    assert "538" in result.message
    assert "try encryption tls" in result.message


async def test_mechanism_refused_by_the_server_falls_back_to_the_next(smtp_server: Server) -> None:
    handler = CramMd5Refused()
    port = await smtp_server(auth_require_tls=False, handler=handler)

    result = await _test(port, "none")

    assert result.success, result
    assert handler.refused == 1  # in clear, CRAM-MD5 is tried first
    assert handler.logins == [(USER, PASSWORD)]
    assert result.details["auth_mechanism"] == "PLAIN"


async def test_starttls_not_offered_is_tls_error_and_sends_no_password(
    smtp_server: Server, recorder: Recorder, tls: Tls
) -> None:
    port = await smtp_server(auth_require_tls=False)  # no tls_context: no STARTTLS

    result = await _test(port, "tls", ssl_ca=tls.cafile)

    assert not result.success
    assert result.category is TestCategory.TLS_ERROR
    assert result.stage is TestStage.TLS
    assert "STARTTLS" in result.message
    assert recorder.connections == 1
    assert recorder.logins == []  # never fell back to plaintext AUTH
    _assert_no_mail(recorder)


@pytest.mark.parametrize("encryption", ["tls", "ssl"])
async def test_certificate_for_another_name_is_tls_error(
    encryption: str, smtp_server: Server, recorder: Recorder, tls: Tls
) -> None:
    # The tester connects to 127.0.0.1 but must verify the certificate for "localhost".
    if encryption == "tls":
        port = await smtp_server(starttls=tls.wrong_name, auth_require_tls=False)
    else:
        port = await smtp_server(implicit=tls.wrong_name, auth_require_tls=False)

    result = await _test(port, encryption, ssl_ca=tls.cafile)

    assert not result.success
    assert result.category is TestCategory.TLS_ERROR
    assert result.stage is TestStage.TLS
    assert "localhost" in result.message
    assert recorder.logins == []
    _assert_no_mail(recorder)


@pytest.mark.parametrize("trust", ["system CAs", "another CA"])
@pytest.mark.parametrize("encryption", ["tls", "ssl"])
async def test_untrusted_certificate_is_tls_error_and_sends_no_password(
    trust: str, encryption: str, smtp_server: Server, recorder: Recorder, tls: Tls, tmp_path: Path
) -> None:
    other_ca, _ = pki.create_ca("someone else")
    (tmp_path / "other.pem").write_bytes(other_ca)
    if encryption == "tls":
        port = await smtp_server(starttls=tls.server)
    else:
        port = await smtp_server(implicit=tls.server, auth_require_tls=False)

    result = await _test(
        port, encryption, ssl_ca=None if trust == "system CAs" else str(tmp_path / "other.pem")
    )

    assert result.category is TestCategory.TLS_ERROR
    assert result.stage is TestStage.TLS
    assert "certificate not valid for localhost" in result.message
    assert recorder.logins == []


@pytest.mark.parametrize("form", ["pem", "path"])
async def test_ssl_ca_as_pem_or_path_is_trusted(
    form: str, smtp_server: Server, recorder: Recorder, tls: Tls
) -> None:
    # Before ssl_ca, an SMTP connection could only trust the system CAs: a private mail CA failed.
    port = await smtp_server(starttls=tls.server)

    result = await _test(port, "tls", ssl_ca=Path(tls.cafile).read_text() if form == "pem" else tls.cafile)

    assert result.success, result
    assert recorder.logins == [(USER, PASSWORD)]


@pytest.mark.parametrize(
    ("ssl_ca", "words"),
    [
        ("-----BEGIN CERTIFICATE-----\nnot base64\n-----END CERTIFICATE-----\n", "not a readable PEM"),
        ("/no/such/ca.pem", "does not exist"),
    ],
)
async def test_unusable_ssl_ca_is_invalid_config_before_connecting(
    ssl_ca: str, words: str, smtp_server: Server, recorder: Recorder, tls: Tls
) -> None:
    port = await smtp_server(starttls=tls.server)

    result = await _test(port, "tls", ssl_ca=ssl_ca)

    assert result.category is TestCategory.INVALID_CONFIG
    assert words in result.message
    assert recorder.connections == 0


async def test_starttls_on_an_implicit_tls_port_times_out_with_a_hint(smtp_server: Server, tls: Tls) -> None:
    # Exim's 465 waits for the handshake in silence: a bare "did not answer in time" sent users
    # looking at firewalls.
    port = await smtp_server(implicit=tls.server, auth_require_tls=False)

    result = await _test(port, "tls", ssl_ca=tls.cafile, connect_timeout=0.3, total_timeout=2.0)

    assert result.category is TestCategory.TIMEOUT
    assert result.stage is TestStage.CONNECT
    assert "try encryption ssl" in result.message


async def test_implicit_tls_on_a_starttls_port_is_tls_error_with_a_hint(
    smtp_server: Server, recorder: Recorder, tls: Tls
) -> None:
    # Was "TLS handshake failed: WRONG_VERSION_NUMBER" alone.
    port = await smtp_server(starttls=tls.server)

    result = await _test(port, "ssl", ssl_ca=tls.cafile)

    assert result.category is TestCategory.TLS_ERROR
    assert result.stage is TestStage.TLS
    assert "try encryption tls" in result.message
    assert recorder.logins == []


async def test_auth_not_offered_is_protocol_error(smtp_server: Server, recorder: Recorder, tls: Tls) -> None:
    # The server offers AUTH only after STARTTLS, and the connection is configured unencrypted.
    port = await smtp_server(starttls=tls.server, auth_require_tls=True)

    result = await _test(port, "none")

    assert result.category is TestCategory.PROTOCOL_ERROR
    assert result.stage is TestStage.AUTHENTICATE
    assert "try encryption tls" in result.message
    assert recorder.logins == []


async def test_refused_address_falls_back_to_the_next_answer(smtp_server: Server, recorder: Recorder) -> None:
    async def two_answers(host: str, port: int) -> Sequence[str]:
        return ["127.0.0.2", "127.0.0.1"]  # nothing listens on 127.0.0.2

    port = await smtp_server(auth_require_tls=False)
    config = {"host": "localhost", "port": port, "encryption": "none", "username": USER}
    policy = EgressPolicy(EgressSettings(allow_loopback=True), resolver=two_answers)

    result = await _run(config, {"password": PASSWORD}, policy)

    assert result.success, result
    assert result.details["address"] == "127.0.0.1"
    assert recorder.connections == 1


async def test_closed_port_is_connection_refused() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]

    result = await _test(port, "none")

    assert result.category is TestCategory.CONNECTION_REFUSED
    assert result.stage is TestStage.CONNECT
    _assert_no_secret(result)


async def test_silent_server_is_timeout() -> None:
    accepted: list[asyncio.StreamWriter] = []

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.append(writer)  # never greets

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        result = await _test(port, "none", connect_timeout=0.3, total_timeout=2.0)
    finally:
        for writer in accepted:
            writer.close()
        server.close()
        await server.wait_closed()

    assert len(accepted) == 1
    assert result.category is TestCategory.TIMEOUT
    assert result.stage is TestStage.CONNECT
    assert result.latency_ms < 2000


async def test_blocked_host_is_refused_without_connecting(smtp_server: Server, recorder: Recorder) -> None:
    port = await smtp_server(auth_require_tls=False)
    config = {"host": "127.0.0.1", "port": port, "encryption": "none", "username": USER}

    result = await _run(config, {"password": PASSWORD}, EgressPolicy(EgressSettings()))

    assert result.category is TestCategory.BLOCKED_BY_POLICY
    assert result.stage is TestStage.RESOLVE_ADDRESS
    assert recorder.connections == 0


async def test_username_without_password_is_invalid_config(smtp_server: Server, recorder: Recorder) -> None:
    port = await smtp_server(auth_require_tls=False)
    config = {"host": "localhost", "port": port, "encryption": "none", "username": USER}

    result = await _run(config, {}, _policy())

    assert result.category is TestCategory.INVALID_CONFIG
    assert recorder.connections == 0
