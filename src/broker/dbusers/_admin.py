"""`UserAdmin`: create, renew, drop and list the broker's users over one administrative session."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping
from datetime import datetime
from types import TracebackType
from typing import Any

from broker.catalog import fill_statement, statement_placeholders
from broker.dbusers._errors import LeaseDbError
from broker.dbusers._mysql import MysqlSession
from broker.dbusers._names import check_prefix
from broker.dbusers._postgres import PostgresSession
from broker.dbusers._session import Session
from broker.dbusers._templates import Statements, expiration_text, statements_for
from broker.egress import EgressPolicy
from broker.testers import Target

# The longest user name each server accepts (PostgreSQL NAMEDATALEN-1, MySQL 5.7+/MariaDB 10.x).
_MAX_NAME = {"postgresql": 63, "mysql": 32}


class UserAdmin:
    """One administrative session to the connection's database, opened through the egress policy."""

    def __init__(self, session: Session, driver: str, config: Mapping[str, Any]) -> None:
        self._session = session
        self._driver = driver
        self._group = str(config.get("group_role") or "")
        self._statements: Statements = statements_for(
            driver, config, mariadb=session.mariadb, password_hashes=session.password_hashes
        )

    @classmethod
    async def open(
        cls,
        target: Target,
        egress: EgressPolicy,
        *,
        timeout: float,  # noqa: ASYNC109 (each step is bounded by it, not the whole session)
    ) -> UserAdmin:
        """Connect as the connection's admin credential. The templates are checked first (a bad
        one is ValueError, before any packet is sent); a failure to connect is LeaseDbError. A
        placeholder the server or the step has no value for ({{password_hash}} on MySQL) is
        LeaseDbError("invalid_config", "{{password_hash}}") from the step that uses it, not here:
        such a creation statement must not keep the revocations from running."""
        driver = str(target.config.get("driver", ""))
        if driver not in _MAX_NAME:
            raise ValueError(f"driver {driver!r} has no database users the broker can manage")
        statements_for(driver, target.config)
        opener = PostgresSession.open if driver == "postgresql" else MysqlSession.open
        session: Session = await opener(target, egress, timeout)
        try:
            return cls(session, driver, target.config)
        except BaseException:
            await session.close()
            raise

    async def __aenter__(self) -> UserAdmin:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def create(self, name: str, password: str, expires_at: datetime) -> None:
        """Create the user with the creation statements. When one fails, what the earlier ones made
        is undone (PostgreSQL: one transaction; MySQL: the revocation runs) and the error raised."""
        self._check_name(name)
        statements = await self._render(self._statements.creation, name, password, expires_at)
        if self._driver == "postgresql":
            await self._session.run(statements)
            return
        # MySQL commits each account statement: when the first fails nothing is ours to undo (it
        # may be a user of that name that exists already), after that the user is.
        await self._session.run(statements[:1])
        try:
            await self._session.run(statements[1:])
        except LeaseDbError:
            with contextlib.suppress(LeaseDbError):
                await self.drop(name)
            raise

    async def renew(self, name: str, expires_at: datetime) -> None:
        """Move the user's validity to `expires_at` (MySQL by default: nothing to do)."""
        self._check_name(name)
        await self._session.run(await self._render(self._statements.renewal, name, None, expires_at))

    @property
    def revocation_replaced(self) -> str:
        """The placeholder ("{{password}}") that makes the connection's revocation statements
        unusable, so that `drop` runs the driver's defaults instead; "" when they are its own."""
        return self._statements.revocation_replaced

    @property
    def own_revocation(self) -> bool:
        """Whether the connection has revocation statements of its own (which `drop` runs unless
        told to run the driver's defaults)."""
        return self._statements.own_revocation

    async def drop(self, name: str, *, driver_default: bool = False) -> None:
        """End the user's sessions and drop it; a user already gone is success. With
        `driver_default`, the driver's default revocation runs instead of the connection's."""
        self._check_name(name)
        templates = self._statements.default_revocation if driver_default else self._statements.revocation
        await self._session.revoke(name, await self._render(templates, name, None, None))

    async def prefixed_users(self, prefix: str) -> list[str]:
        """The users whose name starts with `prefix`, and no other."""
        check_prefix(prefix)
        users = await self._session.users_with_prefix(prefix)
        # The server already compared; this keeps the promise whatever its collation did.
        return [user for user in users if user.startswith(prefix)]

    async def ping(self) -> None:
        """LeaseDbError when the session no longer works."""
        await self._session.ping()

    async def close(self) -> None:
        """Close the session; never raises."""
        with contextlib.suppress(Exception):
            await self._session.close()

    def _check_name(self, name: str) -> None:
        if not name or len(name) > _MAX_NAME[self._driver] or "\x00" in name:
            raise ValueError(f"a user name is 1-{_MAX_NAME[self._driver]} characters")

    async def _render(
        self, templates: tuple[str, ...], name: str, password: str | None, expires_at: datetime | None
    ) -> list[str]:
        """The templates with their placeholders quoted by the server's rules. A placeholder that has
        no value in this step (the password at renewal) or on this server ({{password_hash}} on
        MySQL) is LeaseDbError("invalid_config", "{{placeholder}}"), never an empty string, before
        any statement runs. Only the forms used are computed (a SCRAM verifier costs a PBKDF2)."""
        used = set().union(*(statement_placeholders(t) for t in templates)) if templates else set()
        session = self._session
        available: dict[str, Callable[[], str | None]] = {
            "name": lambda: name,
            "password": lambda: None if password is None else session.password_form(password),
            "password_hash": lambda: (
                session.password_hash(password) if password is not None and session.password_hashes else None
            ),
            "expiration": lambda: (
                expiration_text(expires_at, postgresql=self._driver == "postgresql")
                if expires_at is not None
                else None
            ),
            "group": lambda: self._group or None,
        }
        values: dict[str, str] = {}
        for placeholder in sorted(used):
            value = available[placeholder]()
            if value is None:
                raise LeaseDbError("invalid_config", f"{{{{{placeholder}}}}}")
            values[placeholder] = value
        quoted = await self._session.quote(values) if values else {}
        return [fill_statement(template, quoted) for template in templates]
