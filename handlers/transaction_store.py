"""The transactions table as the saga's hot path uses it: batch statements on the driver itself.

Like the ledger's writer (ledger/storage.py): each group-commit batch inserts its pending rows,
or closes its transactions, with one or two statements for the whole batch, run on the
connection SQLAlchemy opened the transaction on; reads by key take the whole list as one
parameter (`json_each` / `postgres_lookup`). Rows come back as `Stored`, whoever read them.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import msgspec
from sqlalchemy.engine import Row
from sqlalchemy.ext.asyncio import AsyncConnection

from bus.codec import encode, timestamp
from bus.events import new_envelope
from schemas.database import both_stores, lookup_rows, postgres_lookup, sqlite_stored, sqlite_timestamp
from schemas.transactions import Transaction

SOURCE = "transactions"
STORED_COLUMNS = (
    "id, idempotency_key, fingerprint, kind, status, from_account, to_account, amount, currency, "
    "product_id, quantity, memo, ledger_seq, ledger_hash, refusal, inserted_at"
)
NEW_COLUMNS = (
    "idempotency_key, fingerprint, kind, status, from_account, to_account, amount, currency, "
    "product_id, quantity, memo, inserted_at, updated_at"
)

CLOSED_PAGE = both_stores(
    f"SELECT {STORED_COLUMNS} FROM transactions WHERE id > $1 AND status != 'pending' ORDER BY id LIMIT $2"
)
"""`transactions.transactions.list`: the closed transactions after id `$1`, at most `$2`."""
_ACCOUNTS_PAGE_IDS = """SELECT id FROM (
        SELECT id FROM transactions WHERE from_account = $3 AND id > $1 AND status != 'pending' ORDER BY id LIMIT $2
    ) AS sent
    UNION
    SELECT id FROM (
        SELECT id FROM transactions WHERE to_account = $3 AND id > $1 AND status != 'pending' ORDER BY id LIMIT $2
    ) AS received
    ORDER BY id LIMIT $2"""
CLOSED_PAGE_OF_ACCOUNT = (
    f"SELECT {STORED_COLUMNS} FROM transactions WHERE id IN ({both_stores(_ACCOUNTS_PAGE_IDS)[0]}) ORDER BY id",
    f"""SELECT found.* FROM ({_ACCOUNTS_PAGE_IDS}) AS page CROSS JOIN LATERAL (
        SELECT {STORED_COLUMNS} FROM transactions WHERE transactions.id = page.id LIMIT 1
    ) AS found ORDER BY found.id""",
)
"""`CLOSED_PAGE` of those account `$3` sent or received: the first `$2` of each side, on their own
index each (`transactions_from_account`, `transactions_to_account`), merged. Asked as one
condition (`from_account = $3 OR to_account = $3`) over the table in id order, an account with
few transactions among many cost a scan of all the rows after the cursor."""


class Stored(msgspec.Struct, frozen=True):
    """A row of `transactions`, in the order of STORED_COLUMNS; `inserted_at` as the contract writes it."""

    id: int
    idempotency_key: str
    fingerprint: str
    kind: str
    status: str
    from_account: str
    to_account: str | None
    amount: int | None
    currency: str | None
    product_id: int | None
    quantity: int | None
    memo: str
    ledger_seq: int | None
    ledger_hash: str | None
    refusal: str | None
    inserted_at: str


def transaction_from(row: Stored) -> Transaction:
    committed = row.status == "committed"
    return Transaction(
        id=row.id,
        idempotency_key=row.idempotency_key,
        kind=row.kind,
        from_account=row.from_account,
        to_account=row.to_account,
        amount=row.amount if row.amount is not None else (0 if committed else None),
        currency=row.currency,
        product_id=row.product_id,
        quantity=row.quantity,
        memo=row.memo,
        status=row.status,
        ledger_seq=row.ledger_seq if committed else None,
        ledger_hash=row.ledger_hash if committed else None,
        inserted_at=row.inserted_at,
    )


def stored_from(row: Row) -> Stored:
    """A row SQLAlchemy read with `select(transactions)`."""
    return Stored(*row[:15], inserted_at=timestamp(row.inserted_at))


class NewTransaction(msgspec.Struct, frozen=True):
    """What a create request asks for, as its pending row will store it."""

    idempotency_key: str
    fingerprint: str
    kind: str
    from_account: str
    to_account: str | None
    amount: int | None
    currency: str | None
    product_id: int | None = None
    quantity: int | None = None
    memo: str = ""


class Close(msgspec.Struct, frozen=True):
    """Close transaction `id` as `status` (committed with its ledger entry's seq and hash, or rejected)."""

    id: int
    status: str
    ledger_seq: int | None = None
    ledger_hash: str | None = None


class TransactionSql:
    def __init__(self, sqlite: bool) -> None:
        self.sqlite = sqlite
        if sqlite:
            self._by_keys = (
                f"SELECT {STORED_COLUMNS} FROM transactions WHERE idempotency_key IN (SELECT value FROM json_each(?))"
            )
            self._by_ids = f"SELECT {STORED_COLUMNS} FROM transactions WHERE id IN (SELECT value FROM json_each(?))"
            self._read_by_ids = self._by_ids
            self._insert = (
                f"INSERT INTO transactions ({NEW_COLUMNS}) VALUES (?, ?, ?, 'pending', ?, ?, ?, ?, ?, ?, ?, ?, ?) "
                "ON CONFLICT (idempotency_key) DO NOTHING"
            )
            self._close = (
                "UPDATE transactions SET status = ?, ledger_seq = ?, ledger_hash = ?, updated_at = ? "
                "WHERE id = ? AND status = 'pending'"
            )
            self._event = "INSERT INTO transactions_outbox (event_id, subject, payload, created_at) VALUES (?, ?, ?, ?)"
        else:
            self._by_keys = postgres_lookup(STORED_COLUMNS, "transactions", {"idempotency_key": "text"})
            # FOR UPDATE: a replica closing the same transaction waits, then sees it closed
            self._by_ids = postgres_lookup(STORED_COLUMNS, "transactions", {"id": "bigint"}, "FOR UPDATE")
            self._read_by_ids = postgres_lookup(STORED_COLUMNS, "transactions", {"id": "bigint"})
            self._insert = (
                f"INSERT INTO transactions ({NEW_COLUMNS}) "
                "VALUES ($1, $2, $3, 'pending', $4, $5, $6, $7, $8, $9, $10, $11, $12) "
                "ON CONFLICT (idempotency_key) DO NOTHING"
            )
            self._close = (
                "UPDATE transactions SET status = $1, ledger_seq = $2, ledger_hash = $3, updated_at = $4 "
                "WHERE id = $5 AND status = 'pending'"
            )
            self._event = (
                "INSERT INTO transactions_outbox (event_id, subject, payload, created_at) VALUES ($1, $2, $3, $4)"
            )

    def _moment(self, moment: datetime) -> Any:
        """A `UtcDateTime` as SQLAlchemy stores it: text on SQLite, a timestamptz on Postgres."""
        return sqlite_stored(moment) if self.sqlite else moment

    def stored(self, row: Any) -> Stored:
        """A row of STORED_COLUMNS read on the driver."""
        inserted_at = sqlite_timestamp(row[15]) if self.sqlite else timestamp(row[15])
        return Stored(*row[:15], inserted_at=inserted_at)

    async def _fetch(self, driver: Any, sql: str, values: list[Any]) -> list[Stored]:
        return [self.stored(row) for row in await lookup_rows(driver, self.sqlite, (sql, sql), values)]

    async def by_keys(self, driver: Any, keys: list[str]) -> dict[str, Stored]:
        return {row.idempotency_key: row for row in await self._fetch(driver, self._by_keys, keys)}

    async def by_ids(self, driver: Any, ids: list[int]) -> dict[int, Stored]:
        """For reads: no row locked."""
        return {row.id: row for row in await self._fetch(driver, self._read_by_ids, ids)}

    async def insert_pending(self, conn: AsyncConnection, new: list[NewTransaction]) -> list[Stored]:
        """A batch operation: the pending row of each, or the row its key already had."""
        driver = (await conn.get_raw_connection()).driver_connection
        now = self._moment(datetime.now(UTC))
        await driver.executemany(
            self._insert,
            [
                (
                    n.idempotency_key,
                    n.fingerprint,
                    n.kind,
                    n.from_account,
                    n.to_account,
                    n.amount,
                    n.currency,
                    n.product_id,
                    n.quantity,
                    n.memo,
                    now,
                    now,
                )
                for n in sorted(new, key=lambda n: n.idempotency_key)  # replicas lock keys in one order
            ],
        )
        stored = await self.by_keys(driver, list({n.idempotency_key for n in new}))
        return [stored[n.idempotency_key] for n in new]

    async def close(self, conn: AsyncConnection, closes: list[Close]) -> list[Stored]:
        """A batch operation: close each pending transaction and write its event, once; a transaction
        closed before (a retry, the recovery loop, another replica) stays as it was and is returned."""
        driver = (await conn.get_raw_connection()).driver_connection
        ids = sorted({close.id for close in closes})  # locked in order: no deadlock between replicas
        current = {row.id: row for row in await self._fetch(driver, self._by_ids, ids)}
        moment = datetime.now(UTC)
        closed: list[Stored] = []
        answers: list[Stored] = []
        for close in closes:
            row = current[close.id]
            if row.status == "pending":
                committed = close.status == "committed"
                row = msgspec.structs.replace(
                    row,
                    status=close.status,
                    ledger_seq=close.ledger_seq if committed else None,
                    ledger_hash=close.ledger_hash if committed else None,
                )
                current[close.id] = row
                closed.append(row)
            answers.append(row)
        if closed:
            stored_at = self._moment(moment)
            await driver.executemany(
                self._close, [(row.status, row.ledger_seq, row.ledger_hash, stored_at, row.id) for row in closed]
            )
            await driver.executemany(self._event, [self._event_row(row, moment, stored_at) for row in closed])
        return answers

    def _event_row(self, row: Stored, moment: datetime, stored_at: Any) -> tuple[Any, ...]:
        envelope = new_envelope(SOURCE, f"transactions.transaction.{row.status}", transaction_from(row), moment)
        return (envelope.id, f"events.{envelope.type}", encode(envelope), stored_at)
