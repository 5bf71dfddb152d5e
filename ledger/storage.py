"""The writer's statements on the database driver itself: sqlite3 in the writer's thread, or asyncpg.

Going around SQLAlchemy here matters: per-row parameter processing and result rows were a
fifth of the ledger's CPU. On SQLite the whole batch runs in the writer's own thread as plain
calls (`SqliteLedgerSql`, see `SqliteThread`), a few multi-row `INSERT`s per table
(`sqlite_insert_rows`); on Postgres on the writer's own connection (`PostgresLedgerSql`, see
`PostgresThread`), the entries and balances in one `unnest` statement. Reads take a whole list
as one parameter (`json_each` / `postgres_lookup`), so no statement is recompiled per batch size.

History's index differs by store. Postgres keeps two indexes on (account, seq): a row costs
it a tuple in each. SQLite's log takes whole pages, and a batch rewrote a page of each index
per account it touched, so there the index is written in runs (`ledger_postings`, paced across
batches by `ledger.postings`). A history read takes the account's complete runs and scans the
chain past the `postings` cursor. On Postgres (a
scratch test of the same statements) a run of 2,048 entries took a median 15-24 ms inside its
batch and saved its backend ≈ 1-2 µs per transfer: not worth a spike in one batch of eight.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable, Sequence
from datetime import datetime
from typing import Any

from bus.codec import timestamp
from ledger.plan import BalanceKey, Head
from schemas.database import (
    postgres_int_array,
    postgres_lookup,
    postgres_text_array,
    sqlite_insert_rows,
    sqlite_json_list,
    sqlite_stored,
    sqlite_timestamp,
)
from schemas.ledger import Entry

ENTRY_COLUMNS = "seq, id, from_account, to_account, amount, currency, memo, recorded_at, prev_hash, hash"
HEAD = "SELECT seq, hash FROM ledger_entries ORDER BY seq DESC LIMIT 1"
POSTINGS_CURSOR = "SELECT seq FROM ledger_cursors WHERE name = 'postings'"

SQLITE_ENTRIES_AFTER = f"SELECT {ENTRY_COLUMNS} FROM ledger_entries WHERE seq > ?1 AND seq <= ?1 + ?2 ORDER BY seq"
POSTGRES_ENTRIES_AFTER = f"SELECT {ENTRY_COLUMNS} FROM ledger_entries WHERE seq > $1 AND seq <= $1 + $2 ORDER BY seq"
"""Up to `limit` entries after `seq`: seqs are dense, so the range (seq, seq + limit]. Asked as
`seq > $1 ORDER BY seq LIMIT $2`, a Postgres table never analyzed yet was estimated to match a
third of its rows and scanned whole and sorted (up to ~50k entries) at every relay poll; a range
bounded on both sides is planned on the key."""
SQLITE_HISTORY = f"""WITH RECURSIVE runs(last_seq, counted) AS (
    SELECT min(last_seq), 0 FROM ledger_postings WHERE account = ?1 AND last_seq > ?2
    UNION ALL
    SELECT next.last_seq, runs.counted + json_array_length(next.seqs)
    FROM runs JOIN ledger_postings AS next ON next.account = ?1 AND next.last_seq = (
        SELECT min(last_seq) FROM ledger_postings WHERE account = ?1 AND last_seq > runs.last_seq)
    WHERE runs.counted < ?3
)
SELECT {ENTRY_COLUMNS} FROM ledger_entries WHERE seq IN (
    SELECT seq FROM (
        SELECT element.value AS seq
        FROM runs JOIN ledger_postings AS run ON run.account = ?1 AND run.last_seq = runs.last_seq,
             json_each(run.seqs) AS element
        WHERE runs.last_seq <= ({POSTINGS_CURSOR}) AND element.value > ?2
        UNION ALL
        SELECT seq FROM ledger_entries
        WHERE seq > max(?2, ({POSTINGS_CURSOR})) AND (from_account = ?1 OR to_account = ?1)
    ) ORDER BY seq LIMIT ?3
) ORDER BY seq"""
"""The account's entries after `?2`, at most `?3`: from its complete runs and from the chain past
the `postings` cursor, in one snapshot (the rows of a run still being stored are past the
cursor). Runs are taken in order until those after the first hold `?3` seqs (the first may hold
seqs up to `?2`; every later one's are past it): a hot account's history costs the runs it
needs, not `?3` whole runs (`world` in every entry, runs of 8,192: 39 ms for 50 entries)."""
POSTGRES_HISTORY = f"""SELECT {ENTRY_COLUMNS} FROM ledger_entries WHERE seq IN (
    (SELECT seq FROM ledger_entries WHERE from_account = $1 AND seq > $2 ORDER BY seq LIMIT $3)
    UNION ALL
    (SELECT seq FROM ledger_entries WHERE to_account = $1 AND seq > $2 ORDER BY seq LIMIT $3)
) ORDER BY seq LIMIT $3"""
"""Two index range scans of at most `$3` each, however many entries the account has."""


def _head(rows: Sequence[Sequence[Any]]) -> Head:
    return Head(rows[0][0], rows[0][1]) if rows else Head()


def _entries(rows: Iterable[Sequence[Any]], stamp: Any) -> dict[str, Entry]:
    return {
        row[1]: Entry(row[0], row[1], row[2], row[3], row[4], row[5], row[6], stamp(row[7]), row[8], row[9])
        for row in rows
    }


def _balances(rows: Iterable[Sequence[Any]], keys: set[BalanceKey]) -> dict[BalanceKey, int]:
    return {(row[0], row[1]): row[2] for row in rows if (row[0], row[1]) in keys}


def _accounts(keys: set[BalanceKey]) -> list[str]:
    return sorted({account for account, _ in keys})


def _entry_rows(entries: list[Entry], stored_at: Any) -> list[tuple[Any, ...]]:
    return [(e.seq, e.id, e.from_, e.to, e.amount, e.currency, e.memo, stored_at, e.prev_hash, e.hash) for e in entries]


def _balance_rows(balances: Iterable[tuple[BalanceKey, int]]) -> list[tuple[str, str, int]]:
    return [(account, currency, value) for (account, currency), value in balances]


async def entries_after(driver: Any, sqlite: bool, seq: int, limit: int) -> list[Entry]:
    """Up to `limit` entries after `seq`, in order (aiosqlite or asyncpg: the readers' drivers)."""
    if sqlite:
        rows = await driver.execute_fetchall(SQLITE_ENTRIES_AFTER, (seq, limit))
    else:
        rows = await driver.fetch(POSTGRES_ENTRIES_AFTER, seq, limit)
    return _in_order(rows, sqlite)


async def history_after(driver: Any, sqlite: bool, account: str, seq: int, limit: int) -> list[Entry]:
    """Up to `limit` entries from or to `account` after `seq`, in order (the readers' drivers)."""
    if sqlite:
        rows = await driver.execute_fetchall(SQLITE_HISTORY, (account, seq, limit))
    else:
        rows = await driver.fetch(POSTGRES_HISTORY, account, seq, limit)
    return _in_order(rows, sqlite)


def _in_order(rows: Iterable[Sequence[Any]], sqlite: bool) -> list[Entry]:
    """Entries from the readers' rows of `ENTRY_COLUMNS`, in the rows' order."""
    return list(_entries(rows, sqlite_timestamp if sqlite else timestamp).values())


class SqliteLedgerSql:
    by_ids = f"SELECT {ENTRY_COLUMNS} FROM ledger_entries WHERE id IN (SELECT value FROM json_each(?))"
    balances_of = (
        "SELECT account, currency, balance FROM ledger_balances WHERE account IN (SELECT value FROM json_each(?))"
    )
    insert = f"INSERT INTO ledger_entries ({ENTRY_COLUMNS})"
    upsert = "INSERT INTO ledger_balances (account, currency, balance)"
    upsert_conflict = "ON CONFLICT (account, currency) DO UPDATE SET balance = excluded.balance"

    def head(self, conn: sqlite3.Connection) -> Head:
        return _head(conn.execute(HEAD).fetchall())

    def entries_by_id(self, conn: sqlite3.Connection, ids: list[str]) -> dict[str, Entry]:
        return _entries(conn.execute(self.by_ids, (sqlite_json_list(ids),)), sqlite_timestamp)

    def balances(self, conn: sqlite3.Connection, keys: set[BalanceKey]) -> dict[BalanceKey, int]:
        return _balances(conn.execute(self.balances_of, (sqlite_json_list(_accounts(keys)),)), keys)

    def insert_entries(self, conn: sqlite3.Connection, entries: list[Entry], recorded_at: datetime) -> None:
        stored_at = sqlite_stored(recorded_at)
        assert sqlite_timestamp(stored_at) == entries[0].recorded_at
        sqlite_insert_rows(conn, self.insert, 10, "", _entry_rows(entries, stored_at))

    def store_balances(self, conn: sqlite3.Connection, balances: Iterable[tuple[BalanceKey, int]]) -> None:
        sqlite_insert_rows(conn, self.upsert, 3, self.upsert_conflict, _balance_rows(balances))


class PostgresLedgerSql:
    """Each statement is a network round trip. A batch the writer guesses (`Writer`) is one: the
    entries with the balances, committing itself; read first, it is four: BEGIN with the lock,
    the head with the batch's ids, the write, COMMIT. Balances not cached add a read."""

    begin_and_lock = "BEGIN; SELECT pg_advisory_xact_lock({key})"
    by_ids = postgres_lookup(ENTRY_COLUMNS, "ledger_entries", {"id": "text"})
    head_and_ids = (
        f"(SELECT true, {ENTRY_COLUMNS} FROM ledger_entries ORDER BY seq DESC LIMIT 1) "
        f"UNION ALL SELECT false, * FROM ({by_ids}) AS recorded"
    )
    balances_of = postgres_lookup(
        "account, currency, balance", "ledger_balances", {"account": "text", "currency": "text"}
    )
    write = (
        "WITH follows AS (SELECT pg_try_advisory_xact_lock($16) "
        "AND ($14::bigint = 0 OR EXISTS (SELECT FROM ledger_entries WHERE seq = $14 AND hash = $15)) "
        "AND NOT EXISTS (SELECT FROM ledger_entries WHERE seq = $14 + 1) AS head), "
        f"entries AS (INSERT INTO ledger_entries ({ENTRY_COLUMNS}) "
        "SELECT seq, id, from_account, to_account, amount, currency, memo, $8::timestamptz, prev_hash, hash "
        "FROM unnest($1::text::bigint[], $2::text::text[], $3::text::text[], $4::text::text[], $5::text::bigint[], "
        "$6::text::text[], $7::text::text[], $9::text::text[], $10::text::text[]) "
        "AS entry(seq, id, from_account, to_account, amount, currency, memo, prev_hash, hash) "
        "WHERE (SELECT head FROM follows)) "
        "INSERT INTO ledger_balances (account, currency, balance) "
        "SELECT * FROM unnest($11::text::text[], $12::text::text[], $13::text::bigint[]) "
        "WHERE (SELECT head FROM follows) "
        "ON CONFLICT (account, currency) DO UPDATE SET balance = excluded.balance"
    )
    """Each column one array literal (`postgres_text_array`); `recorded_at` once: a batch shares it.

    Writes nothing unless it holds the ledger's lock ($16: taken at once, or already held by
    the transaction) and the entry before the first is the stored head ($14, $15: not so when
    another writer appended, or in a chain emptied or restored behind the writer's head). A
    recorded id fails it on the id's unique key, nothing written: a guessed batch holds no id
    its writer committed lately (`Writer`), so that is a client's late retry or another
    writer's id, rare enough that probing every id first cost more (≈ 6 % of Postgres' CPU,
    bench/RESULTS.md session 8) than redoing such a batch. Alone (autocommit) it is a whole
    batch in one round trip: its lock ends with it, and a writer holding the lock read the head
    under it, so no other write falls between that read and its write. Its checks see the
    statement's snapshot, taken before the lock: a writer that committed in between is refused
    by the keys (the next seq, an id) instead."""

    async def begin_locked(self, driver: Any, key: int) -> None:
        """One round trip: the transaction and the ledger's lock, held until COMMIT or ROLLBACK."""
        await driver.execute(self.begin_and_lock.format(key=int(key)))

    async def head_and_entries(self, driver: Any, ids: list[str]) -> tuple[Head, dict[str, Entry]]:
        rows = await driver.fetch(self.head_and_ids, ids)
        heads = [Head(row[1], row[10]) for row in rows if row[0]]  # seq and hash of ENTRY_COLUMNS
        return (heads[0] if heads else Head()), _entries((row[1:] for row in rows if not row[0]), timestamp)

    async def balances(self, driver: Any, keys: set[BalanceKey]) -> dict[BalanceKey, int]:
        accounts, currencies = zip(*keys, strict=True)
        return _balances(await driver.fetch(self.balances_of, accounts, currencies), keys)

    async def write_entries(
        self,
        driver: Any,
        entries: list[Entry],
        recorded_at: datetime,
        balances: Iterable[tuple[BalanceKey, int]],
        lock_key: int,
    ) -> bool:
        """False when nothing was written: the lock was held elsewhere, or the entry before the
        first is not the stored one. Raises `UniqueViolationError` when an id is recorded."""
        assert all(entry.recorded_at == entries[0].recorded_at for entry in entries)
        assert timestamp(recorded_at) == entries[0].recorded_at
        texts, numbers = postgres_text_array, postgres_int_array
        accounts, currencies, values = zip(*_balance_rows(balances), strict=True)
        status = await driver.execute(
            self.write,
            numbers([entry.seq for entry in entries]),
            texts([entry.id for entry in entries]),
            texts([entry.from_ for entry in entries]),
            texts([entry.to for entry in entries]),
            numbers([entry.amount for entry in entries]),
            texts([entry.currency for entry in entries]),
            texts([entry.memo for entry in entries]),
            recorded_at,
            texts([entry.prev_hash for entry in entries]),
            texts([entry.hash for entry in entries]),
            texts(accounts),
            texts(currencies),
            numbers(values),
            entries[0].seq - 1,
            entries[0].prev_hash,
            lock_key,
        )
        return status != "INSERT 0 0"  # every entry changes two balances
