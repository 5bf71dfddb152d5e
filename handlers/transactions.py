"""The transactions service (contract §4 `transactions.*`): deposits, withdrawals, transfers and
purchases as crash-safe sagas over request-reply.

Each create records the transaction as `pending` under its idempotency key, then asks the
ledger to record transfer `tx:<key>` (products first reserve stock under reservation
`tx:<key>`), then marks it `committed` and writes the event in one database transaction.
Every step is idempotent, so a retry, a restarted process or the recovery loop can drive a
pending transaction to its end again: no money moves twice and no stock is lost.
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import logging
import os
import signal
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, NamedTuple

import msgspec
from nats.aio.client import Client
from sqlalchemy import delete, select, update
from sqlalchemy.ext.asyncio import AsyncConnection

from bus.client import call
from bus.codec import encode
from bus.errors import Conflict, ErrorBody, NotFound, RemoteError, Unavailable, Unprocessable
from bus.service import Service
from handlers.batching import BatchLoader, PageKey, page_loader, read_loader
from handlers.runtime import Repo, serving_with_outbox
from handlers.transaction_store import (
    CLOSED_PAGE,
    CLOSED_PAGE_OF_ACCOUNT,
    Close,
    NewTransaction,
    Stored,
    TransactionSql,
    stored_from,
    transaction_from,
)
from schemas.accounts import User, UserId
from schemas.common import INT64_MAX
from schemas.database import Database
from schemas.ledger import Entry
from schemas.ledger import Transfer as LedgerTransfer
from schemas.products import Reservation, StockChange
from schemas.transactions import (
    CreateDeposit,
    CreatePurchase,
    CreateTransfer,
    CreateWithdrawal,
    ListTransactions,
    Transaction,
    TransactionId,
    TransactionPage,
    transactions,
    transactions_outbox,
)

log = logging.getLogger("bitnexus.transactions")

dependency_timeout_s = 2.0
ledger_timeout_s = 5.0
recovery_interval_s = 1.0
recovery_age_s = 2.0
recovery_batch_max = 100
CRASH_POINT_ENV = "BITNEXUS_CRASH_POINT"


def crash_point(name: str) -> None:
    """Fault injection for the kill-at-every-step tests: SIGKILL ourselves here when asked to."""
    if os.environ.get(CRASH_POINT_ENV) == name:
        os.kill(os.getpid(), signal.SIGKILL)


@dataclass(frozen=True)
class Saga:
    """What the endpoints share: the service's store, its statements, and reads by key grouped."""

    repo: Repo
    sql: TransactionSql
    by_key: BatchLoader[str, Stored]
    driving: collections.Counter[int] = field(default_factory=collections.Counter)
    """Transactions this process drives now (a request, a retry, an ingest message), by id: its
    recovery leaves them to their drivers. A ledger slower than `recovery_age_s` kept them
    pending, and the recovery loop drove each a second time (session 20: safe, but wasted)."""


def wallet(user_id: int) -> str:
    return f"user:{user_id}"


async def create_deposit(request: CreateDeposit, saga: Saga) -> Transaction:
    new = NewTransaction(
        request.idempotency_key, fingerprint(request), "deposit", "world", wallet(request.user_id), request.amount,
        request.currency,
    )  # fmt: skip
    return await create(saga, new, [request.user_id])


async def create_withdrawal(request: CreateWithdrawal, saga: Saga) -> Transaction:
    new = NewTransaction(
        request.idempotency_key, fingerprint(request), "withdrawal", wallet(request.user_id), "world", request.amount,
        request.currency,
    )  # fmt: skip
    return await create(saga, new, [request.user_id])


async def create_transfer(request: CreateTransfer, saga: Saga) -> Transaction:
    new = NewTransaction(
        request.idempotency_key, fingerprint(request), "transfer", wallet(request.from_user_id),
        wallet(request.to_user_id), request.amount, request.currency, memo=request.memo,
    )  # fmt: skip
    return await create(saga, new, [request.from_user_id, request.to_user_id])


async def create_purchase(request: CreatePurchase, saga: Saga) -> Transaction:
    new = NewTransaction(
        request.idempotency_key, fingerprint(request), "purchase", wallet(request.buyer_id), None, None, None,
        request.product_id, request.quantity,
    )  # fmt: skip
    return await create(saga, new, [request.buyer_id])


def fingerprint(request: msgspec.Struct) -> str:
    return hashlib.sha256(type(request).__name__.encode() + encode(request)).hexdigest()


async def create(saga: Saga, new: NewTransaction, user_ids: list[int]) -> Transaction:
    row = await insert_pending(saga, new, user_ids)
    if row.fingerprint != new.fingerprint:
        raise Conflict(
            f"idempotency key {new.idempotency_key} was used with another request", type="idempotency_conflict"
        )
    return await drive(saga, row)


async def check_users(repo: Repo, user_ids: list[int]) -> None:
    async def check(user_id: int) -> None:
        try:
            await call(repo.nc, "accounts.users.get", UserId(user_id), User, timeout_s=dependency_timeout_s)
        except RemoteError as error:
            if error.code == 404:
                raise NotFound(f"user {user_id} not found") from None
            raise

    await asyncio.gather(*(check(user_id) for user_id in dict.fromkeys(user_ids)))


async def insert_pending(saga: Saga, new: NewTransaction, user_ids: list[int]) -> Stored:
    """The pending row, or the row this key already has (then the users' check does not count:
    a retry returns its transaction even if a user is gone since). Both are asked at once."""
    existing, checked = await asyncio.gather(
        saga.by_key.load(new.idempotency_key), check_users(saga.repo, user_ids), return_exceptions=True
    )
    if isinstance(existing, BaseException):
        raise existing
    if existing is not None:
        return existing
    if isinstance(checked, BaseException):
        raise checked
    row = await saga.repo.commits.apply(saga.sql.insert_pending, new)
    crash_point("after_pending")
    return row


async def drive(saga: Saga, row: Stored) -> Transaction:
    """Take a transaction from wherever it stands to its end; raises its refusal if it was refused."""
    saga.driving[row.id] += 1
    try:
        return await _drive(saga, row)
    finally:
        saga.driving[row.id] -= 1
        if not saga.driving[row.id]:
            del saga.driving[row.id]


async def _drive(saga: Saga, row: Stored) -> Transaction:
    if row.status == "pending" and row.refusal is not None:
        await release_stock(saga, row)
        row = await finish(saga, Close(row.id, "rejected"))
    if row.status == "pending" and row.kind == "purchase" and row.amount is None:
        row = await reserve_stock(saga, row)
    if row.status == "pending":
        row = await record_in_ledger(saga, row)
    if row.status == "rejected":
        assert row.refusal is not None
        raise RemoteError(msgspec.json.decode(row.refusal, type=ErrorBody))
    return transaction_from(row)


async def reserve_stock(saga: Saga, row: Stored) -> Stored:
    """Purchases: take the stock, and learn the price, currency and seller as of the reservation."""
    change = StockChange(reservation_id=f"tx:{row.idempotency_key}", product_id=row.product_id, quantity=row.quantity)
    try:
        reservation = await call(
            saga.repo.nc, "products.internal.stock.reserve", change, Reservation, timeout_s=dependency_timeout_s
        )
    except RemoteError as error:
        if error.code == 404:
            await forget(saga, row)  # nothing was reserved: the key stays free, like a 400
            raise NotFound(f"product {row.product_id} not found") from None
        if error.code == 422:
            return await refuse(saga, row, error.body())
        raise
    crash_point("after_reserve")
    assert reservation.status in ("reserved", "released")
    if reservation.status == "released":  # released before: only ever after a stored refusal
        return await refuse(saga, row, Unprocessable("the reservation was released", type="out_of_stock").body())
    product = reservation.product
    assert row.quantity is not None
    if product.price * row.quantity > INT64_MAX:
        return await refuse(
            saga, row, Unprocessable("price x quantity leaves the signed 64-bit range", type="amount_overflow").body()
        )
    values = {
        "to_account": wallet(product.seller_id),
        "amount": product.price * row.quantity,
        "currency": product.currency,
    }
    if values["amount"] == 0:
        values["amount"] = None  # a free product: there is no money to move

    async def price_row(conn: AsyncConnection) -> Stored:
        """Once: a second driver's replayed reservation carries the product as it is now, and
        its price may have changed since the first driver paid (a purchase, committed at one
        price, was stored at the new one until session 20)."""
        unpriced = (transactions.c.id == row.id) & transactions.c.to_account.is_(None)
        await conn.execute(update(transactions).where(unpriced).values(**values))
        return stored_from((await conn.execute(select(transactions).where(transactions.c.id == row.id))).one())

    row = await saga.repo.commits.run(price_row)
    if row.amount is None:
        return await finish(saga, Close(row.id, "committed"))
    return row


async def record_in_ledger(saga: Saga, row: Stored) -> Stored:
    assert row.to_account is not None and row.amount is not None and row.currency is not None
    transfer = LedgerTransfer(
        id=f"tx:{row.idempotency_key}",
        from_=row.from_account,
        to=row.to_account,
        amount=row.amount,
        currency=row.currency,
        memo=row.memo,
    )
    try:
        entry = await call(saga.repo.nc, "ledger.internal.record", transfer, Entry, timeout_s=ledger_timeout_s)
    except RemoteError as error:
        if error.code != 422:
            raise
        return await refuse(saga, row, error.body())
    crash_point("after_ledger")
    return await finish(saga, Close(row.id, "committed", entry.seq, entry.hash))


async def refuse(saga: Saga, row: Stored, error: ErrorBody) -> Stored:
    """Store the refusal first, then give back any stock, then close the transaction."""

    async def store_refusal(conn: AsyncConnection) -> Stored:
        await conn.execute(
            update(transactions)
            .where(transactions.c.id == row.id, transactions.c.status == "pending")
            .values(refusal=encode(error).decode(), updated_at=datetime.now(UTC))
        )
        return stored_from((await conn.execute(select(transactions).where(transactions.c.id == row.id))).one())

    row = await saga.repo.commits.run(store_refusal)
    crash_point("after_refusal")
    if row.status != "pending":
        return row
    await release_stock(saga, row)
    return await finish(saga, Close(row.id, "rejected"))


async def release_stock(saga: Saga, row: Stored) -> None:
    if row.kind != "purchase":
        return
    change = StockChange(reservation_id=f"tx:{row.idempotency_key}", product_id=row.product_id, quantity=row.quantity)
    try:
        await call(saga.repo.nc, "products.internal.stock.release", change, Reservation, timeout_s=dependency_timeout_s)
    except RemoteError as error:
        if error.code != 404:  # the product is gone: there is no stock to give back
            raise
    crash_point("after_release")


async def finish(saga: Saga, close: Close) -> Stored:
    """Close a pending transaction and write its event, once, whoever gets here first."""
    closed = await saga.repo.commits.apply(saga.sql.close, close)
    saga.repo.relay.wake()
    return closed


async def forget(saga: Saga, row: Stored) -> None:
    async def delete_row(conn: AsyncConnection) -> None:
        await conn.execute(delete(transactions).where(transactions.c.id == row.id, transactions.c.status == "pending"))

    await saga.repo.commits.run(delete_row)


async def get_transaction(request: TransactionId, by_id: BatchLoader[int, Stored]) -> Transaction:
    row = await by_id.load(request.id)
    if row is None or row.status == "pending":
        raise NotFound(f"transaction {request.id} not found")
    return transaction_from(row)


class TransactionPages(NamedTuple):
    """`transactions.transactions.list`'s reads, gathered (`handlers.accounts.list_users` says why)."""

    closed: BatchLoader[PageKey, list[Transaction]]
    of_account: BatchLoader[PageKey, list[Transaction]]
    """Asked by (cursor, count, account)."""

    @classmethod
    def of(cls, db: Database, sql: TransactionSql) -> TransactionPages:
        def item(row: Any) -> Transaction:
            return transaction_from(sql.stored(row))

        return cls(
            page_loader(db, CLOSED_PAGE, ("bigint", "bigint"), item),
            page_loader(db, CLOSED_PAGE_OF_ACCOUNT, ("bigint", "bigint", "text"), item),
        )


async def list_transactions(request: ListTransactions, pages: TransactionPages) -> TransactionPage:
    page = (request.after_id, request.limit + 1)
    if request.user_id is None:
        loading = pages.closed.load(page)
    else:
        loading = pages.of_account.load((*page, wallet(request.user_id)))
    return TransactionPage.of(await loading or [], request.limit)


async def recover_forever(saga: Saga) -> None:
    """Drive pending transactions left by a crash (or a timed-out dependency) to their end."""
    while True:
        await recover_once(saga)
        await asyncio.sleep(recovery_interval_s)


async def recover_once(saga: Saga) -> int:
    """Drive the pending transactions older than `recovery_age_s` that no one in this process
    drives (another replica's may still be driven: that is safe); how many it drove."""
    stale = datetime.now(UTC) - timedelta(seconds=recovery_age_s)
    query = select(transactions).where(transactions.c.status == "pending", transactions.c.updated_at < stale)
    async with saga.repo.db.read() as conn:
        rows = (await conn.execute(query.order_by(transactions.c.id).limit(recovery_batch_max))).all()
    orphans = [row for row in rows if row.id not in saga.driving]
    for row in orphans:
        try:
            await drive(saga, stored_from(row))
        except (Unavailable, RemoteError, NotFound) as outcome:
            log.info("recovered transaction %s: %s", row.idempotency_key, outcome.message)
    return len(orphans)


def add_endpoints(service: Service, repo: Repo) -> None:
    sql = TransactionSql(repo.db.is_sqlite)
    saga = Saga(repo, sql, read_loader(repo.db, sql.by_keys))
    by_id = read_loader(repo.db, sql.by_ids)
    service.add_endpoint("transactions.deposits.create", create_deposit, saga)
    service.add_endpoint("transactions.withdrawals.create", create_withdrawal, saga)
    service.add_endpoint("transactions.transfers.create", create_transfer, saga)
    service.add_endpoint("transactions.purchases.create", create_purchase, saga)
    service.add_endpoint("transactions.transactions.get", get_transaction, by_id)
    pages = TransactionPages.of(repo.db, sql)
    service.add_endpoint("transactions.transactions.list", list_transactions, pages)
    from handlers import ingest  # ingest routes messages to the create functions of this module

    async def recovery() -> None:
        await recover_forever(saga)

    async def ingest_consumer() -> None:
        await ingest.consume_forever(repo.nc.jetstream(), saga)

    loaders = [saga.by_key.run, by_id.run, pages.closed.run, pages.of_account.run]
    repo.background.extend([*loaders, recovery, ingest_consumer])


def serving(nc: Client) -> AbstractAsyncContextManager[Service]:
    return serving_with_outbox(
        nc, "transactions", "deposits, withdrawals, transfers and purchases", transactions_outbox, add_endpoints
    )
