"""broker.catalog: connection types as data, the registry, and `validate`."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import pytest

import broker.catalog
from broker.catalog import (
    STATEMENT_PLACEHOLDERS,
    ConnectionType,
    FieldKind,
    FieldSpec,
    Validated,
    fill_statement,
    get_type,
    list_types,
    statement_placeholders,
    statement_problem,
    validate,
    withheld_fields,
)
from broker.catalog._registry import _check_type
from broker.catalog._spec import Default, forbid, is_, require
from broker.errors import FieldViolation, InvalidArgument

CANARY = "CANARY-s3cr3t"
SA_JSON = json.dumps({"type": "service_account", "project_id": "my-project-1", "private_key": "k"})
GUID = "11111111-2222-3333-4444-555555555555"


def violations(
    type_name: str, provider: str, config: dict[str, Any], secrets: dict[str, str] | None = None
) -> dict[str, str]:
    """The violations `validate` raises, as {field path: description}; fails if it does not raise."""
    with pytest.raises(InvalidArgument) as raised:
        validate(type_name, provider, config, secrets or {})
    found = {v.field: v.description for v in raised.value.violations}
    assert len(found) == len(raised.value.violations), "one violation per field"
    return found


# A minimal valid connection per type: (type, provider, config, secrets, expected config).
MINIMAL: list[tuple[str, str, dict[str, Any], dict[str, str], dict[str, Any]]] = [
    (
        "database",
        "",
        {"driver": "postgresql", "host": "db.example.com", "database": "app", "username": "app"},
        {},
        {
            "driver": "postgresql",
            "host": "db.example.com",
            "port": 5432,
            "database": "app",
            "username": "app",
            "ssl": True,
        },
    ),
    (
        "http",
        "",
        {"base_url": "https://api.example.com/v1"},
        {},
        {
            "base_url": "https://api.example.com/v1",
            "auth_type": "none",
            "api_key_header": "X-API-Key",
            "timeout_seconds": 30.0,
        },
    ),
    (
        "smtp",
        "",
        {"host": "mail.example.com"},
        {},
        {"host": "mail.example.com", "port": 587, "encryption": "tls"},
    ),
    (
        "webhook",
        "",
        {"url": "https://hooks.example.com/x"},
        {},
        {"url": "https://hooks.example.com/x", "method": "POST", "auth_type": "none"},
    ),
    ("api_key", "openai", {}, {"api_key": "sk-1"}, {}),
    (
        "oauth2",
        "github",
        {"client_id": "cid"},
        {},
        {
            "authorize_url": "https://github.com/login/oauth/authorize",
            "token_url": "https://github.com/login/oauth/access_token",
            "token_auth_method": "client_secret_post",
            "client_id": "cid",
            "grant_type": "authorization_code",
        },
    ),
    (
        "mcp",
        "",
        {"server_url": "https://mcp.example.com/mcp"},
        {},
        {
            "server_url": "https://mcp.example.com/mcp",
            "transport": "streamable_http",
            "auth_type": "none",
            "api_key_header": "X-API-Key",
            "timeout_seconds": 30.0,
        },
    ),
    (
        "ssh",
        "",
        {"host": "bastion.example.com", "username": "ops"},
        {"private_key": "-----BEGIN OPENSSH PRIVATE KEY-----\n..."},
        {"host": "bastion.example.com", "port": 22, "username": "ops"},
    ),
    (
        "aws",
        "",
        {"access_key_id": "AKIAIOSFODNN7EXAMPLE"},
        {"secret_access_key": "wJalr"},
        {"access_key_id": "AKIAIOSFODNN7EXAMPLE", "region": "us-east-1"},
    ),
    ("gcp", "", {}, {"service_account_json": SA_JSON}, {}),
    (
        "azure",
        "",
        {"tenant_id": "contoso.onmicrosoft.com", "client_id": GUID},
        {"client_secret": "cs"},
        {"tenant_id": "contoso.onmicrosoft.com", "client_id": GUID},
    ),
    ("custom", "", {}, {"MY_TOKEN": "t"}, {}),
]
MINIMAL_BY_TYPE = {m[0]: m for m in MINIMAL}
ALL_TYPES = sorted(MINIMAL_BY_TYPE)


# ------------------------------------------------------------------------- registry


def test_all_is_complete() -> None:
    public = {n for n in dir(broker.catalog) if not n.startswith("_")}
    # `oauth_providers` is a public submodule (the provider table), not a re-exported name.
    assert set(broker.catalog.__all__) == public - {"annotations", "oauth_providers"}
    assert sorted(broker.catalog.__all__) == [
        "CREATION_ONLY_PLACEHOLDERS",
        "ConnectionType",
        "FIELD_NAME",
        "FieldKind",
        "FieldSpec",
        "MAX_JSON_DEPTH",
        "STATEMENT_PLACEHOLDERS",
        "Validated",
        "destination_digest",
        "destination_fields",
        "fields_needing_secrets",
        "fill_statement",
        "get_type",
        "list_types",
        "statement_placeholders",
        "statement_problem",
        "validate",
        "validate_field",
        "withheld_fields",
    ]


def test_field_kind_values_are_lowercase_names() -> None:
    assert FieldKind.STRING.value == "string"
    assert FieldKind.STRING_LIST.value == "string_list"
    assert all(kind.value == kind.name.lower() for kind in FieldKind)
    assert len(FieldKind) == 10


def test_list_types_is_sorted_and_covers_every_type() -> None:
    names = [t.name for t in list_types()]
    assert names == sorted(names)
    assert names == ALL_TYPES
    assert all(isinstance(t, ConnectionType) and t.description for t in list_types())


def test_get_type_returns_the_type() -> None:
    http = get_type("http")
    assert http.name == "http"
    spec = http.spec("token")
    assert isinstance(spec, FieldSpec) and spec.secret and spec.kind is FieldKind.STRING


@pytest.mark.parametrize("name", ["nope", "", "HTTP", "CANARY-s3cr3t"])
def test_get_type_unknown_names_field_type(name: str) -> None:
    with pytest.raises(InvalidArgument) as raised:
        get_type(name)
    assert [v.field for v in raised.value.violations] == ["type"]
    assert CANARY not in str(raised.value)


def test_validate_unknown_type() -> None:
    assert set(violations("postgres", "", {})) == {"type"}


def test_fields_describe_themselves() -> None:
    for ctype in list_types():
        for spec in ctype.fields:
            assert spec.description, f"{ctype.name}.{spec.name}"
            assert (spec.kind is FieldKind.ENUM) == bool(spec.choices)


def test_provider_lists() -> None:
    assert "custom" in get_type("api_key").providers
    assert {"openai", "anthropic", "google_ai", "huggingface"} <= set(get_type("api_key").providers)
    assert {"google", "microsoft", "github", "slack", "notion", "atlassian", "dropbox", "custom"} == set(
        get_type("oauth2").providers
    )
    assert get_type("database").providers == ()


def test_registry_check_refuses_inconsistent_data() -> None:
    base = get_type("database")
    with pytest.raises(ValueError, match="unknown field"):
        _check_type(dataclasses.replace(base, rules=(require("hots"),)))
    with pytest.raises(ValueError, match="default"):
        _check_type(dataclasses.replace(base, defaults=(Default("port", 0, (is_("driver", "mysql"),)),)))
    with pytest.raises(ValueError, match="enum"):
        _check_type(dataclasses.replace(base, rules=(forbid("port", when=(is_("host", "x"),)),)))


@pytest.mark.parametrize("name", ["ssl", "ssl_ca", "tls_mode", "client_ca", "encryption"])
def test_a_field_that_says_how_the_wire_is_secured_must_be_marked_transport(name: str) -> None:
    """Forgetting the mark would leave it out of the digest bound into the ciphertext."""
    base = get_type("ssh")
    unmarked = FieldSpec(name, FieldKind.STRING)
    fields = (*(f for f in base.fields if f.name != name), unmarked)
    with pytest.raises(ValueError, match="transport field"):
        _check_type(dataclasses.replace(base, fields=fields))
    _check_type(
        dataclasses.replace(base, fields=(*fields[:-1], dataclasses.replace(unmarked, transport=True)))
    )
    with pytest.raises(ValueError, match="transport field"):
        both = dataclasses.replace(unmarked, transport=True, destination=True)
        _check_type(dataclasses.replace(base, fields=(*fields[:-1], both)))


def test_only_an_oauth2_client_secret_and_refresh_token_are_withheld_and_only_secrets_can_be() -> None:
    """What Resolve keeps back: the broker's means of getting tokens, never an executor's."""
    withheld = {t.name: sorted(t.withheld) for t in list_types() if t.withheld}
    assert withheld == {"oauth2": ["client_secret", "refresh_token"]}
    assert withheld_fields("oauth2") == {"client_secret", "refresh_token"} and not withheld_fields("nope")
    base = get_type("ssh")
    with pytest.raises(ValueError, match="a use field is neither"):
        _check_type(
            dataclasses.replace(base, fields=(FieldSpec("x", FieldKind.STRING, use=True, transport=True),))
        )
    with pytest.raises(ValueError, match="only a secret can be withheld"):
        _check_type(dataclasses.replace(base, fields=(FieldSpec("hint", FieldKind.STRING, withheld=True),)))


# ------------------------------------------------------------------------- every type


@pytest.mark.parametrize(("type_name", "provider", "config", "secrets", "expected"), MINIMAL)
def test_minimal_valid_connection_gets_defaults(
    type_name: str, provider: str, config: dict[str, Any], secrets: dict[str, str], expected: dict[str, Any]
) -> None:
    result = validate(type_name, provider, config, secrets)
    assert result == Validated(type_name, provider, expected, secrets)
    assert type(result.config.get("port", 0)) is int


@pytest.mark.parametrize(
    ("type_name", "provider", "config", "secrets", "missing"),
    [
        ("database", "", {"driver": "mysql", "host": "h", "username": "u"}, {}, "config.database"),
        ("database", "", {"host": "h", "database": "d", "username": "u"}, {}, "config.driver"),
        ("http", "", {}, {}, "config.base_url"),
        ("smtp", "", {}, {}, "config.host"),
        ("webhook", "", {"method": "PUT"}, {}, "config.url"),
        ("api_key", "anthropic", {}, {}, "secrets.api_key"),
        ("oauth2", "google", {}, {}, "config.client_id"),
        ("mcp", "", {}, {}, "config.server_url"),
        ("ssh", "", {"host": "h"}, {"password": "p"}, "config.username"),
        ("aws", "", {"access_key_id": "AKIAIOSFODNN7EXAMPLE"}, {}, "secrets.secret_access_key"),
        ("aws", "", {}, {"secret_access_key": "s"}, "config.access_key_id"),
        ("gcp", "", {}, {}, "secrets.service_account_json"),
        ("azure", "", {"client_id": GUID}, {"client_secret": "s"}, "config.tenant_id"),
        ("azure", "", {"tenant_id": GUID, "client_id": GUID}, {}, "secrets.client_secret"),
        ("custom", "", {"a": 1}, {}, "secrets"),
    ],
)
def test_missing_required_field_is_named(
    type_name: str, provider: str, config: dict[str, Any], secrets: dict[str, str], missing: str
) -> None:
    found = violations(type_name, provider, config, secrets)
    assert missing in found
    assert "required" in found[missing]


@pytest.mark.parametrize(
    ("type_name", "field"),
    [
        ("database", "password"),
        ("http", "token"),
        ("smtp", "password"),
        ("webhook", "auth_secret"),
        ("api_key", "api_key"),
        ("oauth2", "client_secret"),
        ("mcp", "api_key"),
        ("ssh", "private_key"),
        ("aws", "secret_access_key"),
        ("gcp", "service_account_json"),
        ("azure", "client_secret"),
    ],
)
def test_secret_field_in_config_is_rejected(type_name: str, field: str) -> None:
    _, provider, config, secrets, _ = MINIMAL_BY_TYPE[type_name]
    found = violations(type_name, provider, {**config, field: CANARY}, secrets)
    assert found[f"config.{field}"] == "is a secret field: pass it in secrets, not config"
    assert CANARY not in " ".join(found.values())


@pytest.mark.parametrize("type_name", [t for t in ALL_TYPES if t != "custom"])
def test_unknown_config_key_is_rejected(type_name: str) -> None:
    _, provider, config, secrets, _ = MINIMAL_BY_TYPE[type_name]
    found = violations(type_name, provider, {**config, "hots": "x"}, secrets)
    assert found == {"config.hots": f"unknown field for type {type_name}"}


@pytest.mark.parametrize("type_name", [t for t in ALL_TYPES if t != "custom"])
def test_unknown_secret_is_rejected(type_name: str) -> None:
    _, provider, config, secrets, _ = MINIMAL_BY_TYPE[type_name]
    found = violations(type_name, provider, config, {**secrets, "pasword": "x"})
    assert found == {"secrets.pasword": f"unknown secret field for type {type_name}"}


@pytest.mark.parametrize("type_name", ALL_TYPES)
def test_empty_secret_is_rejected(type_name: str) -> None:
    _, provider, config, secrets, _ = MINIMAL_BY_TYPE[type_name]
    name = next(iter(secrets), None) or next(s.name for s in get_type(type_name).fields if s.secret)
    found = violations(type_name, provider, config, {**secrets, name: ""})
    assert found[f"secrets.{name}"] == "must not be empty"


def test_non_secret_field_in_secrets_is_rejected() -> None:
    found = violations("aws", "", {}, {"secret_access_key": "s", "access_key_id": "AKIAIOSFODNN7EXAMPLE"})
    assert found["secrets.access_key_id"] == "is not a secret field: pass it in config"


@pytest.mark.parametrize("type_name", [t for t in ALL_TYPES if not get_type(t).providers])
def test_provider_must_be_empty_for_types_without_providers(type_name: str) -> None:
    _, _, config, secrets, _ = MINIMAL_BY_TYPE[type_name]
    assert set(violations(type_name, "acme", config, secrets)) == {"provider"}


def test_database_provider_does_not_mirror_driver() -> None:
    config = {"driver": "sqlite", "database": "/data/app.db"}
    assert "provider" in violations("database", "sqlite", config)


# ------------------------------------------------------------------------- ports and urls

PORTED = [
    ("database", {"driver": "postgresql", "host": "h", "database": "d", "username": "u"}, {}),
    ("smtp", {"host": "h"}, {}),
    ("ssh", {"host": "h", "username": "u"}, {"password": "p"}),
]


@pytest.mark.parametrize(("type_name", "config", "secrets"), PORTED)
@pytest.mark.parametrize("port", [0, 70000, -1, "abc", "5432", 5432.5, True, float("nan"), [5432]])
def test_bad_port_is_rejected(
    type_name: str, config: dict[str, Any], secrets: dict[str, str], port: Any
) -> None:
    found = violations(type_name, "", {**config, "port": port}, secrets)
    assert set(found) == {"config.port"}
    assert "integer" in found["config.port"]


@pytest.mark.parametrize(("type_name", "config", "secrets"), PORTED)
def test_port_from_a_struct_double_becomes_int(
    type_name: str, config: dict[str, Any], secrets: dict[str, str]
) -> None:
    for given in (5432.0, 5432, 1.0, 65535.0):
        port = validate(type_name, "", {**config, "port": given}, secrets).config["port"]
        assert port == int(given) and type(port) is int


def test_port_out_of_range_message() -> None:
    found = violations("ssh", "", {"host": "h", "username": "u", "port": 70000}, {"password": "p"})
    assert found["config.port"] == "must be an integer between 1 and 65535"


URL_FIELDS = [
    ("http", "", "base_url", {}, {}),
    ("webhook", "", "url", {}, {}),
    ("mcp", "", "server_url", {}, {}),
    ("api_key", "custom", "base_url", {}, {"api_key": "k"}),
    ("oauth2", "custom", "token_url", {"client_id": "c", "authorize_url": "https://a.example.com/auth"}, {}),
]


@pytest.mark.parametrize(("type_name", "provider", "field", "config", "secrets"), URL_FIELDS)
def test_url_with_userinfo_is_rejected(
    type_name: str, provider: str, field: str, config: dict[str, Any], secrets: dict[str, str]
) -> None:
    for url in (f"https://admin:{CANARY}@example.com/x", f"https://{CANARY}@example.com", "http://u:@h"):
        found = violations(type_name, provider, {**config, field: url}, secrets)
        assert set(found) == {f"config.{field}"}
        assert "credentials" in found[f"config.{field}"] and "secret fields" in found[f"config.{field}"]
        assert CANARY not in found[f"config.{field}"]


@pytest.mark.parametrize(
    "url",
    [
        "ftp://example.com/",
        "example.com",
        "https://",
        "https:///path",
        "https://exa mple.com/",
        "https://example.com/\n",
        "javascript:alert(1)",
        "https://example.com:99999/",
        "https://example.com:abc/",
        "https://example.com/" + "a" * 2048,
        42,
        ["https://example.com"],
    ],
)
def test_bad_urls_are_rejected(url: Any) -> None:
    assert set(violations("http", "", {"base_url": url})) == {"config.base_url"}


@pytest.mark.parametrize(
    "url",
    ["http://localhost:8080", "https://[::1]:8443/api", "HTTPS://Example.com/a?b=c#d", "https://10.0.0.1/"],
)
def test_good_urls_are_accepted_unchanged(url: str) -> None:
    assert validate("http", "", {"base_url": url}, {}).config["base_url"] == url


# ------------------------------------------------------------------------- database


@pytest.mark.parametrize(("driver", "port"), [("postgresql", 5432), ("mysql", 3306), ("mssql", 1433)])
def test_database_port_default_follows_driver(driver: str, port: int) -> None:
    config = {"driver": driver, "host": "db", "database": "d", "username": "u"}
    assert validate("database", "", config, {}).config["port"] == port


def test_database_explicit_port_wins() -> None:
    config = {"driver": "mysql", "host": "db", "database": "d", "username": "u", "port": 3307.0}
    assert validate("database", "", config, {}).config["port"] == 3307


@pytest.mark.parametrize(
    ("host", "ssl"),
    [("localhost", False), ("127.0.0.1", False), ("::1", False), ("LocalHost", False), ("db.internal", True)],
)
def test_database_ssl_default_follows_host(host: str, ssl: bool) -> None:
    config = {"driver": "postgresql", "host": host, "database": "d", "username": "u"}
    assert validate("database", "", config, {}).config["ssl"] is ssl


def test_database_explicit_ssl_wins_and_must_be_a_bool() -> None:
    config = {"driver": "postgresql", "host": "localhost", "database": "d", "username": "u"}
    assert validate("database", "", {**config, "ssl": True}, {}).config["ssl"] is True
    for bad in ("true", 1, 1.0, "yes"):
        assert violations("database", "", {**config, "ssl": bad}) == {"config.ssl": "must be true or false"}


def test_database_sqlite_needs_only_a_path() -> None:
    result = validate("database", "", {"driver": "sqlite", "database": "/var/lib/app.db"}, {})
    assert result.config == {"driver": "sqlite", "database": "/var/lib/app.db", "ssl": False}


def test_database_sqlite_refuses_network_fields() -> None:
    found = violations("database", "", {"driver": "sqlite", "database": "a.db", "host": "h", "port": 1})
    assert found == {"config.host": "not used for driver sqlite", "config.port": "not used for driver sqlite"}


def test_database_server_needs_host_and_username_but_not_password() -> None:
    found = violations("database", "", {"driver": "postgresql", "database": "d"})
    assert found == {
        "config.host": "required for driver postgresql",
        "config.username": "required for driver postgresql",
    }
    ok = validate("database", "", {"driver": "postgresql", "database": "d", "host": "h", "username": "u"}, {})
    assert ok.secrets == {}


def test_database_keeps_secrets_out_of_config() -> None:
    config = {
        "driver": "mssql",
        "host": "sql.example.com",
        "database": "d",
        "username": "u",
        "ssl_ca": "-----BEGIN CERTIFICATE-----\nMII...\n-----END CERTIFICATE-----\n",
        "options": {"application_name": "broker"},
    }
    result = validate("database", "", config, {"password": "pw"})
    assert "password" not in result.config
    assert result.secrets == {"password": "pw"}
    assert result.config["options"] == {"application_name": "broker"}


@pytest.mark.parametrize("driver", ["postgres", "PostgreSQL", "", None])
def test_database_driver_is_exact(driver: Any) -> None:
    found = violations("database", "", {"driver": driver, "host": "h", "database": "d", "username": "u"})
    assert set(found) == {"config.driver"}


@pytest.mark.parametrize(
    "host", ["https://db.example.com", "db.example.com:5432", "db example", "db/x", "u@db"]
)
def test_host_must_be_a_bare_host(host: str) -> None:
    found = violations("database", "", {"driver": "mysql", "host": host, "database": "d", "username": "u"})
    assert set(found) == {"config.host"}


def test_options_map_refuses_line_breaks() -> None:
    config = {"driver": "mysql", "host": "h", "database": "d", "username": "u", "options": {"a": "b\r\nc"}}
    assert set(violations("database", "", config)) == {"config.options"}


DYNAMIC_MYSQL = {"driver": "mysql", "host": "h", "database": "d", "username": "u", "dynamic": True}


def test_statement_templates_take_the_known_placeholders_and_name_the_others() -> None:
    hashed = [
        "CREATE USER {{name}}@'%' IDENTIFIED BY PASSWORD {{ password_hash }}",
        "GRANT {{group}} TO {{name}}",
    ]
    ok = validate("database", "", {**DYNAMIC_MYSQL, "creation_statements": hashed, "group_role": "r"}, {})
    assert ok.config["creation_statements"] == hashed
    found = violations("database", "", {**DYNAMIC_MYSQL, "creation_statements": ["CREATE USER {{hash}}"]})
    assert found["config.creation_statements"].startswith("uses an unknown placeholder {{hash}}; known: ")
    assert "{{password_hash}}" in found["config.creation_statements"]


def test_the_statement_grammar_names_each_problem() -> None:
    """One grammar for saving a template (the catalog) and running it (broker.dbusers)."""
    assert STATEMENT_PLACEHOLDERS == ("name", "password", "expiration", "group", "password_hash")
    good = "CREATE ROLE {{name}} PASSWORD {{password}} VALID UNTIL {{ expiration }}"
    assert statement_problem(good) is None
    assert statement_placeholders(good) == {"name", "password", "expiration"}
    assert (statement_problem("GRANT {{nope}} TO {{name}}") or "").startswith(
        "uses an unknown placeholder {{nope}}"
    )
    # A digit used to read as unbalanced braces on saving and as unknown at lease time.
    assert (statement_problem("GRANT {{name1}} TO {{name}}") or "").startswith(
        "uses an unknown placeholder {{name1}}"
    )
    assert (statement_problem("GRANT {{}} TO {{name}}") or "").startswith("uses an unknown placeholder {{}}")
    assert "unbalanced" in (statement_problem("CREATE ROLE {{name}") or "")
    assert "unbalanced" in (statement_problem("CREATE ROLE {{name}} }}") or "")
    assert statement_problem("  ") == "must not be blank"


def test_filling_a_statement_never_expands_a_value_again() -> None:
    filled = fill_statement(
        "CREATE ROLE {{name}} PASSWORD {{ password }}", {"name": '"{{password}}"', "password": "'x'"}
    )
    assert filled == """CREATE ROLE "{{password}}" PASSWORD 'x'"""


@pytest.mark.parametrize("placeholder", ["password", "password_hash"])
@pytest.mark.parametrize("field", ["renewal_statements", "revocation_statements"])
def test_only_creation_statements_may_ask_for_the_password(field: str, placeholder: str) -> None:
    """The broker keeps no password after the user is made: a later statement asking for one
    could never run (a revocation, never end), so it is refused when the connection is saved."""
    statement = f"ALTER USER {{{{name}}}}@'%' IDENTIFIED BY {{{{{placeholder}}}}}"
    found = violations("database", "", {**DYNAMIC_MYSQL, field: [statement]})
    assert found == {
        f"config.{field}": f"uses {{{{{placeholder}}}}}, which has a value only in creation_statements"
    }


# ------------------------------------------------------------------------- http, webhook, mcp


def test_http_auth_types_require_their_secrets() -> None:
    url = {"base_url": "https://api.example.com"}
    assert violations("http", "", {**url, "auth_type": "bearer"}) == {
        "secrets.token": "required when auth_type is bearer"
    }
    assert set(violations("http", "", {**url, "auth_type": "basic"})) == {
        "config.username",
        "secrets.password",
    }
    assert set(violations("http", "", {**url, "auth_type": "api_key"})) == {"secrets.api_key_value"}
    result = validate(
        "http", "", {**url, "auth_type": "api_key", "api_key_header": "X-Key"}, {"api_key_value": "v"}
    )
    assert result.config["api_key_header"] == "X-Key"
    # oauth2 may be created before consent: the access token is optional.
    assert validate("http", "", {**url, "auth_type": "oauth2"}, {}).secrets == {}
    assert validate("http", "", {**url, "auth_type": "oauth2"}, {"access_token": "a"}).secrets == {
        "access_token": "a"
    }


def test_http_refuses_secrets_of_another_auth_type() -> None:
    found = violations("http", "", {"base_url": "https://h"}, {"token": "t"})
    assert found == {"secrets.token": "not used when auth_type is none"}


@pytest.mark.parametrize("timeout", [0, -1, 300.5, 1000, "30", True])
def test_http_timeout_bounds(timeout: Any) -> None:
    assert set(violations("http", "", {"base_url": "https://h", "timeout_seconds": timeout})) == {
        "config.timeout_seconds"
    }


def test_http_timeout_accepts_fractions() -> None:
    assert (
        validate("http", "", {"base_url": "https://h", "timeout_seconds": 0.5}, {}).config["timeout_seconds"]
        == 0.5
    )
    assert (
        validate("http", "", {"base_url": "https://h", "timeout_seconds": 300}, {}).config["timeout_seconds"]
        == 300.0
    )


@pytest.mark.parametrize(
    "headers", [{"Authorization": CANARY}, {"cookie": CANARY}, {"Bad Header": "x"}, {"X-A": 1}]
)
def test_http_headers_refuse_credentials_and_bad_names(headers: dict[str, Any]) -> None:
    found = violations("http", "", {"base_url": "https://h", "headers": headers})
    assert set(found) == {"config.headers"}
    assert CANARY not in found["config.headers"]


def test_http_headers_accepted() -> None:
    headers = {"Accept": "application/json", "X-Tenant": "t1"}
    assert (
        validate("http", "", {"base_url": "https://h", "headers": headers}, {}).config["headers"] == headers
    )


def test_webhook_method_and_auth() -> None:
    url = {"url": "https://h/hook"}
    assert validate("webhook", "", {**url, "method": "PUT"}, {}).config["method"] == "PUT"
    assert set(violations("webhook", "", {**url, "method": "post"})) == {"config.method"}
    assert set(violations("webhook", "", {**url, "method": "GET"})) == {"config.method"}
    assert violations("webhook", "", {**url, "auth_type": "hmac"}) == {
        "secrets.auth_secret": "required when auth_type is hmac"
    }
    ok = validate("webhook", "", {**url, "auth_type": "bearer"}, {"auth_secret": "s"})
    assert ok.secrets == {"auth_secret": "s"}


def test_mcp_transport_and_auth() -> None:
    base = {"server_url": "https://m/mcp"}
    assert validate("mcp", "", {**base, "transport": "sse"}, {}).config["transport"] == "sse"
    assert set(violations("mcp", "", {**base, "transport": "stdio"})) == {"config.transport"}
    assert set(violations("mcp", "", {**base, "auth_type": "api_key"})) == {"secrets.api_key"}
    assert set(violations("mcp", "", {**base, "auth_type": "bearer"})) == {"secrets.token"}
    assert set(violations("mcp", "", {**base, "auth_type": "basic"})) == {
        "config.username",
        "secrets.password",
    }
    ok = validate("mcp", "", {**base, "auth_type": "api_key"}, {"api_key": "k"})
    assert ok.config["api_key_header"] == "X-API-Key"


# ------------------------------------------------------------------------- smtp, ssh


@pytest.mark.parametrize(("encryption", "port"), [("tls", 587), ("ssl", 465), ("none", 25)])
def test_smtp_port_default_follows_encryption(encryption: str, port: int) -> None:
    assert validate("smtp", "", {"host": "h", "encryption": encryption}, {}).config["port"] == port


@pytest.mark.parametrize("address", ["nobody", "a@b", "Name <a@b.com>", "a b@c.com", CANARY])
def test_smtp_from_address(address: str) -> None:
    found = violations("smtp", "", {"host": "h", "from_address": address})
    assert set(found) == {"config.from_address"}
    assert CANARY not in found["config.from_address"]
    assert (
        validate("smtp", "", {"host": "h", "from_address": "a@b.example"}, {}).config["from_address"]
        == "a@b.example"
    )


def test_ssh_needs_a_password_or_a_key() -> None:
    found = violations("ssh", "", {"host": "h", "username": "u"})
    assert found == {
        "secrets.password": "required unless private_key is set",
        "secrets.private_key": "required unless password is set",
    }
    assert validate("ssh", "", {"host": "h", "username": "u"}, {"password": "p"}).secrets == {"password": "p"}


# ------------------------------------------------------------------------- api_key, oauth2


def test_api_key_provider_rules() -> None:
    assert violations("api_key", "", {}, {"api_key": "k"}) == {"provider": "is required for type api_key"}
    assert set(violations("api_key", "acme", {}, {"api_key": "k"})) == {"provider"}
    assert set(violations("api_key", "OpenAI", {}, {"api_key": "k"})) == {"provider"}
    assert violations("api_key", "custom", {}, {"api_key": "k"}) == {
        "config.base_url": "required for provider custom"
    }
    ok = validate(
        "api_key", "custom", {"base_url": "https://llm.internal/v1"}, {"api_key": "k", "api_secret": "s"}
    )
    assert ok.secrets == {"api_key": "k", "api_secret": "s"}


def test_oauth2_custom_provider_needs_endpoints() -> None:
    assert set(violations("oauth2", "custom", {"client_id": "c"})) == {
        "config.authorize_url",
        "config.token_url",
    }
    ok = validate(
        "oauth2",
        "custom",
        {"client_id": "c", "grant_type": "client_credentials", "token_url": "https://t/x"},
        {},
    )
    assert "authorize_url" not in ok.config


def test_oauth2_known_provider_endpoints_can_be_overridden() -> None:
    url = "https://login.microsoftonline.com/contoso/oauth2/v2.0/token"
    ok = validate("oauth2", "microsoft", {"client_id": "c", "token_url": url}, {})
    assert ok.config["token_url"] == url
    assert ok.config["authorize_url"].startswith("https://login.microsoftonline.com/common/")


def test_oauth2_tokens_and_expiry() -> None:
    config = {"client_id": "c", "expires_at": "2030-01-02T03:04:05.678+02:00", "scopes": ["repo", "read:org"]}
    ok = validate(
        "oauth2", "github", config, {"client_secret": "cs", "access_token": "a", "refresh_token": "r"}
    )
    assert ok.config["expires_at"] == "2030-01-02T01:04:05Z"
    assert ok.config["scopes"] == ["repo", "read:org"]
    assert set(ok.secrets) == {"client_secret", "access_token", "refresh_token"}
    assert (
        validate("oauth2", "github", {"client_id": "c", "expires_at": "2030-01-02t03:04:05z"}, {}).config[
            "expires_at"
        ]
        == "2030-01-02T03:04:05Z"
    )


@pytest.mark.parametrize(
    "stamp",
    [
        "2030-01-02",
        "2030-01-02T03:04:05",
        "2030-02-30T00:00:00Z",
        "tomorrow",
        "1893456000",
        1893456000.0,
        CANARY,
    ],
)
def test_oauth2_bad_expiry(stamp: Any) -> None:
    found = violations("oauth2", "github", {"client_id": "c", "expires_at": stamp})
    assert set(found) == {"config.expires_at"}


@pytest.mark.parametrize("scopes", ["repo", ["repo read"], [""], [1], ["ok", None]])
def test_oauth2_bad_scopes(scopes: Any) -> None:
    assert set(violations("oauth2", "github", {"client_id": "c", "scopes": scopes})) == {"config.scopes"}


# ------------------------------------------------------------------------- aws, gcp, azure


def test_aws_fields() -> None:
    secret = {"secret_access_key": "s", "session_token": "t"}
    config = {
        "access_key_id": "ASIAIOSFODNN7EXAMPLE",
        "region": "eu-west-1",
        "role_arn": "arn:aws:iam::123456789012:role/deployer",
    }
    assert validate("aws", "", config, secret).config == config
    for field, bad in [
        ("region", "Europe"),
        ("role_arn", "deployer"),
        ("access_key_id", "wJalrXUtnFEMI/K7MDENG"),
    ]:
        assert set(violations("aws", "", {**config, field: bad}, secret)) == {f"config.{field}"}


@pytest.mark.parametrize(
    "document",
    ["{not json", "[]", json.dumps({"type": "authorized_user", "secret": CANARY}), json.dumps(CANARY)],
)
def test_gcp_service_account_json_is_checked_without_echo(document: str) -> None:
    found = violations("gcp", "", {}, {"service_account_json": document})
    assert set(found) == {"secrets.service_account_json"}
    assert CANARY not in found["secrets.service_account_json"]


def test_gcp_project_id() -> None:
    ok = validate("gcp", "", {"project_id": "my-project-1"}, {"service_account_json": SA_JSON})
    assert ok.config == {"project_id": "my-project-1"}
    assert ok.secrets == {"service_account_json": SA_JSON}
    assert set(violations("gcp", "", {"project_id": "My Project"}, {"service_account_json": SA_JSON})) == {
        "config.project_id"
    }


def test_azure_ids() -> None:
    config = {"tenant_id": GUID, "client_id": GUID, "subscription_id": GUID}
    assert validate("azure", "", config, {"client_secret": "s"}).config == config
    assert set(violations("azure", "", {**config, "client_id": "app"}, {"client_secret": "s"})) == {
        "config.client_id"
    }


# ------------------------------------------------------------------------- custom


def test_custom_takes_free_config_and_secret_names() -> None:
    config = {"endpoint": "https://x", "retries": 3.0, "nested": {"a": [1, "b", None, True]}}
    ok = validate("custom", "", config, {"API_KEY": "k", "db.password": "p"})
    assert ok.config == config
    assert ok.secrets == {"API_KEY": "k", "db.password": "p"}


@pytest.mark.parametrize("name", ["1abc", "has space", "a" * 65, "", "é"])
def test_custom_secret_names_must_be_plain(name: str) -> None:
    found = violations("custom", "", {}, {"ok": "v", name: "v"})
    assert set(found) == {"secrets"}


@pytest.mark.parametrize(
    "config",
    [
        {"password": CANARY},
        {"api_token": CANARY},
        {"clientSecret": CANARY},
        {"conn": {"auth": {"private_key": CANARY}}},
    ],
)
def test_custom_refuses_config_keys_that_look_secret(config: dict[str, Any]) -> None:
    found = violations("custom", "", config, {"k": "v"})
    assert len(found) == 1 and next(iter(found)).startswith("config.")
    assert "secret" in next(iter(found.values()))
    assert CANARY not in " ".join(found.values())


def test_custom_allows_names_that_only_mention_tokens() -> None:
    assert validate("custom", "", {"token_url": "https://t"}, {"k": "v"}).config == {"token_url": "https://t"}


@pytest.mark.parametrize("value", [float("inf"), object(), {1: "a"}, b"bytes"])
def test_custom_config_must_be_json(value: Any) -> None:
    assert set(violations("custom", "", {"x": value}, {"k": "v"})) == {"config.x"}


# ------------------------------------------------------------------------- collection and leaks


def test_all_violations_are_collected() -> None:
    found = violations(
        "http",
        "acme",
        {"base_url": "ftp://x", "auth_type": "basic", "timeout_seconds": 0, "tiemout": 1, "password": "p"},
        {"username": "u", "nope": "x"},
    )
    assert set(found) == {
        "provider",
        "config.base_url",
        "config.timeout_seconds",
        "config.tiemout",
        "config.password",
        "secrets.username",
        "secrets.nope",
    }


def test_violations_are_field_violations_in_one_error() -> None:
    with pytest.raises(InvalidArgument) as raised:
        validate("ssh", "", {"port": 0}, {})
    assert all(isinstance(v, FieldViolation) for v in raised.value.violations)
    assert {v.field for v in raised.value.violations} >= {"config.host", "config.port", "config.username"}
    assert raised.value.status == "INVALID_ARGUMENT"


def test_bad_containers() -> None:
    with pytest.raises(InvalidArgument) as raised:
        validate("http", "", ["base_url"], "token")  # type: ignore[arg-type]
    assert {v.field for v in raised.value.violations} >= {"config", "secrets"}


def test_empty_and_null_config_values_mean_unset() -> None:
    ok = validate("http", "", {"base_url": "https://h", "auth_type": "", "headers": None}, {})
    assert ok.config["auth_type"] == "none" and "headers" not in ok.config
    assert "config.base_url" in violations("http", "", {"base_url": ""})


def test_validated_repr_hides_secret_values() -> None:
    result = validate("api_key", "openai", {}, {"api_key": CANARY})
    assert CANARY not in repr(result)
    assert "api_key" in repr(result)


def test_result_does_not_share_state_between_calls() -> None:
    first = validate("http", "", {"base_url": "https://h"}, {})
    first.config["api_key_header"] = "mutated"
    assert validate("http", "", {"base_url": "https://h"}, {}).config["api_key_header"] == "X-API-Key"


def _canary_values() -> list[Any]:
    return [
        CANARY,
        f"{CANARY} with space",
        f"https://user:{CANARY}@example.com/",
        f"https://{CANARY}.example.com/ x",
        f"ftp://{CANARY}",
        [CANARY, ""],
        {CANARY: CANARY, "x\n": CANARY},
        {"Authorization": f"Bearer {CANARY}"},
        f"{CANARY}\r\n",
        {"nested": {"password": CANARY}},
        json.dumps({"type": "user", "key": CANARY}),
    ]


def test_canary_never_appears_in_errors() -> None:
    raised = 0
    for ctype in list_types():
        _, provider, config, secrets, _ = MINIMAL_BY_TYPE[ctype.name]
        names = [f.name for f in ctype.fields] + ["password", "unknown_field", "api_token"]
        for name in names:
            for value in _canary_values():
                attempts: list[tuple[str, dict[str, Any], dict[str, Any]]] = [
                    (provider, {**config, name: value}, secrets),
                    (provider, config, {**secrets, name: value}),
                    # A second mistake elsewhere guarantees an error to inspect.
                    (CANARY, {**config, name: value, "port": CANARY}, {**secrets, "": CANARY}),
                    (provider, {**config, f"{CANARY} bad key": value}, secrets),
                ]
                for prov, cfg, sec in attempts:
                    try:
                        validate(ctype.name, prov, cfg, sec)
                    except InvalidArgument as error:
                        raised += 1
                        text = str(error) + repr(error.violations) + repr(error.args)
                        assert CANARY not in text, (ctype.name, name, value)
    assert raised > 1000


def test_canary_in_type_name_is_not_echoed() -> None:
    with pytest.raises(InvalidArgument) as raised:
        validate(f"{CANARY}", CANARY, {"a": CANARY}, {"b": CANARY})
    assert CANARY not in str(raised.value)


def test_urls_with_impossible_host_names_are_refused() -> None:
    for url in ("https://exa+mple.com/", "https://-bad.example/", "http://a_b!.example/"):
        with pytest.raises(InvalidArgument):
            validate("http", "", {"base_url": url}, {})
    assert validate("http", "", {"base_url": "https://bücher.example/"}, {}).config["base_url"]
