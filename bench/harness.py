"""Shared pieces of the benchmarks: a closed-loop requester process and the result table."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import functools
import gc
import json
import os
import subprocess
import sys
import time
from array import array
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import nats
import nats.errors
from nats.aio.msg import Msg

from bus.client import Requests

request_timeout_s = 30.0
warmup_s = 1.0
REQUESTER_ENV = "BENCH_REQUESTER"
REQUESTERS = ("nats-py", "mesh")
"""How the requester process asks, read from `BENCH_REQUESTER` (`--requester`): `nats-py`, its
`request` (what a load-test script would use; the default), or `mesh`, `bus.client.Requests`
(how the mesh's services call each other), which costs the requester about half the CPU per
request (bench/RESULTS.md, session 17). The requester shares the two cores with what it
measures, so the choice moves throughput against the ratio: the echo is bound by the
requester's one core, the path by both."""


def add_requester_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--requester", choices=REQUESTERS, default=REQUESTERS[0], help="how requests are sent")


def use_requester(requester: str) -> None:
    """Every requester process started from now on (they inherit the environment) asks this way."""
    os.environ[REQUESTER_ENV] = requester


@dataclass(frozen=True)
class Result:
    label: str
    concurrency: int
    requests: int
    seconds: float
    p50_ms: float
    p99_ms: float
    errors: int
    requester_cpu_s: float = 0.0
    """The requester's own CPU time while measuring (not its start-up)."""
    responder_cpu_us: float = 0.0
    cpu_us: dict[str, float] = dataclasses.field(default_factory=dict)
    """CPU per request of every process on the path (`run_requester`'s `path`), the requester's too."""
    wal_segments_created: int | None = None
    """Postgres only: WAL segments the server had to create during the run (`bench.services`)."""

    @property
    def rate(self) -> float:
        return self.requests / self.seconds


async def closed_loop(
    url: str,
    subject: str,
    make_body: Callable[[int], bytes],
    concurrency: int,
    warmup_s: float,
    duration_s: float,
) -> dict:
    """Keep `concurrency` requests in flight (a worker pool, not gather windows) and time them.

    The requester's own collector pauses are not the responder's latency: what the imports
    allocated is frozen out of its scans, and the latencies are an array, not a list of floats
    (a full collection visited every element; with both, one took 30-40 ms every 2 s at c512).
    """
    nc = await nats.connect(url)
    request: Callable[[bytes], Awaitable[Msg]]  # the call's own coroutine: no wrapper per request
    if os.environ.get(REQUESTER_ENV, REQUESTERS[0]) == "mesh":
        requests = Requests(nc)
        await requests.subscribe()
        request = functools.partial(requests.request, subject, timeout_s=request_timeout_s)
    else:
        request = functools.partial(nc.request, subject, timeout=request_timeout_s)

    gc.freeze()
    latencies = array("d")
    errors = 0
    measuring = False
    stop = False
    counter = 0

    async def worker() -> None:
        nonlocal errors, counter
        while not stop:
            counter += 1
            body = make_body(counter)
            started = time.perf_counter()
            try:
                reply = await request(body)
            except (nats.errors.TimeoutError, TimeoutError):
                errors += measuring
                continue
            if measuring:
                latencies.append(time.perf_counter() - started)
                if reply.headers and "Nats-Service-Error-Code" in reply.headers:
                    errors += 1

    async with asyncio.TaskGroup() as group:
        for _ in range(concurrency):
            group.create_task(worker())
        await asyncio.sleep(warmup_s)
        measuring = True
        began, cpu_began = time.perf_counter(), time.process_time()
        await asyncio.sleep(duration_s)
        measuring = False
        seconds, cpu_seconds = time.perf_counter() - began, time.process_time() - cpu_began
        stop = True
    await nc.close()
    latencies = sorted(latencies)
    return {
        "requests": len(latencies),
        "seconds": seconds,
        "p50_ms": 1000 * latencies[len(latencies) // 2] if latencies else 0.0,
        "p99_ms": 1000 * latencies[int(len(latencies) * 0.99)] if latencies else 0.0,
        "errors": errors,
        "requester_cpu_s": cpu_seconds,
    }


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU time the processes have used so far (Linux /proc); gone ones count 0."""
    ticks = 0
    for pid in pids:
        with contextlib.suppress(FileNotFoundError, ProcessLookupError):
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            ticks += int(fields[11]) + int(fields[12])
    return ticks / os.sysconf("SC_CLK_TCK")


def run_requester(
    module: str,
    args: list[str],
    label: str,
    concurrency: int,
    responder_pids: list[int],
    path: Mapping[str, list[int]] | None = None,
) -> Result:
    """Run `python -m module requester ...` in its own process; it prints one JSON line.

    The responders' CPU time over the run, per request, is the framework's cost with the
    requester's and the server's share taken out: steadier on 2 cores than throughput.
    `path` names the processes a request goes through (nats-server, services, database):
    their CPU per request, and the requester's, go in `cpu_us`. Their sum against the raw
    echo's is the rate ratio the two paths would have if CPU were all that limited them.
    """
    path = path or {}
    cpu_before = cpu_seconds(responder_pids)
    path_before = {name: cpu_seconds(pids) for name, pids in path.items()}
    out = subprocess.run(
        [sys.executable, "-m", module, "requester", *args, str(concurrency)],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    path_used = {name: cpu_seconds(pids) - path_before[name] for name, pids in path.items()}
    cpu_used = cpu_seconds(responder_pids) - cpu_before
    data = json.loads(out.strip().splitlines()[-1])
    result = Result(label=label, concurrency=concurrency, **data)
    total_requests = max(data["requests"] * (1 + warmup_s / data["seconds"]), 1)
    cpu_us = {"requester": 1e6 * data["requester_cpu_s"] / max(data["requests"], 1)} if path else {}
    cpu_us |= {name: 1e6 * seconds / total_requests for name, seconds in path_used.items()}
    return dataclasses.replace(result, responder_cpu_us=1e6 * cpu_used / total_requests, cpu_us=cpu_us)


def raw_echo(url: str, duration_s: float, concurrency: int, responder_pid: int, nats_pid: int = 0) -> Result:
    """The baseline every benchmark reports beside its own figures: bench.echo's raw nats-py responder."""
    path = {"nats-server": [nats_pid], "echo": [responder_pid]} if nats_pid else None
    return run_requester(
        "bench.echo", [url, str(duration_s), "bench.raw"], "raw nats-py", concurrency, [responder_pid], path
    )


def median_result(results: list[Result]) -> Result:
    ordered = sorted(results, key=lambda result: result.rate)
    return ordered[len(ordered) // 2]


def median_pair(pairs: list[tuple[Result, Result]]) -> tuple[Result, Result]:
    """Of (raw echo, measured) pairs taken one after the other, the one with the median ratio.

    On this shared 2-core machine the raw echo of one run swung between 15k and 26k/s within
    minutes: a ratio from one pair says as much about the moment as about the code."""
    ordered = sorted(pairs, key=lambda pair: pair[1].rate / pair[0].rate)
    return ordered[len(ordered) // 2]


def table(rows: list[tuple[Result, Result]]) -> str:
    """One line per (baseline, measured) pair: rates, latencies and the ratio measured/baseline."""
    lines = [
        "| path | c | req/s | p50 ms | p99 ms | errors | responder CPU µs/req | raw echo req/s | ratio |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for raw, measured in rows:
        lines.append(
            f"| {measured.label} | {measured.concurrency} | {measured.rate:,.0f} | {measured.p50_ms:.2f} | "
            f"{measured.p99_ms:.2f} | {measured.errors} | {measured.responder_cpu_us:.1f} | "
            f"{raw.rate:,.0f} | {measured.rate / raw.rate:.2f} |"
        )
    return "\n".join(lines)


def cpu_table(rows: list[tuple[Result, Result]]) -> str:
    """Per (baseline, measured) pair with `cpu_us`: each path's CPU per request by process.

    "echo's requester" is the share of one core the requester used during the raw echo: near
    1.0 the echo measured how fast one Python requester goes, not the bus, and the ratio
    compares the path with the requester's own speed (bench/RESULTS.md, session 9)."""
    lines = [
        "| path | c | CPU µs/request by process | total | raw echo's | echo ÷ total | echo's requester |",
        "|---|---:|---|---:|---:|---:|---:|",
    ]
    for raw, measured in rows:
        if not (raw.cpu_us and measured.cpu_us):
            continue
        parts = ", ".join(f"{name} {us:.1f}" for name, us in measured.cpu_us.items())
        total, echo_total = sum(measured.cpu_us.values()), sum(raw.cpu_us.values())
        requester_core = raw.requester_cpu_s / raw.seconds
        lines.append(
            f"| {measured.label} | {measured.concurrency} | {parts} | {total:.1f} | {echo_total:.1f} | "
            f"{echo_total / total:.2f} | {requester_core:.2f} core |"
        )
    return "\n".join(lines)
