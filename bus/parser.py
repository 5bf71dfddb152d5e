"""nats-py's protocol parser with a quicker path for what a busy service mostly reads: `MSG`s.

nats-py's `Parser.parse` matches each control line at the start of its buffer, writes the
message's arguments into a dict, flips its state twice and deletes what it read from the
front of the buffer twice per message. `MessageParser` reads each whole `MSG` (control line
and payload) straight from the bytes the socket gave, at an offset, and hands it on as
nats-py would. Anything else (`HMSG`, `PING`, `INFO`, `-ERR`...) and everything after it in
that read goes to nats-py's own parser, as does a payload cut by the end of a read (in
nats-py's state, so a long payload is gathered as nats-py gathers it).

In the ledger at c512 (`py-spy --gil`) parsing took 10.5 % of its busy time, 7.1 % with this;
`timeit` over 32 KiB reads of `ledger.record` requests: 2.46 → 2.29 µs per message, the
client's own handling of each included. Uses nats-py's parser state (pinned below 3);
tests/test_parser.py checks it makes nats-py's calls for any stream, however it is cut.
"""

from __future__ import annotations

import re

from nats.errors import ProtocolError
from nats.protocol.parser import AWAITING_CONTROL_LINE, AWAITING_MSG_PAYLOAD, Parser

_MSG_AT = re.compile(rb"MSG\s+([^\s]+)\s+([^\s]+)\s+(([^\s]+)[^\S\r\n]+)?(\d+)\r\n")
"""nats-py's `MSG_RE` without its `\\A`, so that it matches at an offset."""
CRLF_SIZE = 2


class MessageParser(Parser):
    async def parse(self, data: bytes = b"") -> None:
        if self.state != AWAITING_CONTROL_LINE:
            await super().parse(data)
            return
        if self.buf:  # a control line cut by the end of the last read
            data = bytes(self.buf) + data
            self.buf.clear()
        match = _MSG_AT.match
        process = self.nc._process_msg
        position, size = 0, len(data)
        while position < size:
            msg = match(data, position)
            if msg is None:
                break
            subject, sid_text, _, reply, needed_text = msg.groups()
            try:
                sid, needed = int(sid_text), int(needed_text)
            except ValueError:
                raise ProtocolError("nats: malformed MSG") from None
            start = msg.end()
            end = start + needed
            if end + CRLF_SIZE > size:  # the payload goes on in the next read: nats-py gathers it
                self.msg_arg.update(subject=subject, sid=sid, reply=reply or b"")
                self.needed, self.header_needed = needed, 0
                self.buf.extend(data[start:])
                self.state = AWAITING_MSG_PAYLOAD
                return
            position = end + CRLF_SIZE
            await process(sid, subject, reply or b"", data[start:end], None)
        if position < size:
            await super().parse(data[position:])
