"""Group reads: concurrent loads by key become one `WHERE key IN (...)` query.

Like group commit, but for reads: while one query runs, the next requests gather, so under
load a query serves many requests and the database's per-statement cost is shared. With no
load a batch is one key and costs what a plain query would.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import re
from collections.abc import Awaitable, Callable, Hashable
from typing import Any, Generic, TypeVar

from schemas.database import Database, numbered_rows

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")

batch_keys_max = 512
pending_keys_max = 65_536


class BatchLoader(Generic[K, V]):
    """`await load(key)`; `run()` (owned by the service's task group) does the fetching."""

    def __init__(
        self, fetch: Callable[[list[K]], Awaitable[dict[K, V]]], fetchers: int = 1, batch_max: int = batch_keys_max
    ) -> None:
        assert fetchers >= 1 and 1 <= batch_max <= batch_keys_max
        self._fetch = fetch
        self._fetchers = fetchers
        self._batch_max = batch_max
        self._pending: dict[K, list[asyncio.Future[V | None]]] = {}
        self._wake = asyncio.Event()

    async def load(self, key: K) -> V | None:
        """The value for `key`, or None when there is none."""
        future = asyncio.get_running_loop().create_future()
        waiting = self._pending.get(key)
        if waiting is None:
            assert len(self._pending) < pending_keys_max, "more keys waiting than requests can be in flight"
            self._pending[key] = [future]
            self._wake.set()
        else:
            waiting.append(future)
        return await future

    async def run(self) -> None:
        async with asyncio.TaskGroup() as group:
            for _ in range(self._fetchers):
                group.create_task(self._fetch_forever())

    async def _fetch_forever(self) -> None:
        while True:
            if not self._pending:
                self._wake.clear()
                await self._wake.wait()
                continue
            keys = list(itertools.islice(self._pending, self._batch_max))
            waiting = [self._pending.pop(key) for key in keys]
            try:
                found = await self._fetch(keys)
            except Exception as exc:
                for futures in waiting:
                    for future in futures:
                        if not future.done():
                            future.set_exception(exc)
                continue
            for key, futures in zip(keys, waiting, strict=True):
                value = found.get(key)
                for future in futures:
                    if not future.done():  # its requester may have been cancelled
                        future.set_result(value)


def read_loader(
    db: Database, lookup: Callable[[Any, list[K]], Awaitable[dict[K, V]]], batch_max: int = batch_keys_max
) -> BatchLoader[K, V]:
    """Loads by key whose batches are `lookup(driver, keys)` on a reader's own driver connection
    (aiosqlite or asyncpg): one statement per batch, nothing per row above the driver. One
    SQLAlchemy statement per request cost ≈ 600 µs of CPU: at c64, `products.products.get` and
    `transactions.transactions.get` answered 1.6k-1.8k/s on Postgres and 0.8k-0.9k on SQLite
    where `accounts.users.get`, loaded so, answered 13.8k and 16.1k (bench/RESULTS.md, session 26)."""

    async def fetch(keys: list[K]) -> dict[K, V]:
        async with db.reading() as driver:
            return await lookup(driver, keys)

    return BatchLoader(fetch, fetchers=2, batch_max=batch_max)


pages_batch_max = 64
"""Pages read by one statement: on SQLite one `SELECT` each in a compound (which may have 500),
each batch size a statement of its own, prepared once per reader connection."""
PageKey = tuple[Any, ...]
"""What a page is asked by: its statement's parameters, in order (the cursor, the row count...)."""


def page_loader(
    db: Database, statements: tuple[str, str], types: tuple[str, ...], item: Callable[[Any], V]
) -> BatchLoader[PageKey, list[V]]:
    """Pages of one statement (`statements`: its SQLite and Postgres forms, `both_stores`, whose
    rows start with a key they are ordered by) taking parameters of Postgres `types`, each row
    made an `item`: those asked together, one statement on the driver (`read_loader`). One
    statement per page cost the service 0.5-0.9 ms of CPU: a tenth of the gets' rate
    (bench.reads, session 27). The rows held at once are bounded as before, by the pages in
    flight (each endpoint's `concurrency_max`)."""
    sqlite, width, postgres = statements[0], len(types), postgres_pages(statements[1], types)

    async def lookup(driver: Any, pages: list[PageKey]) -> dict[PageKey, list[V]]:
        if db.is_sqlite:
            parameters = [value for page in pages for value in page]
            rows = await driver.execute_fetchall(_sqlite_pages(sqlite, width, len(pages)), parameters)
        else:
            rows = await driver.fetch(postgres, *(list(column) for column in zip(*pages, strict=True)))
        answers = numbered_rows(rows, len(pages))
        return {page: [item(row) for row in own] for page, own in zip(pages, answers, strict=True)}

    return read_loader(db, lookup, batch_max=pages_batch_max)


def postgres_pages(page: str, types: tuple[str, ...]) -> str:
    """`page` for each element of the arrays `$1`, `$2`, ... (of `types`), numbered from 1."""
    arrays = ", ".join(f"${number}::{type_}[]" for number, type_ in enumerate(types, 1))
    columns = ", ".join(f"p{number}" for number in range(1, len(types) + 1))
    own = re.sub(r"\$(\d+)", r"wanted.p\1", page)
    return (
        f"SELECT wanted.page, listed.* FROM unnest({arrays}) WITH ORDINALITY AS wanted({columns}, page) "
        f"CROSS JOIN LATERAL ({own}) AS listed ORDER BY 1, 2"
    )


@functools.cache
def _sqlite_pages(page: str, width: int, count: int) -> str:
    """`count` copies of `page`, each numbered (from 1) and with parameters of its own, as one
    statement."""

    def copy(number: int) -> str:
        own = re.sub(r"\?(\d+)", lambda match: f"?{int(match[1]) + (number - 1) * width}", page)
        return f"SELECT {number} AS page, * FROM ({own})"

    return " UNION ALL ".join(copy(number) for number in range(1, count + 1)) + " ORDER BY 1, 2"
