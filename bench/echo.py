"""Framework echo vs raw nats-py echo: same msgspec decode/encode of a ~200-byte body.

    python -m bench.echo [--rounds 3] [--duration 4]

Starts its own nats-server, one responder process per path, and one requester process per
measurement, at concurrency 1, 64 and 512; prints a table with the ratio framework/raw.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Annotated

import msgspec
import nats

from bench.harness import (
    add_requester_option,
    closed_loop,
    median_result,
    raw_echo,
    run_requester,
    table,
    use_requester,
    warmup_s,
)
from bus.connection import Settings, connect
from bus.embedded import EmbeddedNats, free_port
from bus.service import Service


class Order(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    idempotency_key: Annotated[str, msgspec.Meta(max_length=128)]
    from_user_id: Annotated[int, msgspec.Meta(gt=0)]
    to_user_id: Annotated[int, msgspec.Meta(gt=0)]
    amount: Annotated[int, msgspec.Meta(gt=0)]
    currency: Annotated[str, msgspec.Meta(pattern="^[A-Z]{3}$")]
    memo: str


BODY = msgspec.json.encode(
    Order(
        "bench-order-0000000000000001",
        1234567,
        7654321,
        1999,
        "EUR",
        "a memo of about sixty bytes for a realistic body size",
    )
)
assert 180 <= len(BODY) <= 220, len(BODY)
decode_order = msgspec.json.Decoder(Order).decode
encode = msgspec.json.Encoder().encode


async def raw_responder(url: str) -> None:
    nc = await nats.connect(url)

    async def respond(msg) -> None:
        await msg.respond(encode(decode_order(msg.data)))

    await nc.subscribe("bench.raw", queue="q", cb=respond)
    await serve_until_terminated(nc)


async def echo(request: Order) -> Order:
    return request


async def framework_responder(url: str) -> None:
    nc = await connect(Settings(servers=[url]), name="bench-echo")
    service = Service(nc, name="bench", version="0.1.0")
    service.add_endpoint("bench.framework", echo, concurrency_max=1024, pending_msgs_max=65_536)
    async with service.serving():
        await serve_until_terminated(nc)


async def serve_until_terminated(nc) -> None:
    await nc.flush()
    print("ready", flush=True)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    await stop.wait()


def start_responder(kind: str, url: str) -> subprocess.Popen:
    process = subprocess.Popen(
        [sys.executable, "-m", "bench.echo", "responder", kind, url], stdout=subprocess.PIPE, text=True
    )
    assert process.stdout is not None
    assert process.stdout.readline().strip() == "ready"
    return process


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=float, default=4.0)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 64, 512])
    add_requester_option(parser)
    options = parser.parse_args()
    use_requester(options.requester)
    with tempfile.TemporaryDirectory() as data_dir:
        server = EmbeddedNats(data_dir=Path(data_dir), port=free_port())
        url = server.start()
        raw, framework = responders = [start_responder("raw", url), start_responder("framework", url)]
        try:
            rows = []
            for concurrency in options.concurrency:
                raws, frameworks = [], []
                for _ in range(options.rounds):
                    raws.append(raw_echo(url, options.duration, concurrency, raw.pid))
                    frameworks.append(
                        run_requester(
                            "bench.echo",
                            [url, str(options.duration), "bench.framework"],
                            "bus framework",
                            concurrency,
                            [framework.pid],
                        )
                    )
                rows.append((median_result(raws), median_result(raws)))
                rows.append((median_result(raws), median_result(frameworks)))
            print(
                f"nats-server {url}, body {len(BODY)} bytes, median of {options.rounds} rounds "
                f"of {options.duration:g} s, cpus {os.cpu_count()}, requester {options.requester}"
            )
            print(table(rows))
        finally:
            for responder in responders:
                responder.terminate()
                responder.wait()
            server.stop()


if __name__ == "__main__":
    if sys.argv[1:2] == ["responder"]:
        kind, url = sys.argv[2], sys.argv[3]
        asyncio.run(raw_responder(url) if kind == "raw" else framework_responder(url))
    elif sys.argv[1:2] == ["requester"]:
        url, duration, subject, concurrency = sys.argv[2], float(sys.argv[3]), sys.argv[4], int(sys.argv[5])
        result = asyncio.run(closed_loop(url, subject, lambda _: BODY, concurrency, warmup_s, duration))
        print(json.dumps(result))
    else:
        main()
