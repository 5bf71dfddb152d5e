"""Batches published to JetStream: fast ingest where the stream allows it, one ack per message where not."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator

import pytest
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.errors import MaxPayloadError, NoRespondersError
from nats.js.api import StreamConfig

from bus.events import STREAM_REPLICAS_ENV, ensure_stream
from bus.jetstream import BatchPublisher, Message, _frame, fast_ingest_supported
from bus.wire import framed, header_block


@pytest.fixture
async def stream_name(nc: Client) -> AsyncIterator[str]:
    name = f"T{uuid.uuid4().hex[:8]}"
    yield name
    await nc.jetstream().delete_stream(name)


def messages(name: str, ids: list[int]) -> list[Message]:
    return [Message(f"{name}.x", b'{"n": %d}' % n, f"{name}-{n}") for n in ids]


async def stored(nc: Client, name: str) -> int:
    return (await nc.jetstream().stream_info(name)).state.messages


async def replies_seen(nc: Client, publisher: BatchPublisher, batch: list[Message]) -> int:
    """Publish `batch` and count the replies the server sent to the publisher's inbox."""
    seen: list[Msg] = []

    async def count(msg: Msg) -> None:
        seen.append(msg)

    spy = await nc.subscribe(f"{publisher._prefix}.>", cb=count)
    await publisher.publish(batch)
    await nc.flush()
    await spy.unsubscribe()
    return len(seen)


async def test_a_batch_is_stored_once_with_one_ack_where_the_stream_allows_fast_ingest(
    nc: Client, stream_name: str
) -> None:
    assert fast_ingest_supported(nc)  # the wheel's server
    await ensure_stream(nc.jetstream(), stream_name, [f"{stream_name}.>"])
    publisher = BatchPublisher(nc)
    replies = await replies_seen(nc, publisher, messages(stream_name, list(range(200))))
    assert replies <= 3, replies  # the start's flow ack, at most one more, the batch's pub ack
    assert await stored(nc, stream_name) == 200
    await publisher.publish(messages(stream_name, [*range(150, 200), *range(200, 210)]))
    assert await stored(nc, stream_name) == 210  # the 50 copies dropped by their Nats-Msg-Id
    await publisher.publish(messages(stream_name, list(range(190, 210))))  # a relay's retry: its last a copy too
    assert await stored(nc, stream_name) == 210
    assert publisher.fast_ingest


async def test_core_subscribers_see_each_event_of_a_fast_batch_once_and_nothing_else(
    nc: Client, stream_name: str
) -> None:
    """`nats sub 'events.>'` beside the stream sees every message once, with its `Nats-Msg-Id`:
    the batch commits on its last message, so no empty end-of-batch message reaches them."""
    await ensure_stream(nc.jetstream(), stream_name, [f"{stream_name}.>"])
    seen: list[Msg] = []

    async def watch(msg: Msg) -> None:
        seen.append(msg)

    watcher = await nc.subscribe(f"{stream_name}.>", cb=watch)
    publisher = BatchPublisher(nc)
    for batch in ([1], [2, 3], list(range(4, 104))):
        await publisher.publish(messages(stream_name, batch))
    sent = messages(stream_name, list(range(1, 104)))
    await nc.flush()
    async with asyncio.timeout(5):  # unsubscribing drops what the callback has not taken yet
        while len(seen) < len(sent):
            await asyncio.sleep(0.01)
    await watcher.unsubscribe()
    assert [(msg.data, msg.headers) for msg in seen] == [(m.payload, {"Nats-Msg-Id": m.msg_id}) for m in sent]
    assert await stored(nc, stream_name) == len(sent)
    assert publisher.fast_ingest


async def test_a_stream_without_batched_publishes_gets_one_ack_per_message(nc: Client, stream_name: str) -> None:
    await nc.jetstream().add_stream(StreamConfig(name=stream_name, subjects=[f"{stream_name}.>"]))
    publisher = BatchPublisher(nc)
    await publisher.publish(messages(stream_name, list(range(20))))
    assert not publisher.fast_ingest
    assert await stored(nc, stream_name) == 20  # the refused fast batch stored nothing
    assert await replies_seen(nc, publisher, messages(stream_name, list(range(20, 50)))) == 30
    assert await stored(nc, stream_name) == 50


async def test_a_batch_no_stream_listens_to_fails(nc: Client) -> None:
    with pytest.raises(NoRespondersError):
        await BatchPublisher(nc).publish(messages("nostream", [1, 2, 3]))


def test_an_event_frame_is_the_general_one() -> None:
    message = Message("events.x", '{"memo":"é"}'.encode(), "3f2a9c1e-0b7d-4e5f-8a6b-1c2d3e4f5a6b")
    header = header_block({"Nats-Msg-Id": message.msg_id})
    general = framed(message.subject, "_INBOX.x.1.$FI", message.payload, header)
    assert general == b"HPUB events.x _INBOX.x.1.$FI %d %d\r\n%s%s\r\n" % (
        len(header),
        len(header) + len(message.payload),
        header,
        message.payload,
    )
    assert _frame(message, b"_INBOX.x.1.$FI") == general
    with pytest.raises(AssertionError):
        _frame(Message("events.x", b"{}", "forged\r\nNats-Expected-Stream: X"), b"_INBOX.x.1")


async def test_a_message_over_the_servers_payload_limit_fails_the_batch_before_sending(nc: Client) -> None:
    too_large = Message("events.x", b"x" * (nc.max_payload + 1), "too-large")
    sent = nc.stats["out_msgs"]
    with pytest.raises(MaxPayloadError):
        await BatchPublisher(nc).publish([Message("events.x", b"{}", "small"), too_large])
    assert nc.stats["out_msgs"] == sent


@pytest.mark.parametrize("setting", ["0", "6", "three", "-1"])
async def test_a_stream_replicas_setting_out_of_range_is_refused_before_anything_is_created(
    nc: Client, setting: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(STREAM_REPLICAS_ENV, setting)
    name = f"T{uuid.uuid4().hex[:8]}"
    with pytest.raises(ValueError, match=STREAM_REPLICAS_ENV):
        await ensure_stream(nc.jetstream(), name, [f"{name}.>"])
    assert name not in {stream.config.name for stream in await nc.jetstream().streams_info()}
