"""Faults users meet: a dependency down, a process killed between commit and publish."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys

from nats.aio.client import Client

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
