"""The README's "Dynamic database credentials" example runs as written, against `broker dev` and
the shared MariaDB: its ```sql block as root, each `brokerctl` line of its ```sh block, and its
```python block. Only names change: the database, role, admin user and user prefix get names
unique to this run (the reconciler must never see another run's users), LEASE_ID becomes the id
the first resolve printed, and paths point at the test's broker. Everything made on the server
is dropped at the end, also when the test fails.
"""

from __future__ import annotations

import datetime as dt
import os
import re
import secrets
import shlex
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pymysql
import pytest

from broker.client import SyncResolveClient
from tests.devbroker import DevBroker

pytestmark = pytest.mark.e2e

README = (Path(__file__).resolve().parents[2] / "README.md").read_text()
SECTION = README.split("## Dynamic database credentials", 1)[1].split("\n## ", 1)[0]
MY_DSN = os.environ.get("BROKER_TEST_MYSQL_DSN", "")
DEV_RESOLVE_ADDR = "127.0.0.1:50052"
WAIT = 15.0
EXECUTOR = "spiffe://broker.local/tenant/default/executor/demo"


def block(language: str) -> str:
    (text,) = re.findall(rf"^```{language}\n(.*?)^```$", SECTION, re.DOTALL | re.MULTILINE)
    return str(text)


class Names:
    """The README's names and this run's unique ones."""

    def __init__(self) -> None:
        suffix = secrets.token_hex(3)
        self.database = f"brk_e2e_{suffix}"
        self.role = f"brk_role_{suffix}"
        self.admin = f"brk_adm_{suffix}"
        self.prefix = f"e{suffix}_"  # the reconciler's rule: this prefix, then 16 of [a-z0-9]

    def sql(self, text: str) -> str:
        text = text.replace("orders_reader", self.role).replace("broker_admin", self.admin)
        return re.sub(r"\borders\b", self.database, text)

    def sh(self, text: str, data_dir: Path) -> str:
        text = text.replace("group_role=orders_reader", f"group_role={self.role}")
        text = text.replace("username=broker_admin", f"username={self.admin}")
        text = text.replace("database=orders ", f"database={self.database} ")
        text = text.replace("username_prefix=ord_", f"username_prefix={self.prefix}")
        return text.replace(".broker-dev/", f"{data_dir}/")


def root() -> Any:
    return pymysql.connect(host="127.0.0.1", port=3306, user="root", password="", autocommit=True)


def run_sql(*statements: str) -> list[Any]:
    conn = root()
    try:
        with conn.cursor() as cur:
            rows: list[Any] = []
            for statement in statements:
                cur.execute(statement)
                rows = list(cur.fetchall())
            return rows
    finally:
        conn.close()


@pytest.fixture
def names() -> Iterator[Names]:
    if not MY_DSN:
        pytest.skip("BROKER_TEST_MYSQL_DSN unset (e.g. mysql://root@127.0.0.1:3306/test)")
    names = Names()
    try:
        yield names
    finally:
        conn = root()
        try:
            with conn.cursor() as cur:
                cur.execute(
                    "SELECT DISTINCT User FROM mysql.user WHERE LEFT(User, CHAR_LENGTH(%s)) = %s",
                    (names.prefix, names.prefix),
                )
                leftovers = [row[0] for row in cur.fetchall()]
                for user in [*leftovers, names.admin]:
                    cur.execute("DROP USER IF EXISTS %s@'%%'", (user,))
                cur.execute(f"DROP ROLE IF EXISTS `{names.role}`")
                cur.execute(f"DROP DATABASE IF EXISTS `{names.database}`")
        finally:
            conn.close()


def commands(script: str) -> list[list[str]]:
    """The script's commands, continuation lines joined and comments dropped."""
    joined = script.replace("\\\n", " ")
    return [shlex.split(line, comments=True) for line in joined.splitlines() if line.strip()]


def login(user: str, password: str, database: str) -> Any:
    return pymysql.connect(host="127.0.0.1", port=3306, user=user, password=password, database=database)


def user_exists(user: str) -> bool:
    conn = root()
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT 1 FROM mysql.user WHERE User = %s", (user,))
            return cur.fetchone() is not None
    finally:
        conn.close()


def wait_until_dropped(user: str) -> None:
    deadline = time.monotonic() + WAIT
    while user_exists(user):
        if time.monotonic() > deadline:
            pytest.fail(f"{user} was not dropped within {WAIT:g}s")
        time.sleep(0.2)


def test_the_readme_lease_example_makes_and_drops_database_users(
    dev_broker: DevBroker, names: Names, tmp_path: Path
) -> None:
    # The ```sql block, as MariaDB's root.
    sql = names.sql(block("sql"))
    statements = [re.sub(r"--[^\n]*", "", part).strip() for part in sql.split(";")]
    run_sql(*(statement for statement in statements if statement))

    script = commands(names.sh(block("sh"), dev_broker.data_dir))
    printf, *ctl_lines = script
    assert printf[0] == "printf" and printf[2] == ">"
    Path(printf[3]).write_text(printf[1])
    assert all(line[0] == "brokerctl" for line in ctl_lines)
    outputs: list[Any] = []
    released: list[Any] = []  # each resolve's answer
    session: Any = None  # the first lease user's open session
    for line in ctl_lines:
        args = [released[0]["lease"]["id"] if arg == "LEASE_ID" else arg for arg in line[1:]]
        doc, _ = dev_broker.ok(*args)
        outputs.append(doc)
        users = [r["lease"]["username"] for r in released]
        if args[0] == "resolve":
            # The lease's user logs in with the password released, with the role's privileges.
            user = doc["lease"]["username"]
            assert doc["config"]["username"] == user and user not in users
            assert re.fullmatch(re.escape(names.prefix) + "[a-z0-9]{16}", user)
            assert doc["secrets"]["password"] != printf[1]  # never the admin's
            assert doc["lease"]["run_id"] == "nightly-42" and doc["expires_at"] == doc["lease"]["expires_at"]
            connection = login(user, doc["secrets"]["password"], names.database)
            with connection.cursor() as cur:
                cur.execute("SELECT count(*) FROM items")
            session = session or connection
            released.append(doc)
        elif args[0] == "lease":
            assert doc == {"revoked": 1}
            # Dropped now, and its open session ended with it; the run's other user is untouched.
            wait_until_dropped(users[0])
            with pytest.raises(pymysql.err.OperationalError), session.cursor() as cur:
                cur.execute("SELECT count(*) FROM items")
            assert user_exists(users[1])
        elif args[:2] == ["leases", "revoke"]:
            assert doc == {"revoked": 1}  # as the README's comment says
            wait_until_dropped(users[1])
        elif args[0] == "leases" and "--state" in args:
            assert {x["id"] for x in doc["leases"]} == {r["lease"]["id"] for r in released}
            assert {x["state"] for x in doc["leases"]} == {"LEASE_STATE_ACTIVE"}
    assert len(released) == 2
    listed = outputs[-1]["leases"]
    assert {(x["state"], x["revoke_reason"]) for x in listed} == {("LEASE_STATE_REVOKED", "revoked")}

    # The ```python block: the SDK's lease, revoked when the client closes.
    (tmp_path / ".broker-dev").symlink_to(dev_broker.data_dir, target_is_directory=True)
    example = block("python")
    assert DEV_RESOLVE_ADDR in example
    ran = subprocess.run(
        [sys.executable, "-c", example.replace(DEV_RESOLVE_ADDR, dev_broker.resolve_addr)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert ran.returncode == 0, ran.stderr
    username = ran.stdout.strip()
    assert username.startswith(names.prefix)
    leases, _ = dev_broker.ok("leases", "--run-id", "nightly-43")
    [lease] = leases["leases"]
    assert lease["username"] == username and lease["state"] in ("LEASE_STATE_REVOKING", "LEASE_STATE_REVOKED")
    wait_until_dropped(username)


def test_the_sync_sdk_renews_its_lease_until_close(dev_broker: DevBroker, names: Names) -> None:
    statements = [re.sub(r"--[^\n]*", "", part).strip() for part in names.sql(block("sql")).split(";")]
    run_sql(*(statement for statement in statements if statement))
    (password_file,) = re.findall(r"^printf '[^']+' > (\S+)", block("sh"), re.MULTILINE)
    admin_password = re.findall(r"IDENTIFIED BY '([^']+)'", block("sql"))[0]
    password_path = Path(password_file.replace(".broker-dev/", f"{dev_broker.data_dir}/"))
    password_path.write_text(admin_password)
    dev_broker.ok(
        "create", "short-lived", "--type", "database", "--config", "driver=mysql",
        "--config", "host=127.0.0.1", "--config", f"database={names.database}",
        "--config", f"username={names.admin}", "--secret", f"password=@{password_path}",
        "--config", "dynamic=true", "--config", f"group_role={names.role}",
        "--config", f"username_prefix={names.prefix}", "--config", "default_ttl=3", "--config", "max_ttl=60",
    )  # fmt: skip
    dev_broker.ok("grant", "short-lived", EXECUTOR, "--expires-in", "1h")
    tls = dev_broker.data_dir / "tls"
    with SyncResolveClient(
        dev_broker.resolve_addr, ca=tls / "ca.pem", cert=tls / "executor.pem", key=tls / "executor-key.pem"
    ) as client:
        db = client.resolve(name="short-lived", run_id="renewal")
        assert db.lease is not None
        first_end = db.lease.expires_at
        # After 2 s (2/3 of 3 s) the client's thread renews: the broker's lease moves on, and the
        # user outlives its first end.
        time.sleep(4.5)
        [lease] = dev_broker.ok("leases", "--run-id", "renewal")[0]["leases"]
        assert lease["state"] == "LEASE_STATE_ACTIVE"
        assert dt.datetime.fromisoformat(lease["expires_at"]) > first_end
        assert user_exists(db.lease.username)
        with login(db.lease.username, db.secrets["password"], names.database).cursor() as cur:
            cur.execute("SELECT count(*) FROM items")
    wait_until_dropped(db.lease.username)  # close() revoked it
