"""A real nats-server from the wheel on a free loopback port for the whole test session."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import asyncpg
import pytest
from nats.aio.client import Client
from nats.js.api import StreamConfig
from nats.js.errors import NotFoundError
from sqlalchemy.engine import make_url

import migrations
import schemas.database
from bus.connection import Settings, connect
from bus.embedded import EmbeddedNats, free_port
from bus.events import EVENTS_STREAM, ensure_events_stream
from handlers.ingest import INGEST_STREAM, ensure_ingest_stream
from schemas.database import open_database, service_url


@pytest.fixture(scope="session")
def nats_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedNats]:
    server = EmbeddedNats(data_dir=Path(tmp_path_factory.mktemp("nats")), port=free_port())
    server.start()
    yield server
    server.stop()


@pytest.fixture
def nats_url(nats_server: EmbeddedNats) -> str:
    return nats_server.url


@pytest.fixture
async def nc(nats_url: str) -> AsyncIterator[Client]:
    client = await connect(Settings(servers=[nats_url]), name="test")
    yield client
    await client.close()


TEST_DATABASE_URL = os.environ.get("TEST_DATABASE_URL", "postgresql+asyncpg://postgres@127.0.0.1:5432/test")


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """A fresh database for this test session on the machine's Postgres, dropped at the end.

    Without a reachable Postgres the Postgres half is skipped, except under CI=1 where it fails.
    """
    admin = make_url(TEST_DATABASE_URL)
    name = f"bitnexus_test_{os.getpid()}_{secrets.token_hex(3)}"

    async def admin_execute(sql: str) -> None:
        conn = await asyncpg.connect(
            host=admin.host,
            port=admin.port or 5432,
            user=admin.username,
            password=admin.password,
            database=admin.database,
            timeout=5,
        )
        try:
            await conn.execute(sql)
        finally:
            await conn.close()

    try:
        asyncio.run(admin_execute(f'CREATE DATABASE "{name}"'))
    except (OSError, asyncpg.PostgresError) as exc:
        if os.environ.get("CI"):
            pytest.fail(f"Postgres at {TEST_DATABASE_URL} is required on CI: {exc!r}")
        pytest.skip(f"no Postgres at {TEST_DATABASE_URL}: {exc!r}")
    yield admin.set(database=name).render_as_string(hide_password=False)
    asyncio.run(admin_execute(f'DROP DATABASE "{name}" WITH (FORCE)'))


async def raw_connection(url: str) -> asyncpg.Connection:
    """asyncpg's own connection to the database at `url`, past the mesh's engines."""
    return await asyncpg.connect(make_url(url).set(drivername="postgresql").render_as_string(False))


@contextlib.asynccontextmanager
async def own_role(postgres_url: str) -> AsyncIterator[tuple[str, asyncpg.Connection]]:
    """A role of the test's own with the privileges of the URL's (a member of it), dropped after:
    yields its URL and an administrator's connection that changes its settings."""
    role, owner = f"bitnexus_role_{secrets.token_hex(3)}", make_url(postgres_url).username
    admin = await raw_connection(postgres_url)
    try:
        await admin.execute(f'CREATE ROLE "{role}" LOGIN IN ROLE "{owner}"')
        yield make_url(postgres_url).set(username=role).render_as_string(hide_password=False), admin
    finally:
        await end_sessions(admin, role)
        await admin.execute(f'REASSIGN OWNED BY "{role}" TO "{owner}"')  # what it made (a migration's tables)
        await admin.execute(f'DROP ROLE IF EXISTS "{role}"')
        await admin.close()


async def end_sessions(admin: asyncpg.Connection, role: str) -> None:
    """End every session of `role`: what it connects with next has the role's settings."""
    await admin.execute(f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = '{role}'")


@pytest.fixture(scope="session", params=["sqlite", "postgres"])
def database_url(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> str:
    """Each storage test runs twice: on SQLite (a file per service) and on Postgres."""
    if request.param == "sqlite":
        url = f"sqlite+aiosqlite:///{tmp_path_factory.mktemp('sqlite') / 'mesh.db'}"
    else:
        url = request.getfixturevalue("postgres_url")
    migrations.upgrade(url)
    return url


async def empty_tables(url: str) -> None:
    """Delete every row (SQLite: in each service's file) and rewind the ledger's cursors (events, postings)."""
    all_tables = [table.name for table in migrations.target_metadata().sorted_tables if table.name != "ledger_cursors"]
    for service in migrations.SERVICES_WITH_TABLES:
        db = open_database(service_url(service, url))
        async with db.writer.begin() as conn:
            catalog = "SELECT name FROM sqlite_master" if db.is_sqlite else "SELECT tablename FROM pg_tables"
            existing = {row[0] for row in await conn.exec_driver_sql(catalog)}
            tables = [name for name in all_tables if name in existing]
            if db.is_sqlite:
                for table in tables:
                    await conn.exec_driver_sql(f"DELETE FROM {table}")
                if "sqlite_sequence" in existing:
                    await conn.exec_driver_sql("DELETE FROM sqlite_sequence")
            else:
                await conn.exec_driver_sql(f"TRUNCATE {', '.join(tables)} RESTART IDENTITY")
            if service == "ledger" or not db.is_sqlite:
                await conn.exec_driver_sql("UPDATE ledger_cursors SET seq = 0")
        await db.dispose()
        if not db.is_sqlite:
            return  # one Postgres database holds every service's tables


@pytest.fixture
async def database(database_url: str, monkeypatch: pytest.MonkeyPatch) -> str:
    """Empty tables, and `DATABASE_URL` pointing at them for services started in this test."""
    await empty_tables(database_url)
    monkeypatch.setenv("DATABASE_URL", database_url)
    return database_url


@pytest.fixture
def short_timeouts(monkeypatch: pytest.MonkeyPatch) -> None:
    """A statement waits 0.3 s for Postgres, and a writer 0.3 s for SQLite's lock (both 10 s)."""
    monkeypatch.setattr(schemas.database, "postgres_command_timeout_s", 0.3)
    monkeypatch.setattr(schemas.database, "sqlite_busy_timeout_ms", 300)


class Mesh:
    """The services under test, spoken to over NATS exactly as an outside client would."""

    def __init__(self, nc: Client) -> None:
        self.nc = nc
        self.js = nc.jetstream()

    async def request(self, subject: str, body: object, timeout_s: float = 10.0) -> tuple[int | None, dict]:
        """Send `body` (bytes as they are, anything else as JSON); return (error code or None, reply)."""
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        reply = await self.nc.request(subject, data, timeout=timeout_s)
        code = reply.headers.get("Nats-Service-Error-Code") if reply.headers else None
        return (int(code) if code is not None else None), json.loads(reply.data)

    async def ok(self, subject: str, body: object) -> dict:
        code, reply = await self.request(subject, body)
        assert code is None, reply
        return reply

    async def events(self, count: int, timeout_s: float = 10.0) -> list[tuple[str, str, dict]]:
        """The first `count` events of the stream as (subject, Nats-Msg-Id, envelope); fails on fewer."""
        sub = await self.js.subscribe("events.>", ordered_consumer=True)
        found = []
        try:
            for _ in range(count):
                msg = await sub.next_msg(timeout=timeout_s)
                found.append((msg.subject, (msg.headers or {}).get("Nats-Msg-Id", ""), json.loads(msg.data)))
        finally:
            await sub.unsubscribe()
        return found

    async def event_count(self) -> int:
        return (await self.js.stream_info(EVENTS_STREAM)).state.messages


async def fresh_streams(mesh: Mesh) -> None:
    """Empty EVENTS, and INGEST made again (no consumer of an earlier test left on it), for each test."""
    await ensure_events_stream(mesh.js)
    await mesh.js.purge_stream(EVENTS_STREAM)
    with contextlib.suppress(NotFoundError):
        await mesh.js.delete_stream(INGEST_STREAM)
    await ensure_ingest_stream(mesh.js)


@contextlib.asynccontextmanager
async def events_parked(mesh: Mesh) -> AsyncIterator[None]:
    """JetStream takes no event while the block runs: EVENTS replaced by a stream of that name on
    other subjects, which the mesh leaves as it is (`ensure_stream`), so that every publish finds
    no stream ("no responders") and every relay keeps its events and retries. Then made again."""
    await mesh.js.delete_stream(EVENTS_STREAM)
    await mesh.js.add_stream(StreamConfig(name=EVENTS_STREAM, subjects=["parked.events.>"]))
    try:
        yield
    finally:
        await mesh.js.delete_stream(EVENTS_STREAM)
        await ensure_events_stream(mesh.js)


@pytest.fixture
async def core_mesh(nc: Client, database: str) -> AsyncIterator[Mesh]:
    """Ledger, accounts and products serving in this test's loop, on an empty database and streams."""
    import ledger.events as ledger_events
    import ledger.service as ledger
    from handlers import accounts, products

    mesh = Mesh(nc)
    await fresh_streams(mesh)
    async with ledger_events.serving(nc), ledger.serving(nc), accounts.serving(nc), products.serving(nc):
        yield mesh


@pytest.fixture
async def mesh(core_mesh: Mesh) -> AsyncIterator[Mesh]:
    """The whole mesh in this test's loop: the core services and transactions."""
    from handlers import transactions

    async with transactions.serving(core_mesh.nc):
        yield core_mesh
