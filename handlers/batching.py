"""Group reads: concurrent loads by key become one `WHERE key IN (...)` query.

Like group commit, but for reads: while one query runs, the next requests gather, so under
load a query serves many requests and the database's per-statement cost is shared. With no
load a batch is one key and costs what a plain query would.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Awaitable, Callable, Hashable
from typing import Any, Generic, TypeVar

from schemas.database import Database

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")

batch_keys_max = 512
pending_keys_max = 65_536


class BatchLoader(Generic[K, V]):
    """`await load(key)`; `run()` (owned by the service's task group) does the fetching."""

    def __init__(self, fetch: Callable[[list[K]], Awaitable[dict[K, V]]], fetchers: int = 1) -> None:
        assert fetchers >= 1
        self._fetch = fetch
        self._fetchers = fetchers
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
            keys = list(itertools.islice(self._pending, batch_keys_max))
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


def read_loader(db: Database, lookup: Callable[[Any, list[K]], Awaitable[dict[K, V]]]) -> BatchLoader[K, V]:
    """Loads by key whose batches are `lookup(driver, keys)` on a reader's own driver connection
    (aiosqlite or asyncpg): one statement per batch, nothing per row above the driver. One
    SQLAlchemy statement per request cost ≈ 600 µs of CPU: at c64, `products.products.get` and
    `transactions.transactions.get` answered 1.6k-1.8k/s on Postgres and 0.8k-0.9k on SQLite
    where `accounts.users.get`, loaded so, answered 13.8k and 16.1k (bench/RESULTS.md, session 26)."""

    async def fetch(keys: list[K]) -> dict[K, V]:
        async with db.read() as conn:
            return await lookup((await conn.get_raw_connection()).driver_connection, keys)

    return BatchLoader(fetch, fetchers=2)
