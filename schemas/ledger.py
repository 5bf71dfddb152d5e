"""Messages and tables of the ledger (contract §4 `ledger.*`, §5)."""

from __future__ import annotations

import re
from typing import Annotated, get_type_hints

import msgspec
from msgspec import Meta
from sqlalchemy import BigInteger, CheckConstraint, Column, String, Table, Text
from sqlalchemy.types import TypeEngine

from schemas.common import (
    CURRENCY,
    INT64_MAX,
    LIMIT_DEFAULT,
    NO_NUL,
    Cents,
    Currency,
    Limit,
    NonNegative,
    Page,
    Request,
    metadata,
)
from schemas.database import UtcDateTime

KEY = "[A-Za-z0-9._:-]{1,128}"
"""An account, a transfer id or an idempotency key: one rule (contract §4, §5)."""
MEMO_LENGTH_MAX = 1024
Account = Annotated[str, Meta(pattern=f"^{KEY}\\Z")]
TransferId = Annotated[str, Meta(pattern=f"^{KEY}\\Z")]
Memo = Annotated[str, Meta(max_length=MEMO_LENGTH_MAX, pattern=NO_NUL)]
Seq = NonNegative
WORLD = "world"
GENESIS_HASH = "0" * 64
record_batch_transfers_max = 1000


def key_text(length: int) -> TypeEngine[str]:
    """A key column: bytewise comparisons on Postgres (`COLLATE "C"`, migration ledger_0003).

    Under the database's locale (here C.UTF-8) every comparison of an index descent went through
    `strcoll`: ≈ 10 % of Postgres' CPU at c512 (`perf`); bytewise, ≈ 3.5 µs less per transfer
    (bench/RESULTS.md, session 6). SQLite compares bytewise already (`BINARY`)."""
    return String(length).with_variant(String(length, collation="C"), "postgresql")


ledger_entries = Table(
    "ledger_entries",
    metadata,
    Column("seq", BigInteger, primary_key=True, autoincrement=False),
    Column("id", key_text(128), nullable=False, unique=True),
    Column("from_account", key_text(128), nullable=False),
    Column("to_account", key_text(128), nullable=False),
    Column("amount", BigInteger, nullable=False),
    Column("currency", key_text(3), nullable=False),
    Column("memo", Text, nullable=False),
    Column("recorded_at", UtcDateTime, nullable=False),
    Column("prev_hash", String(64), nullable=False),
    Column("hash", String(64), nullable=False),
    CheckConstraint("amount > 0", name="ledger_entries_amount_positive"),
    CheckConstraint("from_account <> to_account", name="ledger_entries_two_accounts"),
)
ledger_postings = Table(
    "ledger_postings",
    metadata,
    Column("account", key_text(128), primary_key=True),
    Column("last_seq", BigInteger, primary_key=True, autoincrement=False),
    Column("seqs", Text, nullable=False),
    sqlite_with_rowid=False,
)
"""`ledger.history`'s index, written in runs: per account, the seqs of its entries in one run (a
JSON array, ascending; `last_seq` its last), a run's rows stored over several batches
(`ledger.postings`). Entries past the `postings` cursor are found by scanning the chain
(`ledger.storage`).

Why: with two indexes on (account, seq), SQLite rewrote a page of each index per account a
batch touched (≈ 1.5 pages of log per transfer); with runs, a page per account per run (c512:
the ledger and relay's CPU per transfer 45-48 -> 38-41 µs, bench/RESULTS.md session 4). On
Postgres the two indexes took ≈ 40 % of its CPU per transfer (session 13). Accounts that recur
within a run (hot accounts) are what runs save on: with uniformly random accounts among
millions each entry still dirties pages of its own."""
ledger_balances = Table(
    "ledger_balances",
    metadata,
    Column("account", key_text(128), primary_key=True),
    Column("currency", key_text(3), primary_key=True),
    Column("balance", BigInteger, nullable=False),
)
ledger_refusals = Table(
    "ledger_refusals",
    metadata,
    Column("id", key_text(128), primary_key=True),
    Column("from_account", key_text(128), nullable=False),
    Column("to_account", key_text(128), nullable=False),
    Column("amount", BigInteger, nullable=False),
    Column("currency", key_text(3), nullable=False),
    Column("memo", Text, nullable=False),
    Column("error", Text, nullable=False),
    Column("refused_at", UtcDateTime, nullable=False),
)
"""The refusals of `ledger.internal.record` (the transactions saga's transfers), one per id: that id
is refused the same way ever after. `error` is the refusal's JSON body (contract §2). Without
them a saga's transfer refused once could be recorded by a later try of the same transaction,
after it was closed as rejected (session 20)."""
ledger_cursors = Table(
    "ledger_cursors",
    metadata,
    Column("name", String(64), primary_key=True),
    Column("seq", BigInteger, nullable=False),
)
"""How far the chain has been published as events (`events`: the chain is its own outbox) and
indexed for history (SQLite: `postings`, and the run being stored: `postings_run`, `postings_rows`)."""


class Transfer(Request, rename={"from_": "from"}):
    id: TransferId
    from_: Account
    to: Account
    amount: Cents
    currency: Currency
    memo: Memo = ""


class RecordBatch(Request):
    transfers: Annotated[list[Transfer], Meta(min_length=1, max_length=record_batch_transfers_max)]


def _unconstrained(request: type[Request]) -> type[Request]:
    """`request`'s fields, names on the wire and defaults, without their constraints
    (`get_type_hints` drops `Annotated` metadata)."""
    types = get_type_hints(request)
    fields = msgspec.structs.fields(request)
    return msgspec.defstruct(
        f"{request.__name__}Fields",
        [(field.name, types[field.name], field.default) for field in fields],
        bases=(Request,),
        rename={field.name: field.encode_name for field in fields},
    )


_TransferFields = _unconstrained(Transfer)
"""Decoded first, then checked by `_checked`."""


class _RecordBatchFields(Request):
    transfers: Annotated[list[_TransferFields], Meta(min_length=1, max_length=record_batch_transfers_max)]  # type: ignore[valid-type]


_keys_and_currency = re.compile(f"{KEY}\n{KEY}\n{KEY}\n{CURRENCY}").fullmatch
"""id, from, to and currency joined by newlines, which none of them may hold: four patterns in
one call."""


def _checked(fields: _TransferFields) -> Transfer | None:
    """The transfer, if it meets every constraint of `Transfer`; None if it may not."""
    if not (0 < fields.amount <= INT64_MAX and len(fields.memo) <= MEMO_LENGTH_MAX and "\x00" not in fields.memo):
        return None
    if not _keys_and_currency(f"{fields.id}\n{fields.from_}\n{fields.to}\n{fields.currency}"):
        return None
    return Transfer(fields.id, fields.from_, fields.to, fields.amount, fields.currency, fields.memo)


_decode_transfer_fields = msgspec.json.Decoder(_TransferFields).decode
_decode_record_batch_fields = msgspec.json.Decoder(_RecordBatchFields).decode
_decode_transfer = msgspec.json.Decoder(Transfer).decode
_decode_record_batch = msgspec.json.Decoder(RecordBatch).decode


def decode_transfer(data: bytes) -> Transfer:
    """`msgspec.json.decode(data, type=Transfer)`, in 0.87 µs instead of 1.57 (`timeit`): msgspec
    tests each pattern with its own `re.search` call. Whatever the quick check does not pass is
    decoded strictly, so errors are msgspec's own, word for word."""
    try:
        transfer = _checked(_decode_transfer_fields(data))
    except msgspec.DecodeError:
        transfer = None
    return _decode_transfer(data) if transfer is None else transfer


def decode_record_batch(data: bytes) -> RecordBatch:
    """`msgspec.json.decode(data, type=RecordBatch)`, quickly as `decode_transfer`."""
    try:
        transfers = [_checked(fields) for fields in _decode_record_batch_fields(data).transfers]
    except msgspec.DecodeError:
        transfers = [None]
    if any(transfer is None for transfer in transfers):
        return _decode_record_batch(data)
    return RecordBatch(transfers=transfers)  # type: ignore[arg-type]


class BalanceRequest(Request):
    account: Account


class HistoryRequest(Request):
    account: Account
    after_seq: Seq = 0
    limit: Limit = LIMIT_DEFAULT


class ChainRequest(Request):
    after_seq: Seq = 0
    limit: Limit = LIMIT_DEFAULT


class VerifyRequest(Request):
    pass


class Entry(msgspec.Struct, frozen=True, rename={"from_": "from"}):
    seq: int
    id: str
    from_: str
    to: str
    amount: int
    currency: str
    memo: str
    recorded_at: str
    prev_hash: str
    hash: str


class Entries(msgspec.Struct, frozen=True):
    items: list[Entry]


class EntryPage(Page, frozen=True):
    key = "seq"
    items: list[Entry]
    next_after_seq: int | None


class Balances(msgspec.Struct, frozen=True):
    account: str
    balances: dict[str, int]


class Verification(msgspec.Struct, frozen=True):
    ok: bool
    length: int
    head: str
    first_bad_seq: int | None
