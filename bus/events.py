"""Events (contract §6): written to a service's outbox in the same transaction as the change,
then published to JetStream by a relay that deletes a row only after JetStream acknowledged it.

A crash between commit and publish loses nothing: the row is still there when the relay
restarts, and `Nats-Msg-Id` = event id lets JetStream drop the copy if the first publish
did land. On Postgres, replicas claim rows with `FOR UPDATE SKIP LOCKED`; on SQLite each
service has its own file and one process, so one relay reads, publishes and deletes.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any

import nats.errors
from nats.js import JetStreamContext
from nats.js.api import StreamConfig
from nats.js.errors import BadRequestError, ServiceUnavailableError
from sqlalchemy import Table, delete, select
from sqlalchemy.dialects.postgresql import insert as postgres_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.ext.asyncio import AsyncConnection

from bus.codec import encode, timestamp
from bus.connection import without_secrets
from bus.jetstream import BatchPublisher, JetStreamRefused, Message, fast_ingest_supported
from schemas.database import Database, given_up_waiting
from schemas.events import Envelope

log = logging.getLogger("bitnexus.events")

EVENTS_STREAM = "EVENTS"
duplicate_window_s = 120.0
events_kept_s = 7 * 86_400.0
relay_batch_max = 256
relay_poll_interval_s = 0.5
relay_retry_wait_s_max = 5.0
STREAM_REPLICAS_ENV = "BITNEXUS_STREAM_REPLICAS"
stream_replicas_max = 5
"""JetStream's own limit on a stream's replicas."""


async def relay_forever(
    publish_pending: Callable[[], Awaitable[None]], wake: asyncio.Event, make_stream: Callable[[], Awaitable[None]]
) -> None:
    """Publish what is pending, then sleep until woken or the poll interval passes; forever.

    The wake is cleared before publishing, not after: a commit that wakes us while we publish
    (after what we publish was read) is published next, not at the next poll. Cleared after,
    that wake was lost and its event waited up to `relay_poll_interval_s` (a CI run caught a
    transaction's event missing 0.5 s after its commit).

    JetStream not acknowledging (no stream, a timeout, a reconnect) or not storing for now (no
    room: a full store, a stream's limits) is expected now and then: the rows stay, and the
    relay retries with back-off instead of crashing its service. Until session 23 a full stream
    crashed every relay, and each service restarted until the supervisor gave up.

    "No responders" says that no stream takes the subject: the stream was deleted while the
    mesh ran, or the server's JetStream lost its store. `make_stream()` makes it again, as at
    start-up, before each retry; until session 24 the events waited until the service restarted.
    """
    retry_wait_s = 0.1
    while True:
        wake.clear()
        try:
            await publish_pending()
            retry_wait_s = 0.1
        except (
            nats.errors.TimeoutError,
            nats.errors.NoRespondersError,
            nats.errors.ConnectionClosedError,
            JetStreamRefused,
        ) as exc:
            if isinstance(exc, JetStreamRefused) and not exc.for_now:
                raise
            log.warning("relay: JetStream did not store (%r); retrying in %.1f s", exc, retry_wait_s)
            if isinstance(exc, nats.errors.NoRespondersError):
                await _made_again(make_stream)
            await asyncio.sleep(retry_wait_s)
            retry_wait_s = min(retry_wait_s * 2, relay_retry_wait_s_max)
            continue
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(relay_poll_interval_s):
                await wake.wait()


async def _made_again(make_stream: Callable[[], Awaitable[None]]) -> None:
    """`make_stream()`, where JetStream itself may not answer now (a cluster electing a leader,
    a server restarting): the relay's next retry asks again."""
    try:
        await make_stream()
    except (nats.errors.TimeoutError, nats.errors.NoRespondersError, ServiceUnavailableError) as exc:
        log.warning("relay: the stream could not be made again (%r)", exc)


class NoJetStream(Exception):
    """The NATS server (or the account) has no JetStream: a setting to fix, not a crash to restart."""


async def require_jetstream(js: JetStreamContext, url: str) -> None:
    """`NoJetStream` when JetStream does not answer for this connection's account (the server
    runs without it, or the account is not given it). `url` is said with any user and
    password in it hidden."""
    try:
        await js.account_info()
    except ServiceUnavailableError as exc:  # nobody answers $JS.API for this account
        raise NoJetStream(
            f"the NATS server at {without_secrets(url)} offers no JetStream to this connection's account, and the "
            "mesh's events and ingest are JetStream streams: start the server with -js (or "
            "`jetstream {}` in its config), and give the account JetStream where accounts are set"
        ) from exc


def stream_replicas() -> int:
    """How many servers keep a stream the mesh creates: `BITNEXUS_STREAM_REPLICAS`, 1 when unset
    or empty (one server); 3 on a cluster, so that events and ingest outlive a server."""
    text = os.environ.get(STREAM_REPLICAS_ENV) or "1"
    if not (text.isascii() and text.isdigit() and 1 <= int(text) <= stream_replicas_max):
        raise ValueError(f"{STREAM_REPLICAS_ENV} must be a whole number from 1 to {stream_replicas_max}, not {text!r}")
    return int(text)


async def ensure_stream(js: JetStreamContext, name: str, subjects: list[str], **limits: Any) -> None:
    """Create the stream if missing; an existing one (maybe configured by an operator) is left as it is.

    A new stream allows fast-ingest batches (`bus.jetstream`) where the server has them.
    `limits`: what it keeps, and for how long (`StreamConfig`'s fields: `max_age`, `retention`)."""
    batched = True if fast_ingest_supported(js._nc) else None  # older servers: the field left out
    config = StreamConfig(
        name=name,
        subjects=subjects,
        duplicate_window=duplicate_window_s,
        allow_batched=batched,
        num_replicas=stream_replicas(),
        **limits,
    )
    try:
        await js.add_stream(config)
    except BadRequestError as exc:
        if exc.err_code != 10058:  # stream name already in use with a different configuration
            raise


async def ensure_events_stream(js: JetStreamContext) -> None:
    """EVENTS keeps each event `events_kept_s`: an integration may be away that long and still
    read everything it missed. It kept every event for ever until session 23."""
    await ensure_stream(js, EVENTS_STREAM, ["events.>"], max_age=events_kept_s)


def new_envelope(source: str, type: str, data: Any, moment: datetime, id: str | None = None) -> Envelope:
    id = id or str(uuid.uuid4())
    return Envelope(id=id, type=type, source=source, occurred_at=timestamp(moment), data=data)


async def write_event(
    conn: AsyncConnection,
    outbox: Table,
    source: str,
    type: str,
    data: Any,
    moment: datetime | None = None,
    event_id: str | None = None,
) -> Envelope:
    """Add the event to the outbox inside the caller's transaction; published after commit.

    `event_id`: the id of an event that may be written again (the same work done twice): a
    second write of an id still in the outbox adds nothing, and one published already is
    published under the same id, which JetStream drops as a copy within its window."""
    moment = moment or datetime.now(UTC)
    envelope = new_envelope(source, type, data, moment, event_id)
    row = {"event_id": envelope.id, "subject": f"events.{type}", "payload": encode(envelope), "created_at": moment}
    dialect_insert = sqlite_insert if conn.dialect.name == "sqlite" else postgres_insert
    await conn.execute(dialect_insert(outbox).values(**row).on_conflict_do_nothing(index_elements=["event_id"]))
    return envelope


class OutboxRelay:
    """Publishes outbox rows in order of commit; `wake()` after a commit for low latency."""

    def __init__(self, publisher: BatchPublisher, db: Database, outbox: Table) -> None:
        self.publisher = publisher
        self.db = db
        self.outbox = outbox
        self._wake = asyncio.Event()

    def wake(self) -> None:
        self._wake.set()

    async def run(self) -> None:
        make_stream = functools.partial(ensure_events_stream, self.publisher.nc.jetstream())
        await relay_forever(self.publish_pending, self._wake, make_stream)

    async def publish_pending(self) -> None:
        """Publish pending rows until none is left."""
        while await self._publish_batch() == relay_batch_max:
            pass

    async def _publish_batch(self) -> int:
        """Statements kept waiting past their limit (a lock held elsewhere) are `DatabaseTimeout`,
        which the relay's supervisor waits out; until session 23 SQLite's "database is locked"
        crashed the relay three times and then its service."""
        query = select(self.outbox.c.seq, self.outbox.c.event_id, self.outbox.c.subject, self.outbox.c.payload)
        query = query.order_by(self.outbox.c.seq).limit(relay_batch_max)
        if self.db.is_sqlite:
            async with self.db.read() as conn:
                rows = (await conn.execute(query)).all()
            await self._publish(rows)
            with given_up_waiting():
                async with self.db.writer.begin() as conn:
                    await self._delete(conn, rows)
            return len(rows)
        async with self.db.writer.begin() as conn:
            with given_up_waiting():
                rows = (await conn.execute(query.with_for_update(skip_locked=True))).all()
            await self._publish(rows)
            with given_up_waiting():
                await self._delete(conn, rows)
        return len(rows)

    async def _publish(self, rows: list) -> None:
        await self.publisher.publish([Message(row.subject, row.payload, row.event_id) for row in rows])

    async def _delete(self, conn: AsyncConnection, rows: list) -> None:
        if rows:
            await conn.execute(delete(self.outbox).where(self.outbox.c.seq.in_([row.seq for row in rows])))
