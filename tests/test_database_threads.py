"""The writers' own connections: SqliteThread and PostgresThread (on this machine's Postgres)."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy.engine import make_url

from schemas.database import (
    PostgresThread,
    SqliteThread,
    sqlite_insert_rows,
    sqlite_insert_rows_max,
    wal_checkpoint_interval_s,
    wal_pages_max,
)


@pytest.mark.parametrize("count", [0, 1, 7, sqlite_insert_rows_max, 2 * sqlite_insert_rows_max + 3])
def test_sqlite_insert_rows_stores_every_row_once_in_order_and_upserts(count: int) -> None:
    conn = sqlite3.connect(":memory:")
    conn.execute("CREATE TABLE t (k INTEGER PRIMARY KEY, a TEXT, b INTEGER)")
    rows = [(n, f"a{n}", n * 7) for n in range(count)]
    sqlite_insert_rows(conn, "INSERT INTO t (k, a, b)", 3, "", rows)
    assert conn.execute("SELECT k, a, b FROM t ORDER BY rowid").fetchall() == rows
    upsert = "ON CONFLICT (k) DO UPDATE SET b = excluded.b"
    sqlite_insert_rows(conn, "INSERT INTO t (k, a, b)", 3, upsert, [(n, "new", -n) for n in range(count)])
    assert conn.execute("SELECT k, a, b FROM t ORDER BY k").fetchall() == [(n, f"a{n}", -n) for n in range(count)]


async def test_sqlite_thread_runs_every_call_on_one_thread_and_connection(tmp_path: Path) -> None:
    writer = SqliteThread(str(tmp_path / "w.db"))
    try:

        def where(conn: sqlite3.Connection) -> tuple[int, int, str]:
            return threading.get_ident(), id(conn), conn.execute("PRAGMA journal_mode").fetchone()[0]

        first, second = await writer.run(where), await writer.run(where)
        assert first == second and first[0] != threading.get_ident() and first[2] == "wal"
    finally:
        await writer.close()


async def test_sqlite_thread_moves_the_log_into_the_database_in_the_background(tmp_path: Path) -> None:
    """Commits only append to the WAL (SQLite's own checkpoint waits for `wal_pages_max`);
    the checkpointer thread copies them into the database file within its interval."""
    path = tmp_path / "w.db"
    writer = SqliteThread(str(path))
    try:

        def write(conn: sqlite3.Connection) -> int:
            conn.execute("CREATE TABLE t (n INTEGER PRIMARY KEY, pad TEXT)")
            for batch in range(8):
                conn.execute("BEGIN IMMEDIATE")
                conn.executemany("INSERT INTO t VALUES (?, ?)", ((batch * 100 + n, "x" * 4000) for n in range(100)))
                conn.execute("COMMIT")
            return conn.execute("PRAGMA wal_autocheckpoint").fetchone()[0]

        assert await writer.run(write) == wal_pages_max  # 800 pages written stay below it
        await asyncio.sleep(3 * wal_checkpoint_interval_s)
        assert path.stat().st_size > 800 * 4000  # copied into the database file by the checkpointer
    finally:
        await writer.close()


async def test_postgres_thread_drops_a_connection_left_in_a_transaction(postgres_url: str) -> None:
    writer = PostgresThread(make_url(postgres_url))
    try:

        async def fail_inside_a_transaction(conn: Any) -> None:
            await conn.execute("BEGIN")
            await conn.execute("CREATE TEMP TABLE scratch (n int)")
            raise RuntimeError("boom")

        with pytest.raises(RuntimeError):
            await writer.run(fail_inside_a_transaction)

        async def state(conn: Any) -> tuple[bool, int]:
            missing = await conn.fetchval("SELECT to_regclass('pg_temp.scratch') IS NULL")
            return conn.is_in_transaction(), missing

        assert await writer.run(state) == (False, True)  # a new connection: nothing of the old one
    finally:
        await writer.close()
