"""Messages and tables of the transactions service (contract §4 `transactions.*`, §6, §7)."""

from __future__ import annotations

from typing import Annotated, Any

import msgspec
from msgspec import Meta
from sqlalchemy import BigInteger, CheckConstraint, Column, Index, String, Table, Text

from schemas.common import BigId, ById, Cents, Currency, Id, Page, PageRequest, Request, metadata
from schemas.database import UtcDateTime
from schemas.events import outbox_table
from schemas.ledger import KEY, Memo

IdempotencyKey = Annotated[str, Meta(pattern=f"^{KEY}\\Z")]

transactions = Table(
    "transactions",
    metadata,
    Column("id", BigId, primary_key=True, autoincrement=True),
    Column("idempotency_key", String(128), nullable=False, unique=True),
    Column("fingerprint", String(64), nullable=False),
    Column("kind", String(16), nullable=False),
    Column("status", String(16), nullable=False),
    Column("from_account", String(128), nullable=False),
    Column("to_account", String(128), nullable=True),
    Column("amount", BigInteger, nullable=True),
    Column("currency", String(3), nullable=True),
    Column("product_id", BigInteger, nullable=True),
    Column("quantity", BigInteger, nullable=True),
    Column("memo", Text, nullable=False),
    Column("ledger_seq", BigInteger, nullable=True),
    Column("ledger_hash", String(64), nullable=True),
    Column("refusal", Text, nullable=True),
    Column("inserted_at", UtcDateTime, nullable=False),
    Column("updated_at", UtcDateTime, nullable=False),
    CheckConstraint("status IN ('pending', 'committed', 'rejected')", name="transactions_status"),
    CheckConstraint("kind IN ('deposit', 'withdrawal', 'transfer', 'purchase')", name="transactions_kind"),
    Index("transactions_from_account", "from_account", "id"),
    Index("transactions_to_account", "to_account", "id"),
    Index("transactions_pending", "status", "updated_at"),
    sqlite_autoincrement=True,
)
"""A saga's durable state: `pending` until the ledger answered, then `committed` or `rejected`.
`refusal` holds the error of a refused request (its 422 body), kept so a retry gets the same."""
transactions_outbox = outbox_table("transactions")


class CreateDeposit(Request):
    idempotency_key: IdempotencyKey
    user_id: Id
    amount: Cents
    currency: Currency


class CreateWithdrawal(CreateDeposit):
    pass


class CreateTransfer(Request):
    idempotency_key: IdempotencyKey
    from_user_id: Id
    to_user_id: Id
    amount: Cents
    currency: Currency
    memo: Memo = ""


class CreatePurchase(Request):
    idempotency_key: IdempotencyKey
    buyer_id: Id
    product_id: Id
    quantity: Cents


TransactionId = ById


class ListTransactions(PageRequest):
    user_id: Id | None = None


class Transaction(msgspec.Struct, frozen=True):
    id: int
    idempotency_key: str
    kind: str
    from_account: str
    to_account: str | None
    amount: int | None
    currency: str | None
    product_id: int | None
    quantity: int | None
    memo: str
    status: str
    ledger_seq: int | None
    ledger_hash: str | None
    inserted_at: str


class TransactionPage(Page, frozen=True):
    key = "id"
    items: list[Transaction]
    next_after_id: int | None


class Rejection(msgspec.Struct, frozen=True):
    """Data of a `rejected` event for a message that could not be read as a request."""

    idempotency_key: str | None
    error: Any
