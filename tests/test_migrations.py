"""`bitnexus migrate`: one migrator at a time on both stores; on Postgres a migration's statements
may run long, its waits for a lock may not."""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import sqlite3
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from alembic import command
from sqlalchemy.engine import make_url

import migrations
import schemas.database
from supervisor import setting_faults_said
from tests.conftest import own_role, raw_connection

ENTRIES = 50_000
"""Enough that rebuilding the chain's indexes (ledger_0003) outlasts `LIMIT_S`."""
LIMIT_S = 0.05
"""A statement limit elsewhere, shortened."""


@pytest.fixture
async def new_database(postgres_url: str) -> AsyncIterator[str]:
    """A database of its own, with no tables; dropped after."""
    name = f"bitnexus_migrations_{secrets.token_hex(3)}"
    admin = await raw_connection(postgres_url)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
        yield make_url(postgres_url).set(database=name).render_as_string(hide_password=False)
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()


@pytest.fixture
async def scratch_database(new_database: str) -> str:
    """Migrated to ledger_0002: before the chain's key columns became bytewise (ledger_0003)."""
    await asyncio.to_thread(command.upgrade, migrations._config(make_url(new_database)), "ledger_0002")
    return new_database


async def ledger_revision(url: str) -> str:
    conn = await raw_connection(url)
    try:
        revisions = [row[0] for row in await conn.fetch("SELECT version_num FROM alembic_version")]
    finally:
        await conn.close()
    return next(revision for revision in revisions if revision.startswith("ledger_"))


@pytest.mark.parametrize("limit", ["the services'", "the role's"])
async def test_a_migration_may_take_longer_than_a_statement_may_elsewhere(
    scratch_database: str, monkeypatch: pytest.MonkeyPatch, limit: str
) -> None:
    """Until session 23 a migration's statements had the services' limit (10 s): ledger_0003 gave
    up with a bare `TimeoutError` on a chain of 7M entries, whose indexes took 13 s to rebuild.
    A `statement_timeout` the deployment sets on the role or the database does not bind it either."""
    conn = await raw_connection(scratch_database)
    try:
        await conn.execute(
            "INSERT INTO ledger_entries SELECT n, 'transfer-' || n, 'user:' || n % 1000, 'user:' || n % 997 + 1000,"
            " 1, 'EUR', '', now(), repeat('0', 64), repeat('a', 64) FROM generate_series(1, $1::bigint) AS n",
            ENTRIES,
        )
    finally:
        await conn.close()
    async with contextlib.AsyncExitStack() as stack:
        migrator = scratch_database
        if limit == "the services'":
            monkeypatch.setattr(schemas.database, "postgres_command_timeout_s", LIMIT_S)
        else:
            migrator, admin = await stack.enter_async_context(own_role(scratch_database))
            await admin.execute(f"ALTER ROLE \"{make_url(migrator).username}\" SET statement_timeout = '{LIMIT_S}s'")
        await migrated_past_the_limit(migrator)


async def migrated_past_the_limit(database: str) -> None:
    """Migrated to the head by `database`'s user, for longer than `LIMIT_S`, the chain whole."""
    started = time.monotonic()
    await migrations.upgrade_async(database)
    assert time.monotonic() - started > LIMIT_S
    assert await ledger_revision(database) == migrations.head_of("ledger")
    conn = await raw_connection(database)
    try:
        collation = "SELECT collation_name FROM information_schema.columns WHERE table_name = $1 AND column_name = $2"
        assert await conn.fetchval(collation, "ledger_entries", "id") == "C"
        assert await conn.fetchval("SELECT count(*) FROM ledger_entries") == ENTRIES
    finally:
        await conn.close()


async def test_a_migration_locked_out_gives_up_within_its_wait_and_says_so_in_one_line(
    scratch_database: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A session holding the chain's table (a dump, a long transaction) would keep ledger_0003's
    ALTER TABLE waiting, and every service's statement queued behind it."""
    monkeypatch.setattr(schemas.database, "migration_lock_wait_s", 0.3)
    holder = await raw_connection(scratch_database)
    try:
        await holder.execute("BEGIN; LOCK TABLE ledger_entries IN ACCESS SHARE MODE")
        started = time.monotonic()
        with pytest.raises(SystemExit) as exited, setting_faults_said():
            async with asyncio.timeout(10):  # a lock wait without a limit would last until the COMMIT below
                await migrations.upgrade_async(scratch_database)
        waited = time.monotonic() - started
        await holder.execute("COMMIT")
    finally:
        await holder.close()

    assert exited.value.code == 1 and waited < 5
    said = capsys.readouterr().err
    assert said.count("\n") == 1 and "Traceback" not in said
    assert (
        "waited 0.3 s for a lock another session holds (another migration" in said
        and "nothing of it was applied" in said
    )
    assert await ledger_revision(scratch_database) == "ledger_0002"
    await migrations.upgrade_async(scratch_database)  # the lock released: it goes through
    assert await ledger_revision(scratch_database) == migrations.head_of("ledger")


async def test_two_migrators_at_once_on_a_new_database_both_succeed(new_database: str) -> None:
    """Two meshes started together (`bitnexus migrate` runs first in each): each created
    `alembic_version`, and one failed with a traceback (session 23). One at a time now: the
    second finds nothing left to do."""
    env = {**os.environ, "DATABASE_URL": new_database}
    migrators = [
        await asyncio.create_subprocess_exec(
            sys.executable, "-m", "supervisor", "migrate", env=env, stderr=asyncio.subprocess.PIPE
        )
        for _ in range(2)
    ]
    said = [(await migrator.communicate())[1].decode() for migrator in migrators]
    assert [migrator.returncode for migrator in migrators] == [0, 0], said
    assert await ledger_revision(new_database) == migrations.head_of("ledger")


async def test_migrators_at_once_on_new_sqlite_files_all_succeed(tmp_path: Path) -> None:
    """Alembic takes SQLite's DDL as not transactional and committed each revision on its own,
    with no lock: of three `bitnexus migrate` at once on new files, two failed with "table
    ledger_entries already exists" and a traceback (session 24). Now each migrator holds the
    file's write lock from its first read to its commit, and the later ones find nothing to do."""
    env = {**os.environ, "DATABASE_URL": f"sqlite:///{tmp_path / 'mesh.db'}"}
    migrators = [
        await asyncio.create_subprocess_exec(
            sys.executable, "-m", "supervisor", "migrate", env=env, stderr=asyncio.subprocess.PIPE
        )
        for _ in range(3)
    ]
    said = [(await migrator.communicate())[1].decode() for migrator in migrators]
    assert [migrator.returncode for migrator in migrators] == [0, 0, 0], said
    for service in migrations.SERVICES_WITH_TABLES:
        with sqlite3.connect(tmp_path / f"mesh.{service}.db") as conn:
            (version,) = conn.execute("SELECT version_num FROM alembic_version").fetchall()
        assert version == (migrations.head_of(service),)


async def test_a_sqlite_migration_locked_out_gives_up_within_its_wait_and_says_so_in_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A session holding the ledger file's write lock (a service's long write, a backup): the
    migration waits `migration_lock_wait_s`, then says so, with nothing of it applied."""
    monkeypatch.setattr(schemas.database, "migration_lock_wait_s", 0.3)
    database = f"sqlite+aiosqlite:///{tmp_path / 'mesh.db'}"
    holder = sqlite3.connect(tmp_path / "mesh.ledger.db", isolation_level=None)
    try:
        holder.execute("BEGIN IMMEDIATE")
        started = time.monotonic()
        with pytest.raises(SystemExit) as exited, setting_faults_said():
            await migrations.upgrade_async(database)
        waited = time.monotonic() - started
        holder.execute("COMMIT")
        assert holder.execute("SELECT name FROM sqlite_master").fetchall() == []
    finally:
        holder.close()
    assert exited.value.code == 1 and waited < 5
    said = capsys.readouterr().err
    assert said.count("\n") == 1 and "Traceback" not in said
    assert "waited 0.3 s for a lock another session holds" in said and "nothing of it was applied" in said
    await migrations.upgrade_async(database)  # the lock released: it goes through
    with sqlite3.connect(tmp_path / "mesh.ledger.db") as conn:
        assert conn.execute("SELECT version_num FROM alembic_version").fetchall() == [(migrations.head_of("ledger"),)]
