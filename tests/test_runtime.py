"""How a database-backed service stops (its background jobs in reverse start order, then its outbox),
how its outbox relay wakes, and what a served process leaves to the collector."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import signal
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any

import pytest
from nats.aio.client import Client

from bus.events import relay_forever, relay_poll_interval_s, write_event
from bus.runner import serve_until_stopped
from bus.service import Service
from handlers.runtime import Repo, serving_with_outbox
from schemas.accounts import accounts_outbox
from tests.conftest import Mesh, fresh_streams


async def test_jobs_stop_in_reverse_start_order_and_what_they_commit_meanwhile_is_published(
    nc: Client, database: str
) -> None:
    """Each job, as it stops, commits an event through the group commit (the service's first
    job): it can only if the jobs started after it, which may depend on it, stop before it.
    The outbox is published once more after the last job stopped."""
    mesh = Mesh(nc)
    await fresh_streams(mesh)
    stopped: list[str] = []

    def job(repo: Repo, name: str) -> Callable[[], Coroutine[Any, Any, None]]:
        async def run() -> None:
            try:
                await asyncio.sleep(3600)
            finally:
                await repo.commits.run(
                    lambda conn: write_event(conn, accounts_outbox, "test", "test.job.stopped", {"job": name})
                )
                stopped.append(name)

        run.__qualname__ = name
        return run

    def add_endpoints(service: Service, repo: Repo) -> None:
        repo.background.extend([job(repo, "first"), job(repo, "second"), job(repo, "third")])

    async with asyncio.timeout(20):  # stopped all at once, a job's last commit waited forever
        async with serving_with_outbox(nc, "accounts", "stop order", accounts_outbox, add_endpoints):
            await asyncio.sleep(0.05)
    assert stopped == ["third", "second", "first"]
    assert [envelope["data"]["job"] for _, _, envelope in await mesh.events(3)] == ["third", "second", "first"]


async def test_a_wake_while_the_relay_publishes_is_published_next_not_at_the_next_poll() -> None:
    """A commit that wakes the relay while it publishes (after what it publishes was read) must
    not wait for the poll interval: its event would lag by up to that. Fails if the wake is
    cleared after publishing."""
    wake = asyncio.Event()
    loop = asyncio.get_running_loop()
    calls: list[float] = []

    async def publish_pending() -> None:
        calls.append(loop.time())
        if len(calls) == 1:
            wake.set()  # a commit lands while the first publish runs
            await asyncio.sleep(0)

    async with asyncio.TaskGroup() as group:
        relay = group.create_task(relay_forever(publish_pending, wake))
        try:
            async with asyncio.timeout(relay_poll_interval_s / 2):
                while len(calls) < 2:
                    await asyncio.sleep(0.005)
        finally:
            relay.cancel()


async def test_a_served_process_leaves_its_start_up_objects_out_of_later_collections(
    nats_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """By the time it says ready, what start-up made is frozen: a full collection no longer
    scans it (in the ledger it made every such pause 4-6 times longer)."""
    monkeypatch.setenv("NATS_URL", nats_url)
    assert gc.get_freeze_count() == 0

    @contextlib.asynccontextmanager
    async def serving(nc: Client) -> AsyncIterator[None]:
        yield

    read_end, write_end = os.pipe()
    served = asyncio.create_task(serve_until_stopped("runner-test", serving, write_end))
    try:
        ready = await asyncio.wait_for(asyncio.to_thread(os.read, read_end, 64), timeout=10)
        assert ready == b"ready\n"
        assert gc.get_freeze_count() > 0
        os.kill(os.getpid(), signal.SIGTERM)  # the runner's handler stops it
        await asyncio.wait_for(served, timeout=10)
    finally:
        served.cancel()  # when an assertion failed before the stop: no runner left behind
        with contextlib.suppress(asyncio.CancelledError):
            await served
        gc.unfreeze()
        os.close(read_end)
