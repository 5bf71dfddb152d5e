"""bus.jetstream.BatchPublisher: fast ingest vs one ack per message, CPU per message on each side.

    python -m bench.publisher [--messages 200000] [--batch 256] [--rounds 2]

Starts its own nats-server, one stream with `allow_batched`; publishes `--messages` events
of 560 bytes (an envelope's size) with unique `Nats-Msg-Id`s in batches of `--batch`, each
batch awaited as the relays do, the two ways alternately.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import tempfile
import time
from pathlib import Path

import nats

from bench.harness import cpu_seconds
from bus.embedded import EmbeddedNats, free_port
from bus.events import ensure_stream
from bus.jetstream import BatchPublisher, Message

PAYLOAD = b"x" * 560


async def publish(url: str, server_pid: int, stream: str, fast: bool, total: int, batch: int) -> str:
    nc = await nats.connect(url)
    await ensure_stream(nc.jetstream(), stream, [f"{stream}.>"])
    publisher = BatchPublisher(nc)
    publisher.fast_ingest = fast
    client_before, server_before, began = time.process_time(), cpu_seconds([server_pid]), time.perf_counter()
    for start in range(0, total, batch):
        ids = range(start, min(start + batch, total))
        await publisher.publish([Message(f"{stream}.x", PAYLOAD, f"{stream}-{n}") for n in ids])
    seconds = time.perf_counter() - began
    client, server = time.process_time() - client_before, cpu_seconds([server_pid]) - server_before
    stored = (await nc.jetstream().stream_info(stream)).state.messages
    await nc.jetstream().delete_stream(stream)
    await nc.close()
    assert stored == total, (stored, total)
    way = "fast ingest" if fast else "ack per message"
    return f"| {way} | {batch} | {total / seconds:,.0f} | {1e6 * client / total:.1f} | {1e6 * server / total:.1f} |"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--messages", type=int, default=200_000)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=2)
    options = parser.parse_args()
    with tempfile.TemporaryDirectory() as data_dir:
        server = EmbeddedNats(data_dir=Path(data_dir), port=free_port())
        url = server.start()
        assert server.process is not None
        try:
            print(f"{options.messages} messages of {len(PAYLOAD)} bytes per row, cpus {os.cpu_count()}")
            print("| way | batch | msgs/s | publisher CPU µs/msg | nats-server CPU µs/msg |\n|---|---:|---:|---:|---:|")
            for round in range(options.rounds):
                for fast in (True, False):
                    stream = f"BENCH{round}{int(fast)}"
                    print(asyncio.run(publish(url, server.process.pid, stream, fast, options.messages, options.batch)))
        finally:
            server.stop()


if __name__ == "__main__":
    main()
