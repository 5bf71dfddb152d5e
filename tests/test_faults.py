"""Faults users meet: a dependency down, a process killed between commit and publish."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator

import nats.errors
from nats.aio.client import Client
from sqlalchemy.engine import make_url

import migrations
from bus.events import EVENTS_STREAM, ensure_stream
from handlers import products
from tests.conftest import Mesh


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
        await mesh.js.delete_stream(EVENTS_STREAM)  # JetStream now refuses: the relay must keep the row
        user = await mesh.ok("accounts.users.create", {"email": "k@x.io", "name": "K", "password": "password1"})
        await asyncio.sleep(0.3)
        accounts.send_signal(signal.SIGKILL)  # committed, never published
        accounts.wait(10)
        await ensure_stream(mesh.js, EVENTS_STREAM, ["events.>"])
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
    """A TCP hop to Postgres that the test can cut: every connection through it closed and new
    ones refused for a while, as a restart or a failover of the server looks to its clients."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.cut_until = 0.0
        self.streams: set[asyncio.StreamWriter] = set()

    async def carry(self, client: asyncio.StreamReader, client_out: asyncio.StreamWriter) -> None:
        if asyncio.get_running_loop().time() < self.cut_until:
            client_out.close()
            return
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

    def cut(self, seconds: float) -> None:
        self.cut_until = asyncio.get_running_loop().time() + seconds
        for stream in self.streams:
            stream.transport.abort()


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


async def test_a_database_restart_is_waited_out_by_every_service_not_crashed_through(
    nc: Client, nats_url: str, postgres_url: str
) -> None:
    """Each service's background tasks (the outbox relay, the ledger's writer) used to crash at
    once on a lost database, three times in the second a restart takes, and the process exited:
    under `bitnexus up` every service did, and the supervisor gave the whole mesh up."""
    await migrations.upgrade_async(postgres_url)
    mesh = Mesh(nc)
    await ensure_stream(mesh.js, EVENTS_STREAM, ["events.>"])
    database = make_url(postgres_url)
    async with cuttable_link(database.port or 5432) as (link, port):
        through_link = database.set(port=port).render_as_string(hide_password=False)
        services = [start_service(name, nats_url, through_link) for name in ("accounts", "ledger")]
        try:
            for name in ("accounts", "ledger"):
                await wait_until_serving(nc, name)
            await mesh.ok("accounts.users.create", {"email": "before@x.io", "name": "B", "password": "password1"})
            transfer = {"from": "world", "to": "user:1", "amount": 1, "currency": "EUR"}
            await mesh.ok("ledger.record", {**transfer, "id": "before"})
            link.cut(3.0)
            with contextlib.suppress(nats.errors.TimeoutError):  # the writer meets the outage
                await mesh.request("ledger.record", {**transfer, "id": "during"}, timeout_s=1.0)
            await asyncio.sleep(3.5)
            assert [service.poll() for service in services] == [None, None]
            await answered_again(
                mesh, "accounts.users.create", {"email": "after@x.io", "name": "A", "password": "password1"}
            )
            await answered_again(mesh, "ledger.record", {**transfer, "id": "after"})
            assert [service.poll() for service in services] == [None, None]
        finally:
            for service in services:
                service.send_signal(signal.SIGTERM)
            for service in services:  # the link runs on this loop: waiting must not block it
                await asyncio.to_thread(service.wait, 15)
