"""`bus.parser.MessageParser` against nats-py's own parser: the same calls for the same bytes,
however the reads cut them."""

from __future__ import annotations

import asyncio
import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from nats.errors import ProtocolError
from nats.protocol.parser import Parser

from bus.parser import MessageParser

tokens = st.text(alphabet="abcxyz._>*-0123456789", min_size=1, max_size=12)
payloads = st.one_of(
    st.binary(max_size=40),
    st.sampled_from([b"", b"\r\n", b"MSG a 1 2\r\nxx\r\n", b"PING\r\n", b"x" * 70_000]),
)


@st.composite
def operations(draw: st.DrawFn) -> bytes:
    kind = draw(st.sampled_from(["msg", "msg", "msg_reply", "hmsg", "ping", "pong", "ok", "info"]))
    if kind in ("msg", "msg_reply"):
        payload = draw(payloads)
        reply = b" " + draw(tokens).encode() if kind == "msg_reply" else b""
        sid = draw(st.integers(1, 99))
        return b"MSG %s %d%s %d\r\n%s\r\n" % (draw(tokens).encode(), sid, reply, len(payload), payload)
    if kind == "hmsg":
        headers, payload = b"NATS/1.0\r\nA: b\r\n\r\n", draw(payloads)
        size = len(headers) + len(payload)
        return b"HMSG %s 3 _INBOX.r %d %d\r\n%s%s\r\n" % (draw(tokens).encode(), len(headers), size, headers, payload)
    return {"ping": b"PING\r\n", "pong": b"PONG\r\n", "ok": b"+OK\r\n", "info": b'INFO {"max_payload": 1048576}\r\n'}[
        kind
    ]


class Recorder:
    """What a parser hands to the client, in order."""

    def __init__(self) -> None:
        self.calls: list[tuple] = []

    async def _process_msg(self, sid: int, subject: bytes, reply: bytes, data: bytes, headers: bytes | None) -> None:
        self.calls.append(("msg", sid, bytes(subject), bytes(reply), bytes(data), headers))

    async def _process_ping(self) -> None:
        self.calls.append(("ping",))

    async def _process_pong(self) -> None:
        self.calls.append(("pong",))

    async def _process_info(self, info: dict) -> None:
        self.calls.append(("info", info))

    async def _process_err(self, message: str) -> None:
        self.calls.append(("err", message))


def calls_of(parser_class: type[Parser], reads: list[bytes]) -> list[tuple]:
    recorder = Recorder()
    parser = parser_class(recorder)

    async def feed() -> None:
        for read in reads:
            await parser.parse(read)

    asyncio.run(feed())
    return recorder.calls


def cut(stream: bytes, at: list[int]) -> list[bytes]:
    edges = [0, *sorted(set(at)), len(stream)]
    return [stream[a:b] for a, b in itertools.pairwise(edges) if b > a]


@settings(max_examples=300, deadline=None)
@given(st.lists(operations(), min_size=1, max_size=12), st.data())
def test_the_same_calls_as_nats_py_however_reads_cut_the_stream(ops: list[bytes], data: st.DataObject) -> None:
    stream = b"".join(ops)
    at = data.draw(st.lists(st.integers(0, len(stream)), max_size=8))
    reads = cut(stream, at)
    expected = calls_of(Parser, reads)
    assert len([call for call in expected if call[0] == "msg"]) == len([op for op in ops if op[:1] in b"MH"])
    assert calls_of(MessageParser, reads) == expected


def test_a_malformed_msg_is_a_protocol_error_as_in_nats_py() -> None:
    for parser_class in (Parser, MessageParser):
        with pytest.raises(ProtocolError):
            calls_of(parser_class, [b"MSG a b 2\r\nxx\r\n"])
