"""Service-to-service requests with an explicit timeout; no answer in time is the contract's 503."""

from __future__ import annotations

import asyncio
import itertools
import weakref
from typing import Any, TypeVar

from nats.aio.client import Client
from nats.aio.msg import Msg

from bus.codec import decoder, encode
from bus.errors import ErrorReply, RemoteError, Unavailable
from bus.service import ERROR_CODE_HEADER

T = TypeVar("T")

request_timeout_s_default = 2.0
requests_in_flight_max = 65_536
NO_RESPONDERS_STATUS = "503"


class _NoResponders(Exception):
    pass


def no_responders(msg: Msg) -> bool:
    """The server's own answer when nobody is subscribed to the subject (a status, no payload)."""
    return bool(msg.headers) and msg.headers.get("Status") == NO_RESPONDERS_STATUS


class Requests:
    """Request-reply on one wildcard inbox per connection, like nats-py's `request`, without its
    per-request costs: it draws the token from the OS (`secrets.token_hex`) and waits through
    `asyncio.wait_for`; together 9 % of the transactions process's CPU (py-spy). Here the token
    is a counter and the timeout one timer handle."""

    def __init__(self, nc: Client) -> None:
        self.nc = nc
        self.prefix = nc.new_inbox() + "."
        self._tokens = itertools.count()
        self._waiting: dict[str, asyncio.Future[Msg]] = {}
        self.subscribed = asyncio.get_running_loop().create_future()

    async def subscribe(self) -> None:
        try:
            await self.nc.subscribe(self.prefix + "*", cb=self._on_reply)
        except BaseException as exc:
            self.subscribed.set_exception(exc)
            raise
        self.subscribed.set_result(None)

    async def _on_reply(self, msg: Msg) -> None:
        future = self._waiting.get(msg.subject[len(self.prefix) :])
        if future is None or future.done():
            return  # answered after its timeout
        if no_responders(msg):
            future.set_exception(_NoResponders())
        else:
            future.set_result(msg)

    async def request(self, subject: str, payload: bytes, timeout_s: float) -> Msg:
        """The reply; raises TimeoutError after `timeout_s`, `_NoResponders` when nobody listens."""
        assert len(self._waiting) < requests_in_flight_max, "more requests in flight than any caller allows"
        token = str(next(self._tokens))
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Msg] = loop.create_future()
        self._waiting[token] = future
        timer = loop.call_later(timeout_s, _expire, future)
        try:
            await self.nc.publish(subject, payload, reply=self.prefix + token)
            return await future
        finally:
            timer.cancel()
            del self._waiting[token]


def _expire(future: asyncio.Future[Msg]) -> None:
    if not future.done():
        future.set_exception(TimeoutError())


_requests: weakref.WeakKeyDictionary[Client, Requests] = weakref.WeakKeyDictionary()


async def requests_of(nc: Client) -> Requests:
    """The connection's `Requests`, subscribed on first use."""
    requests = _requests.get(nc)
    if requests is None:
        requests = _requests[nc] = Requests(nc)
        try:
            await requests.subscribe()
        except BaseException:
            del _requests[nc]  # the next caller tries again
            raise
    elif not requests.subscribed.done():  # another caller is subscribing it
        await asyncio.shield(requests.subscribed)
    return requests


async def call(
    nc: Client, subject: str, request: Any, reply_type: type[T], timeout_s: float = request_timeout_s_default
) -> T:
    """Request `subject` and decode the reply; an error reply is raised as `RemoteError`.

    `NoRespondersError` (nobody subscribed: safe to retry) and a timeout (the work may or may
    not have been done) both become `Unavailable`; callers that must not repeat work use
    idempotency keys, not this distinction.
    """
    assert timeout_s > 0
    try:
        msg = await (await requests_of(nc)).request(subject, encode(request), timeout_s)
    except _NoResponders:
        raise Unavailable(f"{subject}: no service is answering") from None
    except TimeoutError:
        raise Unavailable(f"{subject}: no answer within {timeout_s:g} s") from None
    if msg.headers and ERROR_CODE_HEADER in msg.headers:
        raise RemoteError(decoder(ErrorReply).decode(msg.data).error)
    return decoder(reply_type).decode(msg.data)
