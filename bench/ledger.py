"""ledger.record at c1/c64/c512 and ledger.record_batch of 100 on SQLite and Postgres, beside the raw echo.

    python -m bench.ledger [--duration 4] [--rounds 1] [--stores sqlite postgres] [--concurrency 1 64 512]
                           [--no-batch] [--retry-every N] [--ledgers N]

Every transfer is durably committed before its reply (SQLite synchronous=FULL, Postgres
synchronous_commit=on). Accounts are funded from `world` first; each transfer moves 1 cent
between 1,000 funded accounts, so none is refused. Each c512 `ledger.record` row ends with a
line that says which of issue 4's targets it met.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import sys
import time

import msgspec
import nats
import nats.js.errors

import migrations
from bench.echo import BODY
from bench.harness import (
    Result,
    add_requester_option,
    closed_loop,
    cpu_table,
    median_pair,
    raw_echo,
    run_requester,
    table,
    use_requester,
    warmup_s,
)
from bench.services import (
    database_for,
    nats_and_raw_echo,
    postgres_pids,
    services_running,
    wal_position,
    wal_segments_created,
)

ACCOUNTS = 1_000
BATCH_TRANSFERS = 100
RETRY_DISTANCE = 1_000
"""`--retry-every N`: every Nth `ledger.record` repeats the one sent this many requests before,
as a client retrying after a timeout would (same id, same body: answered with its entry)."""


TARGET_CONCURRENCY = 512
TARGET_RATE = 10_000
TARGET_RATIO = 0.5
TARGET_P99_MS = 50.0
"""Issue 4's bar for `ledger.record` at c512, on each store: transfers/s, the ratio to the raw
echo of the same run, and p99."""

RUN = f"b{os.getpid()}-{time.monotonic_ns()}".encode()
"""Transfer ids are unique across requester processes and runs: this prefix and a counter."""


def transfer(counter: int) -> bytes:
    """Formatted, not encoded from a dict: the requester shares two cores with what it measures
    (a dict and `msgspec` cost it ≈ 2 µs per request, 6 % of its CPU)."""
    source = counter % ACCOUNTS
    return b'{"id":"%s-%d","from":"user:%d","to":"user:%d","amount":1,"currency":"EUR"}' % (
        RUN,
        counter,
        source,
        (source + 1) % ACCOUNTS,
    )


def body_for(kind: str, counter: int, retry_every: int = 0) -> bytes:
    if kind == "record":
        retry = retry_every and counter % retry_every == 0 and counter > RETRY_DISTANCE
        return transfer(counter - RETRY_DISTANCE if retry else counter)
    return b'{"transfers":[%s]}' % b",".join(transfer(counter * BATCH_TRANSFERS + n) for n in range(BATCH_TRANSFERS))


async def fund(url: str) -> None:
    nc = await nats.connect(url)
    deposits = [
        {"id": f"fund-{n}", "from": "world", "to": f"user:{n}", "amount": 10**12, "currency": "EUR"}
        for n in range(ACCOUNTS)
    ]
    reply = await nc.request("ledger.record_batch", msgspec.json.encode({"transfers": deposits}), timeout=30)
    assert not reply.headers, reply.data
    await nc.close()


async def purge_events(url: str) -> None:
    nc = await nats.connect(url)
    try:
        await nc.jetstream().purge_stream("EVENTS")
    except nats.js.errors.NotFoundError:
        pass  # the first run creates it
    await nc.close()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--duration", type=float, default=4.0)
    parser.add_argument("--rounds", type=int, default=1, help="echo and record pairs per row; the median ratio's")
    parser.add_argument("--stores", nargs="+", default=["sqlite", "postgres"])
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 64, 512])
    parser.add_argument("--no-batch", action="store_true", help="skip ledger.record_batch")
    parser.add_argument("--retry-every", type=int, default=0, help="every Nth ledger.record a retry of an earlier one")
    parser.add_argument("--ledgers", type=int, default=1, help="ledger processes on the one database")
    add_requester_option(parser)
    options = parser.parse_args()
    use_requester(options.requester)
    variant = f" retrying 1/{options.retry_every}" if options.retry_every else ""
    variant += f" x{options.ledgers} ledgers" if options.ledgers > 1 else ""
    rows: list[tuple[Result, Result]] = []
    rounds: dict[str, list[tuple[Result, Result]]] = {}
    with nats_and_raw_echo() as (data_dir, url, raw, nats_pid):
        for store in options.stores:
            asyncio.run(purge_events(url))  # each store starts with an empty EVENTS stream on disk
            database_url = database_for(store, data_dir)
            migrations.upgrade(database_url)
            with services_running(["ledger_events"] + ["ledger"] * options.ledgers, url, database_url) as services:
                pids = [process.pid for process in services]
                asyncio.run(fund(url))
                path = {"nats-server": [nats_pid]}
                for process in services:
                    path.setdefault(process.args[-1], []).append(process.pid)
                if store == "postgres":
                    path["postgres"] = postgres_pids()  # now that the services have connected
                for concurrency in options.concurrency:
                    pairs = []
                    for _ in range(options.rounds):
                        echo = raw_echo(url, options.duration, concurrency, raw.pid, nats_pid)
                        wal_before = asyncio.run(wal_position()) if store == "postgres" else None
                        record = run_requester(
                            "bench.ledger",
                            [url, str(options.duration), "record", str(options.retry_every)],
                            f"ledger.record {store}{variant}",
                            concurrency,
                            pids,
                            path,
                        )
                        if wal_before is not None:
                            created = wal_segments_created(wal_before, asyncio.run(wal_position()))
                            record = dataclasses.replace(record, wal_segments_created=created)
                        pairs.append((echo, record))
                    rows.append(median_pair(pairs))
                    label = f"ledger.record {store}{variant} c{concurrency}"
                    rounds[label] = pairs
                if not options.no_batch:
                    batch = run_requester(
                        "bench.ledger",
                        [url, str(options.duration), "record_batch", "0"],
                        f"ledger.record_batch x{BATCH_TRANSFERS} {store}",
                        8,
                        pids,
                        path,
                    )
                    rows.append((rows[-1][0], batch))
    print(
        f"{options.duration:g} s per measurement, cpus {os.cpu_count()}, echo body {len(BODY)} bytes, "
        f"requester {options.requester}; "
        f"ledger.record rows: the pair with the median ratio of {options.rounds} echo-then-record rounds; "
        f"record_batch rows count requests (x{BATCH_TRANSFERS} transfers each)"
    )
    print(table(rows))
    print()
    print(cpu_table(rows))
    verdicts = [
        against_targets(echo, measured)
        for echo, measured in rows
        if measured.concurrency == TARGET_CONCURRENCY and measured.label.startswith("ledger.record ")
    ]
    if verdicts:
        print()
        print("\n".join(verdicts))
    if options.rounds > 1:
        print()
        for label, pairs in rounds.items():
            each = ", ".join(f"{measured.rate / echo.rate:.2f} ({round_figures(measured)})" for echo, measured in pairs)
            print(f"{label} ratios by round: {each}")


def against_targets(echo: Result, measured: Result) -> str:
    """One c512 row against issue 4's targets, each figure marked met or not."""

    def mark(met: bool) -> str:
        return "met" if met else "NOT met"

    ratio = measured.rate / echo.rate
    return (
        f"{measured.label} c{measured.concurrency} against the targets: "
        f"{measured.rate:,.0f}/s (>= {TARGET_RATE:,}: {mark(measured.rate >= TARGET_RATE)}), "
        f"ratio {ratio:.2f} (>= {TARGET_RATIO}: {mark(ratio >= TARGET_RATIO)}), "
        f"p99 {measured.p99_ms:.1f} ms (< {TARGET_P99_MS:g}: {mark(measured.p99_ms < TARGET_P99_MS)})"
    )


def round_figures(measured: Result) -> str:
    figures = f"p99 {measured.p99_ms:.1f}"
    if measured.wal_segments_created is not None:
        figures += f", {measured.wal_segments_created} WAL segments created"
    return figures


if __name__ == "__main__":
    if sys.argv[1:2] == ["requester"]:
        url, duration, kind, retry_every, concurrency = sys.argv[2:7]
        result = asyncio.run(
            closed_loop(
                url,
                f"ledger.{kind}",
                lambda n: body_for(kind, n, int(retry_every)),
                int(concurrency),
                warmup_s,
                float(duration),
            )
        )
        print(json.dumps(result))
    else:
        main()
