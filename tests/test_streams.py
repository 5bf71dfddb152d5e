"""What the mesh's streams keep, on a server of their own: each test's streams are new."""

from __future__ import annotations

import asyncio
import contextlib
import functools
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from nats.aio.client import Client
from nats.js.api import DiscardPolicy, StreamConfig
from nats.js.errors import APIError

import bus.events
from bus.connection import Settings, connect
from bus.embedded import EmbeddedNats, free_port
from bus.events import EVENTS_STREAM, ensure_events_stream, relay_forever
from bus.jetstream import BatchPublisher, Message
from handlers import ingest
from handlers.ingest import INGEST_STREAM, ensure_ingest_stream

BODY = b'{"idempotency_key": "backlog", "user_id": 1, "amount": 5, "currency": "EUR"}'


@pytest.fixture
async def own_nc(tmp_path: Path) -> AsyncIterator[Client]:
    server = EmbeddedNats(data_dir=tmp_path / "nats", port=free_port())
    server.start()
    try:
        client = await connect(Settings(servers=[server.url]), name="streams")
        yield client
        await client.close()
    finally:
        server.stop()


async def test_ingest_is_made_on_a_server_with_little_storage_and_lets_go_of_what_the_mesh_acknowledged(
    tmp_path: Path,
) -> None:
    """A server with 100 MB of JetStream storage: a limit of INGEST's own (1 GiB, for a few
    minutes of session 23) reserved more than that, and the stream could not be made."""
    config = tmp_path / "small.conf"
    config.write_text("jetstream { store_dir: $NATS_STORE_DIR, max_file_store: 100MB }\n")
    server = EmbeddedNats(data_dir=tmp_path / "nats", port=free_port(), config=config)
    server.start()
    try:
        client = await connect(Settings(servers=[server.url]), name="streams")
        js = client.jetstream()
        await ensure_ingest_stream(js)
        for _ in range(3):
            await js.publish("ingest.transactions.deposits", BODY)
        mesh_consumer = await js.pull_subscribe("ingest.transactions.*", durable=ingest.CONSUMER, stream=INGEST_STREAM)
        (applied,) = await mesh_consumer.fetch(1, timeout=5)
        await applied.ack_sync()
        assert (await js.stream_info(INGEST_STREAM)).state.messages == 2  # a work queue: acknowledged, gone
        await client.close()
    finally:
        server.stop()


async def test_events_are_kept_for_their_time_and_then_let_go(own_nc: Client, monkeypatch: pytest.MonkeyPatch) -> None:
    """Kept for ever until session 23; `events_kept_s` is seven days (shortened here)."""
    monkeypatch.setattr(bus.events, "events_kept_s", 1.0)
    monkeypatch.setattr(bus.events, "duplicate_window_s", 0.5)  # at most the time kept
    js = own_nc.jetstream()
    await ensure_events_stream(js)
    await js.publish("events.accounts.user.created", b"{}", headers={"Nats-Msg-Id": "kept-a-while"})
    assert (await js.stream_info(EVENTS_STREAM)).state.messages == 1
    await asyncio.sleep(0.5)
    assert (await js.stream_info(EVENTS_STREAM)).state.messages == 1
    deadline = asyncio.get_running_loop().time() + 5
    while (await js.stream_info(EVENTS_STREAM)).state.messages:
        assert asyncio.get_running_loop().time() < deadline, "an event outlived its time by 4 s"
        await asyncio.sleep(0.1)


@pytest.mark.parametrize("batched", [True, False], ids=["fast batches", "an ack per message"])
async def test_a_relay_waits_out_a_full_stream_and_publishes_once_there_is_room(own_nc: Client, batched: bool) -> None:
    """An operator's EVENTS with a size limit that refuses new messages, full: JetStream answers
    503 "maximum bytes exceeded". Until session 23 that crashed the relay, and its service."""
    js = own_nc.jetstream()
    full = StreamConfig(
        name=EVENTS_STREAM, subjects=["events.>"], max_bytes=4096, discard=DiscardPolicy.NEW, allow_batched=batched
    )
    await js.add_stream(full)
    with pytest.raises(APIError, match="maximum bytes exceeded"):
        for n in range(100):
            await js.publish("events.accounts.user.created", BODY, headers={"Nats-Msg-Id": f"filler-{n}"})
    pending = [Message("events.accounts.user.updated", BODY, f"pending-{n}") for n in range(3)]
    async with relaying(own_nc, pending) as (relay, published):
        await asyncio.sleep(1.0)  # refused at 0, 0.1, 0.3 and 0.7 s
        assert not relay.done() and not published.is_set()
        await js.purge_stream(EVENTS_STREAM)  # room made
        async with asyncio.timeout(5):
            await published.wait()
    assert (await js.stream_info(EVENTS_STREAM)).state.messages == len(pending)


async def test_a_relay_makes_events_again_when_the_stream_is_gone(own_nc: Client) -> None:
    """EVENTS deleted while the mesh runs (by an operator, or a JetStream that lost its store):
    nothing takes the events, and JetStream answers "no responders". Until session 24 every relay
    retried that for ever, its events waiting in the outbox until its service restarted."""
    js = own_nc.jetstream()
    await ensure_events_stream(js)
    await js.delete_stream(EVENTS_STREAM)
    pending = [Message("events.accounts.user.created", BODY, f"after-delete-{n}") for n in range(3)]
    async with relaying(own_nc, pending) as (_, published), asyncio.timeout(5):
        await published.wait()
    info = await js.stream_info(EVENTS_STREAM)
    assert info.state.messages == len(pending) and info.config.max_age == bus.events.events_kept_s


@contextlib.asynccontextmanager
async def relaying(nc: Client, pending: list[Message]) -> AsyncIterator[tuple[asyncio.Task, asyncio.Event]]:
    """A relay of `pending` to EVENTS while the block runs: yields its task, and an event set once
    JetStream acknowledged them."""
    publisher = BatchPublisher(nc)
    published = asyncio.Event()

    async def publish_pending() -> None:
        await publisher.publish(pending)
        published.set()

    async with asyncio.TaskGroup() as group:
        make_stream = functools.partial(ensure_events_stream, nc.jetstream())
        relay = group.create_task(relay_forever(publish_pending, asyncio.Event(), make_stream))
        try:
            yield relay, published
        finally:
            relay.cancel()
