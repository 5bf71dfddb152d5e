"""Time from SIGKILL of a replica to its service answering again through the new process.

    python -m bench.restart [--kills 20] [--service accounts]

Starts `bitnexus up` (own nats-server, SQLite in a temporary directory) with one replica of
the service, then 20 times: SIGKILL the replica, and request `$SRV.PING.<service>` every
millisecond until a reply carries a new pid in its metadata; then one real request.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import nats

from bus.embedded import EmbeddedNats, free_port

FIRST_REQUEST = {"accounts": "accounts.users.list", "products": "products.products.list", "ledger": "ledger.verify"}


async def measure(url: str, service: str, kills: int) -> list[float]:
    nc = await nats.connect(url)
    timings = []
    for _ in range(kills):
        old_pid = await current_pid(nc, service)
        os.kill(old_pid, signal.SIGKILL)
        killed_at = time.perf_counter()
        while True:
            try:
                reply = await nc.request(f"$SRV.PING.{service}", b"", timeout=0.05)
                if json.loads(reply.data)["metadata"]["pid"] != str(old_pid):
                    break
            except Exception:  # nobody answering yet
                await asyncio.sleep(0.001)
        answered = await nc.request(FIRST_REQUEST[service], b"{}", timeout=2)
        timings.append(time.perf_counter() - killed_at)
        assert not answered.headers, answered.data
        await asyncio.sleep(6)  # stay inside the restart intensity of deploy/mesh.toml's defaults
    await nc.close()
    return timings


async def current_pid(nc, service: str) -> int:
    for _ in range(500):
        try:
            reply = await nc.request(f"$SRV.PING.{service}", b"", timeout=0.2)
            return int(json.loads(reply.data)["metadata"]["pid"])
        except Exception:
            await asyncio.sleep(0.02)
    raise TimeoutError(service)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--kills", type=int, default=20)
    parser.add_argument("--service", default="accounts", choices=sorted(FIRST_REQUEST))
    options = parser.parse_args()
    with tempfile.TemporaryDirectory() as data_dir:
        server = EmbeddedNats(data_dir=Path(data_dir) / "nats", port=free_port())
        url = server.start()
        config = Path(data_dir) / "mesh.toml"
        config.write_text(
            f"[supervisor]\nrestarts_max = 1\nrestart_period_s = 5\n\n"
            f'[[supervisor.children]]\nname = "{options.service}"\n'
        )
        env = {**os.environ, "NATS_URL": url, "BITNEXUS_DATA_DIR": data_dir, "BITNEXUS_LOG_LEVEL": "WARNING"}
        up = subprocess.Popen([sys.executable, "-m", "supervisor", "up", "--config", str(config)], env=env)
        try:
            timings = asyncio.run(measure(url, options.service, options.kills))
        finally:
            up.send_signal(signal.SIGTERM)
            up.wait(30)
            server.stop()
    ms = sorted(1000 * t for t in timings)
    print(
        f"{options.service}: {len(ms)} kills, SIGKILL to first answer from the new process: "
        f"median {statistics.median(ms):.0f} ms, min {ms[0]:.0f} ms, max {ms[-1]:.0f} ms"
    )


if __name__ == "__main__":
    main()
