"""Engines from `DATABASE_URL`: SQLite (embedded default, a file per service) or Postgres.

SQLite allows one writer per file: each service gets its own file, and within a process all
writes go through one connection that begins `IMMEDIATE`, so writers queue in the pool
instead of failing with SQLITE_BUSY; reads use a separate pool and never wait for the writer
(WAL). On Postgres one pool serves both.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import socket
import sqlite3
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

import asyncpg
import msgspec
from sqlalchemy import DateTime, event
from sqlalchemy.engine import URL, Row, make_url
from sqlalchemy.exc import ArgumentError, DBAPIError, DisconnectionError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine
from sqlalchemy.sql import Executable
from sqlalchemy.types import TypeDecorator
from sqlalchemy.util import greenlet_spawn

from bus.codec import timestamp

T = TypeVar("T")

sqlite_busy_timeout_ms = 10_000
wal_checkpoint_interval_s = 0.2
wal_pages_max = 16_384
"""A writer's own checkpoint, should the background one fall behind: 64 MiB of log at 4 KiB pages."""
sqlite_readers_max = 8
postgres_pool_size = 10
pool_timeout_s = 10.0
postgres_command_timeout_s = 10.0
migration_lock_wait_s = 5.0
"""How long a migration waits for a lock (a table's, or another migrator's: Postgres' `lock_timeout`;
a SQLite file's write lock: its busy timeout) before it gives up. Its statements themselves have
no limit: rebuilding a long chain's indexes takes what it takes."""
postgres_connect_timeout_s = 5.0
postgres_unacknowledged_max_s = 5.0
"""How long what a connection sent may go unacknowledged before the kernel ends it
(`TCP_USER_TIMEOUT`, as libpq's `tcp_user_timeout`): a server behind a dropped route is then a
lost connection, an outage, not a statement that waits out `postgres_command_timeout_s`."""
_TCP_USER_TIMEOUT = getattr(socket, "TCP_USER_TIMEOUT", None)
"""Linux's; elsewhere (macOS) a dropped route waits for the statement timeout."""


def postgres_lookup(columns: str, table: str, keys: dict[str, str], locking: str = "") -> str:
    """`columns` of `table`'s row for each key: the key columns' values come as arrays `$1`,
    `$2`, ... of the types in `keys`, and each key is one lookup on a unique index.

    Asked as `key = ANY($1)` (or joined to `unnest`), a table never analyzed yet (any young one:
    autovacuum looks once a minute) was estimated to match a large share of its rows and scanned
    whole, at every batch, up to ~50k rows: at c512 a fifth of Postgres' CPU went to the ledger's
    id check. A LATERAL subquery with LIMIT 1 is never flattened into a join, and its plan is
    the same whether Postgres plans it for the array at hand or once for any (a generic plan,
    which `plan_cache_mode = force_custom_plan` used to forbid at the cost of planning every
    statement every time). Rows come in the order of the keys (a nested loop over them): sorted
    keys take `locking`'s locks in order."""
    names = ", ".join(keys)
    arrays = ", ".join(f"${number}::{type_}[]" for number, type_ in enumerate(keys.values(), 1))
    match = " AND ".join(f"{table}.{key} = wanted.{key}" for key in keys)
    return (
        f"SELECT found.* FROM unnest({arrays}) AS wanted({names}) CROSS JOIN LATERAL "
        f"(SELECT {columns} FROM {table} WHERE {match} LIMIT 1 {locking}) AS found"
    )


def both_stores(postgres: str) -> tuple[str, str]:
    """A statement both stores read alike, written with Postgres' parameters (`$1`, `$2`, ...), as
    (its SQLite form, itself): SQLite reads the same numbers as `?1`, `?2`, ..."""
    assert "?" not in postgres, postgres
    return postgres.replace("$", "?"), postgres


_encode_json = msgspec.json.Encoder().encode


def sqlite_json_list(values: Sequence[str] | Sequence[int]) -> str:
    """`values` as the JSON text SQLite's `json_each(?)` reads, a whole list in one parameter
    (msgspec: `json.dumps` took 33 µs for a ledger batch's 166 ids, this 5)."""
    return _encode_json(values).decode()


async def lookup_rows(driver: Any, sqlite: bool, statements: tuple[str, str], keys: Sequence[Any]) -> Sequence[Any]:
    """The rows a lookup by keys finds, on a reader's driver: SQLite's statement takes the keys as
    one JSON list (`json_each(?)`), Postgres' as one array (`postgres_lookup`)."""
    if sqlite:
        return await driver.execute_fetchall(statements[0], (sqlite_json_list(keys),))
    return await driver.fetch(statements[1], keys)


def numbered_rows(rows: Iterable[Sequence[Any]], count: int) -> list[list[Sequence[Any]]]:
    """The rows of a statement that answers `count` reads at once, each row's first column the
    number (from 1) of the read it answers: per read, in order, its rows without that number."""
    found: list[list[Sequence[Any]]] = [[] for _ in range(count)]
    for row in rows:
        found[row[0] - 1].append(row[1:])
    return found


def stored_timestamp(sqlite: bool) -> Callable[[Any], str]:
    """How a row read on the driver becomes the contract's timestamp text."""
    return sqlite_timestamp if sqlite else timestamp


sqlite_insert_rows_max = 512
"""Rows in one multi-row `INSERT`: 5,120 parameters at ten columns (SQLite allows 32,766)."""


def sqlite_insert_rows(
    conn: sqlite3.Connection, insert: str, width: int, conflict: str, rows: Sequence[Sequence[Any]]
) -> None:
    """`rows` stored by `{insert} VALUES (...), (...) {conflict}` statements of a power of two
    rows each (a few per batch, each prepared once), not `executemany`. sqlite3 releases the GIL
    around every step, and each row of `executemany` is a step: a writer thread beside a busy
    event loop waited to get the GIL back once per row (a scratch test with a spinning thread:
    1.1-1.5 s for a batch of 177 entries and 300 balances, 65 ms this way; alone 0.9 and 0.65 ms)."""
    start = 0
    while start < len(rows):
        count = min(1 << ((len(rows) - start).bit_length() - 1), sqlite_insert_rows_max)
        chunk = rows[start : start + count]
        conn.execute(_values_statement(insert, width, count, conflict), [value for row in chunk for value in row])
        start += count


@functools.cache
def _values_statement(insert: str, width: int, count: int, conflict: str) -> str:
    row = "(" + ", ".join("?" * width) + ")"
    return f"{insert} VALUES {', '.join([row] * count)} {conflict}"


def postgres_text_array(values: Sequence[str]) -> str:
    """`values` as one Postgres array literal, every element quoted (so `NULL`, commas and
    braces stay text); pass it as `$n::text::text[]`.

    asyncpg's binary array encoder tests every element against abstract base classes: 0.4-1.2
    µs per element measured, ten columns of ~180 entries per ledger batch, on a thread sharing
    the GIL with the service. As one string per column, the ledger's write cost the writer
    5 µs per entry instead of 17, and Postgres' text array input costs its backend no more
    than the binary one (scratch benchmark, bench/RESULTS.md session 5)."""
    plain = "".join(values)
    if '"' in plain or "\\" in plain:
        values = [value.replace("\\", "\\\\").replace('"', '\\"') for value in values]
    return '{"' + '","'.join(values) + '"}' if values else "{}"


def postgres_int_array(values: Sequence[int]) -> str:
    """`values` as one Postgres array literal; pass it as `$n::text::bigint[]` (see above).

    The digits come from msgspec's JSON array without its brackets: 0.02 µs per value against
    0.12 for `",".join(map(str, values))` (`timeit`, 180 bigints)."""
    return "{" + msgspec.json.encode(values)[1:-1].decode() + "}"


class UtcDateTime(TypeDecorator[datetime]):
    """A timestamp stored with its zone on Postgres and read back as UTC on both stores."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: object) -> datetime | None:
        assert value is None or value.tzinfo is not None
        return value.astimezone(UTC) if value is not None else None

    def process_result_value(self, value: datetime | None, dialect: object) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def sqlite_timestamp(stored: str) -> str:
    """The contract's timestamp from SQLAlchemy's SQLite storage of a UTC `UtcDateTime`
    (`2026-01-01 12:00:00.000000`, always six digits): for reads that bypass SQLAlchemy."""
    assert len(stored) == 26 and stored[10] == " ", stored
    return f"{stored[:10]}T{stored[11:]}Z"


def sqlite_stored(moment: datetime) -> str:
    """A UTC moment as SQLAlchemy stores a `UtcDateTime` on SQLite: for writes that bypass it."""
    assert moment.utcoffset() == timedelta(0), moment
    return moment.strftime("%Y-%m-%d %H:%M:%S.%f")


def default_url() -> str:
    data_dir = Path(os.environ.get("BITNEXUS_DATA_DIR", ".bitnexus")).resolve()
    return f"sqlite+aiosqlite:///{data_dir / 'mesh.db'}"


DRIVERS = {
    "sqlite": "sqlite+aiosqlite",
    "sqlite+aiosqlite": "sqlite+aiosqlite",
    "postgres": "postgresql+asyncpg",
    "postgresql": "postgresql+asyncpg",
    "postgresql+asyncpg": "postgresql+asyncpg",
}
"""The schemes `DATABASE_URL` may name, and the async driver each is served by: a plain
`postgresql://` URL, as every Postgres tool takes it, means asyncpg."""
URL_FORMS = "sqlite+aiosqlite:///path/mesh.db or postgresql+asyncpg://user@host/database"


_CAUSES_MAX = 16
"""How far down an exception's causes to look: SQLAlchemy's wrapping is two or three deep."""
_REFUSED = (
    asyncpg.TooManyConnectionsError,  # 53300: `max_connections`, or a role's or database's limit
    asyncpg.ReadOnlySQLTransactionError,  # 25006: no writes now (a failover's old primary, a maintenance)
    asyncpg.DiskFullError,  # 53100: a table or index could not grow (a full WAL disk stops the server instead)
    asyncpg.OutOfMemoryError,  # 53200: the server could not allocate for this statement
)
"""The server up but taking no new session, or no write, now, and saying so in answer to the
connect or the statement: nothing sent was written (not even by a statement that commits itself).
SQLite's own such answer is a full file (`_refused`)."""
_OUTAGES = (
    OSError,  # refused, reset, unreachable: no server to talk to (not a timeout: NATS's are OSErrors too)
    asyncpg.PostgresConnectionError,  # class 08, "connection was closed in the middle of operation"
    asyncpg.CannotConnectNowError,  # 57P03: starting up, shutting down, in recovery
    asyncpg.AdminShutdownError,  # 57P01: a restart or failover ended the session
    PoolTimeout,  # every pooled connection taken (say, each waiting out a connect) for `pool_timeout_s`
)


_ERROR_WHILE_IDLE = "another operation (2) is in progress"
"""asyncpg's words for a connection that got an error while idle and waits for a sync that never
comes (state 2, `PROTOCOL_ERROR_CONSUME`): the FATAL a server shutting down sends to each idle
session (asyncpg issues 784 and 1069). Seen on the ledger's writer and raw reads when Postgres stopped."""


_WAITED_TOO_LONG = (
    TimeoutError,  # asyncpg's `postgres_command_timeout_s` (or a NATS request's, inside a block)
    asyncpg.QueryCanceledError,  # 57014: a server's `statement_timeout`
)
_SQLITE_WAITED_TOO_LONG = ("SQLITE_BUSY", "SQLITE_LOCKED")
"""SQLite's writer lock held by another connection (another process, a migration) for
`sqlite_busy_timeout_ms`."""


def _waited_too_long(exc: BaseException) -> bool:
    return lock_wait_ran_out(exc) or any(isinstance(seen, _WAITED_TOO_LONG) for seen in _causes(exc))


def lock_wait_ran_out(exc: BaseException) -> bool:
    """`exc`, or what it wraps, is a wait for a lock that ran out: Postgres' `lock_timeout`
    (55P03), or SQLite's busy timeout on another connection's write lock."""
    return any(
        isinstance(seen, asyncpg.LockNotAvailableError)
        or (isinstance(seen, sqlite3.OperationalError) and seen.sqlite_errorname in _SQLITE_WAITED_TOO_LONG)
        for seen in _causes(exc)
    )


class DatabaseTimeout(Exception):
    """A statement waited past its limit (a lock held long, a server too busy to answer) in a
    read or in a transaction that was rolled back: nothing recorded. Answered as the contract's
    503, "did not answer in time", like an outage; it was a 500 `internal` until session 21."""


def database_did_not_answer(exc: BaseException) -> bool:
    """`database_unreachable`, or a read or transaction given up on by its timeout (`DatabaseTimeout`)."""
    return database_unreachable(exc) or any(isinstance(seen, DatabaseTimeout) for seen in _causes(exc))


def database_unreachable(exc: BaseException) -> bool:
    """Whether `exc`, or what it wraps, says the database server went away or is not back yet
    (a restart, a failover, the network): an outage to wait out, not a fault of ours.
    SQLAlchemy wraps the driver's error."""
    return any(
        (isinstance(seen, _OUTAGES) and not isinstance(seen, TimeoutError))
        or (isinstance(seen, DBAPIError) and seen.connection_invalidated)
        or _dead_before_sending(seen)
        or _refused(seen)
        for seen in _causes(exc)
    )


def _refused(exc: BaseException) -> bool:
    """`_REFUSED`, or SQLite's "database or disk is full" (SQLITE_FULL: the disk, or a file's
    `max_page_count`), after which SQLite has undone what it could not write. Until session 23
    each write meeting a full disk was a 500 with its traceback, logged to that disk."""
    return isinstance(exc, _REFUSED) or (
        isinstance(exc, sqlite3.OperationalError) and exc.sqlite_errorname == "SQLITE_FULL"
    )


def _dead_before_sending(exc: BaseException) -> bool:
    """asyncpg refused to send anything on a connection that had died: one closed with its server
    ("connection is closed"), or one that got an error while idle."""
    if isinstance(exc, asyncpg.InterfaceError):
        return "connection is closed" in str(exc)
    return isinstance(exc, asyncpg.InternalClientError) and _ERROR_WHILE_IDLE in str(exc)


def _causes(exc: BaseException) -> Iterator[BaseException]:
    seen: BaseException | None = exc
    for _ in range(_CAUSES_MAX):
        if seen is None:
            return
        yield seen
        seen = seen.__cause__ or seen.__context__


class CommitUnanswered(Exception):
    """The database went away, or did not answer in time, while a COMMIT was on its way: the
    write may stand or not.

    Answered as a 500, never as the 503 that a lost database otherwise gets: the contract's 503
    promises that nothing was recorded. A retry with the same key or id finds out which."""


async def committing(commit: Awaitable[T]) -> T:
    """`commit`'s result; if the database went away meanwhile, `CommitUnanswered`."""
    try:
        return await commit
    except Exception as exc:
        if database_unreachable(exc) and not any(_dead_before_sending(seen) or _refused(seen) for seen in _causes(exc)):
            raise CommitUnanswered("the database went away during a commit") from exc
        if _waited_too_long(exc):
            raise CommitUnanswered("the database did not answer a commit in time") from exc
        raise


@contextlib.contextmanager
def given_up_waiting() -> Iterator[None]:
    """Around statements whose failure records nothing (a read, a transaction that an exception
    rolls back): one that waited too long for the database becomes `DatabaseTimeout`. A
    `CommitUnanswered` stays one."""
    try:
        yield
    except CommitUnanswered:
        raise
    except Exception as exc:
        if _waited_too_long(exc) and not database_unreachable(exc):
            raise DatabaseTimeout("the database did not answer in time") from exc
        raise


@contextlib.asynccontextmanager
async def transaction(engine: AsyncEngine) -> AsyncIterator[AsyncConnection]:
    """`engine.begin()` for a request's write: a lost database before the COMMIT (at connect,
    at any statement) left nothing behind and is answered 503, and so is a block that waited
    too long for the database (`DatabaseTimeout`); at the COMMIT either is `CommitUnanswered`.

    The database's transaction is open when the block starts, so statements sent on the driver
    itself (`get_raw_connection`, as the saga's store does) are in it too. SQLAlchemy's asyncpg
    adapter sends BEGIN only before its own first statement: until session 20 the saga's
    statements each committed on their own, and two replicas closing one transaction each wrote
    its event. (SQLite's writer sends BEGIN IMMEDIATE at `begin`, `_sqlite_engine`.)"""
    with given_up_waiting():  # at BEGIN or in the block: rolled back as the connection is given back
        async with _begun(engine) as conn:
            yield conn
            await committing(conn.commit())


@contextlib.asynccontextmanager
async def _begun(engine: AsyncEngine) -> AsyncIterator[AsyncConnection]:
    """A connection with its transaction open. On Postgres the BEGIN goes at once, with a
    `SELECT 1`: a pooled connection the server ended (a restart) that the checkout did not yet
    know to be closed (`_alive_at_checkout`: its FATAL came, its close not yet) is found dead
    before anything is written, and the transaction opens on a new one; SQLAlchemy replaces the
    pool's others. The first write of each pool after a restart was a 503 (session 19). SQLite's
    writer sends BEGIN IMMEDIATE at `begin`, which waits for the file's writer lock."""
    postgres = engine.dialect.name == "postgresql"
    for first_try in (True, False):
        async with engine.connect() as conn:
            try:
                await conn.begin()
                if postgres:
                    await conn.exec_driver_sql("SELECT 1")  # the adapter's BEGIN goes before it
            except Exception as exc:
                if postgres and first_try and database_unreachable(exc):
                    continue  # nothing was written: on a new connection
                raise
            yield conn
            return


settle_attempts_max = 4
settle_pause_s = 0.5
"""A write whose commit went unanswered is written again for up to 2 s: a Postgres restart."""


async def settled(write: Callable[[], Awaitable[T]], stood: Callable[[], Awaitable[T | None]] | None = None) -> T:
    """`write()`; if its commit went unanswered, `write()` again once the database is back (up to
    `settle_attempts_max` times, `settle_pause_s` apart), as a client's retry would. For writes
    that are idempotent, where a second run finds what the first left and answers the same; or
    for writes whose effect `stood()` can recognize (their answer, else None), asked first at
    each try: a user or product written at this request's own microsecond, say. Their callers
    then learn what stands instead of a 500 (the ledger: 3-4 per Postgres stop under load
    before, session 19; the saga: 5 in one stop of a session 20 chaos soak; accounts' and
    products' writes until session 21, whose retried create then got `email_taken`)."""
    try:
        return await write()
    except CommitUnanswered as unanswered:
        for _ in range(settle_attempts_max):
            await asyncio.sleep(settle_pause_s)
            try:
                if stood is not None and (answer := await stood()) is not None:
                    return answer
                return await write()
            except Exception as exc:
                if not nothing_recorded(exc):  # unanswered again, or a fault
                    raise
        raise unanswered


def nothing_recorded(exc: BaseException) -> bool:
    """Whether a request that failed on `exc` can be answered 503: the database was lost, or
    did not answer in time, and not while a commit was on its way."""
    return database_did_not_answer(exc) and not isinstance(exc, CommitUnanswered)


class BadDatabaseUrl(ValueError):
    """`DATABASE_URL` names no database this mesh can use: a setting to fix, said in one line."""


def service_url(service: str, url: str | None = None) -> URL:
    """The database of one service: the same Postgres database, or its own SQLite file beside the named one."""
    try:
        parsed = make_url(url or os.environ.get("DATABASE_URL") or default_url())
    except ArgumentError:
        raise BadDatabaseUrl(f"DATABASE_URL is not a URL; expected {URL_FORMS}") from None
    if parsed.drivername not in DRIVERS:
        raise BadDatabaseUrl(f"DATABASE_URL names {parsed.drivername!r}; expected {URL_FORMS}")
    parsed = parsed.set(drivername=DRIVERS[parsed.drivername])
    if parsed.get_backend_name() != "sqlite":
        postgres_dsn(parsed)  # its limits are said now, not at the first connection
        return parsed
    if not parsed.database or parsed.database == ":memory:":
        raise BadDatabaseUrl(f"DATABASE_URL names no SQLite file, and each service keeps its own; expected {URL_FORMS}")
    path = Path(parsed.database)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        reason = f"DATABASE_URL's SQLite files go in {path.parent}, which cannot be made: {exc.strerror}"
        raise BadDatabaseUrl(reason) from None
    return parsed.set(database=str(path.with_name(f"{path.stem}.{service}{path.suffix or '.db'}")))


@dataclass(frozen=True)
class Database:
    """What a service's Repo talks to: `writer` for transactions that write, `reader` for reads."""

    writer: AsyncEngine
    reader: AsyncEngine

    @property
    def is_sqlite(self) -> bool:
        return self.writer.dialect.name == "sqlite"

    @contextlib.asynccontextmanager
    async def read(self) -> AsyncIterator[AsyncConnection]:
        """A reader's connection; a read kept waiting past its timeout is `DatabaseTimeout` (a
        503), as a write's is: a statement blocked by a migration's lock, say."""
        async with self.reader.connect() as conn:
            with given_up_waiting():
                yield conn

    @contextlib.asynccontextmanager
    async def reading(self) -> AsyncIterator[Any]:
        """A reader's own driver connection (aiosqlite's or asyncpg's), with `read()`'s timeout: for
        statements written per store, with nothing per statement or row above the driver.

        Taken from the pool as it is, not through a SQLAlchemy `AsyncConnection` (whose start,
        driver lookup and close are three trips through a greenlet): a read of one page cost
        the service 30-40 % less CPU on Postgres, and as much on SQLite at concurrency 1
        (scratch loop, bench/RESULTS.md session 27). Returning it runs no statement: SQLite's
        readers reset nothing, and Postgres' rollback is a no-op where no transaction began."""
        raw = await self.reader.raw_connection()
        try:
            with given_up_waiting():
                yield raw.driver_connection
        finally:
            await greenlet_spawn(raw.close)

    async def read_one(self, query: Executable) -> Row | None:
        """The one row `query` finds, or None, read as `read()` reads."""
        async with self.read() as conn:
            return (await conn.execute(query)).one_or_none()

    async def dispose(self) -> None:
        await self.writer.dispose()
        if self.reader.pool is not self.writer.pool:
            await self.reader.dispose()


def create_engine(url: URL, migrating: bool = False, **options: Any) -> AsyncEngine:
    """An async engine for `url`; on Postgres each connection made by `connect_postgres` (a
    migration's with its limits, `migrating`), and checked at checkout (`_alive_at_checkout`).
    A migration's SQLite transaction holds the file's write lock from its first statement
    (`BEGIN IMMEDIATE`), waiting for it up to `migration_lock_wait_s`: one migrator at a time."""
    if url.get_backend_name() != "postgresql":
        engine = create_async_engine(url, **options)
        if migrating:
            event.listen(engine.sync_engine, "connect", _migrating_on_sqlite)
            event.listen(engine.sync_engine, "begin", _begin_immediate)
        return engine
    options["async_creator"] = functools.partial(connect_postgres, postgres_dsn(url), migrating)
    engine = create_async_engine(url, **options)
    event.listen(engine.sync_engine, "checkout", _alive_at_checkout)
    return engine


def _migrating_on_sqlite(dbapi_connection: Any, _record: Any) -> None:
    dbapi_connection.isolation_level = None  # we issue BEGIN ourselves (`_begin_immediate`)
    dbapi_connection.execute(f"PRAGMA busy_timeout={round(migration_lock_wait_s * 1000)}")


def _begin_immediate(connection: Any) -> None:
    connection.exec_driver_sql("BEGIN IMMEDIATE")


def _alive_at_checkout(dbapi_connection: Any, _record: Any, _proxy: Any) -> None:
    """A pooled connection whose server ended it (a restart, a failover, an administrator's
    `pg_terminate_backend`) is replaced before anyone uses it: SQLAlchemy's pool invalidates one
    that raises `DisconnectionError` here and connects anew in its place. asyncpg has already
    seen the server's close on the event loop, so this costs no round trip (SQLAlchemy's
    `pool_pre_ping` would send one per checkout). Until session 22 each pool's first read after
    a Postgres restart was a 503; writes found out at their BEGIN (`_begun`)."""
    if dbapi_connection.driver_connection.is_closed():
        raise DisconnectionError("the server ended this pooled connection")


def open_database(url: URL) -> Database:
    if url.get_backend_name() == "sqlite":
        return Database(writer=_sqlite_engine(url, writer=True), reader=_sqlite_engine(url, writer=False))
    engine = create_engine(url, pool_size=postgres_pool_size, max_overflow=0, pool_timeout=pool_timeout_s)
    # a read is one statement: no BEGIN/COMMIT round trips around it
    return Database(writer=engine, reader=engine.execution_options(isolation_level="AUTOCOMMIT"))


def _sqlite_engine(url: URL, writer: bool) -> AsyncEngine:
    engine = create_async_engine(
        url,
        pool_size=1 if writer else sqlite_readers_max,
        max_overflow=0,
        pool_timeout=pool_timeout_s,
        pool_reset_on_return="rollback" if writer else None,  # readers never open a transaction
    )

    @event.listens_for(engine.sync_engine, "connect")
    def on_connect(dbapi_connection, _record) -> None:  # type: ignore[no-untyped-def]
        dbapi_connection.isolation_level = None  # we issue BEGIN ourselves, below
        configure_sqlite(dbapi_connection)

    if writer:
        event.listen(engine.sync_engine, "begin", _begin_immediate)
    return engine


def configure_sqlite(connection: sqlite3.Connection) -> None:
    """Every connection to a service's file: WAL, durable commits, foreign keys, wait for the lock."""
    cursor = connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=FULL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute(f"PRAGMA busy_timeout={sqlite_busy_timeout_ms}")
    cursor.close()


class ConnectTimeout(ConnectionError):
    """No connection to the database within its connect timeout: the server or the
    network is gone (an outage, unlike a `TimeoutError`, which could be anyone's)."""


@dataclass(frozen=True)
class PostgresDsn:
    """How to connect: the URL as asyncpg reads it, and the two limits libpq reads from a URL's
    query that asyncpg does not (it would send them to the server as settings, which refuses)."""

    dsn: str
    connect_timeout_s: float
    """libpq's `connect_timeout` (seconds)."""
    unacknowledged_max_ms: int
    """libpq's `tcp_user_timeout` (milliseconds; 0: the system's default)."""


def postgres_dsn(url: URL) -> PostgresDsn:
    query = dict(url.query)
    try:
        connect_timeout_s = float(query.pop("connect_timeout", postgres_connect_timeout_s))
        unacknowledged_max_ms = int(query.pop("tcp_user_timeout", postgres_unacknowledged_max_s * 1000))
    except (TypeError, ValueError):
        connect_timeout_s = unacknowledged_max_ms = -1
    if connect_timeout_s <= 0 or unacknowledged_max_ms < 0:
        raise BadDatabaseUrl(
            "DATABASE_URL's connect_timeout takes seconds above 0 (every wait here is bounded), "
            "its tcp_user_timeout milliseconds (0: the system's default)"
        )
    dsn = url.set(drivername="postgresql", query=query).render_as_string(hide_password=False)
    return PostgresDsn(dsn, connect_timeout_s, unacknowledged_max_ms)


def migration_settings() -> list[str]:
    """A migration's limits, for its own transaction only: its waits for a lock end after
    `migration_lock_wait_s`, its statements take as long as they need (whatever `statement_timeout`
    the role or the database sets). Sent at connect as startup parameters until session 24, which
    a PgBouncer refuses ("unsupported startup parameter: lock_timeout")."""
    return [f"SET LOCAL lock_timeout = '{round(migration_lock_wait_s * 1000)}ms'", "SET LOCAL statement_timeout = 0"]


async def connect_postgres(target: PostgresDsn, migrating: bool = False) -> asyncpg.Connection:
    """A connection to Postgres, or `ConnectTimeout` within `connect_timeout_s`: asyncpg waits
    60 s by default, and a server behind a dropped route answers neither yes nor no.

    A service's statements give up after `postgres_command_timeout_s`. A migration's may take as
    long as the data asks: with the services' limit, ledger_0003 gave up with a bare
    `TimeoutError` after 10 s on a chain of 7M entries, whose indexes took 13 s to rebuild
    without it (session 23). Only its waits for a lock are bounded, by `migration_settings` in
    its transaction."""
    limits = {} if migrating else {"command_timeout": postgres_command_timeout_s}
    try:
        connection = await asyncpg.connect(target.dsn, timeout=target.connect_timeout_s, **limits)
    except TimeoutError as exc:
        raise ConnectTimeout(f"no connection to the database within {target.connect_timeout_s:g} s") from exc
    sock = connection._transport.get_extra_info("socket")  # asyncpg offers no option for it
    tcp = sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6)
    if _TCP_USER_TIMEOUT is not None and tcp and target.unacknowledged_max_ms:
        sock.setsockopt(socket.IPPROTO_TCP, _TCP_USER_TIMEOUT, target.unacknowledged_max_ms)
    return connection


class PostgresThread:
    """An asyncpg connection owned by a thread running its own event loop: `await run(fn)` awaits
    `fn(connection)` there, one call at a time.

    The service's event loop is busy under load, and every round trip awaited on it waits for
    its next turn (≈ 5 ms at c512); on this thread's quiet loop a round trip costs what the
    network and Postgres cost. `fn` begins and commits its own transaction; one it leaves open
    (it raised, or was cancelled), or a statement it gave up waiting for, is ended by dropping
    the connection, and the next call opens another.
    """

    def __init__(self, url: URL) -> None:
        self.dsn = postgres_dsn(url)
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="postgres-writer", daemon=True)
        self._thread.start()
        self._connection: Any = None
        self._turn: asyncio.Lock | None = None

    async def run(self, fn: Callable[[Any], Awaitable[T]]) -> T:
        return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(self._call(fn), self.loop))

    async def _call(self, fn: Callable[[Any], Awaitable[T]]) -> T:
        self._turn = self._turn or asyncio.Lock()
        async with self._turn:
            if self._connection is None or self._connection.is_closed():
                self._connection = await connect_postgres(self.dsn)
            connection = self._connection
            try:
                return await fn(connection)
            except BaseException as exc:
                if not connection.is_closed() and (connection.is_in_transaction() or _waited_too_long(exc)):
                    # Postgres rolls back; an interrupted query leaves nothing behind. After a
                    # timeout asyncpg's idea of the transaction can be stale: a COMMIT given up on
                    # left the session in an aborted transaction while asyncpg said none was open.
                    connection.terminate()
                raise

    async def close(self) -> None:
        async def close() -> None:
            if self._connection is not None:
                await self._connection.close()

        await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(close(), self.loop))
        self.loop.call_soon_threadsafe(self.loop.stop)
        await asyncio.to_thread(self._thread.join)
        self.loop.close()


class SqliteThread:
    """A sqlite3 connection owned by one thread: `await run(fn)` calls `fn(connection)` there.

    A whole batch of statements (and the Python between them) then costs one thread round trip.
    aiosqlite pays one per call, and under load each round trip waits a turn of the event
    loop: ≈ 1.5 ms measured in the ledger at c512, so BEGIN, five statements and COMMIT took
    18 ms per batch. The connection is in autocommit mode: `fn` issues BEGIN and COMMIT itself.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sqlite-writer")
        self._connection: sqlite3.Connection | None = None
        self._checkpointer = WalCheckpointer(path)

    async def run(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._executor, self._call, fn)

    def _call(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        if self._connection is None:
            self._connection = sqlite3.connect(self.path, isolation_level=None)
            configure_sqlite(self._connection)
            self._connection.execute(f"PRAGMA wal_autocheckpoint={wal_pages_max}")
            self._checkpointer.start()
        return fn(self._connection)

    async def close(self) -> None:
        def close(connection: sqlite3.Connection) -> None:
            connection.close()
            self._connection = None

        await asyncio.to_thread(self._checkpointer.stop)
        if self._connection is not None:
            await self.run(close)
        self._executor.shutdown(wait=True)


class WalCheckpointer:
    """Copies a SQLite file's write-ahead log into the database every `wal_checkpoint_interval_s`,
    on a thread and connection of its own, so that a writer's commits only append to the log.

    SQLite's own checkpoint runs inside the commit that takes the log past 1,000 pages: in the
    ledger at c512, one commit in ten took 8-13 ms instead of 1-2 (copying pages, fsyncing the
    database file) while every request of its batch waited. A PASSIVE checkpoint never blocks
    the writer or readers. Under constant writes it seldom catches the log's last frame, and
    only then can the next transaction start the log over; the writer keeps
    `wal_autocheckpoint` at `wal_pages_max` as the bound (at c512 the log peaked near 15,500
    pages and started over several times in 6 s).
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        assert self._thread is None
        self._thread = threading.Thread(target=self._run, name="sqlite-checkpointer", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        if self._thread is not None:
            self._thread.join()

    def _run(self) -> None:
        connection = sqlite3.connect(self.path, isolation_level=None)
        try:
            configure_sqlite(connection)
            while not self._stopping.wait(wal_checkpoint_interval_s):
                try:
                    connection.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
                except sqlite3.OperationalError as exc:
                    if exc.sqlite_errorcode != sqlite3.SQLITE_BUSY:
                        raise
                    # another connection is checkpointing (the writer's backstop): next round
        finally:
            connection.close()
