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
import hashlib
import logging
import os
import signal
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import msgspec
from nats.aio.client import Client
from sqlalchemy import delete, or_, select, update
from sqlalchemy.dialects.postgresql import insert as postgres_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.engine import Row
from sqlalchemy.ext.asyncio import AsyncConnection

from bus.client import call
from bus.codec import encode, timestamp
from bus.errors import Conflict, ErrorBody, NotFound, RemoteError, Unavailable, Unprocessable
from bus.events import write_event
from bus.service import Service
from handlers.runtime import Repo, serving_with_outbox
from schemas.accounts import User, UserId
from schemas.common import INT64_MAX
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

SOURCE = "transactions"
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
class Intent:
    """What a create request asks for, as stored in its pending row."""

    kind: str
    from_account: str
    to_account: str | None
    amount: int | None
    currency: str | None
    product_id: int | None = None
    quantity: int | None = None
    memo: str = ""


def wallet(user_id: int) -> str:
    return f"user:{user_id}"


async def create_deposit(request: CreateDeposit, repo: Repo) -> Transaction:
    intent = Intent("deposit", "world", wallet(request.user_id), request.amount, request.currency)
    return await create(repo, request, intent, [request.user_id])


async def create_withdrawal(request: CreateWithdrawal, repo: Repo) -> Transaction:
    intent = Intent("withdrawal", wallet(request.user_id), "world", request.amount, request.currency)
    return await create(repo, request, intent, [request.user_id])


async def create_transfer(request: CreateTransfer, repo: Repo) -> Transaction:
    intent = Intent(
        "transfer",
        wallet(request.from_user_id),
        wallet(request.to_user_id),
        request.amount,
        request.currency,
        memo=request.memo,
    )
    return await create(repo, request, intent, [request.from_user_id, request.to_user_id])


async def create_purchase(request: CreatePurchase, repo: Repo) -> Transaction:
    intent = Intent("purchase", wallet(request.buyer_id), None, None, None, request.product_id, request.quantity)
    return await create(repo, request, intent, [request.buyer_id])


def fingerprint(request: msgspec.Struct) -> str:
    return hashlib.sha256(type(request).__name__.encode() + encode(request)).hexdigest()


async def create(repo: Repo, request: msgspec.Struct, intent: Intent, user_ids: list[int]) -> Transaction:
    key, print_ = request.idempotency_key, fingerprint(request)  # type: ignore[attr-defined]
    existing = await insert_pending(repo, key, print_, intent, user_ids)
    if existing.fingerprint != print_:
        raise Conflict(f"idempotency key {key} was used with another request", type="idempotency_conflict")
    return await drive(repo, existing)


async def check_user(repo: Repo, user_id: int) -> None:
    try:
        await call(repo.nc, "accounts.users.get", UserId(user_id), User, timeout_s=dependency_timeout_s)
    except RemoteError as error:
        if error.code == 404:
            raise NotFound(f"user {user_id} not found") from None
        raise


async def find_by_key(repo: Repo, key: str) -> Row | None:
    async with repo.db.reader.connect() as conn:
        return (await conn.execute(select(transactions).where(transactions.c.idempotency_key == key))).one_or_none()


async def insert_pending(repo: Repo, key: str, print_: str, intent: Intent, user_ids: list[int]) -> Row:
    """The pending row, or the row this key already has; users are checked before a new one."""
    existing = await find_by_key(repo, key)
    if existing is not None:
        return existing
    await asyncio.gather(*(check_user(repo, user_id) for user_id in dict.fromkeys(user_ids)))
    now = datetime.now(UTC)
    values = {
        **intent.__dict__,
        "idempotency_key": key,
        "fingerprint": print_,
        "status": "pending",
        "inserted_at": now,
        "updated_at": now,
    }
    insert_ = sqlite_insert if repo.db.is_sqlite else postgres_insert
    statement = insert_(transactions).values(**values).on_conflict_do_nothing(index_elements=["idempotency_key"])

    async def insert_row(conn: AsyncConnection) -> Row | None:
        return (await conn.execute(statement.returning(transactions))).one_or_none()

    row = await repo.commits.run(insert_row)
    crash_point("after_pending")
    if row is None:  # a concurrent request with this key inserted first: theirs
        row = await find_by_key(repo, key)
        assert row is not None
    return row


async def drive(repo: Repo, row: Row) -> Transaction:
    """Take a transaction from wherever it stands to its end; raises its refusal if it was refused."""
    if row.status == "pending" and row.refusal is not None:
        await release_stock(repo, row)
        row = await finish(repo, row, "rejected")
    if row.status == "pending" and row.kind == "purchase" and row.amount is None:
        row = await reserve_stock(repo, row)
    if row.status == "pending":
        row = await record_in_ledger(repo, row)
    if row.status == "rejected":
        raise RemoteError(msgspec.json.decode(row.refusal, type=ErrorBody))
    return transaction_from(row)


async def reserve_stock(repo: Repo, row: Row) -> Row:
    """Purchases: take the stock, and learn the price, currency and seller as of the reservation."""
    change = StockChange(reservation_id=f"tx:{row.idempotency_key}", product_id=row.product_id, quantity=row.quantity)
    try:
        reservation = await call(
            repo.nc, "products.internal.stock.reserve", change, Reservation, timeout_s=dependency_timeout_s
        )
    except RemoteError as error:
        if error.code == 404:
            await forget(repo, row)  # nothing was reserved: the key stays free, like a 400
            raise NotFound(f"product {row.product_id} not found") from None
        if error.code == 422:
            return await refuse(repo, row, error.body())
        raise
    crash_point("after_reserve")
    assert reservation.status in ("reserved", "released")
    if reservation.status == "released":  # released before: only ever after a stored refusal
        return await refuse(repo, row, Unprocessable("the reservation was released", type="out_of_stock").body())
    product = reservation.product
    if product.price * row.quantity > INT64_MAX:
        return await refuse(
            repo, row, Unprocessable("price x quantity leaves the signed 64-bit range", type="amount_overflow").body()
        )
    values = {
        "to_account": wallet(product.seller_id),
        "amount": product.price * row.quantity,
        "currency": product.currency,
    }
    if values["amount"] == 0:
        values["amount"] = None  # a free product: there is no money to move

    async def price_row(conn: AsyncConnection) -> Row:
        await conn.execute(update(transactions).where(transactions.c.id == row.id).values(**values))
        return (await conn.execute(select(transactions).where(transactions.c.id == row.id))).one()

    row = await repo.commits.run(price_row)
    if row.amount is None:
        return await finish(repo, row, "committed")
    return row


async def record_in_ledger(repo: Repo, row: Row) -> Row:
    transfer = LedgerTransfer(
        id=f"tx:{row.idempotency_key}",
        from_=row.from_account,
        to=row.to_account,
        amount=row.amount,
        currency=row.currency,
        memo=row.memo,
    )
    try:
        entry = await call(repo.nc, "ledger.record", transfer, Entry, timeout_s=ledger_timeout_s)
    except RemoteError as error:
        if error.code != 422:
            raise
        return await refuse(repo, row, error.body())
    crash_point("after_ledger")
    return await finish(repo, row, "committed", entry)


async def refuse(repo: Repo, row: Row, error: ErrorBody) -> Row:
    """Store the refusal first, then give back any stock, then close the transaction."""

    async def store_refusal(conn: AsyncConnection) -> Row:
        await conn.execute(
            update(transactions)
            .where(transactions.c.id == row.id, transactions.c.status == "pending")
            .values(refusal=encode(error).decode(), updated_at=datetime.now(UTC))
        )
        return (await conn.execute(select(transactions).where(transactions.c.id == row.id))).one()

    row = await repo.commits.run(store_refusal)
    crash_point("after_refusal")
    if row.status != "pending":
        return row
    await release_stock(repo, row)
    return await finish(repo, row, "rejected")


async def release_stock(repo: Repo, row: Row) -> None:
    if row.kind != "purchase":
        return
    change = StockChange(reservation_id=f"tx:{row.idempotency_key}", product_id=row.product_id, quantity=row.quantity)
    try:
        await call(repo.nc, "products.internal.stock.release", change, Reservation, timeout_s=dependency_timeout_s)
    except RemoteError as error:
        if error.code != 404:  # the product is gone: there is no stock to give back
            raise
    crash_point("after_release")


async def finish(repo: Repo, row: Row, status: str, entry: Entry | None = None) -> Row:
    """Close a pending transaction and write its event, once, whoever gets here first."""
    values: dict[str, object] = {"status": status, "updated_at": datetime.now(UTC)}
    if entry is not None:
        values |= {"ledger_seq": entry.seq, "ledger_hash": entry.hash}

    async def close(conn: AsyncConnection) -> Row:
        statement = update(transactions).where(transactions.c.id == row.id, transactions.c.status == "pending")
        closed = (await conn.execute(statement.values(**values).returning(transactions))).one_or_none()
        if closed is None:  # someone else closed it first (a retry, the recovery loop): theirs stands
            return (await conn.execute(select(transactions).where(transactions.c.id == row.id))).one()
        await write_event(
            conn, transactions_outbox, SOURCE, f"transactions.transaction.{status}", transaction_from(closed)
        )
        return closed

    closed = await repo.commits.run(close)
    repo.relay.wake()
    return closed


async def forget(repo: Repo, row: Row) -> None:
    async def delete_row(conn: AsyncConnection) -> None:
        await conn.execute(delete(transactions).where(transactions.c.id == row.id, transactions.c.status == "pending"))

    await repo.commits.run(delete_row)


def transaction_from(row: Row) -> Transaction:
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
        inserted_at=timestamp(row.inserted_at),
    )


async def get_transaction(request: TransactionId, repo: Repo) -> Transaction:
    async with repo.db.reader.connect() as conn:
        row = (await conn.execute(select(transactions).where(transactions.c.id == request.id))).one_or_none()
    if row is None or row.status == "pending":
        raise NotFound(f"transaction {request.id} not found")
    return transaction_from(row)


async def list_transactions(request: ListTransactions, repo: Repo) -> TransactionPage:
    query = select(transactions).where(transactions.c.id > request.after_id, transactions.c.status != "pending")
    if request.user_id is not None:
        account = wallet(request.user_id)
        query = query.where(or_(transactions.c.from_account == account, transactions.c.to_account == account))
    async with repo.db.reader.connect() as conn:
        rows = (await conn.execute(query.order_by(transactions.c.id).limit(request.limit + 1))).all()
    items = [transaction_from(row) for row in rows[: request.limit]]
    return TransactionPage(items=items, next_after_id=items[-1].id if len(rows) > request.limit else None)


async def recover_forever(repo: Repo) -> None:
    """Drive pending transactions left by a crash (or a timed-out dependency) to their end."""
    while True:
        await recover_once(repo)
        await asyncio.sleep(recovery_interval_s)


async def recover_once(repo: Repo) -> int:
    stale = datetime.now(UTC) - timedelta(seconds=recovery_age_s)
    query = select(transactions).where(transactions.c.status == "pending", transactions.c.updated_at < stale)
    async with repo.db.reader.connect() as conn:
        rows = (await conn.execute(query.order_by(transactions.c.id).limit(recovery_batch_max))).all()
    for row in rows:
        try:
            await drive(repo, row)
        except (Unavailable, RemoteError, NotFound) as outcome:
            log.info("recovered transaction %s: %s", row.idempotency_key, outcome.message)
    return len(rows)


def add_endpoints(service: Service, repo: Repo) -> None:
    service.add_endpoint("transactions.deposits.create", create_deposit, repo)
    service.add_endpoint("transactions.withdrawals.create", create_withdrawal, repo)
    service.add_endpoint("transactions.transfers.create", create_transfer, repo)
    service.add_endpoint("transactions.purchases.create", create_purchase, repo)
    service.add_endpoint("transactions.transactions.get", get_transaction, repo)
    service.add_endpoint("transactions.transactions.list", list_transactions, repo)
    from handlers import ingest  # ingest routes messages to the create functions of this module

    async def recovery() -> None:
        await recover_forever(repo)

    async def ingest_consumer() -> None:
        await ingest.consume_forever(repo.nc.jetstream(), repo)

    repo.background.extend([recovery, ingest_consumer])


def serving(nc: Client) -> AbstractAsyncContextManager[Service]:
    return serving_with_outbox(
        nc, "transactions", "deposits, withdrawals, transfers and purchases", transactions_outbox, add_endpoints
    )
