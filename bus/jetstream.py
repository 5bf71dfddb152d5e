"""Publishing a batch to JetStream with every message in flight at once, acks on one inbox.

nats-py's `js.publish` is a request per message (a future, a random token, a round trip
awaited one by one): about half of the ledger's CPU went there. Here a batch is written to
the socket back to back, each with reply subject `<inbox>.<batch>.<index>`, and one
subscription counts the acks. A batch succeeds only when every message is acknowledged.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field

import msgspec
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeout

from bus.client import no_responders
from bus.wire import Frame, header_block, publish_all

ack_timeout_s = 5.0
batch_messages_max = 4096


class PubAck(msgspec.Struct):
    stream: str = ""
    seq: int = 0
    duplicate: bool = False
    error: dict | None = None


_decode_ack = msgspec.json.Decoder(PubAck).decode


@dataclass
class _Batch:
    expected: int
    acked: set[int] = field(default_factory=set)
    failure: Exception | None = None
    done: asyncio.Event = field(default_factory=asyncio.Event)


@dataclass(frozen=True)
class Message:
    subject: str
    payload: bytes
    msg_id: str
    """`Nats-Msg-Id`: JetStream drops a second copy within its duplicate window."""


class BatchPublisher:
    def __init__(self, nc: Client) -> None:
        self.nc = nc
        self._prefix = f"{nc._inbox_prefix.decode()}.{nc._nuid.next().decode()}"
        self._batches: dict[int, _Batch] = {}
        self._ids = itertools.count(1)
        self._subscription = None

    async def publish(self, messages: Sequence[Message]) -> None:
        """Publish all and return once JetStream acknowledged each; raises on any failure or timeout."""
        assert len(messages) <= batch_messages_max
        if not messages:
            return
        if self._subscription is None:
            self._subscription = await self.nc.subscribe(f"{self._prefix}.*.*", cb=self._on_ack)
        batch_id = next(self._ids)
        batch = self._batches[batch_id] = _Batch(expected=len(messages))
        try:
            reply = f"{self._prefix}.{batch_id}."
            await publish_all(
                self.nc,
                (
                    Frame(
                        message.subject,
                        f"{reply}{index}",
                        message.payload,
                        header_block({"Nats-Msg-Id": message.msg_id}),
                    )
                    for index, message in enumerate(messages)
                ),
            )
            try:
                async with asyncio.timeout(ack_timeout_s):
                    await batch.done.wait()
            except TimeoutError:
                raise NatsTimeout from None
            if batch.failure is not None:
                raise batch.failure
        finally:
            del self._batches[batch_id]

    async def _on_ack(self, msg: Msg) -> None:
        _, batch_token, index_token = msg.subject.rsplit(".", 2)
        batch = self._batches.get(int(batch_token))
        if batch is None:
            return  # a late ack of a batch that timed out
        if no_responders(msg):
            batch.failure = NoRespondersError()
        else:
            ack = _decode_ack(msg.data)
            if ack.error is not None:
                batch.failure = RuntimeError(f"JetStream refused a message: {ack.error}")
        batch.acked.add(int(index_token))
        if len(batch.acked) == batch.expected:
            batch.done.set()
