"""Group commit: one writer owns the chain head; requests queue (bounded), are planned in
batches, written in one transaction, and answered only after it committed.

Two ledger processes on one database never fork the chain: each batch transaction first takes
the ledger's lock (a Postgres advisory transaction lock; on SQLite `BEGIN IMMEDIATE` holds the
file's write lock), then reads the head, balances and ids from the database under that lock.
On Postgres a writer that committed the head last may instead guess them, in one statement that
takes the lock itself and writes nothing unless the guess holds (`Writer._write_postgres`).

A batch runs on the writer's own thread and connection (`SqliteThread`, `PostgresThread`):
planned and written there in one go, it never waits for the service's busy event loop
between statements. Only that thread touches the balance cache.

Every batch that appends entries also stores its share of the history index
(`ledger.postings`), in the same transaction.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import sqlite3
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import asyncpg

from bus.codec import timestamp
from bus.errors import ServiceError, Unavailable
from ledger import postings
from ledger.plan import BalanceKey, Head, Plan, Refusal, plan
from ledger.storage import PostgresLedgerSql, SqliteLedgerSql
from schemas.database import (
    Database,
    PostgresThread,
    SqliteThread,
    committing,
    given_up_waiting,
    nothing_recorded,
    settled,
)
from schemas.ledger import Entry, Transfer, record_batch_transfers_max

log = logging.getLogger("bitnexus.ledger")

queue_requests_max = 16_384
batches_in_flight_max = 2
batch_transfers_max = 4_096
cached_balances_max = 1_000_000
recent_ids_max = 262_144
"""Postgres: ids of the entries this writer committed last (≈ 13 s at 20k/s). A batch holding
one is a client's retry, and is read first instead of guessed: planned once, not twice."""
LEDGER_LOCK_KEY = 0x4C454447  # "LEDG": the advisory lock every ledger writer takes per batch
assert batch_transfers_max >= record_batch_transfers_max, "a whole record_batch always fits in one batch"


Decide = Callable[[Head, dict[str, Entry], dict[BalanceKey, int], dict[str, Refusal]], Plan]
"""Plans a batch from the head, the entries already recorded for its ids, the stored balances read
and the refusals kept for its kept requests' ids."""


def _uncached(keys: set[BalanceKey], cached: dict[BalanceKey, int]) -> set[BalanceKey]:
    """The keys not in the cache, at the cost of the keys alone: `keys - cached.keys()` copies
    every cached key into a set first (up to `cached_balances_max`, in every batch)."""
    return {key for key in keys if key not in cached}


def _stopped(batch: list[Pending]) -> None:
    for pending in batch:
        if not pending.answer.done():
            pending.answer.set_exception(Unavailable("the ledger writer stopped"))


Outcome = list[Entry] | ServiceError
"""Of one request: its entries (new or recorded before), or why it was refused."""


@dataclass(frozen=True)
class Pending:
    """Requests queued together, each all or nothing on its own; answered with one outcome each."""

    requests: list[list[Transfer]]
    batched: bool
    """True for `ledger.record_batch` bodies, whose refusals name the transfer's index."""
    answer: asyncio.Future[list[Outcome]]
    kept: bool = False
    """True for `ledger.internal.record`'s: their refusals are kept per id (`ledger_refusals`)."""

    @property
    def size(self) -> int:
        return sum(len(transfers) for transfers in self.requests)


class Writer:
    def __init__(self, db: Database, on_commit: Callable[[list[Entry]], Awaitable[None]]) -> None:
        self.db = db
        self.on_commit = on_commit
        self.queue: asyncio.Queue[Pending] = asyncio.Queue(maxsize=queue_requests_max)
        self.sqlite = SqliteThread(db.writer.url.database or "") if db.is_sqlite else None
        self.postgres = None if db.is_sqlite else PostgresThread(db.writer.url)
        self._cached: dict[BalanceKey, int] = {}
        self._cached_head: Head | None = None
        self._recent: set[str] = set()
        self._recent_batches: collections.deque[list[str]] = collections.deque()
        self._recent_count = 0
        self._guessing = True
        """Postgres: the last batch read found no other writer's entries since this writer's own
        last commit (or it had none). With replicas writing in turn, a guess would fail every time."""
        self._index: postings.Index | None = None
        """The history index as this writer left it; valid while the stored head is `_cached_head`."""

    async def close(self) -> None:
        if self.sqlite is not None:
            await self.sqlite.close()
        if self.postgres is not None:
            await self.postgres.close()

    async def submit(self, transfers: list[Transfer], batched: bool) -> list[Entry]:
        """Queue a request and wait until it is committed (its entries) or refused (raises)."""
        (outcome,) = await self.submit_each([transfers], batched)
        if isinstance(outcome, ServiceError):
            raise outcome
        return outcome

    async def submit_each(self, requests: list[list[Transfer]], batched: bool, kept: bool = False) -> list[Outcome]:
        """Queue independent requests at once and wait until each is committed or refused."""
        pending = Pending(requests, batched, asyncio.get_running_loop().create_future(), kept)
        assert pending.size <= batch_transfers_max
        await self.queue.put(pending)
        return await pending.answer

    async def run(self) -> None:
        """Forever: take what is queued, up to `batch_transfers_max` transfers, commit it as one batch.

        Two batches may be in flight: while one is written, the next is already waiting in the
        writer's thread (SQLite) or for the advisory lock (Postgres), so the database never waits
        for this event loop to come round between batches (≈ 5 ms per batch at c512). The second
        reads the head and balances after the first committed, as every batch does.
        """
        carried: Pending | None = None
        batch: list[Pending] = []
        slots = asyncio.Semaphore(batches_in_flight_max)
        try:
            async with asyncio.TaskGroup() as group:
                while True:
                    await slots.acquire()
                    batch = [carried or await self.queue.get()]
                    carried = None
                    size = batch[0].size
                    while not self.queue.empty():
                        pending = self.queue.get_nowait()
                        if size + pending.size > batch_transfers_max:
                            carried = pending
                            break
                        batch.append(pending)
                        size += pending.size
                    group.create_task(self._commit(batch, slots))
                    batch = []
        finally:
            # stopped (cancelled or crashed): no request waits forever for an answer
            leftovers = [*batch, *([carried] if carried else [])]
            while not self.queue.empty():
                leftovers.append(self.queue.get_nowait())
            _stopped(leftovers)

    async def _commit(self, batch: list[Pending], slots: asyncio.Semaphore) -> None:
        try:
            outcomes, new_entries = await settled(lambda: self._write(batch))  # ids make it idempotent
        except Exception as exc:  # fails this batch: 503 for a database lost before the commit, else 500
            if not nothing_recorded(exc):  # the service says the outage in its log, once in a while
                log.exception("ledger batch of %d requests failed", len(batch))
            for pending in batch:
                if not pending.answer.done():
                    pending.answer.set_exception(exc)
            return
        except BaseException:  # cancelled: the outcome is unknown to us, and to the requesters
            _stopped(batch)
            raise
        finally:
            slots.release()
        start = 0
        for pending in batch:
            if not pending.answer.done():  # else its requester went away; the outcomes stand
                pending.answer.set_result(outcomes[start : start + len(pending.requests)])
            start += len(pending.requests)
        assert start == len(outcomes)
        if new_entries:
            await self.on_commit(new_entries)

    async def _write(self, batch: list[Pending]) -> tuple[list[Outcome], list[Entry]]:
        requests = [transfers for pending in batch for transfers in pending.requests]
        batched = [pending.batched for pending in batch for _ in pending.requests]
        kept = [pending.kept for pending in batch for _ in pending.requests]
        kept_ids = [request[0].id for request, is_kept in zip(requests, kept, strict=True) if is_kept]
        transfers = [transfer for request in requests for transfer in request]
        keys = {(t.from_, t.currency) for t in transfers} | {(t.to, t.currency) for t in transfers}
        ids = list({t.id for t in transfers})
        now = datetime.now(UTC)

        def decide(
            head: Head, recorded: dict[str, Entry], stored: dict[BalanceKey, int], refused: dict[str, Refusal]
        ) -> Plan:
            balances = self._balances_at(head, keys, stored)
            return plan(requests, head, recorded, balances, timestamp(now), batched, kept, refused)

        with given_up_waiting():  # a failed batch's transaction is rolled back (or its commit unanswered)
            if self.sqlite is not None:
                result = await self.sqlite.run(lambda conn: self._write_sqlite(conn, ids, kept_ids, keys, now, decide))
            else:
                assert self.postgres is not None
                result = await self.postgres.run(
                    lambda driver: self._write_postgres(driver, ids, kept_ids, keys, now, decide)
                )
        return result.outcomes, result.new_entries

    def _write_sqlite(
        self,
        conn: sqlite3.Connection,
        ids: list[str],
        kept_ids: list[str],
        keys: set[BalanceKey],
        now: datetime,
        decide: Decide,
    ) -> Plan:
        """The whole batch in the writer's thread: `BEGIN IMMEDIATE` holds the file's write lock."""
        sql = SqliteLedgerSql()
        conn.execute("BEGIN IMMEDIATE")
        try:
            head = sql.head(conn)
            missing = self._missing_balances(head, keys)
            refused = sql.refusals(conn, kept_ids) if kept_ids else {}
            result = decide(head, sql.entries_by_id(conn, ids), sql.balances(conn, missing) if missing else {}, refused)
            known = self._index if head == self._cached_head else None
            index = known if known is not None else sql.index(conn, head)
            self._index = None  # until committed: `index_appended` changes it
            if result.new_entries:
                sql.insert_entries(conn, result.new_entries, now)
                sql.store_balances(conn, result.balances.items())
                steps = postings.index_appended(index, result.new_entries, pace=known is not None)
                sql.store_index(conn, postings.drive(steps, lambda after, through: sql.chained(conn, after, through)))
            if result.refusals:
                sql.insert_refusals(conn, result.refusals, now)
            conn.execute("COMMIT")
        except BaseException:
            self._cached_head = None  # the cache may hold this batch's balances: not stored
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        self._remember(result)
        self._index = index
        return result

    async def _write_postgres(
        self, driver: Any, ids: list[str], kept_ids: list[str], keys: set[BalanceKey], now: datetime, decide: Decide
    ) -> Plan:
        """The whole batch on the writer's own connection and thread; the ledger's advisory lock
        serializes every ledger writer on this database.

        When this writer committed the stored head last, as far as it knows (the history index's
        state included), and the batch holds no id it committed recently (a client's retry), it
        guesses: the batch is planned on that head with none of its ids recorded, and written by
        one statement that commits on its own, one round trip where reading first takes four
        (bench/RESULTS.md, session 7). The statement checks the guess: it writes nothing unless
        it gets the lock at once and the head it names is the last stored entry; the keys refuse
        a recorded id and what a writer committing just before the lock adds. A wrong guess, or
        a plan refusing a request (the table cannot check a refusal, and a recorded id's answer
        is its entry), falls back to reading: the lock held for a whole transaction, the head,
        the batch's ids and the history index read under it. It guesses again once a read finds
        no other writer's entries. A batch holding kept requests reads first too: its refusals
        are read, and kept, under the lock (a guess's snapshot is taken before the lock, so it
        could miss a refusal another writer kept just before it)."""
        sql = PostgresLedgerSql()
        if (
            self._cached_head is not None
            and self._index is not None
            and self._guessing
            and not kept_ids
            and self._recent.isdisjoint(ids)
        ):
            try:
                guessed = await self._plan_and_write(sql, driver, self._cached_head, {}, {}, keys, now, decide, None)
            except asyncpg.UniqueViolationError:  # an id recorded, or a writer committed between checks and lock
                guessed = None  # nothing written: the cache still holds as of its head
            except BaseException:
                self._cached_head = None  # the statement may or may not have committed
                raise
            if guessed is not None:
                return guessed
        await sql.begin_locked(driver, LEDGER_LOCK_KEY)
        try:
            head, recorded, stored_index = await sql.head_and_entries(driver, ids)
            refused = await sql.refusals(driver, kept_ids) if kept_ids else {}
            self._guessing = self._cached_head is None or head == self._cached_head
            result = await self._plan_and_write(sql, driver, head, recorded, refused, keys, now, decide, stored_index)
        except BaseException:
            self._cached_head = None  # the transaction may or may not have committed
            raise
        assert result is not None
        return result

    async def _plan_and_write(
        self,
        sql: PostgresLedgerSql,
        driver: Any,
        head: Head,
        recorded: dict[str, Entry],
        refused: dict[str, Refusal],
        keys: set[BalanceKey],
        now: datetime,
        decide: Decide,
        stored_index: postings.Index | None,
    ) -> Plan | None:
        """Plan on `head`, write and commit (a guess's statement commits itself, the reading
        path's transaction is committed here); the cache follows. None, and nothing written,
        when a guess does not hold or its plan refused a request. `stored_index`: the history
        index as read under the lock, None for a guess."""
        guessed = stored_index is None
        missing = self._missing_balances(head, keys)
        result = decide(head, recorded, await sql.balances(driver, missing) if missing else {}, refused)
        if guessed and any(isinstance(outcome, ServiceError) for outcome in result.outcomes):
            return None
        assert not (guessed and result.refusals), "kept requests are never guessed"
        assert result.new_entries or not guessed, "a guess's requests are new, or refused"
        known = self._index if head == self._cached_head else None
        index = known if known is not None else stored_index
        assert index is not None, "a guess knows the index: it reads nothing outside the lock"
        self._index = None  # until committed: `index_appended` changes it
        if result.new_entries:
            steps = postings.index_appended(index, result.new_entries, pace=known is not None)
            index_write = await postings.drive_async(steps, lambda after, through: sql.chained(driver, after, through))
            balances = result.balances.items()
            write = sql.write_entries(driver, result.new_entries, now, balances, index_write, LEDGER_LOCK_KEY)
            written = await (committing(write) if guessed else write)  # a guess's statement commits itself
            if not written:
                assert guessed, "under the lock, the head read is the stored head"
                return None
        if result.refusals:
            await sql.insert_refusals(driver, result.refusals, now)
        if not guessed:
            await committing(driver.execute("COMMIT"))
        self._remember(result)
        self._remember_ids(result.new_entries)
        self._index = index
        return result

    def _remember_ids(self, entries: list[Entry]) -> None:
        """The ids of the newest batches committed here, about `recent_ids_max`, kept and dropped
        a batch at a time (set operations, not a Python step per id). Only ever a reason to read
        first: an id missing here (dropped, or another writer's) is still checked by the write."""
        ids = [entry.id for entry in entries]
        self._recent.update(ids)
        self._recent_batches.append(ids)
        self._recent_count += len(ids)
        while self._recent_count > recent_ids_max:
            dropped = self._recent_batches.popleft()
            self._recent.difference_update(dropped)
            self._recent_count -= len(dropped)
        assert len(self._recent) <= self._recent_count

    def _remember(self, result: Plan) -> None:
        """After COMMIT: the balances this batch stored, valid while the stored head is its head."""
        self._cached.update(result.balances)
        self._cached_head = result.head

    def _missing_balances(self, head: Head, keys: set[BalanceKey]) -> set[BalanceKey]:
        """The keys to read from the database: all of them unless this writer wrote the stored head.

        The cache is only trusted when the stored head is the one this writer committed last,
        so another replica's writes (or an unknown outcome) always send us back to the database.
        """
        if head != self._cached_head or len(self._cached) > cached_balances_max:
            self._cached.clear()
        return _uncached(keys, self._cached)

    def _balances_at(self, head: Head, keys: set[BalanceKey], stored: dict[BalanceKey, int]) -> dict[BalanceKey, int]:
        """Balances as of `head`: the cached ones, and the stored ones read for the missing keys."""
        self._cached.update({key: stored.get(key, 0) for key in _uncached(keys, self._cached)})
        return {key: self._cached[key] for key in keys}
