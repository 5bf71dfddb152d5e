"""Alembic environment: async engines for SQLite and Postgres; one history, a branch per service."""

from __future__ import annotations

import asyncio

from alembic import context
from sqlalchemy.engine import Connection

from migrations import connected, target_metadata

MIGRATIONS_LOCK_KEY = 0x4D494752  # "MIGR": a Postgres advisory lock, held until the migrations commit


def run_with(connection: Connection) -> None:
    """The migrations in one transaction; on Postgres one migrator at a time. Two meshes started
    at once on one new database each created `alembic_version`, and one failed with a traceback
    (session 23); now the second waits (up to the migration's lock wait), then finds nothing to do."""
    if connection.dialect.name == "postgresql":
        # the transaction begins here; alembic's `begin_transaction` below keeps it
        connection.exec_driver_sql(f"SELECT pg_advisory_xact_lock({MIGRATIONS_LOCK_KEY})")
    context.configure(connection=connection, target_metadata=target_metadata(), render_as_batch=True)
    with context.begin_transaction():
        context.run_migrations()


async def run_online() -> None:
    async with connected(context.config.get_main_option("sqlalchemy.url"), migrating=True) as connection:
        await connection.run_sync(run_with)
        await connection.commit()


asyncio.run(run_online())
