"""Property tests: random and hostile bodies at every endpoint get a 4xx, never a 500 or silence."""

from __future__ import annotations

import asyncio
import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import Mesh

ENDPOINT_FIELDS = {
    "accounts.users.create": ["email", "name", "password"],
    "accounts.users.get": ["id"],
    "accounts.users.list": ["limit", "after_id"],
    "accounts.users.update": ["id", "email", "name", "password"],
    "accounts.users.delete": ["id"],
    "accounts.users.authenticate": ["email", "password"],
    "products.products.create": ["sku", "name", "description", "price", "currency", "stock", "seller_id"],
    "products.products.get": ["id"],
    "products.products.list": ["limit", "after_id"],
    "products.products.update": ["id", "sku", "name", "price", "stock", "seller_id"],
    "products.products.delete": ["id"],
    "products.internal.stock.reserve": ["reservation_id", "product_id", "quantity"],
    "products.internal.stock.release": ["reservation_id", "product_id", "quantity"],
    "transactions.deposits.create": ["idempotency_key", "user_id", "amount", "currency"],
    "transactions.withdrawals.create": ["idempotency_key", "user_id", "amount", "currency"],
    "transactions.transfers.create": ["idempotency_key", "from_user_id", "to_user_id", "amount", "currency", "memo"],
    "transactions.purchases.create": ["idempotency_key", "buyer_id", "product_id", "quantity"],
    "transactions.transactions.get": ["id"],
    "transactions.transactions.list": ["user_id", "limit", "after_id"],
    "ledger.record": ["id", "from", "to", "amount", "currency", "memo"],
    "ledger.internal.record": ["id", "from", "to", "amount", "currency", "memo"],
    "ledger.record_batch": ["transfers"],
    "ledger.balance": ["account"],
    "ledger.history": ["account", "after_seq", "limit"],
    "ledger.chain": ["after_seq", "limit"],
    "ledger.verify": [],
}
EXPECTED_CODES = {None, 400, 401, 404, 409, 422}

hostile_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.sampled_from([0, -1, 1, 2**63 - 1, 2**63, -(2**63), 2**64]),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=300),
    st.sampled_from(["", " ", "a@b", "EUR", "x" * 5000, "\u0000", "'; DROP TABLE users; --", "é@ü.de"]),
)
json_values = st.recursive(
    hostile_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)


def bodies(fields: list[str]) -> st.SearchStrategy[bytes]:
    objects = st.dictionaries(st.sampled_from([*fields, "extra", "__proto__"]), json_values, max_size=len(fields) + 1)
    return st.one_of(
        objects.map(lambda value: json.dumps(value).encode()),
        json_values.map(lambda value: json.dumps(value).encode()),
        st.binary(max_size=200),
        st.sampled_from([b"", b"{", b"{}", b"[]", b"null", b'{"id": 1, "id": 2}', b"\xff\xfe", b'{"id": 1e400}']),
    )


@pytest.mark.parametrize("subject", sorted(ENDPOINT_FIELDS))
async def test_random_and_hostile_bodies_get_client_errors_only(mesh: Mesh, subject: str) -> None:
    loop = asyncio.get_running_loop()

    @settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
    @given(body=bodies(ENDPOINT_FIELDS[subject]))
    def check(body: bytes) -> None:
        code, reply = asyncio.run_coroutine_threadsafe(mesh.request(subject, body, timeout_s=5), loop).result(10)
        assert code in EXPECTED_CODES, (code, reply)
        if code is not None:
            assert set(reply) == {"error"} and reply["error"]["code"] == code

    await asyncio.to_thread(check)
    ping = await mesh.nc.request(f"$SRV.PING.{subject.split('.')[0]}", b"", timeout=2)
    assert json.loads(ping.data)["type"] == "io.nats.micro.v1.ping_response"
    stats = json.loads((await mesh.nc.request(f"$SRV.STATS.{subject.split('.')[0]}", b"", timeout=2)).data)
    assert not any(endpoint["last_error"].startswith("500:") for endpoint in stats["endpoints"])


NUL = "a\u0000b"
TRANSFER = {"id": "t-nul", "from": "world", "to": "user:1", "amount": 5, "currency": "EUR"}
STORED_TEXT = [
    ("accounts.users.create", {"email": "nul@example.com", "name": NUL, "password": "password1"}, "$.name"),
    ("accounts.users.create", {"email": f"{NUL}@example.com", "name": "N", "password": "password1"}, "$.email"),
    ("accounts.users.update", {"id": 1, "name": NUL}, "$.name"),
    (
        "products.products.create",
        {"sku": "nul", "name": NUL, "price": 1, "currency": "EUR", "stock": 1, "seller_id": 1},
        "$.name",
    ),
    (
        "products.products.create",
        {"sku": "nul", "name": "N", "description": NUL, "price": 1, "currency": "EUR", "stock": 1, "seller_id": 1},
        "$.description",
    ),
    ("ledger.record", {**TRANSFER, "memo": NUL}, "$.memo"),
    ("ledger.record_batch", {"transfers": [TRANSFER, {**TRANSFER, "id": "t2", "memo": NUL}]}, "$.transfers[1].memo"),
    (
        "transactions.transfers.create",
        {"idempotency_key": "k", "from_user_id": 1, "to_user_id": 2, "amount": 1, "currency": "EUR", "memo": NUL},
        "$.memo",
    ),
]


@pytest.mark.parametrize(("subject", "body", "field"), STORED_TEXT, ids=[f"{s} {f}" for s, _, f in STORED_TEXT])
async def test_text_postgres_cannot_store_is_a_400_naming_the_field(
    mesh: Mesh, subject: str, body: dict, field: str
) -> None:
    """U+0000: SQLite stored it, Postgres failed the whole batch with a 500; refused alike on both."""
    code, reply = await mesh.request(subject, body)
    assert code == 400 and reply["error"]["details"] == [field], reply


CURSORS = [
    ("accounts.users.list", {}, "after_id"),
    ("products.products.list", {}, "after_id"),
    ("transactions.transactions.list", {}, "after_id"),
    ("transactions.transactions.list", {"user_id": 1}, "after_id"),
    ("ledger.chain", {}, "after_seq"),
    ("ledger.history", {"account": "user:1"}, "after_seq"),
]


@pytest.mark.parametrize(("subject", "fields", "cursor"), CURSORS, ids=[f"{s} {f}" for s, f, _ in CURSORS])
async def test_a_cursor_at_int64s_end_gives_an_empty_page_and_one_past_it_a_400(
    mesh: Mesh, subject: str, fields: dict, cursor: str
) -> None:
    """A cursor had no upper bound until session 26: past 2^63 - 1 Postgres' driver could not pass
    it (a 500), and on Postgres a ledger page whose seq range summed past it overflowed."""
    for after in (2**63 - 1001, 2**63 - 1):
        page = await mesh.ok(subject, {**fields, cursor: after, "limit": 1000})
        assert page == {"items": [], f"next_{cursor}": None}, after
    for after in (2**63, 10**30):
        code, reply = await mesh.request(subject, {**fields, cursor: after})
        assert (code, reply["error"]["details"]) == (400, [f"$.{cursor}"]), after


async def test_a_refused_memo_refuses_only_its_own_request(mesh: Mesh) -> None:
    """Requests batched with it commit as if it had never come."""
    good = [mesh.request("ledger.record", {**TRANSFER, "id": f"good-{n}"}) for n in range(20)]
    bad = mesh.request("ledger.record", {**TRANSFER, "memo": NUL})
    *answers, refused = await asyncio.gather(*good, bad)
    assert refused[0] == 400
    assert [code for code, _ in answers] == [None] * 20
    chain = await mesh.ok("ledger.chain", {})
    assert sorted(entry["id"] for entry in chain["items"]) == sorted(f"good-{n}" for n in range(20))


PRODUCT = {"sku": "sku-1", "name": "N", "price": 1, "currency": "EUR", "stock": 1, "seller_id": 1}
CREATE_TRANSFER = {"idempotency_key": "k", "from_user_id": 1, "to_user_id": 2, "amount": 1, "currency": "EUR"}
PATTERNED = [
    ("ledger.record", TRANSFER, "id"),
    ("ledger.record", TRANSFER, "from"),
    ("ledger.record", TRANSFER, "to"),
    ("ledger.record", TRANSFER, "currency"),
    ("products.products.create", PRODUCT, "sku"),
    ("products.products.create", PRODUCT, "currency"),
    ("products.internal.stock.reserve", {"reservation_id": "r", "product_id": 1, "quantity": 1}, "reservation_id"),
    ("accounts.users.create", {"email": "a@example.com", "name": "N", "password": "password1"}, "email"),
    ("transactions.transfers.create", CREATE_TRANSFER, "idempotency_key"),
    ("transactions.transfers.create", CREATE_TRANSFER, "currency"),
]


@pytest.mark.parametrize(("subject", "body", "field"), PATTERNED, ids=[f"{s} {f}" for s, _, f in PATTERNED])
async def test_a_trailing_newline_is_outside_every_pattern(mesh: Mesh, subject: str, body: dict, field: str) -> None:
    """Python's `$` also matches before a final newline: `"EUR\\n"` passed `^[A-Z]{3}$` and was stored.
    The message shows the pattern's end as `$`, not as msgspec quotes `\\Z`."""
    code, reply = await mesh.request(subject, {**body, field: body[field] + "\n"})
    assert code == 400 and reply["error"]["details"] == [f"$.{field}"], reply
    assert reply["error"]["message"].startswith("Expected `str` matching regex '^"), reply
    assert reply["error"]["message"].endswith("$'") and "Z'" not in reply["error"]["message"], reply
