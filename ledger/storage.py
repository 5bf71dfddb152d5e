"""The writer's statements on the database driver itself (aiosqlite or asyncpg).

Each runs inside the transaction the writer opened through SQLAlchemy (which took the lock),
on the same connection. Going around SQLAlchemy here matters: per-row parameter processing
and result rows were a fifth of the ledger's CPU, and aiosqlite pays a thread round trip per
call, so a batch is one `executemany` per table. Reads take a whole list as one parameter
(`json_each` / `= ANY`), so no statement is recompiled per batch size.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from datetime import datetime
from typing import Any

from bus.codec import timestamp
from ledger.plan import BalanceKey, Head
from schemas.database import sqlite_timestamp
from schemas.ledger import Entry

ENTRY_COLUMNS = "seq, id, from_account, to_account, amount, currency, memo, recorded_at, prev_hash, hash"


class LedgerSql:
    def __init__(self, sqlite: bool) -> None:
        self.sqlite = sqlite
        self.stamp = sqlite_timestamp if sqlite else timestamp
        if sqlite:
            self._head = "SELECT seq, hash FROM ledger_entries ORDER BY seq DESC LIMIT 1"
            self._by_ids = f"SELECT {ENTRY_COLUMNS} FROM ledger_entries WHERE id IN (SELECT value FROM json_each(?))"
            self._balances = (
                "SELECT account, currency, balance FROM ledger_balances "
                "WHERE account IN (SELECT value FROM json_each(?))"
            )
            self._insert = f"INSERT INTO ledger_entries ({ENTRY_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
            self._upsert = (
                "INSERT INTO ledger_balances (account, currency, balance) VALUES (?, ?, ?) "
                "ON CONFLICT (account, currency) DO UPDATE SET balance = excluded.balance"
            )
        else:
            self._head = "SELECT seq, hash FROM ledger_entries ORDER BY seq DESC LIMIT 1"
            self._by_ids = f"SELECT {ENTRY_COLUMNS} FROM ledger_entries WHERE id = ANY($1::text[])"
            self._balances = "SELECT account, currency, balance FROM ledger_balances WHERE account = ANY($1::text[])"
            self._insert = (
                f"INSERT INTO ledger_entries ({ENTRY_COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)"
            )
            self._upsert = (
                "INSERT INTO ledger_balances (account, currency, balance) VALUES ($1, $2, $3) "
                "ON CONFLICT (account, currency) DO UPDATE SET balance = excluded.balance"
            )

    async def _fetch(self, driver: Any, sql: str, *args: Any) -> list[Any]:
        if not self.sqlite:
            return await driver.fetch(sql, *args)
        cursor = await driver.execute(sql, args)
        try:
            return list(await cursor.fetchall())
        finally:
            await cursor.close()

    def _list(self, values: list[str]) -> Any:
        return json.dumps(values) if self.sqlite else values

    async def head(self, driver: Any) -> Head:
        rows = await self._fetch(driver, self._head)
        return Head(rows[0][0], rows[0][1]) if rows else Head()

    async def entries_by_id(self, driver: Any, ids: list[str]) -> dict[str, Entry]:
        rows = await self._fetch(driver, self._by_ids, self._list(ids))
        return {
            row[1]: Entry(row[0], row[1], row[2], row[3], row[4], row[5], row[6], self.stamp(row[7]), row[8], row[9])
            for row in rows
        }

    async def balances(self, driver: Any, keys: set[BalanceKey]) -> dict[BalanceKey, int]:
        rows = await self._fetch(driver, self._balances, self._list(sorted({account for account, _ in keys})))
        return {(row[0], row[1]): row[2] for row in rows if (row[0], row[1]) in keys}

    async def insert_entries(self, driver: Any, entries: list[Entry], recorded_at: datetime) -> None:
        stored_at: Any = recorded_at.strftime("%Y-%m-%d %H:%M:%S.%f") if self.sqlite else recorded_at
        assert self.stamp(stored_at) == entries[0].recorded_at
        await driver.executemany(
            self._insert,
            [
                (e.seq, e.id, e.from_, e.to, e.amount, e.currency, e.memo, stored_at, e.prev_hash, e.hash)
                for e in entries
            ],
        )

    async def store_balances(self, driver: Any, balances: Iterable[tuple[BalanceKey, int]]) -> None:
        await driver.executemany(self._upsert, [(account, currency, value) for (account, currency), value in balances])
