"""The hash chain (contract §5): `hash = sha256_hex(prev_hash + JCS(body))`, recomputable by anyone.

`body` = {seq, id, from, to, amount, currency, memo, recorded_at}. RFC 8785 (JCS) sorts keys
and writes no whitespace; strings escape only `"`, `\\`, and control characters (short forms
and lower-case `\\u00xx`), exactly what msgspec writes. The Struct below declares its fields
in JCS order, so encoding it is the canonical form.
"""

from __future__ import annotations

import hashlib

import msgspec

from schemas.ledger import GENESIS_HASH, Entry


class HashedBody(msgspec.Struct, frozen=True, rename={"from_": "from"}):
    amount: int
    currency: str
    from_: str
    id: str
    memo: str
    recorded_at: str
    seq: int
    to: str


_encode = msgspec.json.Encoder().encode
_names = [field.encode_name for field in msgspec.structs.fields(HashedBody)]
assert _names == sorted(_names), "JCS orders keys; the Struct must declare them in that order"


def canonical_body(
    seq: int, id: str, from_: str, to: str, amount: int, currency: str, memo: str, recorded_at: str
) -> bytes:
    return _encode(HashedBody(amount, currency, from_, id, memo, recorded_at, seq, to))


def entry_hash(prev_hash: str, body: bytes) -> str:
    return hashlib.sha256(prev_hash.encode() + body).hexdigest()


def make_entry(
    seq: int, id: str, from_: str, to: str, amount: int, currency: str, memo: str, recorded_at: str, prev_hash: str
) -> Entry:
    body = canonical_body(seq, id, from_, to, amount, currency, memo, recorded_at)
    return Entry(seq, id, from_, to, amount, currency, memo, recorded_at, prev_hash, entry_hash(prev_hash, body))


def entry_is_valid(entry: Entry, prev_hash: str, seq: int) -> bool:
    """The entry follows `prev_hash` at `seq` and its hash is what its body says."""
    if entry.seq != seq or entry.prev_hash != prev_hash:
        return False
    body = canonical_body(
        entry.seq, entry.id, entry.from_, entry.to, entry.amount, entry.currency, entry.memo, entry.recorded_at
    )
    return entry.hash == entry_hash(prev_hash, body)


assert len(GENESIS_HASH) == 64
