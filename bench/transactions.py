"""transactions.transfers.create end to end (transactions -> accounts -> ledger), and ingest.

    python -m bench.transactions [--duration 4] [--stores sqlite postgres] [--ingest 5000]

Starts its own nats-server and one process per service (ledger, accounts, transactions),
seeds 1,000 users and funds them through the ledger, then measures create at c64 and c512
beside the raw echo, and ingest: N messages published to `ingest.transactions.transfers`,
timed until the last one is committed (the sink's balance reaches N).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time

import msgspec
import nats

from bench.harness import Result, closed_loop, raw_echo, run_requester, table, warmup_s
from bench.services import nats_and_raw_echo, store_served
from bench.services import seed as seed_users

USERS = 1_000
SINK = USERS  # user ids are 1..USERS; ingest sends everything to the last one


def body_for(counter: int) -> bytes:
    source = counter % (USERS - 1) + 1
    return msgspec.json.encode(
        {
            "idempotency_key": f"b{os.getpid()}-{time.monotonic_ns()}-{counter}",
            "from_user_id": source,
            "to_user_id": source % (USERS - 1) + 1,
            "amount": 1,
            "currency": "EUR",
        }
    )


async def seed(database_url: str, url: str) -> None:
    await seed_users(database_url, USERS)
    nc = await nats.connect(url)
    deposits = [
        {"id": f"fund-{n}", "from": "world", "to": f"user:{n}", "amount": 10**12, "currency": "EUR"}
        for n in range(1, USERS + 1)
    ]
    reply = await nc.request("ledger.record_batch", msgspec.json.encode({"transfers": deposits}), timeout=60)
    assert not reply.headers, reply.data
    await nc.close()


async def ingest(url: str, count: int, label: str) -> Result:
    nc = await nats.connect(url)
    js = nc.jetstream()
    start_balance = await sink_balance(nc)
    started = time.perf_counter()
    for n in range(count):
        body = {
            "idempotency_key": f"in-{time.monotonic_ns()}-{n}",
            "from_user_id": n % (USERS - 1) + 1,
            "to_user_id": SINK,
            "amount": 1,
            "currency": "EUR",
        }
        await js.publish_async("ingest.transactions.transfers", msgspec.json.encode(body))
    await js.publish_async_completed()
    published = time.perf_counter()
    while await sink_balance(nc) < start_balance + count:
        await asyncio.sleep(0.05)
    seconds = time.perf_counter() - started
    await nc.close()
    print(f"ingest: {count} published in {published - started:.2f} s, all committed after {seconds:.2f} s")
    return Result(label, 0, count, seconds, 0.0, 0.0, 0)


async def sink_balance(nc) -> int:
    reply = await nc.request("ledger.balance", json.dumps({"account": f"user:{SINK}"}).encode(), timeout=5)
    return json.loads(reply.data)["balances"].get("EUR", 0)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--duration", type=float, default=4.0)
    parser.add_argument("--stores", nargs="+", default=["sqlite", "postgres"])
    parser.add_argument("--ingest", type=int, default=5_000)
    options = parser.parse_args()
    rows: list[tuple[Result, Result]] = []
    with nats_and_raw_echo() as (data_dir, url, raw, _):
        for store in options.stores:
            names = ["ledger_events", "ledger", "accounts", "transactions"]
            with store_served(store, data_dir, url, names) as (database_url, pids):
                asyncio.run(seed(database_url, url))
                for concurrency in (64, 512):
                    echo = raw_echo(url, options.duration, concurrency, raw.pid)
                    create = run_requester(
                        "bench.transactions",
                        [url, str(options.duration)],
                        f"transfers.create {store}",
                        concurrency,
                        pids,
                    )
                    rows.append((echo, create))
                rows.append((rows[-1][0], asyncio.run(ingest(url, options.ingest, f"ingest {store}"))))
    print(f"{options.duration:g} s per measurement, cpus {os.cpu_count()}; responder CPU: all four service processes")
    print(table(rows))


if __name__ == "__main__":
    if sys.argv[1:2] == ["requester"]:
        url, duration, concurrency = sys.argv[2], float(sys.argv[3]), int(sys.argv[4])
        result = asyncio.run(
            closed_loop(url, "transactions.transfers.create", body_for, concurrency, warmup_s, duration)
        )
        print(json.dumps(result))
    else:
        main()
