"""Service-to-service requests with an explicit timeout; no answer in time is the contract's 503."""

from __future__ import annotations

from typing import Any, TypeVar

from nats.aio.client import Client
from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeout

from bus.codec import decoder, encode
from bus.errors import ErrorReply, RemoteError, Unavailable
from bus.service import ERROR_CODE_HEADER

T = TypeVar("T")

request_timeout_s_default = 2.0


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
        msg = await nc.request(subject, encode(request), timeout=timeout_s)
    except NoRespondersError:
        raise Unavailable(f"{subject}: no service is answering") from None
    except NatsTimeout:
        raise Unavailable(f"{subject}: no answer within {timeout_s:g} s") from None
    if msg.headers and ERROR_CODE_HEADER in msg.headers:
        raise RemoteError(decoder(ErrorReply).decode(msg.data).error)
    return decoder(reply_type).decode(msg.data)
