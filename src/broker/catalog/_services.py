"""Connection types for network services the broker's testers reach: database, http, smtp,
webhook, mcp, ssh. Pure data; `_validate` interprets it.
"""

from __future__ import annotations

from collections.abc import Mapping

from broker.catalog import _values as v
from broker.catalog._spec import (
    ConnectionType,
    Default,
    FieldKind,
    FieldSpec,
    Rule,
    forbid,
    is_,
    is_not,
    one_of,
    require,
    secret,
)

_LOCAL_HOSTS = ("localhost", "127.0.0.1", "::1")


def _port(description: str, default: int | None = None) -> FieldSpec:
    return FieldSpec(
        "port",
        FieldKind.INTEGER,
        default=default,
        description=description,
        check=v.integer_between(1, 65535),
        destination=True,
    )


def _host(description: str, *, required: bool = False) -> FieldSpec:
    return FieldSpec(
        "host", FieldKind.STRING, required=required, description=description, check=v.host, destination=True
    )


def _auth_type(*choices: str) -> FieldSpec:
    return FieldSpec(
        "auth_type",
        FieldKind.ENUM,
        default="none",
        choices=("none", *choices),
        description="How requests authenticate: " + ", ".join(("none", *choices)) + ".",
    )


def _timeout() -> FieldSpec:
    return FieldSpec(
        "timeout_seconds",
        FieldKind.NUMBER,
        default=30.0,
        description="Request timeout in seconds, greater than 0 and at most 300.",
        check=v.number_in(0, 300),
    )


def auth_rules(
    required: Mapping[str, tuple[str, ...]], optional: Mapping[str, tuple[str, ...]] | None = None
) -> tuple[Rule, ...]:
    """Rules for an `auth_type` switch: each auth type requires its fields, and a field that
    belongs to some auth types is refused under the others (a token sent with auth_type none is
    a mistake the caller wants to hear about, not a secret to store and never use).
    """
    rules = [require(*fields, when=(is_("auth_type", kind),)) for kind, fields in required.items() if fields]
    users: dict[str, list[str]] = {}
    for table in (required, optional or {}):
        for kind, fields in table.items():
            for name in fields:
                users.setdefault(name, []).append(kind)
    rules += [forbid(name, when=(is_not("auth_type", *kinds),)) for name, kinds in users.items()]
    return tuple(rules)


def _statements(when: str, purpose: str) -> FieldSpec:
    creation = when == "creation"
    passwords = (
        "{{password}}, {{password_hash}} (the password as the server stores it: PostgreSQL, MariaDB), "
        if creation
        else ""
    )
    return FieldSpec(
        f"{when}_statements",
        FieldKind.STRING_LIST,
        description=f"Dynamic: the SQL that {purpose} a lease's user, one statement each, with "
        f"{{{{name}}}}, {passwords}{{{{expiration}}}}, {{{{group}}}}; empty: the driver's defaults.",
        check=v.each(v.statement_template if creation else v.later_statement_template),
        use=True,
    )


# A dynamic database connection keeps an administrator's credentials, never released, and
# makes a fresh user per Resolve (a lease, broker.service.leases); postgresql and mysql only.
_DYNAMIC_FIELDS = (
    FieldSpec(
        "dynamic",
        FieldKind.BOOLEAN,
        description="Make a fresh, short-lived database user per Resolve (a lease); the stored "
        "credentials are then the administrator's and are never released. postgresql and mysql "
        "only; defaults to false.",
        use=True,
    ),
    FieldSpec(
        "default_ttl",
        FieldKind.INTEGER,
        description="Dynamic: seconds a lease lasts unless renewed (capped at max_ttl); defaults to 3600.",
        check=v.integer_between(1, 366 * 86400),
        use=True,
    ),
    FieldSpec(
        "max_ttl",
        FieldKind.INTEGER,
        description="Dynamic: seconds a lease may last in all, renewals included; defaults to 86400.",
        check=v.integer_between(1, 366 * 86400),
        use=True,
    ),
    FieldSpec(
        "username_prefix",
        FieldKind.STRING,
        description="Dynamic: the start of every user name the broker makes (defaults to brk_); the "
        "reconciler drops users named so with no live lease, and never touches any other user.",
        check=v.matching(r"[a-z][a-z0-9_]{0,11}", "a lower-case letter then up to 11 of a-z, 0-9, _"),
        use=True,
    ),
    FieldSpec(
        "group_role",
        FieldKind.STRING,
        description="Dynamic: the role whose privileges a lease's user gets (the default statements).",
        use=True,
    ),
    _statements("creation", "creates"),
    _statements("renewal", "extends"),
    _statements("revocation", "drops"),
)


DATABASE = ConnectionType(
    name="database",
    description="A SQL database: PostgreSQL, MySQL/MariaDB, SQLite or SQL Server. Takes no provider.",
    fields=(
        FieldSpec(
            "driver",
            FieldKind.ENUM,
            required=True,
            choices=("postgresql", "mysql", "sqlite", "mssql"),
            description="Database engine.",
            destination=True,
        ),
        _host("Server host name or IP address; required except for sqlite."),
        _port("Server port; defaults to 5432 (postgresql), 3306 (mysql) or 1433 (mssql); not for sqlite."),
        FieldSpec(
            "database",
            FieldKind.STRING,
            required=True,
            description="Database name; for sqlite, the path of the database file.",
        ),
        FieldSpec("username", FieldKind.STRING, description="User name; required except for sqlite."),
        secret("password", "Password; optional for trust or certificate authentication."),
        FieldSpec(
            "ssl",
            FieldKind.BOOLEAN,
            default=True,
            description="Use TLS; defaults to false for localhost, 127.0.0.1, ::1 and sqlite, else true.",
            transport=True,
        ),
        FieldSpec(
            "ssl_ca",
            FieldKind.STRING,
            description="CA certificate (PEM) or its path, to verify the server.",
            transport=True,
        ),
        FieldSpec(
            "options",
            FieldKind.STRING_MAP,
            description="Extra driver connection options; no credentials.",
            transport=True,
            check=v.no_secret_names,
        ),
        *_DYNAMIC_FIELDS,
    ),
    rules=(
        require("host", "username", when=(is_not("driver", "sqlite"),)),
        forbid("host", "port", "username", when=(is_("driver", "sqlite"),)),
        forbid(*(f.name for f in _DYNAMIC_FIELDS), when=(is_("driver", "sqlite", "mssql"),)),
    ),
    defaults=(
        Default("port", 5432, (is_("driver", "postgresql"),)),
        Default("port", 3306, (is_("driver", "mysql"),)),
        Default("port", 1433, (is_("driver", "mssql"),)),
        Default("ssl", False, (is_("driver", "sqlite"),)),
        Default("ssl", False, (is_("host", *_LOCAL_HOSTS),)),
    ),
)

_HTTP_AUTH = {"bearer": ("token",), "basic": ("username", "password"), "api_key": ("api_key_value",)}

HTTP = ConnectionType(
    name="http",
    proxy="http",
    description="An HTTP API reached at a base URL, with optional authentication.",
    fields=(
        FieldSpec(
            "base_url", FieldKind.URL, required=True, description="Base URL, http or https.", destination=True
        ),
        _auth_type("bearer", "basic", "api_key", "oauth2"),
        secret("token", "Bearer token; required when auth_type is bearer."),
        FieldSpec("username", FieldKind.STRING, description="User name; required when auth_type is basic."),
        secret("password", "Password; required when auth_type is basic."),
        FieldSpec(
            "api_key_header",
            FieldKind.STRING,
            default="X-API-Key",
            description="Header that carries the API key when auth_type is api_key.",
            check=v.matching(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+", "an HTTP header name"),
        ),
        secret("api_key_value", "API key; required when auth_type is api_key."),
        # oauth2 here means "an access token obtained elsewhere"; the oauth2 connection type
        # owns refresh. The token is optional so the connection can be created before consent.
        secret("access_token", "OAuth2 access token; optional, used when auth_type is oauth2."),
        FieldSpec(
            "headers",
            FieldKind.STRING_MAP,
            description="Extra headers sent with every request; no credentials.",
            check=v.http_headers,
        ),
        _timeout(),
    ),
    rules=auth_rules(_HTTP_AUTH, {"oauth2": ("access_token",)}),
)

SMTP = ConnectionType(
    name="smtp",
    description="An SMTP server for sending mail.",
    fields=(
        _host("SMTP server host name or IP address.", required=True),
        _port("Server port; defaults to 587 (tls), 465 (ssl) or 25 (none)."),
        FieldSpec("username", FieldKind.STRING, description="User name for SMTP AUTH."),
        secret("password", "Password for SMTP AUTH."),
        FieldSpec("from_address", FieldKind.STRING, description="Sender address.", check=v.email),
        FieldSpec(
            "encryption",
            FieldKind.ENUM,
            default="tls",
            choices=("tls", "ssl", "none"),
            description="tls (STARTTLS), ssl (implicit TLS) or none.",
            transport=True,
        ),
        FieldSpec(
            "ssl_ca",
            FieldKind.STRING,
            description="CA certificate (PEM) or its path, to verify the server; default: the system CAs.",
            transport=True,
        ),
    ),
    defaults=(
        Default("port", 587, (is_("encryption", "tls"),)),
        Default("port", 465, (is_("encryption", "ssl"),)),
        Default("port", 25, (is_("encryption", "none"),)),
    ),
)

WEBHOOK = ConnectionType(
    name="webhook",
    proxy="http",
    description="An outbound webhook: requests sent to one URL.",
    fields=(
        FieldSpec(
            "url", FieldKind.URL, required=True, description="Target URL, http or https.", destination=True
        ),
        FieldSpec(
            "method", FieldKind.ENUM, default="POST", choices=("POST", "PUT"), description="HTTP method."
        ),
        _auth_type("bearer", "hmac"),
        secret("auth_secret", "Bearer token or HMAC signing key; required unless auth_type is none."),
        FieldSpec(
            "headers",
            FieldKind.STRING_MAP,
            description="Extra headers sent with every request; no credentials.",
            check=v.http_headers,
        ),
    ),
    rules=auth_rules({"bearer": ("auth_secret",), "hmac": ("auth_secret",)}),
)

MCP = ConnectionType(
    name="mcp",
    proxy="mcp",
    description="A Model Context Protocol tool server over HTTP.",
    fields=(
        FieldSpec(
            "server_url",
            FieldKind.URL,
            required=True,
            description="MCP endpoint URL, http or https.",
            destination=True,
        ),
        FieldSpec(
            "transport",
            FieldKind.ENUM,
            default="streamable_http",
            choices=("streamable_http", "sse"),
            description="MCP transport.",
        ),
        _auth_type("api_key", "bearer", "basic", "oauth2"),
        FieldSpec(
            "oauth_connection",
            FieldKind.STRING,
            description="With auth_type oauth2: the oauth2 connection whose access token authenticates to "
            "the server, by id or name (kept as its id). Its resource indicators must list server_url; "
            "the broker refreshes the token as for that connection, and Resolve never releases it here.",
            check=v.matching(r"[!-~][ -~]{0,127}", "a connection id or name"),
        ),
        FieldSpec(
            "api_key_header",
            FieldKind.STRING,
            default="X-API-Key",
            description="Header that carries the API key when auth_type is api_key.",
            check=v.matching(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+", "an HTTP header name"),
        ),
        secret("api_key", "API key; required when auth_type is api_key."),
        secret("token", "Bearer token; required when auth_type is bearer."),
        FieldSpec("username", FieldKind.STRING, description="User name; required when auth_type is basic."),
        secret("password", "Password; required when auth_type is basic."),
        _timeout(),
    ),
    rules=auth_rules(
        {
            "api_key": ("api_key",),
            "bearer": ("token",),
            "basic": ("username", "password"),
            "oauth2": ("oauth_connection",),
        }
    ),
)

SSH = ConnectionType(
    name="ssh",
    description="An SSH server; authenticates with a password or a private key.",
    fields=(
        _host("SSH server host name or IP address.", required=True),
        _port("Server port.", default=22),
        FieldSpec("username", FieldKind.STRING, required=True, description="User name."),
        secret("password", "Password; this or private_key is required."),
        secret("private_key", "Private key (OpenSSH or PEM); this or password is required."),
        secret("passphrase", "Passphrase of an encrypted private key."),
    ),
    rules=(one_of("password", "private_key"),),
)

SERVICE_TYPES = (DATABASE, HTTP, SMTP, WEBHOOK, MCP, SSH)
