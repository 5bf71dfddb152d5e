"""The reads users make most, beside the raw echo: gets, lists, balances and ledger pages.

    python -m bench.reads [--duration 4] [--stores sqlite postgres] [--concurrency 64]

Starts its own nats-server and one process per service (accounts, products, transactions,
ledger), seeds 10,000 users, 10,000 products and 10,000 closed transactions straight into
their tables, and a chain of 10,000 entries among 1,000 accounts through `ledger.record_batch`,
then measures each read in a closed loop. Gets ask for ids spread over the table; lists and
ledger pages ask for 10 items after a cursor spread the same way.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from collections.abc import Callable
from datetime import UTC, datetime

import msgspec
import nats
from sqlalchemy import insert

from bench.harness import Result, closed_loop, median_result, raw_echo, run_requester, table, warmup_s
from bench.services import SEEDED_USERS, nats_and_raw_echo, store_served
from bench.services import seed as seed_users
from schemas.database import open_database, service_url
from schemas.products import products
from schemas.transactions import transactions

ROWS = SEEDED_USERS
"""Users, products and transactions seeded, each with ids 1..ROWS."""
ACCOUNTS = 1_000
ENTRIES = 10_000
PAGE = 10


def account(n: int) -> str:
    return f"user:{n % ACCOUNTS + 1}"


READS: dict[str, tuple[str, Callable[[int], dict]]] = {
    "users.get": ("accounts.users.get", lambda n: {"id": n % ROWS + 1}),
    "users.list": ("accounts.users.list", lambda n: {"after_id": n % ROWS, "limit": PAGE}),
    "products.get": ("products.products.get", lambda n: {"id": n % ROWS + 1}),
    "products.list": ("products.products.list", lambda n: {"after_id": n % ROWS, "limit": PAGE}),
    "transactions.get": ("transactions.transactions.get", lambda n: {"id": n % ROWS + 1}),
    "transactions.list": ("transactions.transactions.list", lambda n: {"after_id": n % ROWS, "limit": PAGE}),
    "transactions.list user": (
        "transactions.transactions.list",
        lambda n: {"user_id": n % ACCOUNTS + 1, "after_id": n % ROWS, "limit": PAGE},
    ),
    "ledger.balance": ("ledger.balance", lambda n: {"account": account(n)}),
    "ledger.history": ("ledger.history", lambda n: {"account": account(n), "limit": PAGE}),
    "ledger.chain": ("ledger.chain", lambda n: {"after_seq": n % ENTRIES, "limit": PAGE}),
}
"""Each read's name in the table: its subject and the body of the n-th request."""


async def seed(database_url: str, url: str) -> None:
    await seed_users(database_url, ROWS)
    now = datetime.now(UTC)
    catalog = open_database(service_url("products", database_url))
    async with catalog.writer.begin() as conn:
        rows = [
            {
                "sku": f"SKU-{n}",
                "name": f"Product {n}",
                "description": "A product seeded for the read benchmark",
                "price": 100 + n,
                "currency": "EUR",
                "stock": 1_000,
                "seller_id": n % ROWS + 1,
                "inserted_at": now,
                "updated_at": now,
            }
            for n in range(ROWS)
        ]
        await conn.execute(insert(products), rows)
    await catalog.dispose()
    saga = open_database(service_url("transactions", database_url))
    async with saga.writer.begin() as conn:
        rows = [
            {
                "idempotency_key": f"seed-{n}",
                "fingerprint": "0" * 64,
                "kind": "transfer",
                "status": "committed",
                "from_account": account(n),
                "to_account": account(n + 1),
                "amount": 1,
                "currency": "EUR",
                "memo": "",
                "ledger_seq": n + 1,
                "ledger_hash": f"{n:064x}",
                "inserted_at": now,
                "updated_at": now,
            }
            for n in range(ROWS)
        ]
        await conn.execute(insert(transactions), rows)
    await saga.dispose()
    await record_chain(url)


async def record_chain(url: str) -> None:
    """ENTRIES entries: a deposit to each account, then transfers around them."""
    nc = await nats.connect(url)
    transfers = [
        {"id": f"fund-{n}", "from": "world", "to": account(n), "amount": 10**9, "currency": "EUR"}
        for n in range(ACCOUNTS)
    ]
    transfers += [
        {"id": f"move-{n}", "from": account(n), "to": account(n + 1), "amount": 1, "currency": "EUR"}
        for n in range(ENTRIES - ACCOUNTS)
    ]
    for start in range(0, ENTRIES, 1_000):
        body = msgspec.json.encode({"transfers": transfers[start : start + 1_000]})
        reply = await nc.request("ledger.record_batch", body, timeout=30)
        assert not reply.headers, reply.data
    await nc.close()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--duration", type=float, default=4.0)
    parser.add_argument("--stores", nargs="+", default=["sqlite", "postgres"])
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--reads", nargs="+", choices=list(READS), default=list(READS))
    options = parser.parse_args()
    rows: list[tuple[Result, Result]] = []
    with nats_and_raw_echo() as (data_dir, url, raw, _):
        for store in options.stores:
            names = ["ledger_events", "ledger", "accounts", "products", "transactions"]
            with store_served(store, data_dir, url, names) as (database_url, pids):
                asyncio.run(seed(database_url, url))
                echo = median_result([raw_echo(url, options.duration, options.concurrency, raw.pid) for _ in range(2)])
                for name in options.reads:
                    args = [url, str(options.duration), name]
                    label = f"{name} {store}"
                    rows.append((echo, run_requester("bench.reads", args, label, options.concurrency, pids)))
    print(
        f"{options.duration:g} s per measurement, cpus {os.cpu_count()}, pages of {PAGE}; "
        "responder CPU: all five service processes"
    )
    print(table(rows))


if __name__ == "__main__":
    if sys.argv[1:2] == ["requester"]:
        url, duration, name, concurrency = sys.argv[2], float(sys.argv[3]), sys.argv[4], int(sys.argv[5])
        subject, body = READS[name]
        make_body = lambda n: msgspec.json.encode(body(n))  # noqa: E731
        result = asyncio.run(closed_loop(url, subject, make_body, concurrency, warmup_s, duration))
        print(json.dumps(result))
    else:
        main()
