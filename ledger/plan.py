"""Deciding a batch, without I/O: which requests commit, their seq and hash, the new balances.

The writer reads the head, the balances and the already-recorded ids a batch touches, calls
`plan`, writes what it returns in one transaction, and only then answers. Each request
(a `ledger.record`, or a whole `ledger.record_batch`) is all or nothing and refuses only itself.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

from bus.errors import Conflict, ErrorBody, RemoteError, ServiceError, Unprocessable
from ledger.chain import make_entry
from schemas.common import INT64_MAX
from schemas.ledger import GENESIS_HASH, WORLD, Entry, Transfer

INT64_MIN = -(2**63)
BalanceKey = tuple[str, str]
"""(account, currency)"""


class Head(NamedTuple):
    """The chain's last entry. A NamedTuple: made once per request planned, and per handed-over
    batch, in 0.15 µs where a frozen dataclass took 0.7."""

    seq: int = 0
    hash: str = GENESIS_HASH


@dataclass(frozen=True)
class Refusal:
    """A kept refusal (`ledger_refusals`): its transfer's id is refused the same way ever after."""

    transfer: Transfer
    error: ErrorBody


@dataclass
class Plan:
    outcomes: list[list[Entry] | ServiceError] = field(default_factory=list)
    """One per request, in order: its entries (new or recorded before) or why it was refused."""
    new_entries: list[Entry] = field(default_factory=list)
    balances: dict[BalanceKey, int] = field(default_factory=dict)
    """Only the balances this batch changed, with their new values."""
    head: Head = field(default_factory=Head)
    refusals: list[Refusal] = field(default_factory=list)
    """The refusals of kept requests this batch made, to store with it."""


def same_body(transfer: Transfer, entry: Entry | Transfer) -> bool:
    """The same transfer apart from its id: a recorded entry, or a kept refusal's transfer."""
    return (transfer.from_, transfer.to, transfer.amount, transfer.currency, transfer.memo) == (
        entry.from_,
        entry.to,
        entry.amount,
        entry.currency,
        entry.memo,
    )


def plan(
    requests: list[list[Transfer]],
    head: Head,
    recorded: dict[str, Entry],
    balances: dict[BalanceKey, int],
    recorded_at: str,
    batched: list[bool],
    kept: list[bool] | None = None,
    refused: dict[str, Refusal] | None = None,
) -> Plan:
    """Apply `requests` in order.

    A kept request (`kept`: `ledger.internal.record`'s, one transfer each) whose id was refused
    before (`refused`) gets that refusal again, and a new refusal of one is kept
    (`Plan.refusals`). A recorded entry still comes first: the id's entry, whoever recorded it.

    `balances` holds the stored value of every key the requests touch (absent is 0) and is
    updated in place as requests commit; `recorded` holds entries already stored for their ids.
    A request's transfers change `balances` as they go, and a refusal undoes what the request's
    earlier transfers did: no dicts of changes and new ids per request. In a batch of single
    transfers (`ledger.record`'s) that is a fifth less time per transfer, sha256 included
    (`timeit`, on a slow minute: 8.0 → 6.3 µs).
    """
    result = Plan(head=head)
    kept = kept or [False] * len(requests)
    refused = dict(refused or {})
    known = dict(recorded)
    new_entries = result.new_entries
    changed: dict[BalanceKey, int | None] = {}
    """The keys committed requests changed: `undo`'s pairs as they are, the values unused."""
    seq, prev_hash = head
    for transfers, is_batch, is_kept in zip(requests, batched, kept, strict=True):
        assert not is_kept or (len(transfers) == 1 and not is_batch), "a kept request is one transfer"
        answer: list[Entry] = []
        undo: list[tuple[BalanceKey, int | None]] = []
        first_new, seq_before, prev_hash_before = len(new_entries), seq, prev_hash
        refusal: ServiceError | None = None
        for index, transfer in enumerate(transfers):
            earlier = known.get(transfer.id)
            if earlier is not None:
                if not same_body(transfer, earlier):
                    refusal = Conflict(
                        f"transfer id {transfer.id} was recorded with another body",
                        type="idempotency_conflict",
                        details=_where(is_batch, index),
                    )
                    break
                answer.append(earlier)
                continue
            if is_kept:
                refusal = _kept_refusal(transfer, refused.get(transfer.id))
                if refusal is not None:
                    break
            refusal = _refusal(transfer, balances, undo, is_batch, index)
            if refusal is not None:
                if is_kept:
                    refused[transfer.id] = Refusal(transfer, refusal.body())
                    result.refusals.append(refused[transfer.id])
                break
            seq += 1
            entry = make_entry(
                seq,
                transfer.id,
                transfer.from_,
                transfer.to,
                transfer.amount,
                transfer.currency,
                transfer.memo,
                recorded_at,
                prev_hash,
            )
            prev_hash = entry.hash
            known[entry.id] = entry
            new_entries.append(entry)
            answer.append(entry)
        if refusal is None:
            result.outcomes.append(answer)
            changed.update(undo)
            continue
        result.outcomes.append(refusal)
        for key, before in reversed(undo):
            if before is None:
                del balances[key]
            else:
                balances[key] = before
        for entry in new_entries[first_new:]:
            del known[entry.id]
        del new_entries[first_new:]
        seq, prev_hash = seq_before, prev_hash_before
    result.balances = {key: balances[key] for key in changed}
    result.head = Head(seq, prev_hash)
    _assert_plan(result, head)
    return result


def _kept_refusal(transfer: Transfer, earlier: Refusal | None) -> ServiceError | None:
    """A kept request's answer from its id's kept refusal, if there is one."""
    if earlier is None:
        return None
    if not same_body(transfer, earlier.transfer):
        return Conflict(f"transfer id {transfer.id} was refused with another body", type="idempotency_conflict")
    return RemoteError(earlier.error)


def _where(is_batch: bool, index: int) -> list[str]:
    """A refusal's `details`: the transfer's path in a `ledger.record_batch` body."""
    return [f"$.transfers[{index}]"] if is_batch else []


def _refusal(
    transfer: Transfer,
    balances: dict[BalanceKey, int],
    undo: list[tuple[BalanceKey, int | None]],
    is_batch: bool,
    index: int,
) -> ServiceError | None:
    """Check one transfer against the balances so far; on success apply it to `balances` and
    note in `undo` what each changed key held before (None: absent)."""
    if transfer.from_ == transfer.to:
        return Unprocessable("from and to are the same account", type="same_account", details=_where(is_batch, index))
    debit, credit = (transfer.from_, transfer.currency), (transfer.to, transfer.currency)
    debit_before, credit_before = balances.get(debit), balances.get(credit)
    debit_after = (debit_before or 0) - transfer.amount
    credit_after = (credit_before or 0) + transfer.amount
    if debit_after < 0 and transfer.from_ != WORLD:
        return Unprocessable(
            f"insufficient funds in {transfer.from_}", type="insufficient_funds", details=_where(is_batch, index)
        )
    if debit_after < INT64_MIN or credit_after > INT64_MAX:
        return Unprocessable(
            "a balance would leave the signed 64-bit range", type="amount_overflow", details=_where(is_batch, index)
        )
    undo.append((debit, debit_before))
    undo.append((credit, credit_before))
    balances[debit], balances[credit] = debit_after, credit_after
    return None


def _assert_plan(result: Plan, start: Head) -> None:
    """Invariants of every plan: dense seqs from the head, linked hashes, no account but world negative."""
    expected_seq, expected_prev = start.seq + 1, start.hash
    for entry in result.new_entries:
        assert entry.seq == expected_seq
        assert entry.prev_hash == expected_prev
        assert entry.from_ != entry.to
        expected_seq, expected_prev = entry.seq + 1, entry.hash
    assert result.head == (Head(expected_seq - 1, expected_prev) if result.new_entries else start)
    for (account, _currency), balance in result.balances.items():
        assert balance >= 0 or account == WORLD
        assert INT64_MIN <= balance <= INT64_MAX
