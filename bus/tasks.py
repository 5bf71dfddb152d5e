"""Task-level supervision inside a service process, the in-process half of the OTP tree.

A background task (outbox relay, batch loader, ledger writer) that crashes is logged and
started again, so one bad moment does not take the process's endpoints down with it. Past
`restarts_max` crashes in `restart_period_s` the crash propagates: the process exits, and
the OS-level supervisor restarts it from durable state.

A database that went away (a restart, a failover) or did not answer in time is waited out
instead, up to `outage_max_s`, starting the task again after a growing pause: restarted at
once, every task crashed three times in the second a Postgres restart took, every process
exited, and the supervisor gave the whole mesh up. Such failures do not count against the
intensity.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any

from schemas.database import database_did_not_answer

log = logging.getLogger("bitnexus.tasks")

restarts_max_default = 3
restart_period_s_default = 5.0
recancel_interval_s = 1.0
outage_max_s = 60.0
"""How long a task waits for its database to come back before it crashes after all."""
outage_pause_first_s = 0.1
outage_pause_max_s = 2.0
outage_over_s = 15.0
"""A failure this long after the last one starts a new outage: the task ran in between, so the
database was back. Within one outage failures come at most a pause (`outage_pause_max_s`) and a
connect (`postgres_connect_timeout_s`, 5 s) apart, so a dead server's failures stay one outage,
bounded. (At 120 s, three 8 s Postgres stops 12 s apart added up to one outage past
`outage_max_s`: every relay gave up, and two services restarted.)"""


async def supervised(
    name: str,
    run: Callable[[], Awaitable[None]],
    restarts_max: int = restarts_max_default,
    restart_period_s: float = restart_period_s_default,
) -> None:
    assert restarts_max >= 0 and restart_period_s > 0
    crashes: deque[float] = deque()
    outage_started = outage_failed = -math.inf  # no outage yet
    pause_s = outage_pause_first_s
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
            if database_did_not_answer(exc):
                if now - outage_failed > outage_over_s:
                    outage_started, pause_s = now, outage_pause_first_s
                    log.warning(
                        "database unreachable, too slow or refusing; waiting for it",
                        extra={"task": name, "reason": repr(exc)},
                    )
                outage_failed = now
                if now - outage_started <= outage_max_s:
                    await asyncio.sleep(pause_s)
                    pause_s = min(2 * pause_s, outage_pause_max_s)
                    continue
                log.error(
                    "database unreachable, too slow or refusing for too long; giving up",
                    extra={"task": name, "reason": repr(exc)},
                )
                raise
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
