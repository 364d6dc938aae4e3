"""`AdminPool` on the real PostgreSQL: administrative sessions are reused, bounded per connection,
replaced when the server ended them, retired by a newer record, closed when idle or after a
failed use. Sessions are counted where they live: `pg_stat_activity`, for an administrator role
made for the test (CREATEROLE, unique name, dropped at the end)."""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from urllib.parse import urlsplit

import asyncpg  # type: ignore[import-untyped]
import pytest

from broker.dbusers import AdminPool, UserAdmin, new_password, new_username
from broker.egress import EgressPolicy, EgressSettings
from broker.sensitive import SecretFields
from broker.testers import Target
from tests.postgres_db import base_dsn

KEY = ("default", "conn_pool_test")


@dataclass
class Admin:
    """The test's administrator role, and a counting opener of its sessions."""

    dsn: str
    role: str
    opened: int = 0

    async def open(self) -> UserAdmin:
        self.opened += 1
        parts = urlsplit(self.dsn)
        config = {
            "driver": "postgresql",
            "host": parts.hostname,
            "port": parts.port or 5432,
            "database": parts.path.lstrip("/"),
            "username": self.role,
            "ssl": False,
        }
        target = Target("database", "", config, SecretFields({"password": "unused-trust"}))
        return await UserAdmin.open(target, EgressPolicy(EgressSettings(allow_loopback=True)), timeout=5)

    async def sessions(self) -> int:
        """The role's sessions on the server now (an ended one can take a moment to go)."""
        conn = await asyncpg.connect(self.dsn)
        try:
            return int(
                await conn.fetchval("SELECT count(*) FROM pg_stat_activity WHERE usename = $1", self.role)
            )
        finally:
            await conn.close()

    async def end_sessions(self) -> None:
        conn = await asyncpg.connect(self.dsn)
        try:
            await conn.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = $1", self.role
            )
        finally:
            await conn.close()

    async def settle(self, expected: int) -> int:
        for _ in range(50):
            if (found := await self.sessions()) == expected:
                return found
            await asyncio.sleep(0.05)
        return found


@pytest.fixture
async def admin() -> AsyncIterator[Admin]:
    dsn = base_dsn()
    role = "pooltest_" + secrets.token_hex(4)
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(f"CREATE ROLE {role} LOGIN CREATEROLE")
        yield Admin(dsn, role)
    finally:
        await conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = $1", role)
        for _ in range(50):
            if not await conn.fetchval("SELECT count(*) FROM pg_stat_activity WHERE usename = $1", role):
                break
            await asyncio.sleep(0.05)
        await conn.execute(f"DROP ROLE IF EXISTS {role}")
        await conn.close()


async def make_and_drop_a_user(pool: AdminPool, admin: Admin, version: int = 1) -> None:
    """What a lease does with a session: create a user, then (the revocation) drop it."""
    name = new_username("pooltest_")
    async with pool.session(KEY, version, admin.open) as db:
        await db.create(name, new_password(), datetime.now(UTC) + timedelta(hours=1))
        await asyncio.sleep(0.02)  # held a moment, so concurrent callers overlap
        await db.drop(name)


async def test_sessions_are_reused_and_no_more_than_size_are_open_at_once(admin: Admin) -> None:
    pool = AdminPool(size=2, idle_seconds=60)
    try:
        await asyncio.gather(*(make_and_drop_a_user(pool, admin) for _ in range(8)))
        assert admin.opened == 2  # eight uses at once, two sessions: the others waited
        assert await admin.sessions() == 2  # kept open for the next ones
        for _ in range(5):
            await make_and_drop_a_user(pool, admin)
        assert admin.opened == 2
    finally:
        await pool.close()
    assert await admin.settle(0) == 0


async def test_a_kept_session_the_server_ended_is_replaced_without_failing_the_use(admin: Admin) -> None:
    pool = AdminPool(size=2, idle_seconds=60)
    try:
        await make_and_drop_a_user(pool, admin)
        await admin.end_sessions()  # a server restart, or an idle timeout, while it was kept
        assert await admin.settle(0) == 0
        await make_and_drop_a_user(pool, admin)  # the stale one fails its ping: another is opened
        assert admin.opened == 2 and await admin.sessions() == 1
    finally:
        await pool.close()


async def test_a_newer_record_retires_the_sessions_of_the_older_one(admin: Admin) -> None:
    pool = AdminPool(size=2, idle_seconds=60)
    try:
        await make_and_drop_a_user(pool, admin, version=1)
        await make_and_drop_a_user(pool, admin, version=2)  # new credentials or settings
        assert admin.opened == 2
        assert await admin.settle(1) == 1  # the version 1 session was closed
        # A caller still holding the older record gets a session of its own, not kept.
        await make_and_drop_a_user(pool, admin, version=1)
        assert admin.opened == 3 and await admin.settle(1) == 1
        await make_and_drop_a_user(pool, admin, version=2)
        assert admin.opened == 3  # the version 2 session is still the kept one
    finally:
        await pool.close()


async def test_sessions_unused_for_idle_seconds_are_closed(admin: Admin) -> None:
    now = [0.0]
    pool = AdminPool(size=2, idle_seconds=30, clock=lambda: now[0])
    try:
        await make_and_drop_a_user(pool, admin)
        now[0] = 29.0
        await pool.prune()
        assert await admin.sessions() == 1
        now[0] = 30.0
        await pool.prune()
        assert await admin.settle(0) == 0
        await make_and_drop_a_user(pool, admin)
        assert admin.opened == 2
    finally:
        await pool.close()


async def test_a_session_whose_use_failed_is_closed_not_kept(admin: Admin) -> None:
    pool = AdminPool(size=2, idle_seconds=60)
    try:
        with pytest.raises(RuntimeError):
            async with pool.session(KEY, 1, admin.open):
                raise RuntimeError("the caller's own failure, half way through")
        assert await admin.settle(0) == 0
        await make_and_drop_a_user(pool, admin)
        assert admin.opened == 2
    finally:
        await pool.close()


async def test_idle_seconds_zero_keeps_nothing(admin: Admin) -> None:
    pool = AdminPool(size=2, idle_seconds=0)
    await make_and_drop_a_user(pool, admin)
    await make_and_drop_a_user(pool, admin)
    assert admin.opened == 2 and await admin.settle(0) == 0
