"""The transactions service killed (SIGKILL) between each pair of saga steps, then restarted;
and ingest of messages published while it was not running."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys

import pytest

from tests.conftest import Mesh
from tests.ledger_checks import assert_ledger_invariants
from tests.test_faults import wait_until_serving
from tests.test_transactions import balance, committed_keys, user, wait_until


def start_transactions(nats_url: str, database_url: str, crash_point: str | None = None) -> subprocess.Popen:
    env = {**os.environ, "NATS_URL": nats_url, "DATABASE_URL": database_url}
    env.pop("BITNEXUS_CRASH_POINT", None)
    if crash_point:
        env["BITNEXUS_CRASH_POINT"] = crash_point
    return subprocess.Popen([sys.executable, "-m", "supervisor", "serve", "transactions"], env=env)


async def stock(mesh: Mesh, product_id: int) -> int:
    return (await mesh.ok("products.products.get", {"id": product_id}))["stock"]


@pytest.mark.parametrize(
    ("crash_point", "funded", "outcome"),
    [
        ("after_pending", True, "committed"),
        ("after_reserve", True, "committed"),
        ("after_ledger", True, "committed"),
        ("after_reserve", False, "rejected"),
        ("after_refusal", False, "rejected"),
        ("after_release", False, "rejected"),
    ],
)
async def test_purchase_killed_at_each_step_ends_exactly_once_after_restart(
    core_mesh: Mesh, database: str, nats_url: str, crash_point: str, funded: bool, outcome: str
) -> None:
    mesh = core_mesh
    buyer, seller = await user(mesh, "buyer"), await user(mesh, "seller")
    product = await mesh.ok(
        "products.products.create",
        {"sku": "P", "name": "P", "price": 300, "currency": "EUR", "stock": 4, "seller_id": seller},
    )
    if funded:
        await mesh.ok(
            "ledger.record", {"id": "fund", "from": "world", "to": f"user:{buyer}", "amount": 1000, "currency": "EUR"}
        )
    body = {"idempotency_key": "buy-1", "buyer_id": buyer, "product_id": product["id"], "quantity": 3}
    doomed = start_transactions(nats_url, database, crash_point)
    try:
        await wait_until_serving(mesh.nc, "transactions")
        with pytest.raises(Exception):  # noqa: B017 - it dies before answering: no responders or a timeout
            await mesh.request("transactions.purchases.create", body, timeout_s=3)
        assert doomed.wait(10) == -signal.SIGKILL
    finally:
        if doomed.poll() is None:
            doomed.kill()
    restarted = start_transactions(nats_url, database)
    try:
        await wait_until_serving(mesh.nc, "transactions")
        expected_stock, expected_buyer = (1, 100) if outcome == "committed" else (4, 1000 if funded else 0)
        await wait_until(lambda: stock(mesh, product["id"]), expected_stock)  # the recovery loop, no retry
        await wait_until(lambda: listed_status(mesh, buyer), [outcome])
        code, reply = await mesh.request("transactions.purchases.create", body)
        assert (code is None) == (outcome == "committed"), reply
        assert await stock(mesh, product["id"]) == expected_stock
        assert await balance(mesh, buyer) == expected_buyer
        assert await balance(mesh, seller) == (900 if outcome == "committed" else 0)
        entries = await assert_ledger_invariants(mesh)
        assert len(entries) == int(funded) + (outcome == "committed")
        await asyncio.sleep(0.5)
        events = await mesh.events(await mesh.event_count())
        finals = [subject for subject, _, _ in events if subject.startswith("events.transactions")]
        assert finals == [f"events.transactions.transaction.{outcome}"]
    finally:
        restarted.send_signal(signal.SIGTERM)
        restarted.wait(15)


async def listed_status(mesh: Mesh, user_id: int) -> list[str]:
    page = await mesh.ok("transactions.transactions.list", {"user_id": user_id})
    return [item["status"] for item in page["items"]]


async def test_ingest_published_while_transactions_is_down_is_processed_once_after_it_starts(
    core_mesh: Mesh, database: str, nats_url: str
) -> None:
    mesh = core_mesh
    alice = await user(mesh, "alice")
    for n in range(20):
        body = {"idempotency_key": f"down-{n % 10}", "user_id": alice, "amount": 10, "currency": "EUR"}
        await mesh.js.publish("ingest.transactions.deposits", json.dumps(body).encode())
    assert await balance(mesh, alice) == 0
    service = start_transactions(nats_url, database)
    try:
        await wait_until_serving(mesh.nc, "transactions")
        await wait_until(lambda: committed_keys(mesh, alice), sorted(f"down-{n}" for n in range(10)))
        await asyncio.sleep(1.0)
        assert await balance(mesh, alice) == 100
        info = await mesh.js.consumer_info("INGEST", "transactions")
        assert info.num_ack_pending == 0 and info.num_pending == 0
        await assert_ledger_invariants(mesh)
    finally:
        service.send_signal(signal.SIGTERM)
        service.wait(15)
