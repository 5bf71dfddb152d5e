"""JSON on msgspec: strict decoding at the edge, one place that turns a decode failure into a 400."""

from __future__ import annotations

import re
from datetime import UTC, datetime
from functools import cache
from typing import TypeVar

import msgspec

from bus.errors import BadRequest

T = TypeVar("T")

encoder = msgspec.json.Encoder()
encode = encoder.encode

_AT_PATH = re.compile(r" - at `(\$[^`]*)`$")
_NAMED_FIELD = re.compile(r"(?:missing required field|unknown field) `([^`]+)`")
_PATTERN_END_AS_QUOTED = "\\\\Z'"
"""How msgspec quotes a pattern's `\\Z` (its `repr`); the message shows `$` instead, which means
the same to a reader of JSON Schema or JavaScript patterns (see `schemas.common.Currency`)."""


@cache
def decoder(type_: type[T]) -> msgspec.json.Decoder[T]:
    """One strict decoder per type, built once."""
    return msgspec.json.Decoder(type_)


def decode(type_: type[T], data: bytes) -> T:
    """Decode `data` into `type_`, or raise the contract's 400 with `details` naming the field."""
    try:
        return decoder(type_).decode(data)
    except msgspec.DecodeError as exc:
        raise bad_request_from(exc, data) from None


EMPTY_BODY = "the body is empty: send a JSON object ({} when the request has no fields)"
"""`nats req mesh.status ''` is easy to type; msgspec would say "Input data was truncated"."""


def bad_request_from(exc: msgspec.DecodeError, data: bytes) -> BadRequest:
    """msgspec says `... - at `$.a[1]`` for nested errors and names missing/unknown fields in backticks."""
    if not data.strip():
        return BadRequest(EMPTY_BODY, details=["$"])
    text = str(exc)
    where = _AT_PATH.search(text)
    path = where.group(1) if where else "$"
    message = text[: where.start()] if where else text
    named = _NAMED_FIELD.search(message)
    if named:
        path = f"{path}.{named.group(1)}"
    if not isinstance(exc, msgspec.ValidationError):
        message = "body is not valid JSON: " + message
    return BadRequest(message.replace(_PATTERN_END_AS_QUOTED, "$'"), details=[path])


def timestamp(moment: datetime | None = None) -> str:
    """RFC 3339 UTC with microseconds and `Z`, always six digits (msgspec drops `.000000`)."""
    moment = (moment or datetime.now(UTC)).astimezone(UTC)
    return moment.replace(tzinfo=None).isoformat(timespec="microseconds") + "Z"
