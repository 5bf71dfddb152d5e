"""The life of one service process: connect, serve, say ready, drain on SIGTERM, close."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager

from nats.aio.client import Client

from bus.connection import Settings, connect

log = logging.getLogger("bitnexus.runner")

Serving = Callable[[Client], AbstractAsyncContextManager[object]]
READY_FD_ENV = "BITNEXUS_READY_FD"


def notify_ready() -> None:
    """Tell the supervisor this process serves: one line on the pipe it passed us, then close it."""
    fd = os.environ.pop(READY_FD_ENV, None)
    if fd is not None:
        with contextlib.suppress(OSError):
            os.write(int(fd), b"ready\n")
            os.close(int(fd))


async def serve_until_stopped(name: str, serving: Serving) -> None:
    """Serve until SIGTERM or SIGINT; leaving `serving` drains the work in flight."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    nc = await connect(Settings.from_env(), name=name)
    try:
        async with serving(nc):
            notify_ready()
            log.info("serving")
            await stop.wait()
            log.info("draining")
    finally:
        await nc.drain()
    log.info("stopped")
