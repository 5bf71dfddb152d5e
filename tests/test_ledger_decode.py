"""The ledger's quick decoders answer exactly as msgspec's strict ones: same value, same error."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import msgspec
from hypothesis import example, given, settings
from hypothesis import strategies as st

from schemas.common import INT64_MAX
from schemas.ledger import RecordBatch, Transfer, decode_record_batch, decode_transfer

KEY_CHARS = "ABCXYZabcxyz0189._:-"
near_limits = st.one_of(
    st.text(KEY_CHARS, min_size=1, max_size=3),
    st.sampled_from(["", "a" * 128, "a" * 129, "EUR", "eur", "EURO", "EUR\n", "\nEUR", "a\nb", "é", "a\x00", " a"]),
    st.text(max_size=8),
    st.text(KEY_CHARS + "\n\x00 é", min_size=125, max_size=130),
)
memos = st.one_of(st.text(max_size=6), st.sampled_from(["x" * 1024, "x" * 1025, "é" * 1024, "a\x00b", "a\nb\n"]))
amounts = st.one_of(
    st.sampled_from([0, 1, -1, INT64_MAX, INT64_MAX + 1, 2**64, 1.0, 1.5, True, "1", None]),
    st.integers(),
)
FIELDS = {"id": near_limits, "from": near_limits, "to": near_limits, "currency": near_limits, "amount": amounts}
OPTIONAL = {"memo": memos, "extra": st.integers()}
VALID = {"id": "t-1", "from": "world", "to": "user:1", "amount": 5, "currency": "EUR"}
transfers = st.one_of(
    st.fixed_dictionaries({}, optional=FIELDS | OPTIONAL).map(lambda changed: {**VALID, **changed}),
    st.fixed_dictionaries({}, optional=FIELDS | OPTIONAL),
)
"""Valid but for a few fields, or with some missing."""


def outcome(decode: Callable[[bytes], Any], data: bytes) -> Any:
    try:
        return decode(data)
    except msgspec.DecodeError as exc:
        return (type(exc), str(exc))


@settings(max_examples=3000, deadline=None)
@given(transfers | st.just(VALID))
@example({**VALID, "memo": "x" * 1024})
@example({**VALID, "to": "user:1\n"})
@example({**VALID, "amount": INT64_MAX})
def test_decode_transfer_is_msgspecs_decode(body: dict) -> None:
    data = json.dumps(body).encode()
    assert outcome(decode_transfer, data) == outcome(msgspec.json.Decoder(Transfer).decode, data)


@settings(max_examples=500, deadline=None)
@given(st.lists(st.one_of(transfers, st.just(VALID)), max_size=4) | st.just([VALID] * 1001))
def test_decode_record_batch_is_msgspecs_decode(items: list[dict]) -> None:
    data = json.dumps({"transfers": items}).encode()
    assert outcome(decode_record_batch, data) == outcome(msgspec.json.Decoder(RecordBatch).decode, data)


def test_the_quick_path_takes_valid_bodies_and_gives_transfers() -> None:
    """Not only equal by falling back: a valid body passes the quick check itself."""
    from schemas import ledger

    fields = ledger._decode_transfer_fields(json.dumps({**VALID, "memo": "m"}).encode())
    assert ledger._checked(fields) == Transfer("t-1", "world", "user:1", 5, "EUR", "m")
    for bad in ({"to": "user:1\n"}, {"currency": "EURO"}, {"amount": 0}, {"memo": "a\x00"}, {"id": "a" * 129}):
        assert ledger._checked(ledger._decode_transfer_fields(json.dumps({**VALID, **bad}).encode())) is None
