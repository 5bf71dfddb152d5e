"""Group commit with batch operations, on SQLite and on Postgres: the saga's pending rows."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
from sqlalchemy import func, select, text
from sqlalchemy.ext.asyncio import AsyncConnection

from handlers.group_commit import GroupCommit
from handlers.transaction_store import Close, NewTransaction, TransactionSql
from schemas.database import nothing_recorded, open_database, service_url
from schemas.transactions import transactions_outbox


def new(key: str, fingerprint: str = "f") -> NewTransaction:
    return NewTransaction(key, fingerprint, "deposit", "world", "user:1", 5, "EUR")


@pytest.fixture
async def commits(database: str) -> AsyncIterator[tuple[GroupCommit, TransactionSql]]:
    db = open_database(service_url("transactions", database))
    yield GroupCommit(db.writer), TransactionSql(db.is_sqlite)
    await db.dispose()


async def in_one_batch(commits: GroupCommit, calls: list[Callable[[], Awaitable[Any]]]) -> list[Any]:
    """Queue every call before the committer starts, so they share one batch; their outcomes."""
    outcomes = asyncio.gather(*(call() for call in calls), return_exceptions=True)  # awaited below
    await asyncio.sleep(0)  # each call is queued now
    assert commits.queue.qsize() == len(calls)
    async with asyncio.TaskGroup() as group:
        committer = group.create_task(commits.commit_forever())
        results = await outcomes
        committer.cancel()
    return results


async def test_a_batch_inserts_each_key_once_and_answers_every_caller_with_its_row(
    commits: tuple[GroupCommit, TransactionSql],
) -> None:
    group_commit, sql = commits
    calls = [lambda n=n: group_commit.apply(sql.insert_pending, new(f"k{n % 50}", f"f{n}")) for n in range(100)]
    rows = await in_one_batch(group_commit, calls)
    assert len({row.id for row in rows}) == 50
    for n, row in enumerate(rows):
        assert row.idempotency_key == f"k{n % 50}" and row.status == "pending"
        assert row.fingerprint == f"f{n % 50}"  # the first caller with a key inserted it
    assert len({row.inserted_at for row in rows}) == 1  # one statement for the whole batch

    again = await in_one_batch(group_commit, [lambda: group_commit.apply(sql.insert_pending, new("k7", "other"))])
    assert again[0] == rows[7]  # a key already stored: its row, untouched


async def test_a_failing_operation_fails_only_its_caller(commits: tuple[GroupCommit, TransactionSql]) -> None:
    group_commit, sql = commits

    async def boom(_conn: AsyncConnection) -> None:
        raise RuntimeError("boom")

    calls: list[Callable[[], Awaitable[Any]]] = [
        lambda n=n: group_commit.apply(sql.insert_pending, new(f"ok{n}")) for n in range(10)
    ]
    outcomes = await in_one_batch(group_commit, [*calls[:5], lambda: group_commit.run(boom), *calls[5:]])
    assert isinstance(outcomes[5], RuntimeError)
    inserted = [outcome for n, outcome in enumerate(outcomes) if n != 5]
    assert sorted(row.idempotency_key for row in inserted) == sorted(f"ok{n}" for n in range(10))
    stored = await in_one_batch(group_commit, [lambda: group_commit.apply(sql.insert_pending, new("ok3"))])
    assert stored[0].id == inserted[3].id


async def test_a_lost_database_fails_the_whole_batch_at_once(postgres_url: str) -> None:
    """Run again alone, each caller would only meet the same outage, one after another."""
    db = open_database(service_url("transactions", postgres_url))
    group_commit = GroupCommit(db.writer)
    runs = 0

    async def lose_the_connection(conn: AsyncConnection) -> None:
        nonlocal runs
        runs += 1
        await conn.execute(text("SELECT pg_terminate_backend(pg_backend_pid())"))

    try:
        outcomes = await in_one_batch(group_commit, [lambda: group_commit.run(lose_the_connection)] * 5)
    finally:
        await db.dispose()
    assert runs == 1
    assert all(isinstance(outcome, Exception) and nothing_recorded(outcome) for outcome in outcomes), outcomes


async def test_statements_on_the_driver_itself_are_rolled_back_with_the_batch(
    commits: tuple[GroupCommit, TransactionSql],
) -> None:
    """The saga's statements go to the driver (asyncpg, aiosqlite) around SQLAlchemy: they are in
    the batch's transaction all the same. (SQLAlchemy's asyncpg adapter sent BEGIN only before
    its own first statement, so on Postgres each of them committed on its own.)"""
    group_commit, sql = commits

    async def insert_then_fail(conn: AsyncConnection) -> None:
        await sql.insert_pending(conn, [new("rolled-back")])
        raise RuntimeError("after the insert")

    (outcome,) = await in_one_batch(group_commit, [lambda: group_commit.run(insert_then_fail)])
    assert isinstance(outcome, RuntimeError)
    async with group_commit.engine.connect() as conn:
        stored = await sql.by_keys((await conn.get_raw_connection()).driver_connection, ["rolled-back"])
    assert stored == {}


async def test_two_replicas_closing_one_transaction_write_its_event_once(database: str) -> None:
    """The second waits for the first's lock, then finds the transaction closed (chaos soak,
    session 20: two replicas' recovery closed the same one, and each wrote an event)."""
    replicas = [open_database(service_url("transactions", database)) for _ in range(2)]
    first, second = (GroupCommit(db.writer) for db in replicas)
    sql = TransactionSql(replicas[0].is_sqlite)
    closing, release = asyncio.Event(), asyncio.Event()

    async def close_and_hold(conn: AsyncConnection) -> list:
        closed = await sql.close(conn, [Close(row.id, "rejected")])
        closing.set()
        await release.wait()
        return closed

    try:
        async with asyncio.TaskGroup() as group:
            committers = [group.create_task(commits.commit_forever()) for commits in (first, second)]
            row = await first.apply(sql.insert_pending, new("closed-once"))
            held = group.create_task(first.run(close_and_hold))
            await asyncio.wait_for(closing.wait(), 5)
            waiting = group.create_task(second.apply(sql.close, Close(row.id, "rejected")))
            await asyncio.sleep(0.5)
            assert not waiting.done(), "the second replica did not wait for the first's lock"
            release.set()
            (closed,) = await held
            again = await waiting
            for committer in committers:
                committer.cancel()
        async with replicas[0].writer.connect() as conn:
            events = (await conn.execute(select(func.count()).select_from(transactions_outbox))).scalar_one()
    finally:
        for db in replicas:
            await db.dispose()
    assert closed.status == again.status == "rejected"
    assert events == 1
