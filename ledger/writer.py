"""Group commit: one writer owns the chain head; requests queue (bounded), are planned in
batches, written in one transaction, and answered only after it committed.

Two ledger processes on one database never fork the chain: each batch transaction first takes
the ledger's lock (a Postgres advisory transaction lock; on SQLite `BEGIN IMMEDIATE` holds the
file's write lock), then reads the head, balances and ids from the database under that lock.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import text
from sqlalchemy.engine import Row

from bus.codec import timestamp
from bus.errors import ServiceError, Unavailable
from ledger.plan import BalanceKey, Head, plan
from ledger.storage import LedgerSql
from schemas.database import Database
from schemas.ledger import Entry, Transfer, record_batch_transfers_max

log = logging.getLogger("bitnexus.ledger")

queue_requests_max = 16_384
batch_transfers_max = 4_096
cached_balances_max = 1_000_000
LEDGER_LOCK_KEY = 0x4C454447  # "LEDG": the advisory lock every ledger writer takes per batch
assert batch_transfers_max >= record_batch_transfers_max, "a whole record_batch always fits in one batch"


@dataclass(frozen=True)
class Pending:
    transfers: list[Transfer]
    batched: bool
    answer: asyncio.Future[list[Entry]]


def entry_from(row: Row) -> Entry:
    return Entry(
        row.seq,
        row.id,
        row.from_account,
        row.to_account,
        row.amount,
        row.currency,
        row.memo,
        timestamp(row.recorded_at),
        row.prev_hash,
        row.hash,
    )


class Writer:
    def __init__(self, db: Database, on_commit: Callable[[list[Entry]], None]) -> None:
        self.db = db
        self.on_commit = on_commit
        self.queue: asyncio.Queue[Pending] = asyncio.Queue(maxsize=queue_requests_max)
        self.sql = LedgerSql(db.is_sqlite)
        self._cached: dict[BalanceKey, int] = {}
        self._cached_head: Head | None = None

    async def submit(self, transfers: list[Transfer], batched: bool) -> list[Entry]:
        """Queue a request and wait until it is committed (its entries) or refused (raises)."""
        pending = Pending(transfers, batched, asyncio.get_running_loop().create_future())
        await self.queue.put(pending)
        return await pending.answer

    async def run(self) -> None:
        """Forever: take what is queued, up to `batch_transfers_max` transfers, commit it as one batch."""
        carried: Pending | None = None
        batch: list[Pending] = []
        try:
            while True:
                batch = [carried or await self.queue.get()]
                carried = None
                size = len(batch[0].transfers)
                while not self.queue.empty():
                    pending = self.queue.get_nowait()
                    if size + len(pending.transfers) > batch_transfers_max:
                        carried = pending
                        break
                    batch.append(pending)
                    size += len(pending.transfers)
                await self._commit(batch)
        finally:
            # stopped (cancelled or crashed): no request waits forever for an answer
            leftovers = [*batch, *([carried] if carried else [])]
            while not self.queue.empty():
                leftovers.append(self.queue.get_nowait())
            for pending in leftovers:
                if not pending.answer.done():
                    pending.answer.set_exception(Unavailable("the ledger writer stopped"))

    async def _commit(self, batch: list[Pending]) -> None:
        try:
            outcomes, new_entries = await self._write(batch)
        except Exception as exc:  # a database failure fails this batch, answered as 500s
            log.exception("ledger batch of %d requests failed", len(batch))
            for pending in batch:
                if not pending.answer.done():
                    pending.answer.set_exception(exc)
            return
        self.on_commit(new_entries)
        for pending, outcome in zip(batch, outcomes, strict=True):
            if pending.answer.done():
                continue  # its requester went away; the outcome stands
            if isinstance(outcome, ServiceError):
                pending.answer.set_exception(outcome)
            else:
                pending.answer.set_result(outcome)

    async def _write(self, batch: list[Pending]) -> tuple[list[list[Entry] | ServiceError], list[Entry]]:
        transfers = [transfer for pending in batch for transfer in pending.transfers]
        keys = {(t.from_, t.currency) for t in transfers} | {(t.to, t.currency) for t in transfers}
        now = datetime.now(UTC)
        try:
            async with self.db.writer.begin() as conn:
                if not self.db.is_sqlite:
                    await conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": LEDGER_LOCK_KEY})
                driver = (await conn.get_raw_connection()).driver_connection
                head = await self.sql.head(driver)
                recorded = await self.sql.entries_by_id(driver, list({t.id for t in transfers}))
                balances = await self._balances_at(driver, head, keys)
                result = plan(
                    [p.transfers for p in batch], head, recorded, balances, timestamp(now), [p.batched for p in batch]
                )
                if result.new_entries:
                    await self.sql.insert_entries(driver, result.new_entries, now)
                    await self.sql.store_balances(driver, result.balances.items())
        except BaseException:
            self._cached_head = None  # the transaction may or may not have committed
            raise
        self._cached.update(result.balances)
        self._cached_head = result.head
        return result.outcomes, result.new_entries

    async def _balances_at(self, driver: Any, head: Head, keys: set[BalanceKey]) -> dict[BalanceKey, int]:
        """Balances as of `head`: from memory while this writer wrote the head, else from the database.

        The cache is only trusted when the stored head is the one this writer committed last,
        so another replica's writes (or an unknown outcome) always send us back to the database.
        """
        if head != self._cached_head or len(self._cached) > cached_balances_max:
            self._cached.clear()
        missing = keys - self._cached.keys()
        if missing:
            stored = await self.sql.balances(driver, missing)
            self._cached.update({key: stored.get(key, 0) for key in missing})
        return {key: self._cached[key] for key in keys}
