"""The writers' own connections: SqliteThread and PostgresThread (on this machine's Postgres)."""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy.engine import make_url

from schemas.database import PostgresThread, SqliteThread


async def test_sqlite_thread_runs_every_call_on_one_thread_and_connection(tmp_path: Path) -> None:
    writer = SqliteThread(str(tmp_path / "w.db"))
    try:

        def where(conn: sqlite3.Connection) -> tuple[int, int, str]:
            return threading.get_ident(), id(conn), conn.execute("PRAGMA journal_mode").fetchone()[0]

        first, second = await writer.run(where), await writer.run(where)
        assert first == second and first[0] != threading.get_ident() and first[2] == "wal"
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
