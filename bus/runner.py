"""The life of one service process: connect, serve, say ready, drain on SIGTERM, close."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import signal
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager

from nats.aio.client import Client

from bus.connection import Settings, connect, subscription_refused

log = logging.getLogger("bitnexus.runner")

Serving = Callable[[Client], AbstractAsyncContextManager[object]]
READY_FD_ENV = "BITNEXUS_READY_FD"
GC_THRESHOLDS = (50_000, 20, 100)
"""Python's default (700, 10, 10) runs a collection every 700 allocations, and a full one
scanning every cached balance and recent entry every 70 of those: at c512 the ledger's p99
was 90 ms with the defaults and 67 ms with these (13.4k transfers/s instead of 12.2k).
Nothing here relies on cycles being freed quickly."""


def freeze_start_up_objects() -> None:
    """Leave what start-up made (modules, classes, the connection, the service) out of every
    later collection: a full one in the ledger at c512 took 47-82 ms scanning it, 13 ms without
    (bench/RESULTS.md, session 14), and each is a stall every request in flight waits through."""
    gc.freeze()


def notify_ready(fd: int | None) -> None:
    """Tell the supervisor this process serves: one line on the pipe it passed us, then close it."""
    if fd is not None:
        with contextlib.suppress(OSError):
            os.write(fd, b"ready\n")
            os.close(fd)


def ready_fd_from_env() -> int | None:
    fd = os.environ.pop(READY_FD_ENV, None)
    return int(fd) if fd is not None else None


async def serve_until_stopped(
    name: str, serving: Serving, ready_fd: int | None = None, service: str | None = None
) -> None:
    """Serve until SIGTERM or SIGINT; leaving `serving` drains the work in flight.

    A subscription the server refuses, at any time, stops the process too, and it ends with
    `SubscriptionRefused`: a service deaf to some of its subjects (say, after a reload of the
    server's permissions) is ended and restarted by its supervisor, not left running.
    `service` names the NATS credentials to use (`Settings.from_env`)."""
    gc.set_threshold(*GC_THRESHOLDS)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    nc = await connect(Settings.from_env(service=service), name=name, on_subscription_refused=stop.set)
    try:
        async with serving(nc):
            freeze_start_up_objects()
            notify_ready(ready_fd)
            log.info("serving")
            await stop.wait()
            log.info("draining")
    finally:
        if nc.is_connected:
            await nc.drain()  # flushes our last replies and publishes
        else:
            await nc.close()  # NATS is gone (say, it died with the supervisor): nothing to flush to
    if nc.refused:
        raise subscription_refused(nc, sorted(nc.refused))
    log.info("stopped")
