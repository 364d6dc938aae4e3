"""Short-lived database users for leases: create, renew, drop and list them on PostgreSQL and
MySQL/MariaDB, with the connection's administrative credential, through the egress policy.

    _templates.py  Statements, statements_for (defaults per driver; the placeholders' grammar is
                   broker.catalog's), expiration_text
    _names.py      new_username (prefix + 16 random [a-z0-9]), new_password
    _admin.py      UserAdmin: one administrative session (open, create, renew, drop, prefixed_users)
    _pool.py       AdminPool: sessions kept per connection and reused, bounded, closed when idle
    _postgres.py   the asyncpg session;  _mysql.py  the aiomysql session;  _session.py  what they share
    _errors.py     LeaseDbError(reason, code): a token and a SQLSTATE / errno, never server text

Every value reaches SQL quoted by the server's rules (PostgreSQL quote_ident / quote_literal,
MySQL the driver's escape), never by string formatting, and statements run one at a time. On
PostgreSQL a password reaches the server only as its SCRAM-SHA-256 verifier; by default on
MariaDB only as its mysql_native_password hash ({{password_hash}}), on MySQL as it is ({{password}},
which MySQL rewrites out of its logs).
"""

from broker.dbusers._admin import UserAdmin
from broker.dbusers._errors import LeaseDbError
from broker.dbusers._names import new_password, new_username
from broker.dbusers._pool import AdminPool
from broker.dbusers._templates import Statements, statements_for

__all__ = [
    "AdminPool",
    "LeaseDbError",
    "Statements",
    "UserAdmin",
    "new_password",
    "new_username",
    "statements_for",
]
