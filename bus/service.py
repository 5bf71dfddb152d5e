"""A NATS Services API v1 (ADR-32) service whose endpoints are plain `async def`s on Structs.

Written on nats-py's core subscriptions rather than `nats.micro` because micro runs one request
at a time per endpoint, unsubscribes instead of draining on stop, and answers an unexpected
exception with its `repr` (see ../shared/NATS-NOTES.md). Here each endpoint has a bounded number
of requests in flight; beyond it messages wait in the subscription's bounded pending queue.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import itertools
import logging
import math
import time
import typing
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from time import perf_counter_ns
from typing import Any

import msgspec
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.nuid import NUID

from bus import discovery
from bus.codec import bad_request_from, decoder, encode, timestamp
from bus.connection import MeshClient, require_subscriptions
from bus.errors import INTERNAL_MESSAGE, ErrorReply, Internal, ServiceError, Unavailable
from bus.wire import Frame, header_block, publish_all
from schemas.common import Page
from schemas.database import nothing_recorded

log = logging.getLogger("bitnexus.bus")

Handler = Callable[..., Awaitable[Any]]
BatchHandler = Callable[..., Awaitable[list[Any]]]
"""`handler(requests, *deps)`: one reply (or the ServiceError to answer) per request, in order."""

QUEUE_GROUP = "q"
concurrency_max_default = 256
pending_msgs_max_default = 65_536
pending_bytes_max_default = 64 * 1024 * 1024
drain_timeout_s = 30.0
database_lost_log_interval_s = 10.0
page_cursor_chars_max = 20
"""A cut page's cursor replaces `null` with an id or seq: at most 20 characters."""
ERROR_HEADER = "Nats-Service-Error"
ERROR_CODE_HEADER = "Nats-Service-Error-Code"


@dataclass
class EndpointCounters:
    num_requests: int = 0
    num_errors: int = 0
    last_error: str = ""
    processing_time_ns: int = 0


@dataclass
class Endpoint:
    name: str
    subject: str
    handler: Handler
    deps: tuple[Any, ...]
    request_type: type
    queue_group: str
    concurrency_max: int
    pending_msgs_max: int
    metadata: dict[str, str]
    decode: Callable[[bytes], Any] | None = None
    """Decodes a request body as `msgspec.json.decode(body, type=request_type)`, by default with it."""
    batch_max: int = 0
    """0: `handler` takes one request. Else it takes every request queued, up to this many."""
    counters: EndpointCounters = field(default_factory=EndpointCounters)
    subscription: Subscription | None = None

    def __post_init__(self) -> None:
        self.decode = self.decode or decoder(self.request_type).decode

    def info(self) -> discovery.EndpointInfo:
        return discovery.EndpointInfo(self.name, self.subject, self.queue_group, self.metadata)

    def stats(self, nc: MeshClient) -> discovery.EndpointStats:
        c = self.counters
        sid = self.subscription._id if self.subscription else -1
        return discovery.EndpointStats(
            name=self.name,
            subject=self.subject,
            queue_group=self.queue_group,
            num_requests=c.num_requests,
            num_errors=c.num_errors,
            last_error=c.last_error,
            processing_time=c.processing_time_ns,
            average_processing_time=c.processing_time_ns // c.num_requests if c.num_requests else 0,
            data={
                "slow_consumer_drops": nc.dropped[sid],  # dropped as the pending queue was full
                "concurrency_max": self.concurrency_max,
            },
        )


def request_type_of(handler: Handler) -> type:
    """The Struct a handler takes, read from the annotation of its first parameter."""
    first = next(iter(inspect.signature(handler).parameters))
    hint = typing.get_type_hints(handler)[first]
    assert isinstance(hint, type) and issubclass(hint, msgspec.Struct), f"{handler} must take a Struct"
    return hint


def fitted(reply: Any, room: int) -> bytes:
    """`reply` encoded; a page too large for `room` (the server's max payload) cut to its longest
    head that fits, its cursor naming its last item, so the client's next page goes on from there.
    Before session 23 such a page was a 500: 1,000 products with 4 KB descriptions, or 1,000
    entries with long memos, make more than 1 MiB, and a client could never page past them."""
    data = encode(reply)
    if len(data) <= room or not isinstance(reply, Page):
        return data
    sizes = [len(encode(item)) + 1 for item in reply.items]  # each with a comma
    budget = room - (len(data) - sum(sizes)) - page_cursor_chars_max
    count = sum(1 for used in itertools.accumulate(sizes) if used <= budget)
    assert count > 0, "one item alone is larger than the server's max payload"
    data = encode(reply.cut(count))
    assert len(data) <= room
    return data


class Service:
    """One running instance of a named service: its endpoints plus the nine discovery subjects."""

    def __init__(
        self,
        nc: MeshClient,
        name: str,
        version: str,
        description: str = "",
        metadata: dict[str, str] | None = None,
    ) -> None:
        self.nc = nc
        self.name = name
        self.version = version
        self.description = description
        self.metadata = metadata or {}
        self.id = NUID().next().decode()
        self.endpoints: list[Endpoint] = []
        self.started = ""
        self._database_lost_logged = -math.inf

    def add_endpoint(
        self,
        subject: str,
        handler: Handler,
        *deps: Any,
        name: str | None = None,
        request_type: type | None = None,
        decode: Callable[[bytes], Any] | None = None,
        concurrency_max: int = concurrency_max_default,
        pending_msgs_max: int = pending_msgs_max_default,
        metadata: dict[str, str] | None = None,
    ) -> None:
        """Serve `handler(request, *deps)` on `subject`; the request is decoded strictly first
        (`decode`: a quicker equivalent of msgspec's decoder of the request type)."""
        assert concurrency_max >= 1
        assert pending_msgs_max >= concurrency_max
        assert not self.started, "endpoints are added before the service starts"
        endpoint_name = name or subject.removeprefix(f"{self.name}.").replace(".", "_")
        self.endpoints.append(
            Endpoint(
                name=endpoint_name,
                subject=subject,
                handler=handler,
                deps=deps,
                request_type=request_type or request_type_of(handler),
                decode=decode,
                queue_group=QUEUE_GROUP,
                concurrency_max=concurrency_max,
                pending_msgs_max=pending_msgs_max,
                metadata=metadata or {},
            )
        )

    def add_batch_endpoint(
        self,
        subject: str,
        handler: BatchHandler,
        *deps: Any,
        request_type: type,
        batch_max: int,
        decode: Callable[[bytes], Any] | None = None,
        batches_in_flight: int = 2,
        pending_msgs_max: int = pending_msgs_max_default,
    ) -> None:
        """Serve `handler(requests, *deps)` on `subject` with whatever requests are queued, up to
        `batch_max` at a time and `batches_in_flight` batches at once: for handlers that batch
        anyway (the ledger's group commit), a task, a future and two event-loop turns per
        request saved."""
        assert batch_max >= 1
        self.add_endpoint(
            subject,
            handler,
            *deps,
            request_type=request_type,
            decode=decode,
            concurrency_max=batches_in_flight,
            pending_msgs_max=pending_msgs_max,
        )
        self.endpoints[-1].batch_max = batch_max

    @contextlib.asynccontextmanager
    async def serving(self) -> AsyncIterator[Service]:
        """Serve inside the block; on leaving it, drain: take no new requests, finish those in flight."""
        async with asyncio.TaskGroup() as group:
            discovery_subs = [
                await self.nc.subscribe(subject, cb=self._on_discovery)
                for subject in discovery.subjects(self.name, self.id)
            ]
            workers: list[asyncio.Task] = []
            for endpoint in self.endpoints:
                endpoint.subscription = await self.nc.subscribe(
                    endpoint.subject,
                    queue=endpoint.queue_group,
                    pending_msgs_limit=endpoint.pending_msgs_max,
                    pending_bytes_limit=pending_bytes_max_default,
                )
                work = self._work_batches if endpoint.batch_max else self._work
                workers += [
                    group.create_task(work(endpoint, endpoint.subscription)) for _ in range(endpoint.concurrency_max)
                ]
            subjects = [sub.subject for sub in discovery_subs] + [endpoint.subject for endpoint in self.endpoints]
            await require_subscriptions(self.nc, subjects)
            self.started = timestamp()
            try:
                yield self
            finally:
                await self._drain(discovery_subs)
                for worker in workers:
                    worker.cancel()
        # leaving the TaskGroup waited for every worker

    async def _drain(self, discovery_subs: list[Subscription]) -> None:
        """Unsubscribe, then wait until every message already received has been answered."""
        if not self.nc.is_connected:
            return  # nothing can be unsubscribed or answered; requests in flight end with the process
        subs = [endpoint.subscription for endpoint in self.endpoints if endpoint.subscription]
        try:
            async with asyncio.timeout(drain_timeout_s):
                await asyncio.gather(*(sub.drain() for sub in subs + discovery_subs))
        except TimeoutError:
            log.error("drain did not finish within %s s; abandoning requests in flight", drain_timeout_s)

    async def _work(self, endpoint: Endpoint, subscription: Subscription) -> None:
        """One of `concurrency_max` workers taking requests off the subscription's bounded queue.

        nats-py keeps a subscription without callback in `_pending_queue` (maxsize = the pending
        limit) and `drain()` joins it, so `task_done()` after the reply is what makes drain wait
        for requests in flight. A task per message plus a semaphore cost ~10% more here.
        """
        queue = subscription._pending_queue
        while True:
            msg = await queue.get()
            subscription._pending_size -= len(msg.data)
            try:
                await self._handle(endpoint, msg)
            finally:
                queue.task_done()

    async def _work_batches(self, endpoint: Endpoint, subscription: Subscription) -> None:
        """Like `_work`, taking every message queued (up to `batch_max`) as one batch."""
        queue = subscription._pending_queue
        while True:
            msgs = [await queue.get()]
            while len(msgs) < endpoint.batch_max and not queue.empty():
                msgs.append(queue.get_nowait())
            subscription._pending_size -= sum(len(msg.data) for msg in msgs)
            try:
                await self._handle_batch(endpoint, msgs)
            finally:
                for _ in msgs:
                    queue.task_done()

    async def _handle_batch(self, endpoint: Endpoint, msgs: list[Msg]) -> None:
        started = perf_counter_ns()
        requests: list[Any] = []
        decoded: list[Msg] = []
        frames: list[Frame] = []
        for msg in msgs:
            try:
                requests.append(endpoint.decode(msg.data))
                decoded.append(msg)
            except msgspec.DecodeError as exc:
                frames.append(self._error_frame(endpoint, msg, bad_request_from(exc, msg.data)))
        replies: list[Any] = []
        try:
            if requests:
                replies = await endpoint.handler(requests, *endpoint.deps)
                assert len(replies) == len(requests), f"{endpoint.subject}: {len(replies)} replies"
        except ServiceError as exc:
            replies = [exc] * len(requests)
        except Exception as exc:
            replies = [self._unexpected(endpoint, exc)] * len(requests)
        frames += [
            self._error_frame(endpoint, msg, reply)
            if isinstance(reply, ServiceError)
            else Frame(msg.reply, "", encode(reply))
            for msg, reply in zip(decoded, replies, strict=True)
        ]
        await publish_all(self.nc, (frame for frame in frames if frame.subject))  # one write for the whole batch
        counters = endpoint.counters
        counters.num_requests += len(msgs)
        counters.processing_time_ns += (perf_counter_ns() - started) * len(msgs)  # each waited the whole batch

    async def _handle(self, endpoint: Endpoint, msg: Msg) -> None:
        started = perf_counter_ns()
        try:
            try:
                request = endpoint.decode(msg.data)
            except msgspec.DecodeError as exc:
                raise bad_request_from(exc, msg.data) from None
            reply = await endpoint.handler(request, *endpoint.deps)
            if msg.reply:
                await self.nc.publish(msg.reply, fitted(reply, self.nc.max_payload))
        except ServiceError as exc:
            await self._reply_error(endpoint, msg, exc)
        except Exception as exc:
            await self._reply_error(endpoint, msg, self._unexpected(endpoint, exc))
        finally:
            counters = endpoint.counters
            counters.num_requests += 1
            counters.processing_time_ns += perf_counter_ns() - started

    def _unexpected(self, endpoint: Endpoint, exc: Exception) -> ServiceError:
        """The answer to an exception no handler expected. A database lost (or given up on by a
        timeout) before anything was recorded is a 503, said in the log once per
        `database_lost_log_interval_s` (at c512 it fails thousands of requests a second);
        anything else is a 500, its traceback logged."""
        if nothing_recorded(exc):
            now = time.monotonic()
            if now - self._database_lost_logged > database_lost_log_interval_s:
                self._database_lost_logged = now
                log.warning(
                    "database unreachable, too slow or refusing; answering 503 until it answers",
                    extra={"service": self.name, "endpoint": endpoint.subject, "reason": repr(exc)},
                )
            return Unavailable("the database is unavailable; nothing was recorded")
        log.error("endpoint %s failed", endpoint.subject, exc_info=exc, extra={"service": self.name})
        return Internal(INTERNAL_MESSAGE)

    async def _reply_error(self, endpoint: Endpoint, msg: Msg, error: ServiceError) -> None:
        frame = self._error_frame(endpoint, msg, error)
        if frame.subject:
            await publish_all(self.nc, [frame])

    def _error_frame(self, endpoint: Endpoint, msg: Msg, error: ServiceError) -> Frame:
        """Counts the error; the reply to send (no subject when the request asked for none)."""
        counters = endpoint.counters
        counters.num_errors += 1
        counters.last_error = f"{error.code}:{error.message}"
        headers = header_block({ERROR_HEADER: error.message, ERROR_CODE_HEADER: str(error.code)})
        return Frame(msg.reply, "", encode(ErrorReply(error.body())), headers)

    async def _on_discovery(self, msg: Msg) -> None:
        verb = msg.subject.split(".")[1]
        common = (self.name, self.id, self.version, self.metadata)
        reply: msgspec.Struct
        if verb == "PING":
            reply = discovery.Ping(discovery.PING_TYPE, *common)
        elif verb == "INFO":
            endpoints = [endpoint.info() for endpoint in self.endpoints]
            reply = discovery.Info(discovery.INFO_TYPE, *common, self.description, endpoints)
        else:
            endpoints_stats = [endpoint.stats(self.nc) for endpoint in self.endpoints]
            reply = discovery.Stats(discovery.STATS_TYPE, *common, self.started, endpoints_stats)
        await msg.respond(encode(reply))
