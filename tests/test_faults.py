"""Faults users meet: a dependency down, a process killed between commit and publish."""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import signal
import sqlite3
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from nats.aio.client import Client
from sqlalchemy.engine import make_url

import migrations
import schemas.database
from handlers import accounts, products
from tests.conftest import (
    Mesh,
    empty_tables,
    end_sessions,
    events_parked,
    fresh_streams,
    own_role,
    raw_connection,
)


async def test_product_create_is_503_when_accounts_does_not_answer(nc: Client, database: str) -> None:
    mesh = Mesh(nc)
    async with products.serving(nc):
        code, reply = await mesh.request(
            "products.products.create",
            {"sku": "S", "name": "N", "price": 1, "currency": "EUR", "stock": 1, "seller_id": 1},
        )
    assert code == 503
    assert reply["error"]["type"] == "unavailable"


def start_service(name: str, nats_url: str, database_url: str) -> subprocess.Popen:
    env = {**os.environ, "NATS_URL": nats_url, "DATABASE_URL": database_url}
    return subprocess.Popen([sys.executable, "-m", "supervisor", "serve", name], env=env)


async def wait_until_serving(nc: Client, name: str, timeout_s: float = 15.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while asyncio.get_running_loop().time() < deadline:
        try:
            await nc.request(f"$SRV.PING.{name}", b"", timeout=0.2)
            return
        except Exception:  # not up yet
            await asyncio.sleep(0.05)
    raise TimeoutError(name)


async def test_event_committed_before_a_kill_is_published_after_restart_exactly_once(
    nc: Client, database: str, nats_url: str
) -> None:
    mesh = Mesh(nc)
    accounts = start_service("accounts", nats_url, database)
    try:
        await wait_until_serving(nc, "accounts")
        async with events_parked(mesh):  # JetStream takes no event: the relay must keep the row
            user = await mesh.ok("accounts.users.create", {"email": "k@x.io", "name": "K", "password": "password1"})
            await asyncio.sleep(0.3)
            accounts.send_signal(signal.SIGKILL)  # committed, never published
            accounts.wait(10)
        assert await mesh.event_count() == 0
        accounts = start_service("accounts", nats_url, database)
        events = await mesh.events(1)
        await asyncio.sleep(0.5)
        assert await mesh.event_count() == 1
    finally:
        accounts.send_signal(signal.SIGTERM)
        accounts.wait(10)
    subject, msg_id, envelope = events[0]
    assert subject == "events.accounts.user.created"
    assert envelope["data"] == user and msg_id == envelope["id"]
    assert json.loads(json.dumps(envelope))["source"] == "accounts"


class CuttableLink:
    """A TCP hop to Postgres that the test can cut: every connection through it closed, and for a
    while new ones refused, as a restart or a failover of the server looks to its clients, or
    held open unanswered, as a server behind a dropped route looks (`silent`)."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.cut_until = 0.0
        self.silent = False
        self.streams: set[asyncio.StreamWriter] = set()

    async def carry(self, client: asyncio.StreamReader, client_out: asyncio.StreamWriter) -> None:
        while asyncio.get_running_loop().time() < self.cut_until:
            if not self.silent:
                client_out.close()
                return
            await asyncio.sleep(0.05)  # holds the connection: the client hears nothing
        server, server_out = await asyncio.open_connection("127.0.0.1", self.port)
        self.streams |= {client_out, server_out}

        async def pump(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
            with contextlib.suppress(OSError):
                while data := await source.read(65_536):
                    sink.write(data)
                    await sink.drain()
            sink.close()

        await asyncio.gather(pump(client, server_out), pump(server, client_out))
        self.streams -= {client_out, server_out}

    def cut(self, seconds: float, silent: bool = False) -> None:
        self.cut_until = asyncio.get_running_loop().time() + seconds
        self.silent = silent
        for stream in self.streams:
            stream.transport.abort()

    async def cut_and_wait(self, seconds: float, silent: bool = False) -> None:
        """`cut`, then a moment for each service to learn that its connections died. A statement
        sent on one in the very moment it dies may have reached the server, and is rightly a
        500 (`CommitUnanswered`) when it commits: seen once in CI, on the ledger's writer."""
        self.cut(seconds, silent)
        await asyncio.sleep(0.2)

    def heal(self) -> None:
        self.cut_until = 0.0


@contextlib.asynccontextmanager
async def cuttable_link(port: int) -> AsyncIterator[tuple[CuttableLink, int]]:
    link = CuttableLink(port)
    server = await asyncio.start_server(link.carry, "127.0.0.1", 0)
    try:
        yield link, server.sockets[0].getsockname()[1]
    finally:
        server.close()
        link.cut(0)
        await server.wait_closed()


async def answered_again(mesh: Mesh, subject: str, body: dict, timeout_s: float = 10.0) -> dict:
    """The reply once the service answers without error: a pooled connection that died with the
    server fails the one request that finds it."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    while True:
        code, reply = await mesh.request(subject, body)
        if code is None or asyncio.get_running_loop().time() > deadline:
            assert code is None, reply
            return reply
        await asyncio.sleep(0.2)


@contextlib.asynccontextmanager
async def services_through_link(
    nc: Client, nats_url: str, postgres_url: str, names: tuple[str, ...]
) -> AsyncIterator[tuple[Mesh, CuttableLink, list[subprocess.Popen]]]:
    """`names` served on a migrated, empty Postgres reached through a `CuttableLink`."""
    database = make_url(postgres_url)
    async with cuttable_link(database.port or 5432) as (link, port):
        through_link = database.set(port=port, query={"connect_timeout": str(CONNECT_TIMEOUT_S)})
        served = services_on(nc, nats_url, postgres_url, through_link.render_as_string(hide_password=False), names)
        async with served as (mesh, services):
            yield mesh, link, services


@contextlib.asynccontextmanager
async def services_on(
    nc: Client, nats_url: str, postgres_url: str, service_url: str, names: tuple[str, ...]
) -> AsyncIterator[tuple[Mesh, list[subprocess.Popen]]]:
    """`names` served on `postgres_url`, migrated and emptied, reached at `service_url`."""
    await migrations.upgrade_async(postgres_url)
    await empty_tables(postgres_url)
    mesh = Mesh(nc)
    await fresh_streams(mesh)
    services = [start_service(name, nats_url, service_url) for name in names]
    try:
        for name in names:
            await wait_until_serving(nc, name)
        yield mesh, services
    finally:
        for service in services:
            service.send_signal(signal.SIGTERM)
        for service in services:  # a link may run on this loop: waiting must not block it
            await asyncio.to_thread(service.wait, 15)


TRANSFER = {"from": "world", "to": "user:1", "amount": 1, "currency": "EUR"}
CONNECT_TIMEOUT_S = 2.0
"""The services' connect timeout through the link (libpq's `connect_timeout` in the URL)."""


def user(email: str) -> dict:
    return {"email": email, "name": "U", "password": "password1"}


async def answers_during_outage(mesh: Mesh, timeout_s: float) -> list[tuple[int | None, str]]:
    """Each service's write and read while the database is gone: (error code, type) of each."""
    asked = [
        ("accounts.users.create", user("during@x.io")),
        ("accounts.users.get", {"id": 1}),
        ("ledger.record", {**TRANSFER, "id": "during"}),
        ("ledger.balance", {"account": "user:1"}),
    ]
    replies = await asyncio.gather(*(mesh.request(subject, body, timeout_s=timeout_s) for subject, body in asked))
    return [(code, reply.get("error", {}).get("type", "")) for code, reply in replies]


async def recorded_nothing_during_the_outage(mesh: Mesh) -> None:
    """The email and the transfer id refused by a 503 are free: another body takes them."""
    await answered_again(mesh, "accounts.users.create", user("during@x.io"))
    entry = await answered_again(mesh, "ledger.record", {**TRANSFER, "id": "during", "amount": 2})
    assert entry["amount"] == 2


async def test_a_lost_database_is_answered_503_with_nothing_recorded_and_waited_out(
    nc: Client, nats_url: str, postgres_url: str
) -> None:
    """Each service's background tasks (the outbox relay, the ledger's writer) used to crash at
    once on a lost database, three times in the second a restart takes, and the process exited:
    under `bitnexus up` every service did, and the supervisor gave the whole mesh up. Requests
    meanwhile got 500 `internal`, which says nothing of whether anything was recorded."""
    async with services_through_link(nc, nats_url, postgres_url, ("accounts", "ledger")) as (mesh, link, services):
        await mesh.ok("accounts.users.create", user("before@x.io"))
        await mesh.ok("ledger.record", {**TRANSFER, "id": "before"})
        await link.cut_and_wait(3.0)
        assert await answers_during_outage(mesh, 1.0) == [(503, "unavailable")] * 4
        await asyncio.sleep(3.5)
        assert [service.poll() for service in services] == [None, None]
        await recorded_nothing_during_the_outage(mesh)
        assert [service.poll() for service in services] == [None, None]


async def test_a_database_that_answers_nothing_is_a_503_within_the_connect_timeout(
    nc: Client, nats_url: str, postgres_url: str
) -> None:
    """A server behind a dropped route neither accepts nor refuses: asyncpg waited 60 s for each
    connection, and its timeout was a 500."""
    waiting_s = CONNECT_TIMEOUT_S + 5.0
    async with services_through_link(nc, nats_url, postgres_url, ("accounts", "ledger")) as (mesh, link, services):
        await mesh.ok("ledger.record", {**TRANSFER, "id": "before"})
        await link.cut_and_wait(math.inf, silent=True)
        # the held connections, cut, fail at once; connecting again waits for the timeout
        assert await answers_during_outage(mesh, waiting_s) == [(503, "unavailable")] * 4
        started = asyncio.get_running_loop().time()
        assert await answers_during_outage(mesh, waiting_s) == [(503, "unavailable")] * 4
        assert asyncio.get_running_loop().time() - started >= CONNECT_TIMEOUT_S - 0.5
        link.heal()
        await recorded_nothing_during_the_outage(mesh)
        assert [service.poll() for service in services] == [None, None]


@contextlib.asynccontextmanager
async def mesh_on_a_restricted_role(
    nc: Client, nats_url: str, postgres_url: str, restrict: str, lift: str
) -> AsyncIterator[Mesh]:
    """accounts and ledger served on a role of their own, restricted (`ALTER ROLE ... <restrict>`,
    their sessions ended so that the next ones have it) while the block runs; then lifted. The
    services must run throughout, their background tasks waiting, and have recorded nothing."""
    async with own_role(postgres_url) as (role_url, admin):
        role = make_url(role_url).username
        async with services_on(nc, nats_url, postgres_url, role_url, ("accounts", "ledger")) as (mesh, services):
            await mesh.ok("accounts.users.create", user("before@x.io"))
            await mesh.ok("ledger.record", {**TRANSFER, "id": "before"})
            await admin.execute(f'ALTER ROLE "{role}" {restrict}')
            await end_sessions(admin, role)
            yield mesh
            await asyncio.sleep(2.0)  # the outbox relays and the ledger's writer meet it too
            assert [service.poll() for service in services] == [None, None]
            await admin.execute(f'ALTER ROLE "{role}" {lift}')
            await end_sessions(admin, role)
            await recorded_nothing_during_the_outage(mesh)
            assert [service.poll() for service in services] == [None, None]


async def test_a_database_refusing_new_sessions_is_answered_503_and_waited_out(
    nc: Client, nats_url: str, postgres_url: str
) -> None:
    """Postgres' `max_connections` reached (more replicas than it was sized for), or a role's or a
    database's `CONNECTION LIMIT`: "too many connections" (53300) at every connect. Until
    session 23 each service's outbox relay crashed on it three times at once, and the service
    exited; requests got 500s."""
    limited = mesh_on_a_restricted_role(nc, nats_url, postgres_url, "CONNECTION LIMIT 0", "CONNECTION LIMIT -1")
    async with limited as mesh:
        assert await answers_during_outage(mesh, 5.0) == [(503, "unavailable")] * 4


async def test_a_database_taking_no_writes_is_answered_503_for_them_and_waited_out(
    nc: Client, nats_url: str, postgres_url: str
) -> None:
    """A failover's old primary still reached, or `default_transaction_read_only` set for a
    maintenance: every write is refused "cannot execute ... in a read-only transaction"
    (25006), reads go on. Until session 23 the writes got 500s, and each service's outbox
    relay crashed on its delete three times at once, and the service exited."""
    read_only = "SET default_transaction_read_only = on"
    async with mesh_on_a_restricted_role(nc, nats_url, postgres_url, read_only, "RESET ALL") as mesh:
        await answered_again(mesh, "accounts.users.get", {"id": 1})  # a read finds its connection ended once
        written, read = (503, "unavailable"), (None, "")
        assert await answers_during_outage(mesh, 5.0) == [written, read, written, read]


@pytest.mark.parametrize("condition", ["disk_full", "out_of_memory"])
async def test_a_postgres_out_of_disk_or_memory_is_answered_503_for_writes_and_waited_out(
    nc: Client, nats_url: str, postgres_url: str, condition: str
) -> None:
    """A full disk under Postgres' tables: "could not extend file ... No space left on device"
    (53100) at every insert, reads go on; or no memory for the statement (53200). Here a trigger
    raises the server's own error in their place, as a tablespace on a full file system would
    (that needs a mount). Until session 24 each such write was a 500 `internal` with its
    traceback, as SQLite's full file was."""
    tables = ("users", "ledger_entries")
    async with services_on(nc, nats_url, postgres_url, postgres_url, ("accounts", "ledger")) as (mesh, services):
        await mesh.ok("accounts.users.create", user("before@x.io"))
        await mesh.ok("ledger.record", {**TRANSFER, "id": "before"})
        admin = await raw_connection(postgres_url)
        try:
            await admin.execute(REFUSING.format(condition=condition))
            for table in tables:
                await admin.execute(f"CREATE TRIGGER refusing BEFORE INSERT ON {table} EXECUTE FUNCTION refusing()")
            written, read = (503, "unavailable"), (None, "")
            assert await answers_during_outage(mesh, 5.0) == [written, read, written, read]
            code, reply = await mesh.request("accounts.users.create", user("refused@x.io"))
            assert (code, reply["error"]["message"]) == (503, "the database is unavailable; nothing was recorded")
            await asyncio.sleep(1.0)  # the ledger's writer meets it again on its own
            assert [service.poll() for service in services] == [None, None]
            for table in tables:
                await admin.execute(f"DROP TRIGGER refusing ON {table}")
            await admin.execute("DROP FUNCTION refusing()")
        finally:
            await admin.close()
        await recorded_nothing_during_the_outage(mesh)
        assert [service.poll() for service in services] == [None, None]


REFUSING = """CREATE FUNCTION refusing() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN
    RAISE EXCEPTION 'the server is out of it' USING ERRCODE = '{condition}';
END $$"""


async def test_an_ingest_message_that_met_a_lost_database_is_applied_soon_after_it_is_back(
    nc: Client, nats_url: str, postgres_url: str
) -> None:
    """Before, the lost database ended the ingest consumer's task group: the consumer restarted,
    and the message came back only after the consumer's ack wait (30 s)."""
    names = ("accounts", "ledger", "transactions")
    async with services_through_link(nc, nats_url, postgres_url, names) as (mesh, link, services):
        user_id = (await mesh.ok("accounts.users.create", user("ingest@x.io")))["id"]
        deposit = {"idempotency_key": "during-outage", "user_id": user_id, "amount": 7, "currency": "EUR"}
        link.cut(3.0)
        await mesh.js.publish("ingest.transactions.deposits", json.dumps(deposit).encode())
        deadline = asyncio.get_running_loop().time() + 12.0
        listed: list[dict] = []
        while not listed and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.5)
            code, page = await mesh.request("transactions.transactions.list", {"user_id": user_id})
            listed = page["items"] if code is None else []
        assert [(item["idempotency_key"], item["status"]) for item in listed] == [("during-outage", "committed")]
        assert [service.poll() for service in services] == [None, None, None]


async def test_a_full_sqlite_file_is_answered_503_for_writes_and_waited_out(
    nc: Client, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SQLite's "database or disk is full" (SQLITE_FULL; here the file's `max_page_count`, as a
    full disk would): each write meeting it was a 500, with its traceback logged to that disk
    (session 23). Reads go on; once room is made (users deleted), writes do too."""
    database = f"sqlite+aiosqlite:///{tmp_path / 'mesh.db'}"
    await migrations.upgrade_async(database)
    configure = schemas.database.configure_sqlite

    def within_pages(connection: sqlite3.Connection) -> None:
        configure(connection)
        connection.execute(f"PRAGMA max_page_count = {PAGES_MAX}")

    monkeypatch.setattr(schemas.database, "configure_sqlite", within_pages)
    monkeypatch.setenv("DATABASE_URL", database)
    mesh = Mesh(nc)
    async with accounts.serving(nc):
        full = 0
        while (answer := await mesh.request("accounts.users.create", user(f"u{full}@x.io") | LONG_NAME))[0] is None:
            full += 1
            assert full < 100, "the file never filled"
        assert full > 0 and answer == (503, answer[1]) and answer[1]["error"]["type"] == "unavailable"
        for n in range(3):  # and stays so, nothing written
            assert (await mesh.request("accounts.users.create", user(f"more{n}@x.io") | LONG_NAME))[0] == 503
        assert (await mesh.ok("accounts.users.get", {"id": 1}))["id"] == 1
        for id in range(1, full + 1):  # every user: their pages are free again
            await mesh.ok("accounts.users.delete", {"id": id})
        await answered_again(mesh, "accounts.users.create", user("after@x.io") | LONG_NAME)


PAGES_MAX = 14
"""A file of at most 56 KiB: room for a few users with `LONG_NAME` beside the empty tables."""
LONG_NAME = {"name": "N" * 255}
