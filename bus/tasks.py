"""Task-level supervision inside a service process, the in-process half of the OTP tree.

A background task (outbox relay, batch loader, ledger writer) that crashes is logged and
started again, so one bad moment does not take the process's endpoints down with it. Past
`restarts_max` crashes in `restart_period_s` the crash propagates: the process exits, and
the OS-level supervisor restarts it from durable state.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any

log = logging.getLogger("bitnexus.tasks")

restarts_max_default = 3
restart_period_s_default = 5.0
recancel_interval_s = 1.0


async def supervised(
    name: str,
    run: Callable[[], Awaitable[None]],
    restarts_max: int = restarts_max_default,
    restart_period_s: float = restart_period_s_default,
) -> None:
    assert restarts_max >= 0 and restart_period_s > 0
    crashes: deque[float] = deque()
    while True:
        try:
            await run()
            return
        except Exception as exc:
            if (task := asyncio.current_task()) is not None and task.cancelling():
                # Being stopped: a TaskGroup inside `run` turns our cancellation into its children's
                # errors (say, "the group commit stopped" under the ingest consumer's handlers).
                # Restarted, the task would run on and its owner would wait for it forever.
                log.warning("task failed while stopping", extra={"task": name, "reason": repr(exc)})
                raise asyncio.CancelledError from exc
            now = time.monotonic()
            crashes.append(now)
            while now - crashes[0] > restart_period_s:
                crashes.popleft()
            if len(crashes) > restarts_max:
                log.error("task crashed too often; giving up", extra={"task": name, "reason": repr(exc)})
                raise
            log.exception("task crashed; restarting", extra={"task": name, "restarts": len(crashes)})


async def stop(task: asyncio.Task[Any], name: str) -> None:
    """Cancel `task` and wait until it has ended, cancelling it again each `recancel_interval_s`.

    One `cancel()` can be lost: on Python 3.11 `asyncio.wait_for` returns the awaited result
    instead of raising when the cancellation lands just after that result arrived. nats-py's
    `next_msg` (under a pull subscription's `fetch`) waits that way, and a loop around it then ran
    on while its owner waited for it forever (the ingest consumer, when stopped before the
    group commit: a test fixture's teardown hung). A lost cancellation is logged, then asked again.
    """
    task.cancel()
    while not (await asyncio.wait([task], timeout=recancel_interval_s))[0]:
        log.warning("task still running after cancel; cancelling again", extra={"task": name})
        task.cancel()
