"""accounts.users.get and accounts.users.create on SQLite and Postgres, beside the raw echo.

    python -m bench.services [--duration 4] [--stores sqlite postgres]

Starts its own nats-server, the raw nats-py echo responder of bench.echo, and one accounts
process per store (`bitnexus serve accounts`), seeded with users straight into its table.
Also measures `get` at c64 while a stream of `create` (scrypt, deliberately slow) runs.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import select
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import NamedTuple

import asyncpg
from sqlalchemy import insert

import migrations
from bench.echo import BODY, start_responder
from bench.harness import Result, closed_loop, median_result, raw_echo, run_requester, table, warmup_s
from bus.embedded import EmbeddedNats, free_port
from bus.runner import READY_FD_ENV
from schemas.accounts import users
from schemas.database import open_database, postgres_dsn, service_url

SEEDED_USERS = 10_000
service_start_timeout_s = 30.0
service_stop_timeout_s = 30.0
"""Like the supervisor's `shutdown_s` (10 s there; a bench gives a draining service longer): a
service still running this long after SIGTERM is killed, and the bench says so."""
POSTGRES_ADMIN = os.environ.get("TEST_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/test")
BENCH_DATABASE = "bitnexus_bench"


def body_for(kind: str, counter: int) -> bytes:
    if kind == "get":
        return b'{"id": %d}' % (counter % SEEDED_USERS + 1)
    email = f"bench-{os.getpid()}-{counter}-{time.monotonic_ns()}@example.com"
    return json.dumps({"email": email, "name": "Bench", "password": "bench password"}).encode()


async def seed(database_url: str, count: int = SEEDED_USERS) -> None:
    """`count` users straight into the accounts table (ids 1..count), with a hash nobody can match."""
    db = open_database(service_url("accounts", database_url))
    now = datetime.now(UTC)
    rows = [
        {
            "email": f"seed{n}@example.com",
            "name": f"Seed {n}",
            "password_hash": "scrypt$1$1$1$AA==$AA==",
            "inserted_at": now,
            "updated_at": now,
        }
        for n in range(count)
    ]
    async with db.writer.begin() as conn:
        await conn.execute(insert(users), rows)
    await db.dispose()


async def fresh_postgres(name: str = BENCH_DATABASE) -> str:
    """A new, empty database on the machine's Postgres (dropped first if it is there)."""
    admin = await asyncpg.connect(POSTGRES_ADMIN)
    await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    await admin.execute(f'CREATE DATABASE "{name}"')
    await admin.close()
    return f"postgresql+asyncpg://postgres@127.0.0.1:5432/{name}"


WAL_FILES = """SELECT (pg_current_wal_lsn() - '0/0')::bigint / setting::bigint, setting::bigint,
    array(SELECT name FROM pg_ls_waldir() WHERE name ~ '^[0-9A-F]{24}$')
FROM pg_settings WHERE name = 'wal_segment_size'"""


class WalPosition(NamedTuple):
    segment: int
    """The WAL segment Postgres writes now, counted from the first."""
    ready: int
    """Segment files already made beyond it (recycled at a checkpoint): used without a wait."""


async def wal_position() -> WalPosition:
    """Where the server's WAL stands (its superuser's view: `pg_ls_waldir`)."""
    admin = await asyncpg.connect(POSTGRES_ADMIN)
    try:
        segment, segment_size, names = await admin.fetchrow(WAL_FILES)
    finally:
        await admin.close()
    per_log = 2**32 // segment_size  # a file's name: timeline, log and segment, 8 hex digits each
    numbers = [int(name[8:16], 16) * per_log + int(name[16:24], 16) for name in names]
    return WalPosition(segment, sum(number > segment for number in numbers))


def wal_segments_created(before: WalPosition, after: WalPosition) -> int:
    """Segments Postgres had to create and fill (16 MB written and synced under its WAL lock)
    between two positions: those used beyond the ones that were ready. A commit waits for it:
    the Postgres tail at c512 (bench/RESULTS.md, session 21)."""
    return max(0, after.segment - before.segment - before.ready)


@contextlib.asynccontextmanager
async def table_locked(database_url: str, service: str, table: str, mode: str = "EXCLUSIVE") -> AsyncIterator[None]:
    """Another connection holds a lock on `service`'s `table` until the block ends: on Postgres
    in `mode` (EXCLUSIVE: reads go on, writes wait; ACCESS EXCLUSIVE, as `ALTER TABLE` takes it:
    reads wait too), on SQLite the write lock of the service's file."""
    url = service_url(service, database_url)
    if url.get_backend_name() == "sqlite":
        holder = sqlite3.connect(url.database or "", isolation_level=None)
        holder.execute("BEGIN IMMEDIATE")
        try:
            yield
        finally:
            holder.execute("ROLLBACK")
            holder.close()
        return
    admin = await asyncpg.connect(postgres_dsn(url).dsn)
    try:
        async with admin.transaction():
            await admin.execute(f"LOCK TABLE {table} IN {mode} MODE")
            yield
    finally:
        await admin.close()


def postgres_pids() -> list[int]:
    """The machine's Postgres processes (backends, WAL writer, checkpointer...): a bench's
    database work is theirs."""
    out = subprocess.run(["pgrep", "-u", "postgres"], capture_output=True, text=True, check=False).stdout
    return [int(pid) for pid in out.split()]


def database_for(store: str, data_dir: str) -> str:
    """A fresh database of the store: a SQLite file in the run's directory, or a new Postgres database."""
    if store == "sqlite":
        return f"sqlite+aiosqlite:///{data_dir}/{store}.db"
    return asyncio.run(fresh_postgres())


@contextlib.contextmanager
def nats_and_raw_echo() -> Iterator[tuple[str, str, subprocess.Popen, int]]:
    """What every bench runs in: a data directory, a nats-server on a free port, the raw nats-py
    echo as the baseline. Yields (data_dir, nats_url, raw echo process, nats-server's pid); all
    gone on leaving."""
    with tempfile.TemporaryDirectory() as data_dir:
        server = EmbeddedNats(data_dir=Path(data_dir) / "nats", port=free_port())
        url = server.start()
        raw = start_responder("raw", url)
        try:
            yield data_dir, url, raw, server.process.pid
        finally:
            raw.terminate()
            raw.wait()
            server.stop()


@contextlib.contextmanager
def services_running(names: list[str], nats_url: str, database_url: str) -> Iterator[list[subprocess.Popen]]:
    """One process per service, started in order and serving; terminated and reaped on leaving."""
    processes: list[subprocess.Popen] = []
    try:
        for name in names:
            processes.append(start_service(name, nats_url, database_url))
        yield processes
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            try:
                process.wait(timeout=service_stop_timeout_s)
            except subprocess.TimeoutExpired:  # said, not hidden: a drain should never take this long
                command = " ".join(process.args)
                print(f"{command}: still running {service_stop_timeout_s:g} s after SIGTERM; killed", file=sys.stderr)
                process.kill()
                process.wait()


@contextlib.contextmanager
def store_served(store: str, data_dir: str, nats_url: str, names: list[str]) -> Iterator[tuple[str, list[int]]]:
    """A fresh, migrated database of `store` and one process per named service serving it:
    yields the database's URL and the processes' pids."""
    database_url = database_for(store, data_dir)
    migrations.upgrade(database_url)
    with services_running(names, nats_url, database_url) as processes:
        yield database_url, [process.pid for process in processes]


def start_service(name: str, nats_url: str, database_url: str) -> subprocess.Popen:
    """`bitnexus serve <name>` in its own process; returns once it says it serves, on the pipe a
    supervisor passes its children (`BITNEXUS_READY_FD`). Polling `$SRV.PING.<name>` instead
    waited its full 15 s for `ledger_events`, which has no endpoints."""
    read_fd, write_fd = os.pipe()
    env = {
        **os.environ,
        "NATS_URL": nats_url,
        "DATABASE_URL": database_url,
        "BITNEXUS_LOG_LEVEL": "WARNING",
        READY_FD_ENV: str(write_fd),
    }
    try:
        process = subprocess.Popen([sys.executable, "-m", "supervisor", "serve", name], env=env, pass_fds=(write_fd,))
    finally:
        os.close(write_fd)
    with os.fdopen(read_fd, "rb") as ready:
        said = ready.readline() if select.select([ready], [], [], service_start_timeout_s)[0] else b""
    if not said.startswith(b"ready"):
        process.kill()
        process.wait()
        raise RuntimeError(f"{name} did not say it serves within {service_start_timeout_s:g} s")
    return process


def measure(store: str, url: str, duration: float, raw_pid: int, accounts_pid: int) -> list[tuple[Result, Result]]:
    rows = []
    for concurrency in (64, 512):
        raw = median_result([raw_echo(url, duration, concurrency, raw_pid) for _ in range(2)])
        get = run_requester(
            "bench.services", [url, str(duration), "get"], f"users.get {store}", concurrency, [accounts_pid]
        )
        rows += [(raw, get)]
    for concurrency in (64, 512):
        create = run_requester(
            "bench.services", [url, str(duration), "create"], f"users.create {store}", concurrency, [accounts_pid]
        )
        rows.append((rows[0][0], create))
    creates = subprocess.Popen(
        [sys.executable, "-m", "bench.services", "requester", url, str(duration + 2 * warmup_s), "create", "64"],
        stdout=subprocess.DEVNULL,
    )
    time.sleep(warmup_s)
    under_load = run_requester(
        "bench.services", [url, str(duration), "get"], f"users.get {store} + creates", 64, [accounts_pid]
    )
    creates.wait()
    rows.append((rows[0][0], under_load))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--duration", type=float, default=4.0)
    parser.add_argument("--stores", nargs="+", default=["sqlite", "postgres"])
    options = parser.parse_args()
    with nats_and_raw_echo() as (data_dir, url, raw, _):
        rows = []
        for store in options.stores:
            database_url = database_for(store, data_dir)
            migrations.upgrade(database_url)
            asyncio.run(seed(database_url))
            with services_running(["accounts"], url, database_url) as (accounts,):
                rows += measure(store, url, options.duration, raw.pid, accounts.pid)
    print(
        f"{SEEDED_USERS} users seeded, {options.duration:g} s per measurement, cpus {os.cpu_count()}, "
        f"echo body {len(BODY)} bytes"
    )
    print(table(rows))


if __name__ == "__main__":
    if sys.argv[1:2] == ["requester"]:
        url, duration, kind, concurrency = sys.argv[2], float(sys.argv[3]), sys.argv[4], int(sys.argv[5])
        subject = f"accounts.users.{kind}"
        result = asyncio.run(closed_loop(url, subject, lambda n: body_for(kind, n), concurrency, warmup_s, duration))
        print(json.dumps(result))
    else:
        main()
