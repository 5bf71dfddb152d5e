"""The ledger service: `ledger.*` (contract §4, §5). Writes go through the group-commit writer;
reads use their own connections and never wait behind it."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from importlib.metadata import version
from typing import Any

from nats.aio.client import Client
from nats.errors import ConnectionClosedError, ConnectionDrainingError, OutboundBufferLimitError

from bus.codec import encode
from bus.errors import BadRequest, ServiceError
from bus.service import Service
from bus.tasks import stop, supervised
from handlers.batching import BatchLoader, pages_batch_max, read_loader
from handlers.runtime import instance_metadata
from ledger.chain import entry_is_valid
from ledger.events import COMMITTED_SUBJECT, committed_message
from ledger.plan import Head
from ledger.storage import (
    History,
    balances_of_accounts,
    entries_after,
    histories,
    postgres_verified,
    seq_range_end,
)
from ledger.writer import Writer
from schemas.common import INT64_MAX
from schemas.database import Database, open_database, service_url
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
    decode_record_batch,
    decode_transfer,
)

log = logging.getLogger("bitnexus.ledger")

verify_page_entries = 2_000
verify_range_entries = 10_000
"""Postgres: the entries one statement of `verify` checks: 68-83 ms here (50,000 took 0.34-0.37 s,
the same per entry), well inside a deployment's `statement_timeout` and a short snapshot."""
verify_waiting_max = 64
"""`ledger.verify` requests taken off the subscription at once: those waiting share the next verify."""
RECORDED_AT_SHAPE = "2026-01-01T00:00:00.000000Z"
"""As long as every `recorded_at` (contract §1)."""
record_batch_requests_max = 1_024
"""`ledger.record` requests taken off the subscription at once. Taken one by one, each cost a
worker task, a future and two more event-loop turns: c512 ran at 17k/s (p99 48-60 ms)."""


async def record_each(requests: list[Transfer], writer: Writer) -> list[Entry | ServiceError]:
    """`ledger.record`: every request queued meanwhile, committed (or refused) one by one in one batch."""
    return await _record_each(requests, writer, kept=False)


async def record_each_kept(requests: list[Transfer], writer: Writer) -> list[Entry | ServiceError]:
    """`ledger.internal.record`, the transactions saga's: `ledger.record` whose refusals are kept,
    so that an id refused once is refused the same way ever after, however the balances change.
    A saga may drive one transaction twice at once (a client's retry, its recovery, two replicas):
    without it, a later try could record a transfer after an earlier one's refusal closed the
    transaction as rejected (a chaos soak, session 20). TigerBeetle's `id_already_failed`, the
    same idea. `ledger.record`'s refused ids stay free (contract §5)."""
    return await _record_each(requests, writer, kept=True)


async def _record_each(requests: list[Transfer], writer: Writer, kept: bool) -> list[Entry | ServiceError]:
    outcomes = await writer.submit_each([[request] for request in requests], batched=False, kept=kept)
    return [outcome if isinstance(outcome, ServiceError) else outcome[0] for outcome in outcomes]


async def record_batch(request: RecordBatch, writer: Writer, nc: Client) -> Entries:
    """All or nothing; refused before anything is written when its reply could not be sent."""
    reply_bytes_max = len(encode(Entries(items=[_longest_entry(transfer) for transfer in request.transfers])))
    if reply_bytes_max > nc.max_payload:
        raise BadRequest(
            f"the reply to these transfers could take {reply_bytes_max} bytes, more than the server's max payload "
            f"of {nc.max_payload}: send fewer at a time",
            details=["$.transfers"],
        )
    return Entries(items=await writer.submit(request.transfers, batched=True))


def _longest_entry(transfer: Transfer) -> Entry:
    """The entry `transfer` may become, with the longest seq: a 1,000-transfer batch with memos
    of 770 characters (868 KB) was recorded and then answered 500, its reply over 1 MiB, until
    session 23; every retry the same."""
    return Entry(
        INT64_MAX, transfer.id, transfer.from_, transfer.to, transfer.amount, transfer.currency, transfer.memo,
        RECORDED_AT_SHAPE, GENESIS_HASH, GENESIS_HASH,
    )  # fmt: skip


BalancesLoader = BatchLoader[str, dict[str, int]]
"""Each account's balances by currency."""


def balances_loader(db: Database) -> BalancesLoader:
    """`ledger.balance`'s reads: those that come together, one statement on the driver. One
    statement each through SQLAlchemy, c64 reached 2.4k-2.5k reads/s on Postgres and 1.0k-1.1k on
    SQLite, a quarter and a tenth of `ledger.record`'s (bench/RESULTS.md, session 26)."""

    async def lookup(driver: Any, accounts: list[str]) -> dict[str, dict[str, int]]:
        return await balances_of_accounts(driver, db.is_sqlite, accounts)

    return read_loader(db, lookup)


async def balance(request: BalanceRequest, balances: BalancesLoader) -> Balances:
    return Balances(account=request.account, balances=await balances.load(request.account) or {})


HistoriesLoader = BatchLoader[History, list[Entry]]


def histories_loader(db: Database) -> HistoriesLoader:
    """`ledger.history`'s reads: those that come together, one statement on the driver that scans
    the chain past the history index once for them all (`ledger.storage.histories`). One at a
    time, c64 reached 342 reads/s on SQLite and 502 on Postgres (bench.reads, session 27)."""

    async def lookup(driver: Any, reads: list[History]) -> dict[History, list[Entry]]:
        return dict(zip(reads, await histories(driver, db.is_sqlite, reads), strict=True))

    return read_loader(db, lookup, batch_max=pages_batch_max)


async def history(request: HistoryRequest, reads: HistoriesLoader) -> EntryPage:
    entries = await reads.load((request.account, request.after_seq, request.limit + 1))
    return EntryPage.of(entries or [], request.limit)


async def chain(request: ChainRequest, db: Database) -> EntryPage:
    return await _chain_page(db, request.after_seq, request.limit)


async def _chain_page(db: Database, after_seq: int, limit: int) -> EntryPage:
    async with db.reading() as driver:
        entries = await entries_after(driver, db.is_sqlite, after_seq, limit + 1)
    return EntryPage.of(entries, limit)


class Verifier:
    """`ledger.verify` one at a time: requests that come while one runs share the next, which
    starts after they came, so each answer covers the chain as it stood when it was asked. Clients
    that stop waiting and ask again (a monitor polling more often than a verify takes) add no
    more than one verify at a time; until session 26 each of their requests queued one, two
    running at once."""

    def __init__(self, db: Database) -> None:
        self.db = db
        self._turn = asyncio.Lock()
        self._started = 0
        self._finished = 0
        self._last: Verification | Exception | None = None
        """The last run's outcome. A failure is shared too (a lost database: those waiting get
        its 503 at once, not one after another as each run of their own meets the outage)."""

    async def verify(self) -> Verification:
        started_before = self._started
        async with self._turn:
            if self._finished <= started_before:  # no run begun after this request came has ended
                self._started += 1
                try:
                    self._last = await verify_chain(self.db)
                except Exception as exc:
                    self._last = exc
                self._finished = self._started
            assert self._last is not None
            if isinstance(self._last, Exception):
                raise self._last
            return self._last


async def verify(request: VerifyRequest, verifier: Verifier) -> Verification:
    return await verifier.verify()


async def verify_chain(db: Database) -> Verification:
    """Recompute every hash from the stored rows. On Postgres the server does it, a range per
    statement (`postgres_verified`): done here, a verify of a million entries beside `ledger.record`
    at c64 took 11-12 s, and the record rate fell to a quarter while it ran (bench/RESULTS.md,
    session 26)."""
    if db.is_sqlite:
        return await _verify_here(db)
    good = Head()
    while True:
        async with db.reading() as driver:
            after = good
            good, stopped = await postgres_verified(driver, after, verify_range_entries)
        if stopped:
            return Verification(ok=False, length=good.seq, head=good.hash, first_bad_seq=good.seq + 1)
        if good.seq < seq_range_end(after.seq, verify_range_entries):
            return Verification(ok=True, length=good.seq, head=good.hash, first_bad_seq=None)


async def _verify_here(db: Database) -> Verification:
    """In this process, page by page, yielding to other requests between pages."""
    seq, prev_hash = 0, GENESIS_HASH
    while True:
        page = await _chain_page(db, seq, verify_page_entries - 1)
        for entry in page.items:
            if not entry_is_valid(entry, prev_hash, seq + 1):
                return Verification(ok=False, length=seq, head=prev_hash, first_bad_seq=seq + 1)
            seq, prev_hash = entry.seq, entry.hash
        if page.next_after_seq is None:
            return Verification(ok=True, length=seq, head=prev_hash, first_bad_seq=None)
        await asyncio.sleep(0)


@contextlib.asynccontextmanager
async def serving(nc: Client) -> AsyncIterator[Service]:
    """Serve until the block ends; events are published by `ledger.events`, another process."""
    db = open_database(service_url("ledger"))

    async def hand_over(entries: list[Entry]) -> None:
        """Best effort, after the commit: a handover that cannot be sent (NATS reconnecting with a
        full buffer, closing) only makes the relay read the database at its next poll."""
        try:
            await nc.publish(COMMITTED_SUBJECT, committed_message(entries, nc.max_payload))
        except (OutboundBufferLimitError, ConnectionClosedError, ConnectionDrainingError) as exc:
            log.warning("committed entries %d-%d not handed over: %r", entries[0].seq, entries[-1].seq, exc)

    writer = Writer(db, on_commit=hand_over)
    service = Service(nc, "ledger", version("bitnexus-mesh"), "double-entry, hash-chained ledger", instance_metadata())
    service.add_batch_endpoint(
        "ledger.record",
        record_each,
        writer,
        request_type=Transfer,
        decode=decode_transfer,
        batch_max=record_batch_requests_max,
    )
    service.add_batch_endpoint(
        "ledger.internal.record",
        record_each_kept,
        writer,
        request_type=Transfer,
        decode=decode_transfer,
        batch_max=record_batch_requests_max,
    )
    service.add_endpoint(
        "ledger.record_batch", record_batch, writer, nc, decode=decode_record_batch, concurrency_max=64
    )
    balances = balances_loader(db)
    service.add_endpoint("ledger.balance", balance, balances)
    history_reads = histories_loader(db)
    service.add_endpoint("ledger.history", history, history_reads)
    service.add_endpoint("ledger.chain", chain, db)
    service.add_endpoint("ledger.verify", verify, Verifier(db), concurrency_max=verify_waiting_max)
    try:
        async with asyncio.TaskGroup() as group:
            task = group.create_task(supervised("ledger.writer", writer.run))
            loads = group.create_task(supervised("ledger.balances", balances.run))
            history_loads = group.create_task(supervised("ledger.histories", history_reads.run))
            async with service.serving():
                yield service
            await stop(history_loads, "ledger.histories")
            await stop(loads, "ledger.balances")
            await stop(task, "ledger.writer")
    finally:
        await writer.close()
        await db.dispose()
