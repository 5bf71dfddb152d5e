"""What every database-backed service process runs: its database, its outbox relay, its endpoints."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from importlib.metadata import version

from nats.aio.client import Client
from sqlalchemy import Table

from bus.events import EVENTS_STREAM, OutboxRelay, ensure_stream
from bus.service import Service
from schemas.database import Database, open_database, service_url


@dataclass(frozen=True)
class Repo:
    """One service's store: its own database (or tables) and the relay that publishes its outbox."""

    db: Database
    relay: OutboxRelay
    nc: Client


@contextlib.asynccontextmanager
async def serving_with_outbox(
    nc: Client, name: str, description: str, outbox: Table, add_endpoints: Callable[[Service, Repo], None]
) -> AsyncIterator[Service]:
    """Serve until the block ends; then drain requests, publish what is left in the outbox, close."""
    db = open_database(service_url(name))
    js = nc.jetstream()
    await ensure_stream(js, EVENTS_STREAM, ["events.>"])
    repo = Repo(db=db, relay=OutboxRelay(js, db, outbox), nc=nc)
    service = Service(nc, name, version("bitnexus-mesh"), description)
    add_endpoints(service, repo)
    try:
        async with asyncio.TaskGroup() as group:
            relay = group.create_task(repo.relay.run(), name=f"{name}-outbox-relay")
            async with service.serving():
                yield service
            await repo.relay.publish_pending()
            relay.cancel()
    finally:
        await db.dispose()
