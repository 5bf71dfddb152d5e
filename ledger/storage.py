"""The writer's statements on the database driver itself: sqlite3 in the writer's thread, or asyncpg.

Going around SQLAlchemy here matters: per-row parameter processing and result rows were a
fifth of the ledger's CPU. On SQLite the whole batch runs in the writer's own thread as plain
calls (`SqliteLedgerSql`, see `SqliteThread`), a few multi-row `INSERT`s per table
(`sqlite_insert_rows`); on Postgres on the writer's own connection (`PostgresLedgerSql`, see
`PostgresThread`), the entries and balances in one `unnest` statement. Reads take a whole list
as one parameter (`json_each` / `postgres_lookup`), so no statement is recompiled per batch size.

History's index is written in runs on both stores (`ledger_postings`, paced across batches by
`ledger.postings`): a history read takes the account's complete runs and scans the chain past
the `postings` cursor. Two indexes on (account, seq) cost SQLite a page of each per account a
batch touched; on Postgres, measured again in session 13 with runs paced, they took ≈ 40 % of
its CPU per transfer at c512 (bench/RESULTS.md). An earlier scratch test had put the saving at
1-2 µs per transfer, with each run written whole by one batch.
"""

from __future__ import annotations

import functools
import sqlite3
from collections.abc import Callable, Iterable, Sequence
from datetime import datetime
from typing import Any

import msgspec

from bus.codec import timestamp
from bus.errors import ErrorBody
from ledger import postings
from ledger.plan import BalanceKey, Head, Refusal
from schemas.common import INT64_MAX
from schemas.database import (
    lookup_rows,
    numbered_rows,
    postgres_int_array,
    postgres_lookup,
    postgres_text_array,
    sqlite_insert_rows,
    sqlite_json_list,
    sqlite_stored,
    sqlite_timestamp,
)
from schemas.ledger import Entry, Transfer

ENTRY_COLUMNS = "seq, id, from_account, to_account, amount, currency, memo, recorded_at, prev_hash, hash"
POSTGRES_RECORDED_AT = """to_char(recorded_at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"')"""
"""A stored `recorded_at` as the contract's text, written by Postgres."""
POSTGRES_ENTRY_COLUMNS = ENTRY_COLUMNS.replace("recorded_at", f"{POSTGRES_RECORDED_AT} AS recorded_at")
"""`ENTRY_COLUMNS` as Postgres reads them out, `recorded_at` as text: asyncpg made each a
`datetime` and Python the text, 0.8-1.0 µs of the ledger's CPU per entry read (of 2.6-2.9 in
all: a `ledger.chain` page of 1,000 took ≈ 3 ms of its loop; bench/RESULTS.md, session 26)."""
REFUSAL_COLUMNS = "id, from_account, to_account, amount, currency, memo, error"
HEAD = "SELECT seq, hash FROM ledger_entries ORDER BY seq DESC LIMIT 1"
POSTINGS_CURSOR = "SELECT seq FROM ledger_cursors WHERE name = 'postings'"

SQLITE_ENTRIES_AFTER = f"SELECT {ENTRY_COLUMNS} FROM ledger_entries WHERE seq > ?1 AND seq <= ?2 ORDER BY seq"
POSTGRES_ENTRIES_AFTER = (
    f"SELECT {POSTGRES_ENTRY_COLUMNS} FROM ledger_entries WHERE seq > $1 AND seq <= $2 ORDER BY seq"
)
"""Up to `limit` entries after `seq`: seqs are dense, so the range (seq, seq + limit] (`seq_range_end`). Asked as
`seq > $1 ORDER BY seq LIMIT $2`, a Postgres table never analyzed yet was estimated to match a
third of its rows and scanned whole and sorted (up to ~50k entries) at every relay poll; a range
bounded on both sides is planned on the key."""
ENTRIES_PAST_A_GAP = (
    f"SELECT {ENTRY_COLUMNS} FROM ledger_entries WHERE seq > ?1 ORDER BY seq LIMIT ?2",
    f"SELECT {POSTGRES_ENTRY_COLUMNS} FROM ledger_entries WHERE seq > $1 ORDER BY seq LIMIT $2",
)
"""Up to `limit` entries after `seq` when the range does not hold them: only where an entry was
deleted from the table (`entries_after`)."""
LAST_SEQ = "SELECT max(seq) FROM ledger_entries"
POSTGRES_CANONICAL_BODY = f"""'{{"amount":' || amount || ',"currency":' || to_json(currency)
    || ',"from":' || to_json(from_account) || ',"id":' || to_json(id) || ',"memo":' || to_json(memo)
    || ',"recorded_at":"' || {POSTGRES_RECORDED_AT}
    || '","seq":' || seq || ',"to":' || to_json(to_account) || '}}'"""
"""`ledger.chain.canonical_body` written by Postgres: keys in JCS order, integers as digits,
strings by `to_json`, which escapes as JCS does (`"`, `\\`, control characters in their short
forms or as lower-case `\\u00xx`), and `recorded_at` as the contract's timestamp."""
POSTGRES_VERIFY_RANGE = f"""WITH checked AS (
    SELECT seq, prev_hash, hash, $1 + row_number() OVER chain AS expected_seq,
        coalesce(lag(hash) OVER chain, $2) AS expected_prev,
        encode(sha256(convert_to(prev_hash || {POSTGRES_CANONICAL_BODY}, 'UTF8')), 'hex') AS recomputed
    FROM ledger_entries WHERE seq > $1 AND seq <= $3
    WINDOW chain AS (ORDER BY seq)
), first_bad AS (
    SELECT expected_seq - 1 AS seq, expected_prev AS hash FROM checked
    WHERE seq <> expected_seq OR prev_hash <> expected_prev OR hash <> recomputed ORDER BY seq LIMIT 1
), last AS (SELECT seq, hash FROM checked ORDER BY seq DESC LIMIT 1)
SELECT (SELECT seq FROM first_bad), (SELECT hash FROM first_bad), (SELECT seq FROM last), (SELECT hash FROM last),
    ({LAST_SEQ})"""
"""The chain over the range ($1, $3] checked by Postgres, following the head ($1, $2): the
last good entry before the first bad one (or none), the range's last entry, and the stored
last seq, all in one snapshot."""
SQLITE_BALANCES_OF_ACCOUNTS = (
    "SELECT account, currency, balance FROM ledger_balances "
    "WHERE account IN (SELECT value FROM json_each(?1)) ORDER BY account, currency"
)
CURRENCIES_MAX = 26**3
"""Every currency there can be (three upper-case letters): a bound no account's balances exceed."""
POSTGRES_BALANCES_OF_ACCOUNTS = f"""SELECT found.* FROM unnest($1::text[]) AS wanted(account) CROSS JOIN LATERAL (
    SELECT account, currency, balance FROM ledger_balances WHERE ledger_balances.account = wanted.account
    ORDER BY currency LIMIT {CURRENCIES_MAX}
) AS found"""
"""As `postgres_lookup`: a LATERAL subquery with a LIMIT is never flattened into a join that a
young table's estimates would answer with a scan of the whole table; each account is one range
of the primary key."""
History = tuple[str, int, int]
"""A history read: the account, the seq its entries come after, how many at most."""
SQLITE_HISTORY_TAIL = f"""tail AS (
    SELECT seq, from_account, to_account FROM ledger_entries
    WHERE seq > max(?{{after}}, ({POSTINGS_CURSOR}))
      AND (from_account IN (SELECT value FROM json_each(?{{accounts}}))
           OR to_account IN (SELECT value FROM json_each(?{{accounts}})))
)"""
"""The chain past the `postings` cursor, the entries of any of the reads' accounts: scanned once
for them all. SQLite materializes a CTE used more than once (since 3.35); Postgres would fold
one used once into the LATERAL subquery and scan it for each read, so there it says so."""
SQLITE_HISTORY_RUNS = """runs{n}(last_seq, counted) AS (
    SELECT min(last_seq), 0 FROM ledger_postings WHERE account = ?{account} AND last_seq > ?{after}
    UNION ALL
    SELECT next.last_seq, runs{n}.counted + json_array_length(next.seqs)
    FROM runs{n} JOIN ledger_postings AS next ON next.account = ?{account} AND next.last_seq = (
        SELECT min(last_seq) FROM ledger_postings WHERE account = ?{account} AND last_seq > runs{n}.last_seq)
    WHERE runs{n}.counted < ?{count}
)"""
SQLITE_HISTORY_PAGE = f"""SELECT {{n}} + 1 AS page, * FROM (
    SELECT {ENTRY_COLUMNS} FROM ledger_entries WHERE seq IN (
        SELECT seq FROM (
            SELECT element.value AS seq
            FROM runs{{n}} JOIN ledger_postings AS run
                ON run.account = ?{{account}} AND run.last_seq = runs{{n}}.last_seq, json_each(run.seqs) AS element
            WHERE runs{{n}}.last_seq <= ({POSTINGS_CURSOR}) AND element.value > ?{{after}}
            UNION ALL
            SELECT seq FROM tail WHERE seq > ?{{after}} AND (from_account = ?{{account}} OR to_account = ?{{account}})
        ) ORDER BY seq LIMIT ?{{count}}
    ) ORDER BY seq
)"""
"""Each read's entries: from the account's complete runs and from the chain past the `postings`
cursor (`tail`), in one snapshot (the rows of a run still being stored are past the cursor).
Runs are taken in order until those after the first hold `count` seqs (the first may hold seqs
up to `after`; every later one's are past it): a hot account's history costs the runs it
needs. Taking `count` whole runs instead, 50 entries of `world` (in every entry, runs of
8,192) cost 39 ms; this way 2.8 ms (bench/RESULTS.md, session 13)."""
POSTGRES_HISTORIES = f"""WITH wanted AS (
    SELECT * FROM unnest($1::text[], $2::bigint[], $3::bigint[]) WITH ORDINALITY AS wanted(account, after, count, page)
), bounds AS (
    SELECT ({POSTINGS_CURSOR}) AS indexed, (SELECT max(seq) FROM ledger_entries) AS head
), tail AS MATERIALIZED (
    SELECT seq, from_account, to_account FROM ledger_entries
    WHERE seq > greatest((SELECT min(after) FROM wanted), (SELECT indexed FROM bounds))
      AND seq <= (SELECT head FROM bounds)
      AND (from_account = ANY($1::text[]) OR to_account = ANY($1::text[]))
)
SELECT wanted.page, entry.* FROM wanted CROSS JOIN LATERAL (
    WITH RECURSIVE runs(last_seq, counted) AS (
        (SELECT last_seq, 0::bigint FROM ledger_postings
         WHERE account = wanted.account AND last_seq > wanted.after ORDER BY last_seq LIMIT 1)
        UNION ALL
        SELECT next.last_seq, runs.counted + json_array_length(next.seqs::json)
        FROM runs, LATERAL (
            SELECT last_seq, seqs FROM ledger_postings WHERE account = wanted.account AND last_seq > runs.last_seq
            ORDER BY last_seq LIMIT 1
        ) AS next
        WHERE runs.counted < wanted.count
    )
    SELECT seq FROM (
        SELECT element::bigint AS seq
        FROM runs JOIN ledger_postings AS run ON run.account = wanted.account AND run.last_seq = runs.last_seq,
             json_array_elements_text(run.seqs::json) AS element
        WHERE runs.last_seq <= (SELECT indexed FROM bounds) AND element::bigint > wanted.after
        UNION ALL
        SELECT seq FROM tail WHERE seq > wanted.after AND (from_account = wanted.account OR to_account = wanted.account)
    ) AS found ORDER BY seq LIMIT wanted.count
) AS page CROSS JOIN LATERAL (
    SELECT {POSTGRES_ENTRY_COLUMNS} FROM ledger_entries WHERE ledger_entries.seq = page.seq LIMIT 1
) AS entry ORDER BY 1, entry.seq"""
"""The SQLite statements on Postgres, for arrays of the reads' accounts, seqs and counts: shaped
so that a table never analyzed is not scanned whole (`postgres_lookup` says why): the chain
past the cursor as a range bounded on both sides, and each entry one key lookup."""


@functools.cache
def sqlite_histories(count: int) -> str:
    """`count` history reads as one statement: the i-th read's (from 0) account, seq and count
    are parameters 3i+1 to 3i+3, then come the accounts as a JSON list and the least seq; each
    row says its read's number, from 1."""
    reads = [{"n": n, "account": 3 * n + 1, "after": 3 * n + 2, "count": 3 * n + 3} for n in range(count)]
    tail = SQLITE_HISTORY_TAIL.format(accounts=3 * count + 1, after=3 * count + 2)
    runs = ", ".join(SQLITE_HISTORY_RUNS.format(**read) for read in reads)
    pages = " UNION ALL ".join(SQLITE_HISTORY_PAGE.format(**read) for read in reads)
    return f"WITH RECURSIVE {tail}, {runs} {pages} ORDER BY 1, 2"


async def histories(driver: Any, sqlite: bool, reads: list[History]) -> list[list[Entry]]:
    """Each read's entries from or to its account after its seq, in order, at most its count
    (the readers' drivers). The chain past the history index's cursor, which every read scans,
    is scanned once for them all: one read alone cost ≈ 3 ms of Postgres' time for 10,000
    entries (bench/RESULTS.md, session 27)."""
    accounts = [account for account, _, _ in reads]
    if sqlite:
        parameters = [value for read in reads for value in read]
        parameters += [sqlite_json_list(accounts), min(after for _, after, _ in reads)]
        rows = await driver.execute_fetchall(sqlite_histories(len(reads)), parameters)
    else:
        _, afters, counts = zip(*reads, strict=True)
        rows = await driver.fetch(POSTGRES_HISTORIES, accounts, list(afters), list(counts))
    return [_in_order(own, sqlite) for own in numbered_rows(rows, len(reads))]


def _head(rows: Sequence[Sequence[Any]]) -> Head:
    return Head(rows[0][0], rows[0][1]) if rows else Head()


def _entry_list(rows: Iterable[Sequence[Any]], stamp: Callable[[Any], str] | None) -> list[Entry]:
    """Entries from rows of `ENTRY_COLUMNS`, each stored `recorded_at` made the contract's text once
    by `stamp` (a batch's entries share it), or read as that text already (`POSTGRES_ENTRY_COLUMNS`:
    `stamp` None)."""
    if stamp is None:
        return [Entry(*row) for row in rows]
    stamps: dict[Any, str] = {}

    def stamped(stored: Any) -> str:
        text = stamps.get(stored)
        if text is None:
            text = stamps[stored] = stamp(stored)
        return text

    return [Entry(r[0], r[1], r[2], r[3], r[4], r[5], r[6], stamped(r[7]), r[8], r[9]) for r in rows]


def _entries(rows: Iterable[Sequence[Any]], stamp: Callable[[Any], str] | None) -> dict[str, Entry]:
    return {entry.id: entry for entry in _entry_list(rows, stamp)}


def _balances(rows: Iterable[Sequence[Any]], keys: set[BalanceKey]) -> dict[BalanceKey, int]:
    return {(row[0], row[1]): row[2] for row in rows if (row[0], row[1]) in keys}


_decode_error = msgspec.json.Decoder(ErrorBody).decode


def _refusals(rows: Iterable[Sequence[Any]]) -> dict[str, Refusal]:
    """Kept refusals from rows of `REFUSAL_COLUMNS`, by id."""
    return {
        row[0]: Refusal(Transfer(row[0], row[1], row[2], row[3], row[4], row[5]), _decode_error(row[6])) for row in rows
    }


def _refusal_rows(refusals: list[Refusal]) -> list[tuple[Any, ...]]:
    """Rows of `REFUSAL_COLUMNS`."""
    return [
        (
            r.transfer.id,
            r.transfer.from_,
            r.transfer.to,
            r.transfer.amount,
            r.transfer.currency,
            r.transfer.memo,
            msgspec.json.encode(r.error).decode(),
        )
        for r in refusals
    ]


def _accounts(keys: set[BalanceKey]) -> list[str]:
    return sorted({account for account, _ in keys})


def _entry_rows(entries: list[Entry], stored_at: Any) -> list[tuple[Any, ...]]:
    return [(e.seq, e.id, e.from_, e.to, e.amount, e.currency, e.memo, stored_at, e.prev_hash, e.hash) for e in entries]


def _balance_rows(balances: Iterable[tuple[BalanceKey, int]]) -> list[tuple[str, str, int]]:
    return [(account, currency, value) for (account, currency), value in balances]


async def entries_after(driver: Any, sqlite: bool, seq: int, limit: int) -> list[Entry]:
    """Up to `limit` entries after `seq`, in order (aiosqlite or asyncpg: the readers' drivers).

    Read as the range (seq, seq + limit], which holds them all while seqs are dense. A range
    holding fewer ends at the head, or at a gap: an entry deleted from the table. Past a gap the
    entries are read by seq alone, so `ledger.verify` names it and no pager or relay stops
    there. Until session 26 a range one short ended verify with `ok` and the chain cut short."""
    statements = (SQLITE_ENTRIES_AFTER, POSTGRES_ENTRIES_AFTER)
    rows = await _fetch(driver, sqlite, statements, seq, seq_range_end(seq, limit))
    if len(rows) < limit:
        ((last_seq,),) = await _fetch(driver, sqlite, (LAST_SEQ, LAST_SEQ))
        if last_seq is not None and last_seq > (rows[-1][0] if rows else seq):
            rows = await _fetch(driver, sqlite, ENTRIES_PAST_A_GAP, seq, limit)
    return _in_order(rows, sqlite)


async def balances_of_accounts(driver: Any, sqlite: bool, accounts: list[str]) -> dict[str, dict[str, int]]:
    """Each account's balances by currency, in currency order; an account with none is left out."""
    statements = (SQLITE_BALANCES_OF_ACCOUNTS, POSTGRES_BALANCES_OF_ACCOUNTS)
    rows = await lookup_rows(driver, sqlite, statements, accounts)
    found: dict[str, dict[str, int]] = {}
    for account, currency, balance in rows:
        found.setdefault(account, {})[currency] = balance
    return found


async def postgres_verified(driver: Any, after: Head, entries: int) -> tuple[Head, bool]:
    """The chain past `after` checked by Postgres, over `entries` seqs at most: the last entry
    that holds, and whether the check stopped before the chain's end (at a bad entry, or at a
    gap: a range holding fewer than it covers while later entries are stored)."""
    through = seq_range_end(after.seq, entries)
    bad_seq, bad_hash, last_seq, last_hash, stored_seq = await driver.fetchrow(
        POSTGRES_VERIFY_RANGE, after.seq, after.hash, through
    )
    if bad_seq is not None:
        return Head(bad_seq, bad_hash), True
    good = Head(last_seq, last_hash) if last_seq is not None else after
    return good, good.seq < through and (stored_seq or 0) > good.seq


def seq_range_end(after: int, entries: int) -> int:
    """The last seq of the range of `entries` after `after`, never past the largest seq a table
    can hold: Postgres' `bigint` refuses a sum past it (a 500 until session 26)."""
    return min(after + entries, INT64_MAX)


async def _fetch(driver: Any, sqlite: bool, statements: tuple[str, str], *parameters: Any) -> Sequence[Any]:
    """The rows of the store's statement (SQLite's, Postgres'), on the readers' drivers."""
    if sqlite:
        return await driver.execute_fetchall(statements[0], parameters)
    return await driver.fetch(statements[1], *parameters)


def _in_order(rows: Iterable[Sequence[Any]], sqlite: bool) -> list[Entry]:
    """Entries from the readers' rows of `ENTRY_COLUMNS`, in the rows' order."""
    return _entry_list(rows, sqlite_timestamp if sqlite else None)


class SqliteLedgerSql:
    by_ids = f"SELECT {ENTRY_COLUMNS} FROM ledger_entries WHERE id IN (SELECT value FROM json_each(?))"
    balances_of = (
        "SELECT account, currency, balance FROM ledger_balances WHERE account IN (SELECT value FROM json_each(?))"
    )
    insert = f"INSERT INTO ledger_entries ({ENTRY_COLUMNS})"
    upsert = "INSERT INTO ledger_balances (account, currency, balance)"
    upsert_conflict = "ON CONFLICT (account, currency) DO UPDATE SET balance = excluded.balance"
    insert_postings = "INSERT INTO ledger_postings (account, last_seq, seqs)"
    refusals_of = f"SELECT {REFUSAL_COLUMNS} FROM ledger_refusals WHERE id IN (SELECT value FROM json_each(?))"
    insert_refusal = f"INSERT INTO ledger_refusals ({REFUSAL_COLUMNS}, refused_at)"
    write_cursors = (
        "UPDATE ledger_cursors SET seq = CASE name WHEN 'postings' THEN ?1 WHEN 'postings_run' THEN ?2 ELSE ?3 END "
        f"WHERE name IN {postings.CURSORS}"
    )
    run_entries = "SELECT from_account, to_account, seq FROM ledger_entries WHERE seq > ? AND seq <= ? ORDER BY seq"

    def head(self, conn: sqlite3.Connection) -> Head:
        return _head(conn.execute(HEAD).fetchall())

    def entries_by_id(self, conn: sqlite3.Connection, ids: list[str]) -> dict[str, Entry]:
        return _entries(conn.execute(self.by_ids, (sqlite_json_list(ids),)), sqlite_timestamp)

    def balances(self, conn: sqlite3.Connection, keys: set[BalanceKey]) -> dict[BalanceKey, int]:
        return _balances(conn.execute(self.balances_of, (sqlite_json_list(_accounts(keys)),)), keys)

    def refusals(self, conn: sqlite3.Connection, ids: list[str]) -> dict[str, Refusal]:
        return _refusals(conn.execute(self.refusals_of, (sqlite_json_list(ids),)))

    def insert_refusals(self, conn: sqlite3.Connection, refusals: list[Refusal], refused_at: datetime) -> None:
        stored_at = sqlite_stored(refused_at)
        sqlite_insert_rows(conn, self.insert_refusal, 8, "", [(*row, stored_at) for row in _refusal_rows(refusals)])

    def insert_entries(self, conn: sqlite3.Connection, entries: list[Entry], recorded_at: datetime) -> None:
        stored_at = sqlite_stored(recorded_at)
        assert sqlite_timestamp(stored_at) == entries[0].recorded_at
        sqlite_insert_rows(conn, self.insert, 10, "", _entry_rows(entries, stored_at))

    def store_balances(self, conn: sqlite3.Connection, balances: Iterable[tuple[BalanceKey, int]]) -> None:
        sqlite_insert_rows(conn, self.upsert, 3, self.upsert_conflict, _balance_rows(balances))

    def index(self, conn: sqlite3.Connection, head: Head) -> postings.Index:
        return postings.stored_index(dict(conn.execute(postings.READ_CURSORS).fetchall()), head)

    def chained(self, conn: sqlite3.Connection, after: int, through: int) -> postings.Chained:
        return conn.execute(self.run_entries, (after, through)).fetchall()

    def store_index(self, conn: sqlite3.Connection, write: postings.IndexWrite) -> None:
        sqlite_insert_rows(conn, self.insert_postings, 3, "", write.rows)
        if write.cursors is not None:
            conn.execute(self.write_cursors, write.cursors)


class PostgresLedgerSql:
    """Each statement is a network round trip. A batch the writer guesses (`Writer`) is one: the
    entries with the balances and the history index's share, committing itself; read first, it
    is four: BEGIN with the lock, the head with the batch's ids and the history index's cursors,
    the write, COMMIT. Balances not cached add a read, and so does a run's entries once per run,
    when it is due and this writer did not leave the index."""

    begin_and_lock = "BEGIN; SELECT pg_advisory_xact_lock({key})"
    run_entries = "SELECT from_account, to_account, seq FROM ledger_entries WHERE seq > $1 AND seq <= $2 ORDER BY seq"
    by_ids = postgres_lookup(POSTGRES_ENTRY_COLUMNS, "ledger_entries", {"id": "text"})
    head_and_ids = (
        f"(SELECT true, {POSTGRES_ENTRY_COLUMNS} FROM ledger_entries ORDER BY seq DESC LIMIT 1) "
        f"UNION ALL SELECT false, * FROM ({by_ids}) AS recorded "
        "UNION ALL SELECT NULL, seq, name, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL "
        f"FROM ledger_cursors WHERE name IN {postings.CURSORS}"
    )
    """The head (first column true), the entries recorded for the ids (false) and the history
    index's cursors (null: seq and name), in one round trip."""
    balances_of = postgres_lookup(
        "account, currency, balance", "ledger_balances", {"account": "text", "currency": "text"}
    )
    refusals_of = postgres_lookup(REFUSAL_COLUMNS, "ledger_refusals", {"id": "text"})
    insert_refusals_of = (
        f"INSERT INTO ledger_refusals ({REFUSAL_COLUMNS}, refused_at) "
        "SELECT *, $8::timestamptz FROM unnest($1::text[], $2::text[], $3::text[], $4::bigint[], $5::text[], "
        "$6::text[], $7::text[])"
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
        "WHERE (SELECT head FROM follows)), "
        "postings AS (INSERT INTO ledger_postings (account, last_seq, seqs) "
        "SELECT * FROM unnest($17::text::text[], $18::text::bigint[], $19::text::text[]) "
        "WHERE (SELECT head FROM follows)), "
        "cursors AS (UPDATE ledger_cursors "
        "SET seq = CASE name WHEN 'postings' THEN $20::bigint WHEN 'postings_run' THEN $21::bigint "
        "ELSE $22::bigint END "
        f"WHERE name IN {postings.CURSORS} AND $20::bigint IS NOT NULL AND (SELECT head FROM follows)) "
        "INSERT INTO ledger_balances (account, currency, balance) "
        "SELECT * FROM unnest($11::text::text[], $12::text::text[], $13::text::bigint[]) "
        "WHERE (SELECT head FROM follows) "
        "ON CONFLICT (account, currency) DO UPDATE SET balance = excluded.balance"
    )
    """Each column one array literal (`postgres_text_array`); `recorded_at` once: a batch shares it.
The history index's rows and cursors ($17-$22, `ledger.postings`; cursors null when unchanged)
are written with the entries.

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

    async def head_and_entries(self, driver: Any, ids: list[str]) -> tuple[Head, dict[str, Entry], postings.Index]:
        """The stored head, the entries recorded for `ids`, and the history index as stored."""
        rows = await driver.fetch(self.head_and_ids, ids)
        heads = [Head(row[1], row[10]) for row in rows if row[0]]  # seq and hash of ENTRY_COLUMNS
        head = heads[0] if heads else Head()
        recorded = _entries((row[1:] for row in rows if row[0] is False), None)
        cursors = {row[2]: row[1] for row in rows if row[0] is None}
        return head, recorded, postings.stored_index(cursors, head)

    async def balances(self, driver: Any, keys: set[BalanceKey]) -> dict[BalanceKey, int]:
        accounts, currencies = zip(*keys, strict=True)
        return _balances(await driver.fetch(self.balances_of, accounts, currencies), keys)

    async def chained(self, driver: Any, after: int, through: int) -> postings.Chained:
        return [tuple(row) for row in await driver.fetch(self.run_entries, after, through)]

    async def refusals(self, driver: Any, ids: list[str]) -> dict[str, Refusal]:
        return _refusals(await driver.fetch(self.refusals_of, ids))

    async def insert_refusals(self, driver: Any, refusals: list[Refusal], refused_at: datetime) -> None:
        """Under the ledger's lock, as every write: a refusal is kept once, by the writer that made it."""
        columns = zip(*_refusal_rows(refusals), strict=True)
        await driver.execute(self.insert_refusals_of, *map(list, columns), refused_at)

    async def write_entries(
        self,
        driver: Any,
        entries: list[Entry],
        recorded_at: datetime,
        balances: Iterable[tuple[BalanceKey, int]],
        index: postings.IndexWrite,
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
            texts([row[0] for row in index.rows]),
            numbers([row[1] for row in index.rows]),
            texts([row[2] for row in index.rows]),
            *(index.cursors or (None, None, None)),
        )
        return status != "INSERT 0 0"  # every entry changes two balances
