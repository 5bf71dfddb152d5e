"""Group commit for small writes: concurrent operations share one database transaction.

A commit costs an fsync (≈ 5 ms on this machine kind's disk), and SQLite has one writer per
file, so a transaction per request caps a service near 100-200 writes/s. Here the operations
queued meanwhile run in one transaction, and every caller gets its result only after that
COMMIT. Operations are written not to fail on expected conflicts (`ON CONFLICT DO NOTHING`);
if one raises anyway, the transaction rolls back, that caller gets the error, and the others
run again in a new transaction (savepoints per operation cost more than they save here).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

log = logging.getLogger("bitnexus.group_commit")

T = TypeVar("T")
Operation = Callable[[AsyncConnection], Awaitable[Any]]

queue_operations_max = 16_384
batch_operations_max = 512


@dataclass(frozen=True)
class _Pending:
    operation: Operation
    answer: asyncio.Future[Any]


class GroupCommit:
    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine
        self.queue: asyncio.Queue[_Pending] = asyncio.Queue(maxsize=queue_operations_max)

    async def run(self, operation: Callable[[AsyncConnection], Awaitable[T]]) -> T:
        """Run `operation(conn)` in the next shared transaction; its result once that committed."""
        pending = _Pending(operation, asyncio.get_running_loop().create_future())
        await self.queue.put(pending)
        return await pending.answer

    async def commit_forever(self) -> None:
        batch: list[_Pending] = []
        try:
            while True:
                batch = [await self.queue.get()]
                while not self.queue.empty() and len(batch) < batch_operations_max:
                    batch.append(self.queue.get_nowait())
                await self._commit(batch)
        finally:
            leftovers = batch + [self.queue.get_nowait() for _ in range(self.queue.qsize())]
            for pending in leftovers:
                if not pending.answer.done():
                    pending.answer.set_exception(RuntimeError("the group commit stopped"))

    async def _commit(self, batch: list[_Pending]) -> None:
        while batch:
            results: list[Any] = []
            failed: _Pending | None = None
            try:
                async with self.engine.begin() as conn:
                    for pending in batch:
                        failed = pending
                        results.append(await pending.operation(conn))
                    failed = None
            except Exception as exc:
                if failed is None:  # the COMMIT itself failed: nobody's write happened
                    log.exception("group commit of %d operations failed", len(batch))
                    _answer(batch, [exc] * len(batch), ok=False)
                    return
                _answer([failed], [exc], ok=False)
                batch = [pending for pending in batch if pending is not failed]
                continue
            _answer(batch, results, ok=True)
            return


def _answer(batch: list[_Pending], values: list[Any], ok: bool) -> None:
    for pending, value in zip(batch, values, strict=True):
        if pending.answer.done():
            continue  # its caller went away; the write stands (or not) all the same
        if ok:
            pending.answer.set_result(value)
        else:
            pending.answer.set_exception(value)
