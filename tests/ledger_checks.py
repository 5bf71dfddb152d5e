"""Independent checks of the ledger's invariants, computed from what any client can read."""

from __future__ import annotations

import hashlib
from collections import defaultdict

import rfc8785

from tests.conftest import Mesh

GENESIS = "0" * 64
HASHED_FIELDS = ("seq", "id", "from", "to", "amount", "currency", "memo", "recorded_at")


JS_SAFE_INTEGER_MAX = 2**53 - 1


def outside_hash(entry: dict) -> str:
    """The contract's formula with a third-party RFC 8785 implementation.

    RFC 8785 numbers are IEEE doubles, so JCS libraries refuse integers past 2^53 - 1; the
    ledger writes every integer exactly (docs/decisions.md), which is the same bytes below
    that bound. Above it, this check canonicalises with 0 and splices in the exact digits.
    """
    body = {key: entry[key] for key in HASHED_FIELDS}
    if body["amount"] <= JS_SAFE_INTEGER_MAX and body["seq"] <= JS_SAFE_INTEGER_MAX:
        canonical = rfc8785.dumps(body)
    else:
        canonical = rfc8785.dumps({**body, "amount": 0})
        assert canonical.startswith(b'{"amount":0,')
        canonical = b'{"amount":%d,' % body["amount"] + canonical.removeprefix(b'{"amount":0,')
    return hashlib.sha256(entry["prev_hash"].encode() + canonical).hexdigest()


async def whole_chain(mesh: Mesh) -> list[dict]:
    entries, after = [], 0
    while True:
        page = await mesh.ok("ledger.chain", {"after_seq": after, "limit": 1000})
        entries += page["items"]
        if page["next_after_seq"] is None:
            return entries
        after = page["next_after_seq"]


async def whole_history(mesh: Mesh, account: str, limit: int = 10) -> list[dict]:
    entries, after = [], 0
    while True:
        page = await mesh.ok("ledger.history", {"account": account, "after_seq": after, "limit": limit})
        entries += page["items"]
        if page["next_after_seq"] is None:
            return entries
        after = page["next_after_seq"]


async def assert_ledger_invariants(mesh: Mesh) -> list[dict]:
    """Seq dense from 1, hashes recomputable, sums zero, only world negative, stored = replayed,
    every account's history is the chain's entries from or to it."""
    entries = await whole_chain(mesh)
    replayed: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    prev = GENESIS
    for expected_seq, entry in enumerate(entries, start=1):
        assert entry["seq"] == expected_seq
        assert entry["prev_hash"] == prev
        assert entry["hash"] == outside_hash(entry)
        replayed[entry["from"]][entry["currency"]] -= entry["amount"]
        replayed[entry["to"]][entry["currency"]] += entry["amount"]
        prev = entry["hash"]
    totals: dict[str, int] = defaultdict(int)
    for account, balances in replayed.items():
        stored = (await mesh.ok("ledger.balance", {"account": account}))["balances"]
        assert stored == {currency: value for currency, value in balances.items()}, account
        for currency, value in balances.items():
            totals[currency] += value
            assert value >= 0 or account == "world", (account, currency, value)
    assert all(total == 0 for total in totals.values()), totals
    for account in replayed:
        assert await whole_history(mesh, account) == [e for e in entries if account in (e["from"], e["to"])], account
    verification = await mesh.ok("ledger.verify", {})
    assert verification == {"ok": True, "length": len(entries), "head": prev, "first_bad_seq": None}
    return entries
