"""The ledger's events (contract §6): `events.ledger.transfer.recorded` for every entry, published
by a process of its own (`bitnexus serve ledger_events`, a supervisor child).

The chain is already an ordered, append-only log, so it is its own outbox: no second row per
transfer. The relay publishes entries past a stored cursor, in order; the event id derives
from the entry's hash, so a republish carries the same `Nats-Msg-Id` and JetStream drops the
copy. After each commit the ledger hands the batch's entries over (`ledger.internal.committed`,
core NATS, one message per batch): entries that continue exactly where the relay stands, by
seq and `prev_hash`, are published as they come. The relay reads the database itself only
when it may be behind (at start, after a gap: a lost, reordered or forged message, another
replica's batch; after an empty handover) and once per `relay_poll_interval_s` in case the
last handover was lost. Reading every batch back cost the relay a third of its CPU.

Why a process: publishing an event and reading its ack cost the ledger's single event loop
≈ 30 % of its CPU. Measured at c512 on SQLite (bench/RESULTS.md): 13.6k transfers/s
with the relay in the ledger process, 17.3k without it.

The stored cursor advances at most every `cursor_store_interval_s` (and when the relay stops):
its transaction takes SQLite's one writer away from the ledger. After a crash, at most that
much is published again, with the same ids, inside JetStream's duplicate window.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
from collections.abc import AsyncIterator
from typing import NamedTuple

import msgspec
from nats.aio.msg import Msg
from sqlalchemy import select, update

from bus.codec import encode
from bus.connection import MeshClient, require_subscriptions
from bus.events import ensure_events_stream, relay_forever, relay_poll_interval_s
from bus.jetstream import BatchPublisher, Message
from bus.tasks import stop, supervised
from ledger.plan import Head
from ledger.storage import entries_after
from schemas.database import Database, open_database, service_url
from schemas.ledger import Entry, ledger_cursors

COMMITTED_SUBJECT = "ledger.internal.committed"
EVENTS_CURSOR = "events"
relay_batch_max = 1_024
cursor_store_interval_s = 0.5
handed_batches_max = 16
"""Batches handed over and not yet published; older ones are dropped (and read back instead)."""


class Link(msgspec.Struct, frozen=True):
    """What the relay reads of an entry: where it sits in the chain, and when it was recorded."""

    seq: int
    recorded_at: str
    prev_hash: str
    hash: str


class Committed(NamedTuple):
    """An entry to publish: its link, and its JSON as the ledger encoded it (the event's `data`)."""

    link: Link
    body: bytes


_decode_bodies = msgspec.json.Decoder(list[msgspec.Raw]).decode
_decode_link = msgspec.json.Decoder(Link).decode
EVENT_SUBJECT = "events.ledger.transfer.recorded"
_EVENT = b'{"id":"%s","type":"ledger.transfer.recorded","source":"ledger","occurred_at":"%s","data":%s}'
"""The envelope (contract §6) around an entry's JSON, as `encode(Envelope(...))` would write it.
Decoding every handed-over entry whole and encoding it again in an envelope, then framing it,
took 4.3 µs per event in Python; this way 3.1 (`timeit`, 256 entries; bench/RESULTS.md, session 14)."""


def committed_message(entries: list[Entry], payload_max: int) -> bytes:
    """The nudge: the batch's entries, or nothing when they would not fit in one message."""
    body = encode(entries)
    return body if len(body) <= payload_max else b""


def handed_over(body: bytes) -> list[Committed]:
    """A nudge's entries, each with its JSON as it came (the ledger's `encode`)."""
    return [Committed(_decode_link(entry), bytes(entry)) for entry in _decode_bodies(body)]


def stored(entries: list[Entry]) -> list[Committed]:
    """Entries read from the database, as `handed_over` gives them."""
    return [Committed(Link(e.seq, e.recorded_at, e.prev_hash, e.hash), encode(e)) for e in entries]


def event_message(entry: Committed) -> Message:
    digest = entry.link.hash  # unique per entry and the same on every republish: the event id derives from it
    event_id = f"{digest[:8]}-{digest[8:12]}-{digest[12:16]}-{digest[16:20]}-{digest[20:32]}"
    return Message(EVENT_SUBJECT, _EVENT % (event_id.encode(), entry.link.recorded_at.encode(), entry.body), event_id)


def chained(head: Head, entries: list[Committed]) -> bool:
    """`entries` follow `head` and each other by seq and by hash (their hashes not recomputed)."""
    seq, prev = head
    for link, _ in entries:
        if link.seq != seq + 1 or link.prev_hash != prev:
            return False
        seq, prev = link.seq, link.hash
    return True


class ChainRelay:
    """Publishes an event for every entry past the cursor; replicas may overlap, never go back."""

    def __init__(self, publisher: BatchPublisher, db: Database) -> None:
        self.publisher = publisher
        self.db = db
        self.wake = asyncio.Event()
        self.handed: collections.deque[list[Committed]] = collections.deque(maxlen=handed_batches_max)
        self._published = Head()
        self._stored = 0
        self._stored_at = 0.0
        self._behind = True
        """The database may hold entries past `_published` that were not handed over."""
        self._read_at = 0.0

    async def run(self) -> None:
        make_stream = functools.partial(ensure_events_stream, self.publisher.nc.jetstream())
        await relay_forever(self.publish_pending, self.wake, make_stream)

    def hand_over(self, body: bytes) -> None:
        """A committed batch from the ledger (`committed_message`); an empty one only wakes us."""
        if body:
            self.handed.append(handed_over(body))
        else:
            self._behind = True
        self.wake.set()

    async def publish_pending(self) -> None:
        """Publish what was handed over; read the database only when behind, or once per poll
        interval in case a handover was lost after the last one that arrived."""
        while True:
            entries = self._next_handed()
            loop = asyncio.get_running_loop()
            if not entries and (self._behind or loop.time() - self._read_at >= relay_poll_interval_s):
                entries = await self._next_entries()
            if not entries:
                return
            try:
                await self.publisher.publish([event_message(entry) for entry in entries])
            except Exception:
                self._behind = True  # what was handed over is gone: the retry reads the database
                raise
            last = entries[-1].link
            self._published = Head(last.seq, last.hash)
            if loop.time() - self._stored_at >= cursor_store_interval_s:
                await self.store_cursor()

    async def finish(self) -> None:
        """On stopping: publish what is left, the database included, and store the cursor."""
        self._behind = True
        await self.publish_pending()
        await self.store_cursor()

    async def store_cursor(self) -> None:
        """Write down how far events are published (never backwards: another replica may be ahead)."""
        if self._published.seq <= self._stored:
            return
        async with self.db.writer.begin() as conn:
            await conn.execute(
                update(ledger_cursors)
                .where(ledger_cursors.c.name == EVENTS_CURSOR, ledger_cursors.c.seq < self._published.seq)
                .values(seq=self._published.seq)
            )
        self._stored = self._published.seq
        self._stored_at = asyncio.get_running_loop().time()

    def _next_handed(self) -> list[Committed]:
        """The next handed-over entries if they continue the published ones, seq and hash; at a
        gap, none, and the rest dropped: the database has them."""
        while self.handed:
            entries = [entry for entry in self.handed.popleft() if entry.link.seq > self._published.seq]
            if entries and chained(self._published, entries):
                return entries
            if entries:
                self.handed.clear()
                self._behind = True
        return []

    async def _next_entries(self) -> list[Committed]:
        async with self.db.read() as conn:
            query = select(ledger_cursors.c.seq).where(ledger_cursors.c.name == EVENTS_CURSOR)
            cursor = max((await conn.execute(query)).scalar_one(), self._published.seq)
            driver = (await conn.get_raw_connection()).driver_connection
            entries = await entries_after(driver, self.db.is_sqlite, cursor, relay_batch_max)
        self._read_at = asyncio.get_running_loop().time()
        self._behind = len(entries) == relay_batch_max
        return stored(entries)


@contextlib.asynccontextmanager
async def serving(nc: MeshClient) -> AsyncIterator[ChainRelay]:
    """Relay until the block ends; then publish what is left and store the cursor."""
    db = open_database(service_url("ledger"))
    await ensure_events_stream(nc.jetstream())
    relay = ChainRelay(BatchPublisher(nc), db)

    async def nudged(msg: Msg) -> None:
        relay.hand_over(msg.data)

    nudges = await nc.subscribe(COMMITTED_SUBJECT, cb=nudged)
    try:
        await require_subscriptions(nc, [COMMITTED_SUBJECT])
        async with asyncio.TaskGroup() as group:
            task = group.create_task(supervised("ledger_events.relay", relay.run))
            yield relay
            await nudges.unsubscribe()
            await stop(task, "ledger_events.relay")  # one publisher at a time: finish after the loop stopped
            await relay.finish()
    finally:
        await db.dispose()
