"""Ingest (contract §7): other systems publish to `ingest.transactions.*` on the stream `INGEST`;
a durable pull consumer shared by all transactions replicas applies each message once.

The consumer reads all of `INGEST` (`ingest.>`), so that a message on a subject the contract
does not name (`ingest.transaction.transfers`) is rejected like any malformed one instead of
being stored, acknowledged to its publisher and never read. Where an operator's consumer already
reads part of the stream (a work queue gives each subject one consumer), it reads only
`ingest.transactions.*` and says so.

A message is acknowledged only after its outcome is committed (or refused, for good). An
outage (a dependency that did not answer, a lost or too slow database) is waited out with the
message held, however long it lasts; a dependency's 500 gets a nak with a growing delay, at most
`deliveries_max` deliveries in all. A malformed or refused message gets a `rejected` event and a
terminal ack, never an endless redelivery.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime

import msgspec
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, RetentionPolicy
from nats.js.errors import BadRequestError, ServiceUnavailableError
from sqlalchemy.ext.asyncio import AsyncConnection

from bus.codec import decode
from bus.errors import BadRequest, ServiceError
from bus.events import ensure_stream, write_event
from handlers import transactions
from handlers.transaction_store import SOURCE
from handlers.transactions import Saga
from schemas.database import database_did_not_answer
from schemas.transactions import (
    CreateDeposit,
    CreatePurchase,
    CreateTransfer,
    CreateWithdrawal,
    Rejection,
    transactions_outbox,
)

log = logging.getLogger("bitnexus.ingest")

INGEST_STREAM = "INGEST"
INGEST_SUBJECTS = "ingest.>"
TRANSACTIONS_SUBJECTS = "ingest.transactions.*"
CONSUMER = "transactions"
SUBJECTS_TAKEN = 10100
"""JetStream's "filtered consumer not unique on workqueue stream": another consumer reads some of them."""
in_flight_max = 512
fetch_messages_max = 64
fetch_wait_s = 1.0
ack_wait_s = 30.0
deliveries_max = 50
redelivery_delay_s_max = 30.0
consumer_gone_pause_s_first = 0.1
consumer_gone_pause_s_max = 5.0
outage_retry_wait_s_max = 10.0
"""How long a held message waits between tries during an outage; it tells JetStream it is in
progress before each wait, so its `ack_wait_s` never runs out meanwhile."""
assert outage_retry_wait_s_max < ack_wait_s

Create = Callable[[msgspec.Struct, Saga], Awaitable[object]]
ROUTES: dict[str, tuple[type[msgspec.Struct], Create]] = {
    "ingest.transactions.deposits": (CreateDeposit, transactions.create_deposit),
    "ingest.transactions.withdrawals": (CreateWithdrawal, transactions.create_withdrawal),
    "ingest.transactions.transfers": (CreateTransfer, transactions.create_transfer),
    "ingest.transactions.purchases": (CreatePurchase, transactions.create_purchase),
}


async def ensure_ingest_stream(js: JetStreamContext) -> None:
    """INGEST is a work queue: a message leaves it once the mesh acknowledged it (after its outcome
    committed). Until session 23 it kept every message for ever, applied or not. What may wait
    there (the mesh down, or behind) is bounded by the server's JetStream storage: when it is
    full a publisher gets an error instead of an ack, so nothing acknowledged is dropped. (A
    limit of the stream's own reserves its bytes: 1 GiB of them made the stream impossible to
    create on a server with less JetStream storage than that.)"""
    await ensure_stream(js, INGEST_STREAM, [INGEST_SUBJECTS], retention=RetentionPolicy.WORK_QUEUE)


async def consume_forever(js: JetStreamContext, saga: Saga) -> None:
    """Consume; when the stream or the consumer is gone (deleted while the mesh runs, a JetStream
    that lost its store) or JetStream does not answer for them, make them again after a pause.
    Until session 24 that was a crash with its traceback at every try, three in 5 s ending the
    process (`bus.tasks.supervised`)."""
    pause_s = consumer_gone_pause_s_first
    while True:
        started = asyncio.get_running_loop().time()
        try:
            await consume_until_gone(js, saga)
            what = "is gone"
        except (ServiceUnavailableError, TimeoutError) as exc:  # making them: JetStream did not answer
            what = f"could not be made ({exc!r})"
        if asyncio.get_running_loop().time() - started > consumer_gone_pause_s_max:
            pause_s = consumer_gone_pause_s_first  # it consumed in between: a new outage
        log.warning("ingest: the stream or its consumer %s; making them again in %.1f s", what, pause_s)
        await asyncio.sleep(pause_s)
        pause_s = min(2 * pause_s, consumer_gone_pause_s_max)


async def consume_until_gone(js: JetStreamContext, saga: Saga) -> None:
    """One fetcher keeps up to `in_flight_max` messages being applied at once, each in its own
    task of this task group, until the consumer does not answer a fetch; returns once those in
    flight are done. (Fetching on one pull subscription from several tasks mixes their
    replies; one message at a time per worker measured 1/4 of this throughput.)"""
    await ensure_ingest_stream(js)
    config = await made_consumer(js)
    assert config.filter_subject is not None
    subscription = await js.pull_subscribe(config.filter_subject, durable=CONSUMER, stream=INGEST_STREAM, config=config)
    consumer = asyncio.current_task()
    assert consumer is not None
    in_flight = 0
    room = asyncio.Event()
    room.set()

    async def apply(msg: Msg) -> None:
        nonlocal in_flight
        try:
            await handle(msg, saga)
        finally:
            in_flight -= 1
            room.set()

    try:
        async with asyncio.TaskGroup() as group:
            while True:
                await room.wait()
                try:
                    messages = await subscription.fetch(
                        min(fetch_messages_max, in_flight_max - in_flight), timeout=fetch_wait_s
                    )
                except TimeoutError:  # nothing to fetch within fetch_wait_s (nats-py raises both kinds)
                    continue
                except ServiceUnavailableError:  # nobody answers for the consumer: it or its stream is gone
                    break
                if consumer.cancelling():  # `fetch` returned instead of raising (`bus.tasks.stop`)
                    raise asyncio.CancelledError  # what it fetched is redelivered after `ack_wait_s`
                for msg in messages:
                    in_flight += 1
                    group.create_task(apply(msg))
                assert in_flight <= in_flight_max
                if in_flight == in_flight_max:
                    room.clear()
    finally:
        # unacknowledged messages go back to the consumer; a drained connection must not wait for them
        await subscription.unsubscribe()


def consumer_config(subjects: str) -> ConsumerConfig:
    return ConsumerConfig(
        durable_name=CONSUMER,
        ack_policy=AckPolicy.EXPLICIT,
        ack_wait=ack_wait_s,
        max_deliver=deliveries_max,
        max_ack_pending=in_flight_max,
        filter_subject=subjects,
    )


async def made_consumer(js: JetStreamContext) -> ConsumerConfig:
    """The mesh's consumer of all of `INGEST`, made or brought to this config (an older version's
    read `ingest.transactions.*` only); of `ingest.transactions.*` where another consumer reads
    some of the stream's other subjects."""
    config = consumer_config(INGEST_SUBJECTS)
    try:
        await js.add_consumer(INGEST_STREAM, config)
    except BadRequestError as exc:
        if exc.err_code != SUBJECTS_TAKEN:
            raise
        log.warning(
            "ingest: another consumer of %s reads some of its subjects; the mesh reads only %s, and a "
            "message on any other subject waits for that consumer",
            INGEST_STREAM,
            TRANSACTIONS_SUBJECTS,
        )
        config = consumer_config(TRANSACTIONS_SUBJECTS)
        await js.add_consumer(INGEST_STREAM, config)
    return config


async def handle(msg: Msg, saga: Saga) -> None:
    """Apply one message; through an outage, again and again, the message held: an outage of any
    length costs it no delivery. Until session 23 each try was a nak and a delivery, and a message
    met by an outage longer than its `deliveries_max` deliveries (≈ 22 min) was never applied: the
    consumer gave up on it, and it stayed in INGEST. Raised instead (until session 21), a lost
    database ended the consumer's task group, every message in flight with it."""
    wait_s = min(redelivery_delay_s(msg), outage_retry_wait_s_max)
    while True:
        try:
            await apply_message(msg, saga)
            return
        except Exception as exc:
            if not (database_did_not_answer(exc) or (isinstance(exc, ServiceError) and exc.code == 503)):
                raise
        await msg.in_progress()
        await asyncio.sleep(wait_s)
        wait_s = min(2 * wait_s, outage_retry_wait_s_max)


def redelivery_delay_s(msg: Msg) -> float:
    return min(2.0**msg.metadata.num_delivered / 4, redelivery_delay_s_max)


async def apply_message(msg: Msg, saga: Saga) -> None:
    route = ROUTES.get(msg.subject)
    try:
        if route is None:
            known = ", ".join(ROUTES)
            raise BadRequest(f"no ingest subject {msg.subject}: the mesh takes {known}", details=["subject"])
        request_type, create = route
        request = decode(request_type, msg.data)
    except BadRequest as error:
        await reject(saga, msg, key_of(msg.data), error)
        await msg.term()
        return
    try:
        await create(request, saga)
    except ServiceError as error:
        if error.code == 503:  # a dependency did not answer: `handle` tries again
            raise
        if error.code >= 500:  # a dependency failed: the same message may succeed later
            await msg.nak(delay=redelivery_delay_s(msg))
            return
        if error.code != 422:  # a 422 was recorded as rejected, with its event; anything else was not
            await reject(saga, msg, request.idempotency_key, error)  # type: ignore[attr-defined]
        await msg.term()
        return
    await msg.ack()


def key_of(data: bytes) -> str | None:
    """The idempotency key of a malformed message, when one can be read at all."""
    try:
        body = msgspec.json.decode(data)
    except msgspec.DecodeError:
        return None
    key = body.get("idempotency_key") if isinstance(body, dict) else None
    return key if isinstance(key, str) and len(key) <= 128 else None


REJECTIONS = uuid.UUID("5b0c3f7e-9a51-4d2e-8f3c-1e6a2d4b7c90")
"""The namespace of rejection event ids: one per ingest message, named by its stream, its sequence
there and when the stream stored it (a stream made again counts from 1 again)."""


async def reject(saga: Saga, msg: Msg, key: str | None, error: ServiceError) -> None:
    """A `rejected` event for a message that recorded nothing, committed before the message is
    acked. Its id follows from the message, so a redelivery (an ack lost after the commit) writes
    the same event, not a second one under another id."""
    metadata = msg.metadata
    stored = f"{metadata.stream}:{metadata.sequence.stream}:{metadata.timestamp.isoformat()}"
    event_id = str(uuid.uuid5(REJECTIONS, stored))

    async def write_rejection(conn: AsyncConnection) -> None:
        rejection = Rejection(idempotency_key=key, error=error.body())
        event_type = "transactions.transaction.rejected"
        await write_event(conn, transactions_outbox, SOURCE, event_type, rejection, datetime.now(UTC), event_id)

    await saga.repo.commits.run(write_rejection)
    saga.repo.relay.wake()
