"""Alembic environment: async engines for SQLite and Postgres; one history, a branch per service."""

from __future__ import annotations

import asyncio

from alembic import context
from sqlalchemy.engine import Connection

from migrations import connected, target_metadata
from schemas.database import migration_settings

MIGRATIONS_LOCK_KEY = 0x4D494752  # "MIGR": a Postgres advisory lock, held until the migrations commit


def run_with(connection: Connection) -> None:
    """The migrations in one transaction, one migrator at a time. Two meshes started at once on
    one new Postgres database each created `alembic_version`, and one failed with a traceback
    (session 23); three `bitnexus migrate` at once on new SQLite files, two (session 24). Now the
    later ones wait (up to the migration's lock wait), then find nothing to do. The transaction
    begins here, under the lock, so alembic keeps it instead of committing each revision on its
    own (as it does on SQLite, whose DDL it takes as not transactional)."""
    if connection.dialect.name == "postgresql":
        for setting in migration_settings():  # the transaction begins with these
            connection.exec_driver_sql(setting)
        connection.exec_driver_sql(f"SELECT pg_advisory_xact_lock({MIGRATIONS_LOCK_KEY})")
    else:
        connection.begin()  # BEGIN IMMEDIATE: the file's write lock (`schemas.database.create_engine`)
    context.configure(connection=connection, target_metadata=target_metadata(), render_as_batch=True)
    with context.begin_transaction():
        context.run_migrations()


async def run_online() -> None:
    async with connected(context.config.get_main_option("sqlalchemy.url"), migrating=True) as connection:
        await connection.run_sync(run_with)
        await connection.commit()


asyncio.run(run_online())
