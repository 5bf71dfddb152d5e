"""Alembic environment: async engines for SQLite and Postgres; one history, a branch per service."""

from __future__ import annotations

import asyncio

from alembic import context
from sqlalchemy.engine import Connection
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import create_async_engine

from migrations import DatabaseUnreachable, target_metadata


def run_with(connection: Connection) -> None:
    context.configure(connection=connection, target_metadata=target_metadata(), render_as_batch=True)
    with context.begin_transaction():
        context.run_migrations()


async def run_online() -> None:
    engine = create_async_engine(context.config.get_main_option("sqlalchemy.url"))
    try:
        connection = await engine.connect()
    except (OSError, DBAPIError) as exc:  # down, refused, no such database, login refused, no file
        await engine.dispose()
        raise DatabaseUnreachable(engine.url, exc) from exc
    try:
        await connection.run_sync(run_with)
        await connection.commit()
    finally:
        await connection.close()
        await engine.dispose()


asyncio.run(run_online())
