"""How a database-backed service stops (its background jobs in reverse start order, then its outbox),
how its outbox relay wakes, and what a served process leaves to the collector."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import signal
from collections.abc import AsyncIterator, Callable, Coroutine
from pathlib import Path
from typing import Any

import msgspec
import nats
import pytest
from nats.aio.client import Client

from bus.connection import SubscriptionRefused
from bus.embedded import EmbeddedNats, free_port
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
        relay = group.create_task(relay_forever(publish_pending, wake, make_stream=lambda: asyncio.sleep(0)))
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


class Ping(msgspec.Struct, frozen=True):
    n: int


async def pong(request: Ping) -> Ping:
    return request


PERMISSIONS = """authorization {{ users = [ {{ user: svc, password: pw,
  permissions: {{ subscribe: {{ allow: [{allowed}] }} }} }} ] }}
"""


async def test_a_served_process_whose_subscription_the_server_takes_away_stops_and_says_why(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An operator reloads the server with permissions that no longer let the service read its
    subject: the server drops the subscription and says so. The process must end, with the
    reason, for its supervisor to see; before, it ran on, said to serve, and answered nothing."""
    config = tmp_path / "nats-server.conf"
    config.write_text(PERMISSIONS.format(allowed='"probe.>", "$SRV.>", "_INBOX.>"'))
    server = EmbeddedNats(data_dir=tmp_path / "nats", port=free_port(), config=config)
    server.start()
    monkeypatch.setenv("NATS_URL", server.url)
    monkeypatch.setenv("NATS_USER", "svc")
    monkeypatch.setenv("NATS_PASSWORD", "pw")

    @contextlib.asynccontextmanager
    async def serving(nc: Client) -> AsyncIterator[None]:
        service = Service(nc, "probe", "0.1.0")
        service.add_endpoint("probe.pong", pong)
        async with service.serving():
            yield

    read_end, write_end = os.pipe()
    served = asyncio.create_task(serve_until_stopped("probe", serving, write_end))
    requester = await nats.connect(server.url, user="svc", password="pw")
    try:
        assert await asyncio.wait_for(asyncio.to_thread(os.read, read_end, 64), timeout=10) == b"ready\n"
        assert (await requester.request("probe.pong", b'{"n": 1}', timeout=5)).data == b'{"n":1}'
        config.write_text(PERMISSIONS.format(allowed='"$SRV.>", "_INBOX.>"'))
        server.process.send_signal(signal.SIGHUP)  # nats-server reloads its config
        with pytest.raises(SubscriptionRefused, match=r"user 'svc' subscribe to probe\.pong"):
            await asyncio.wait_for(served, timeout=10)
    finally:
        served.cancel()
        with contextlib.suppress(asyncio.CancelledError, SubscriptionRefused):
            await served
        gc.unfreeze()
        os.close(read_end)
        await requester.close()
        server.stop()
