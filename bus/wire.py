"""Many messages published as one write: the NATS protocol frames built here, handed to nats-py once.

nats-py's `publish` validates, formats and queues one message per call (and builds a header
block from a dict each time): ≈ 9 % of the event relay's busy time at c512, for batches of a
few hundred events (or a ledger batch's replies). `publish_all` keeps nats-py's rules (closed, draining,
payload limit, buffering while reconnecting) and its stats, and uses two of its private
methods, `_send_command` and `_flush_pending`, and its flush queue (nats-py is pinned below 3).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import NamedTuple

from nats import errors
from nats.aio.client import Client


class Frame(NamedTuple):
    subject: str
    reply: str
    payload: bytes
    headers: bytes = b""
    """An encoded header block (`header_block`), or empty for a plain PUB."""


def header_block(headers: Mapping[str, str]) -> bytes:
    """`NATS/1.0` and the headers as they go on the wire; values trimmed, CR and LF made spaces (as
    nats-py). One per published event: written for speed (`str.translate` alone cost 0.8 µs)."""
    block = "NATS/1.0\r\n"
    for key, value in headers.items():
        block += f"{key}: {value.strip().replace(chr(13), ' ').replace(chr(10), ' ')}\r\n"
    return f"{block}\r\n".encode()


def framed(subject: str, reply: str, payload: bytes, headers: bytes = b"") -> bytes:
    """A PUB, or an HPUB with `headers`, as it goes on the wire (a `Frame`'s fields, for callers
    that need not build one: the JetStream publisher frames one per event)."""
    assert subject and " " not in subject and " " not in reply, (subject, reply)
    if headers:
        size = len(headers) + len(payload)
        return b"".join((f"HPUB {subject} {reply} {len(headers)} {size}\r\n".encode(), headers, payload, b"\r\n"))
    return b"PUB %s %s %d\r\n%s\r\n" % (subject.encode(), reply.encode(), len(payload), payload)


async def publish_all(nc: Client, frames: Iterable[Frame]) -> None:
    """Queue every frame in order as one command and flush, as `nc.publish` would one by one."""
    chunks = []
    payload_bytes = 0
    payload_max = nc.max_payload
    for frame in frames:
        if len(frame.payload) > payload_max:
            raise errors.MaxPayloadError
        payload_bytes += len(frame.payload)
        chunks.append(framed(*frame))
    await send_framed(nc, chunks, payload_bytes)


async def send_framed(nc: Client, chunks: list[bytes], payload_bytes: int) -> None:
    """`publish_all` for frames already built by `framed`, each payload checked against
    `nc.max_payload` by the caller."""
    if nc.is_closed:
        raise errors.ConnectionClosedError
    if nc.is_draining_pubs:
        raise errors.ConnectionDrainingError
    if not chunks:
        return
    command = b"".join(chunks)
    if not nc.is_connected and (
        nc._max_pending_size <= 0 or len(command) + nc._pending_data_size > nc._max_pending_size
    ):
        raise errors.OutboundBufferLimitError  # as nats-py: no buffering while reconnecting, or buffer full
    nc.stats["out_msgs"] += len(chunks)
    nc.stats["out_bytes"] += payload_bytes
    await nc._send_command(command)
    if nc._flush_queue is not None and nc._flush_queue.empty():  # as nats-py: one flush request queued at most
        await nc._flush_pending()
