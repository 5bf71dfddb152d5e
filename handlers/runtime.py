"""What every database-backed service process runs: its database, its outbox relay, its endpoints."""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator, Callable, Coroutine
from dataclasses import dataclass, field
from importlib.metadata import version
from typing import Any

from nats.aio.client import Client
from sqlalchemy import Table

from bus.events import OutboxRelay, ensure_events_stream
from bus.jetstream import BatchPublisher
from bus.service import Service
from bus.tasks import stop, supervised
from handlers.group_commit import GroupCommit
from schemas.database import Database, open_database, service_url


@dataclass(frozen=True)
class Repo:
    """One service's store: its own database (or tables) and the relay that publishes its outbox."""

    db: Database
    relay: OutboxRelay
    nc: Client
    commits: GroupCommit
    background: list[Callable[[], Coroutine[Any, Any, None]]] = field(default_factory=list)
    """Jobs that run as long as the service serves (batch loaders, consumers), started in its task
    group in this order and stopped in the reverse: a job may depend on the ones before it."""

    @classmethod
    def of(cls, db: Database, nc: Client, outbox: Table) -> Repo:
        """A service's store as its process builds it, its background jobs not yet added."""
        return cls(db=db, relay=OutboxRelay(BatchPublisher(nc), db, outbox), nc=nc, commits=GroupCommit(db.writer))


def instance_metadata() -> dict[str, str]:
    """ADR-32 metadata of this replica: which OS process and which supervisor child it is."""
    return {"pid": str(os.getpid()), "child": os.environ.get("BITNEXUS_CHILD", "")}


@contextlib.asynccontextmanager
async def serving_with_outbox(
    nc: Client, name: str, description: str, outbox: Table, add_endpoints: Callable[[Service, Repo], None]
) -> AsyncIterator[Service]:
    """Serve until the block ends; then drain requests, publish what is left in the outbox, close."""
    db = open_database(service_url(name))
    js = nc.jetstream()
    await ensure_events_stream(js)
    repo = Repo.of(db, nc, outbox)
    repo.background.append(repo.commits.commit_forever)
    service = Service(nc, name, version("bitnexus-mesh"), description, instance_metadata())
    add_endpoints(service, repo)
    try:
        async with asyncio.TaskGroup() as group:
            relay = group.create_task(supervised(f"{name}.outbox_relay", repo.relay.run))
            jobs = [group.create_task(supervised(f"{name}.{job.__qualname__}", job)) for job in repo.background]
            async with service.serving():
                yield service
            # In reverse start order, as OTP stops children: the ingest consumer before the group
            # commit its handlers wait on, and everything committed before the outbox's last publish.
            for job, run in reversed(list(zip(jobs, repo.background, strict=True))):
                await stop(job, f"{name}.{run.__qualname__}")
            await repo.relay.publish_pending()
            await stop(relay, f"{name}.outbox_relay")
    finally:
        await db.dispose()
