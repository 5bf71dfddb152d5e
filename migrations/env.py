"""Alembic environment: async engines for SQLite and Postgres; one history, a branch per service."""

from __future__ import annotations

import asyncio

from alembic import context
from sqlalchemy.engine import Connection

from migrations import connected, target_metadata


def run_with(connection: Connection) -> None:
    context.configure(connection=connection, target_metadata=target_metadata(), render_as_batch=True)
    with context.begin_transaction():
        context.run_migrations()


async def run_online() -> None:
    async with connected(context.config.get_main_option("sqlalchemy.url"), migrating=True) as connection:
        await connection.run_sync(run_with)
        await connection.commit()


asyncio.run(run_online())
