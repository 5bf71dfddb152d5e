"""The ledger service: `ledger.*` (contract §4, §5). Writes go through the group-commit writer;
reads use their own connections and never wait behind it."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
from collections.abc import AsyncIterator
from importlib.metadata import version

from nats.aio.client import Client
from sqlalchemy import or_, select, update

from bus.codec import encode
from bus.events import EVENTS_STREAM, ensure_stream, relay_batch_max, relay_forever
from bus.jetstream import BatchPublisher, Message
from bus.service import Service
from bus.tasks import supervised
from handlers.runtime import instance_metadata
from ledger.chain import entry_is_valid
from ledger.writer import Writer, entry_from
from schemas.database import Database, open_database, service_url
from schemas.events import Envelope
from schemas.ledger import (
    GENESIS_HASH,
    BalanceRequest,
    Balances,
    ChainRequest,
    Entries,
    Entry,
    EntryPage,
    HistoryRequest,
    RecordBatch,
    Transfer,
    Verification,
    VerifyRequest,
    ledger_balances,
    ledger_cursors,
    ledger_entries,
)

log = logging.getLogger("bitnexus.ledger")

verify_page_entries = 2_000
recent_entries_max = 65_536
cursor_store_interval_s = 0.5
EVENTS_CURSOR = "events"


async def record(request: Transfer, writer: Writer) -> Entry:
    (entry,) = await writer.submit([request], batched=False)
    return entry


async def record_batch(request: RecordBatch, writer: Writer) -> Entries:
    return Entries(items=await writer.submit(request.transfers, batched=True))


async def balance(request: BalanceRequest, db: Database) -> Balances:
    query = select(ledger_balances.c.currency, ledger_balances.c.balance).where(
        ledger_balances.c.account == request.account
    )
    async with db.reader.connect() as conn:
        rows = (await conn.execute(query.order_by(ledger_balances.c.currency))).all()
    return Balances(account=request.account, balances={row.currency: row.balance for row in rows})


async def history(request: HistoryRequest, db: Database) -> EntryPage:
    touches = or_(ledger_entries.c.from_account == request.account, ledger_entries.c.to_account == request.account)
    return await _page(db, touches, request.after_seq, request.limit)


async def chain(request: ChainRequest, db: Database) -> EntryPage:
    return await _page(db, None, request.after_seq, request.limit)


async def _page(db: Database, condition, after_seq: int, limit: int) -> EntryPage:  # type: ignore[no-untyped-def]
    query = select(ledger_entries).where(ledger_entries.c.seq > after_seq)
    if condition is not None:
        query = query.where(condition)
    async with db.reader.connect() as conn:
        rows = (await conn.execute(query.order_by(ledger_entries.c.seq).limit(limit + 1))).all()
    items = [entry_from(row) for row in rows[:limit]]
    return EntryPage(items=items, next_after_seq=items[-1].seq if len(rows) > limit else None)


async def verify(request: VerifyRequest, db: Database) -> Verification:
    """Recompute every hash from the stored rows, page by page, yielding to other requests between pages."""
    seq, prev_hash = 0, GENESIS_HASH
    while True:
        page = await _page(db, None, seq, verify_page_entries - 1)
        for entry in page.items:
            if not entry_is_valid(entry, prev_hash, seq + 1):
                return Verification(ok=False, length=seq, head=prev_hash, first_bad_seq=seq + 1)
            seq, prev_hash = entry.seq, entry.hash
        if page.next_after_seq is None:
            return Verification(ok=True, length=seq, head=prev_hash, first_bad_seq=None)
        await asyncio.sleep(0)


class ChainRelay:
    """Publishes `events.ledger.transfer.recorded` for every entry past the stored cursor.

    The chain is already an ordered, append-only log, so it is its own outbox: no second row
    per transfer. Entries this process just committed are handed over in memory; anything
    else past the cursor (a crash, another replica's entries) is read from the database.
    The event id is derived from the entry's hash, so a republish carries the same
    `Nats-Msg-Id` and JetStream drops the copy.

    The stored cursor advances at most every `cursor_store_interval_s` (and when the service
    stops): its transaction takes SQLite's one writer, and once per batch it cost the ledger's
    writer a commit of its own. After a crash, at most that much is published again, with
    the same ids, inside JetStream's duplicate window.
    """

    def __init__(self, publisher: BatchPublisher, db: Database) -> None:
        self.publisher = publisher
        self.db = db
        self.recent: dict[int, Entry] = {}
        self._wake = asyncio.Event()
        self._published = 0
        self._stored = 0
        self._stored_at = 0.0

    def committed(self, entries: list[Entry]) -> None:
        for entry in entries:
            self.recent[entry.seq] = entry
        while len(self.recent) > recent_entries_max:
            del self.recent[next(iter(self.recent))]  # oldest first; it will be read back if needed
        self._wake.set()

    async def run(self) -> None:
        await relay_forever(self.publish_pending, self._wake)

    async def publish_pending(self) -> int:
        total = 0
        while True:
            cursor, entries = await self._next_entries()
            if not entries:
                return total
            await self.publisher.publish([event_message(entry) for entry in entries])
            self._published = entries[-1].seq
            for seq in range(cursor + 1, entries[-1].seq + 1):
                self.recent.pop(seq, None)
            total += len(entries)
            if asyncio.get_running_loop().time() - self._stored_at >= cursor_store_interval_s:
                await self.store_cursor()

    async def store_cursor(self) -> None:
        """Write down how far events are published (never backwards: another replica may be ahead)."""
        if self._published <= self._stored:
            return
        async with self.db.writer.begin() as conn:
            await conn.execute(
                update(ledger_cursors)
                .where(ledger_cursors.c.name == EVENTS_CURSOR, ledger_cursors.c.seq < self._published)
                .values(seq=self._published)
            )
        self._stored = self._published
        self._stored_at = asyncio.get_running_loop().time()

    async def _next_entries(self) -> tuple[int, list[Entry]]:
        async with self.db.reader.connect() as conn:
            query = select(ledger_cursors.c.seq).where(ledger_cursors.c.name == EVENTS_CURSOR)
            cursor = max((await conn.execute(query)).scalar_one(), self._published)
            following = (self.recent.get(cursor + n) for n in range(1, relay_batch_max + 1))
            in_memory = list(itertools.takewhile(lambda entry: entry is not None, following))
            if in_memory:
                return cursor, in_memory
            query = select(ledger_entries).where(ledger_entries.c.seq > cursor).order_by(ledger_entries.c.seq)
            return cursor, [entry_from(row) for row in (await conn.execute(query.limit(relay_batch_max))).all()]


def event_message(entry: Entry) -> Message:
    digest = entry.hash  # unique per entry and the same on every republish: the event id derives from it
    envelope = Envelope(
        id=f"{digest[:8]}-{digest[8:12]}-{digest[12:16]}-{digest[16:20]}-{digest[20:32]}",
        type="ledger.transfer.recorded",
        source="ledger",
        occurred_at=entry.recorded_at,
        data=entry,
    )
    return Message("events.ledger.transfer.recorded", encode(envelope), envelope.id)


@contextlib.asynccontextmanager
async def serving(nc: Client) -> AsyncIterator[Service]:
    db = open_database(service_url("ledger"))
    js = nc.jetstream()
    await ensure_stream(js, EVENTS_STREAM, ["events.>"])
    relay = ChainRelay(BatchPublisher(nc), db)
    writer = Writer(db, on_commit=relay.committed)
    service = Service(nc, "ledger", version("bitnexus-mesh"), "double-entry, hash-chained ledger", instance_metadata())
    service.add_endpoint("ledger.record", record, writer, concurrency_max=4096)
    service.add_endpoint("ledger.record_batch", record_batch, writer, concurrency_max=64)
    service.add_endpoint("ledger.balance", balance, db)
    service.add_endpoint("ledger.history", history, db)
    service.add_endpoint("ledger.chain", chain, db)
    service.add_endpoint("ledger.verify", verify, db, concurrency_max=2)
    try:
        async with asyncio.TaskGroup() as group:
            tasks = [
                group.create_task(supervised("ledger.writer", writer.run)),
                group.create_task(supervised("ledger.chain_relay", relay.run)),
            ]
            async with service.serving():
                yield service
            await relay.publish_pending()
            await relay.store_cursor()
            for task in tasks:
                task.cancel()
    finally:
        await writer.close()
        await db.dispose()
