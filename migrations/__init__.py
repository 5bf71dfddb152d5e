"""`bitnexus migrate`: one alembic history, a branch per service (`accounts@head`, ...).

On SQLite each service has its own file and gets only its own branch; on Postgres all
services share one database and every branch is applied to it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import MetaData
from sqlalchemy.engine import URL, Connection, make_url
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncConnection

import schemas.database
from schemas.database import create_engine, service_url

SERVICES_WITH_TABLES = ("accounts", "products", "ledger", "transactions")


class DatabaseUnreachable(Exception):
    """The database takes no connection: a fault of the setting or the server, not of a migration."""

    def __init__(self, url: URL, cause: BaseException) -> None:
        reason = getattr(cause, "orig", None) or cause  # the driver's words, not SQLAlchemy's wrapping
        super().__init__(f"cannot reach the database at {url.render_as_string(hide_password=True)}: {reason}")


class MigrationLockedOut(Exception):
    """A migration waited `migration_lock_wait_s` for a lock another session holds (another
    migration, a long transaction, `pg_dump`) and gave up. The services' statements queue behind
    a migration that waits for a table's lock, so it waits no longer. Its transaction is rolled
    back: nothing of it applied."""


class NotMigrated(Exception):
    """A service's tables are missing or behind its migrations: `bitnexus migrate` first."""


@contextlib.asynccontextmanager
async def connected(url: URL | str, migrating: bool = False) -> AsyncIterator[AsyncConnection]:
    """A connection to the database at `url` (a migration's, `migrating`: see `connect_postgres`),
    or `DatabaseUnreachable` when it takes none (down, refused, no such database, login refused,
    no file); closed and disposed after."""
    engine = create_engine(make_url(url), migrating)
    try:
        try:
            connection = await engine.connect()
        except (OSError, DBAPIError) as exc:
            raise DatabaseUnreachable(engine.url, exc) from exc
        try:
            yield connection
        finally:
            await connection.close()
    finally:
        await engine.dispose()


def target_metadata() -> MetaData:
    from schemas import accounts, ledger, products, transactions
    from schemas.common import metadata

    tables = (accounts.users, products.products, ledger.ledger_entries, transactions.transactions)
    assert all(table.metadata is metadata for table in tables)
    return metadata


def _config(url: URL) -> Config:
    config = Config()
    config.set_main_option("script_location", str(Path(__file__).parent))
    config.set_main_option("sqlalchemy.url", url.render_as_string(hide_password=False).replace("%", "%%"))
    return config


def _targets(url: str | None) -> list[tuple[URL, str]]:
    """(database, revision spec) pairs: a branch per SQLite file, or every branch on one Postgres."""
    urls = {service: service_url(service, url) for service in SERVICES_WITH_TABLES}
    if all(u.get_backend_name() == "sqlite" for u in urls.values()):
        return [(urls[service], service) for service in SERVICES_WITH_TABLES]
    return [(next(iter(urls.values())), "")]


def upgrade(url: str | None = None) -> None:
    for database, branch in _targets(url):
        with lockout_said(database):
            command.upgrade(_config(database), f"{branch}@head" if branch else "heads")


def downgrade(url: str | None = None) -> None:
    for database, branch in _targets(url):
        with lockout_said(database):
            command.downgrade(_config(database), f"{branch}@base" if branch else "base")


@contextlib.contextmanager
def lockout_said(database: URL) -> Iterator[None]:
    """A migration's lock wait that ran out is `MigrationLockedOut`, said in one line by `bitnexus migrate`."""
    try:
        yield
    except DBAPIError as exc:
        if not schemas.database.lock_wait_ran_out(exc):
            raise
        where = database.render_as_string(hide_password=True)
        raise MigrationLockedOut(
            f"a migration of {where} waited {schemas.database.migration_lock_wait_s:g} s for a lock another session "
            "holds (another migration, a long transaction, a dump) and gave up; nothing of it was applied: "
            "run `bitnexus migrate` again once that session ends"
        ) from exc


async def upgrade_async(url: str | None = None) -> None:
    """Alembic is synchronous and its env runs its own loop: run it in a thread."""
    await asyncio.to_thread(upgrade, url)


def _current_heads(conn: Connection) -> tuple[str, ...]:
    """The revisions the database is at, without alembic's two lines of INFO about its dialect."""
    quiet = logging.getLogger("alembic.runtime.migration")
    level = quiet.level
    quiet.setLevel(logging.WARNING)
    try:
        return MigrationContext.configure(conn).get_current_heads()
    finally:
        quiet.setLevel(level)


def head_of(service: str) -> str:
    """The revision the service's branch of the history ends at."""
    scripts = ScriptDirectory.from_config(_config(make_url("sqlite://")))  # the scripts, for any database
    (head,) = (script.revision for script in scripts.get_revisions(f"{service}@head"))
    return head


async def require_current(service: str, url: str | None = None) -> None:
    """`NotMigrated` unless the service's branch is at its head in its database. `bitnexus up`
    migrates before it starts anything; a replica started on its own (`bitnexus serve`, one per
    container) would otherwise serve, and crash on its first missing table with a traceback."""
    database = service_url(service, url)
    head = head_of(service)
    async with connected(database) as conn:
        current = await conn.run_sync(_current_heads)
    if head not in current:
        where = database.render_as_string(hide_password=True)
        raise NotMigrated(f"the {service} tables at {where} are not migrated to {head}: run `bitnexus migrate` first")
