"""`transactions.*` as the contract writes them, on SQLite and on Postgres."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import msgspec
import nats.errors
import pytest
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.errors import NotFoundError
from sqlalchemy import update
from sqlalchemy.ext.asyncio import AsyncConnection

import schemas.database
from bench.services import table_locked
from bus.events import relay_poll_interval_s
from bus.service import Service
from handlers import ingest, transactions
from handlers.batching import read_loader
from handlers.ingest import INGEST_STREAM
from handlers.runtime import Repo
from handlers.transaction_store import NewTransaction, Stored, TransactionSql
from schemas.accounts import User, UserId
from schemas.database import open_database, service_url
from schemas.transactions import transactions as transactions_table
from schemas.transactions import transactions_outbox
from tests.conftest import Mesh, fresh_streams
from tests.ledger_checks import assert_ledger_invariants

TRANSACTION_FIELDS = [
    "id",
    "idempotency_key",
    "kind",
    "from_account",
    "to_account",
    "amount",
    "currency",
    "product_id",
    "quantity",
    "memo",
    "status",
    "ledger_seq",
    "ledger_hash",
    "inserted_at",
]


async def user(mesh: Mesh, name: str) -> int:
    return (await mesh.ok("accounts.users.create", {"email": f"{name}@x.io", "name": name, "password": "password1"}))[
        "id"
    ]


async def balance(mesh: Mesh, user_id: int, currency: str = "EUR") -> int:
    return (await mesh.ok("ledger.balance", {"account": f"user:{user_id}"}))["balances"].get(currency, 0)


async def test_deposit_withdrawal_and_transfer_move_money_through_the_ledger(mesh: Mesh) -> None:
    alice, bob = await user(mesh, "alice"), await user(mesh, "bob")
    deposit = await mesh.ok(
        "transactions.deposits.create", {"idempotency_key": "d-1", "user_id": alice, "amount": 1000, "currency": "EUR"}
    )
    assert list(deposit) == TRANSACTION_FIELDS
    assert (deposit["kind"], deposit["status"], deposit["from_account"], deposit["to_account"]) == (
        "deposit",
        "committed",
        "world",
        f"user:{alice}",
    )
    assert deposit["ledger_seq"] == 1 and len(deposit["ledger_hash"]) == 64
    transfer = await mesh.ok(
        "transactions.transfers.create",
        {
            "idempotency_key": "t-1",
            "from_user_id": alice,
            "to_user_id": bob,
            "amount": 300,
            "currency": "EUR",
            "memo": "rent",
        },
    )
    assert transfer["memo"] == "rent" and transfer["kind"] == "transfer"
    withdrawal = await mesh.ok(
        "transactions.withdrawals.create", {"idempotency_key": "w-1", "user_id": bob, "amount": 100, "currency": "EUR"}
    )
    assert withdrawal["to_account"] == "world"
    assert (await balance(mesh, alice), await balance(mesh, bob)) == (700, 200)
    assert await mesh.ok("transactions.transactions.get", {"id": transfer["id"]}) == transfer
    await assert_ledger_invariants(mesh)


async def test_gets_asked_together_are_each_transactions_own(mesh: Mesh) -> None:
    """Gets that come together are one statement (`read_loader`): each answer is its own transaction."""
    alice = await user(mesh, "alice")
    body = {"user_id": alice, "currency": "EUR"}
    made = [
        await mesh.ok("transactions.deposits.create", {**body, "idempotency_key": f"g-{n}", "amount": n + 1})
        for n in range(12)
    ]
    ids = [transaction["id"] for transaction in made] * 2 + [made[-1]["id"] + 1]
    answers = await asyncio.gather(*(mesh.request("transactions.transactions.get", {"id": id}) for id in ids))
    assert [reply for _, reply in answers[:-1]] == made * 2
    assert answers[-1][0] == 404


async def test_refused_requests_are_rejected_finally_and_move_nothing(mesh: Mesh) -> None:
    alice, bob = await user(mesh, "alice"), await user(mesh, "bob")
    body = {"idempotency_key": "too-much", "user_id": alice, "amount": 5, "currency": "EUR"}
    code, reply = await mesh.request("transactions.withdrawals.create", body)
    assert code == 422 and reply["error"]["type"] == "insufficient_funds"
    await mesh.ok(
        "transactions.deposits.create", {"idempotency_key": "d", "user_id": alice, "amount": 10, "currency": "EUR"}
    )
    code, again = await mesh.request("transactions.withdrawals.create", body)
    assert code == 422 and again == reply  # final: a retry gets the same refusal
    code, reply = await mesh.request(
        "transactions.transfers.create",
        {"idempotency_key": "self", "from_user_id": alice, "to_user_id": alice, "amount": 1, "currency": "EUR"},
    )
    assert code == 422 and reply["error"]["type"] == "same_account"
    page = await mesh.ok("transactions.transactions.list", {"user_id": alice})
    statuses = {item["idempotency_key"]: item["status"] for item in page["items"]}
    assert statuses == {"too-much": "rejected", "d": "committed", "self": "rejected"}
    rejected = next(item for item in page["items"] if item["idempotency_key"] == "too-much")
    assert rejected["ledger_seq"] is None and rejected["ledger_hash"] is None
    assert await balance(mesh, alice) == 10 and await balance(mesh, bob) == 0


async def every_page(mesh: Mesh, body: dict, limit: int) -> list[dict]:
    """The items of `transactions.transactions.list` for `body`, page by page of `limit`."""
    items: list[dict] = []
    after_id = 0
    for _ in range(100):
        page = await mesh.ok("transactions.transactions.list", {**body, "limit": limit, "after_id": after_id})
        assert len(page["items"]) <= limit
        items += page["items"]
        if page["next_after_id"] is None:
            return items
        assert page["next_after_id"] == page["items"][-1]["id"]
        after_id = page["next_after_id"]
    raise AssertionError("more than 100 pages")


async def test_a_users_list_pages_through_what_they_sent_and_received_once_each_in_id_order(
    mesh: Mesh, database: str
) -> None:
    alice, bob, carol = [await user(mesh, name) for name in ("alice", "bob", "carol")]
    asked = [
        ("transactions.deposits.create", {"user_id": alice, "amount": 100}),
        ("transactions.deposits.create", {"user_id": bob, "amount": 100}),
        ("transactions.transfers.create", {"from_user_id": alice, "to_user_id": bob, "amount": 10}),
        ("transactions.transfers.create", {"from_user_id": bob, "to_user_id": carol, "amount": 5}),
        ("transactions.transfers.create", {"from_user_id": bob, "to_user_id": alice, "amount": 3}),
        ("transactions.transfers.create", {"from_user_id": alice, "to_user_id": alice, "amount": 1}),  # rejected
        ("transactions.withdrawals.create", {"user_id": alice, "amount": 1_000}),  # rejected
        ("transactions.transfers.create", {"from_user_id": carol, "to_user_id": bob, "amount": 1}),
        ("transactions.withdrawals.create", {"user_id": alice, "amount": 7}),
    ]
    for number, (subject, body) in enumerate(asked):
        await mesh.request(subject, {**body, "idempotency_key": f"k{number}", "currency": "EUR"})
    db = open_database(service_url("transactions", database))
    try:
        async with db.writer.begin() as conn:  # one still pending: no list shows it
            now = datetime.now(UTC)
            pending = {"idempotency_key": "in-flight", "fingerprint": "", "kind": "transfer", "status": "pending"}
            pending |= {"from_account": f"user:{alice}", "to_account": f"user:{bob}", "amount": 1, "currency": "EUR"}
            await conn.execute(transactions_table.insert().values(**pending, memo="", inserted_at=now, updated_at=now))
    finally:
        await db.dispose()
    everything = await every_page(mesh, {}, 1_000)
    assert [item["idempotency_key"] for item in everything] == [f"k{number}" for number in range(len(asked))]
    listed = {None: everything}
    for who in (alice, bob, carol):
        listed[who] = [item for item in everything if f"user:{who}" in (item["from_account"], item["to_account"])]
        assert len(listed[who]) >= 2
        for limit in (1, 2, 3, 1_000):
            assert await every_page(mesh, {"user_id": who}, limit) == listed[who], (who, limit)
            assert await every_page(mesh, {}, limit) == everything
    pages = [(who, after, limit) for who in listed for after in [0, *(t["id"] for t in everything)] for limit in (1, 3)]
    bodies = [{"after_id": after, "limit": limit} | ({"user_id": who} if who else {}) for who, after, limit in pages]
    answers = await asyncio.gather(*(mesh.ok("transactions.transactions.list", body) for body in bodies))
    for (who, after, limit), answer in zip(pages, answers, strict=True):  # asked together: one statement
        rest = [item for item in listed[who] if item["id"] > after]
        assert answer["items"] == rest[:limit], (who, after, limit)
        assert answer["next_after_id"] == (rest[limit - 1]["id"] if len(rest) > limit else None)


async def test_same_key_same_body_is_the_same_transaction_other_body_is_409(mesh: Mesh) -> None:
    alice = await user(mesh, "alice")
    body = {"idempotency_key": "k", "user_id": alice, "amount": 50, "currency": "EUR"}
    results = await asyncio.gather(*(mesh.ok("transactions.deposits.create", body) for _ in range(10)))
    assert all(result == results[0] for result in results)
    assert await balance(mesh, alice) == 50
    code, reply = await mesh.request("transactions.deposits.create", {**body, "amount": 51})
    assert code == 409 and reply["error"]["type"] == "idempotency_conflict"
    code, _ = await mesh.request("transactions.withdrawals.create", body)
    assert code == 409


async def test_unknown_user_and_bad_bodies_record_nothing_and_leave_the_key_free(mesh: Mesh) -> None:
    code, _ = await mesh.request(
        "transactions.deposits.create", {"idempotency_key": "free", "user_id": 999, "amount": 1, "currency": "EUR"}
    )
    assert code == 404
    for bad, field in [
        ({"idempotency_key": "bad key!", "user_id": 1, "amount": 1, "currency": "EUR"}, "$.idempotency_key"),
        ({"idempotency_key": "free", "user_id": 1, "amount": 0, "currency": "EUR"}, "$.amount"),
    ]:
        code, reply = await mesh.request("transactions.deposits.create", bad)
        assert (code, reply["error"]["details"]) == (400, [field])
    alice = await user(mesh, "alice")
    await mesh.ok(
        "transactions.deposits.create", {"idempotency_key": "free", "user_id": alice, "amount": 1, "currency": "EUR"}
    )


@contextlib.asynccontextmanager
async def second_driver(
    mesh: Mesh, database: str, key: str | None
) -> AsyncIterator[tuple[transactions.Saga, Stored | None]]:
    """Another driver of transaction `key` (a client's retry beside its recovery, or two
    replicas), late: it still holds the row as it was before the first driver moved it on."""
    db = open_database(service_url("transactions", database))
    repo = Repo.of(db, mesh.nc, transactions_outbox)
    sql = TransactionSql(db.is_sqlite)
    try:
        async with db.read() as conn:
            driver = (await conn.get_raw_connection()).driver_connection
            row = (await sql.by_keys(driver, [key]))[key] if key is not None else None
        async with asyncio.TaskGroup() as group:
            committer = group.create_task(repo.commits.commit_forever())
            yield transactions.Saga(repo, sql, read_loader(repo.db, sql.by_keys)), row
            committer.cancel()
    finally:
        await db.dispose()


async def test_a_late_second_try_of_a_rejected_transaction_moves_no_money(mesh: Mesh, database: str) -> None:
    """The late driver asks the ledger after the first one's refusal closed the transaction and
    the balance grew. The ledger keeps the saga's refusals, so it is refused again (before
    session 20 its transfer was recorded, under a rejected transaction: found by a chaos soak)."""
    payer = await user(mesh, "payer")
    spend = {"idempotency_key": "w-late", "user_id": payer, "amount": 50, "currency": "EUR"}
    code, refused = await mesh.request("transactions.withdrawals.create", spend)
    assert code == 422, refused
    fund = {"idempotency_key": "d-late", "user_id": payer, "amount": 100, "currency": "EUR"}
    await mesh.ok("transactions.deposits.create", fund)
    async with second_driver(mesh, database, "w-late") as (saga, rejected):
        stale = msgspec.structs.replace(rejected, status="pending", refusal=None)
        late = await transactions.record_in_ledger(saga, stale)
    assert late.status == "rejected"
    assert await balance(mesh, payer) == 100


async def test_a_late_second_try_of_a_purchase_keeps_the_price_it_was_paid_at(mesh: Mesh, database: str) -> None:
    """The late driver replays the reservation after the price changed: the price stays the one
    the first driver set (before session 20 it was overwritten with the new one, and the
    committed purchase no longer matched its ledger entry)."""
    buyer, seller = await user(mesh, "buyer"), await user(mesh, "seller")
    product = await mesh.ok(
        "products.products.create",
        {"sku": "P", "name": "P", "price": 250, "currency": "EUR", "stock": 5, "seller_id": seller},
    )
    fund = {"idempotency_key": "fund", "user_id": buyer, "amount": 1000, "currency": "EUR"}
    await mesh.ok("transactions.deposits.create", fund)
    buy = {"idempotency_key": "buy", "buyer_id": buyer, "product_id": product["id"], "quantity": 2}
    bought = await mesh.ok("transactions.purchases.create", buy)
    await mesh.ok("products.products.update", {"id": product["id"], "price": 300})
    async with second_driver(mesh, database, "buy") as (saga, committed):
        stale = msgspec.structs.replace(committed, status="pending", to_account=None, amount=None, currency=None)
        late = await transactions.drive(saga, stale)
    assert late.amount == 500
    assert await mesh.ok("transactions.transactions.get", {"id": bought["id"]}) == bought


async def test_a_rejection_applied_twice_is_one_event(mesh: Mesh, database: str) -> None:
    """An ingest message whose ack was lost after its rejection committed comes again, and is
    rejected again: under the same event id, which the outbox and JetStream keep once (until
    session 20 each rejection had an id of its own, so consumers could not tell the copy)."""
    async with elsewhere_inbox(mesh) as inbox, second_driver(mesh, database, None) as (saga, _):
        await mesh.js.publish("elsewhere.deposits", b"{}")  # malformed
        (msg,) = [as_ingested(msg) for msg in await inbox.fetch(1, timeout=5)]
        await ingest.apply_message(msg, saga)
        await ingest.apply_message(dataclasses.replace(msg, _ackd=False), saga)  # its redelivery
    await asyncio.sleep(2 * relay_poll_interval_s + 0.5)  # the service's relay publishes the outbox
    events = await mesh.events(await mesh.event_count())
    rejected = [event for subject, _, event in events if subject == "events.transactions.transaction.rejected"]
    assert len(rejected) == 1, rejected
    assert rejected[0]["data"]["error"]["details"] == ["$.idempotency_key"]


async def test_an_ingest_message_held_through_an_outage_longer_than_its_deliveries_is_applied_after_it(
    mesh: Mesh, database: str, short_timeouts: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Its write outlasted the timeout (a lock held elsewhere) try after try: the message is held
    and tried again, applied once the lock goes, and delivered once. Until session 23 each try was
    a nak and a delivery, and an outage outlasting the consumer's 50 deliveries (≈ 22 min) left
    the message never applied; raised (until session 21), it ended the consumer's task group."""
    monkeypatch.setattr(ingest, "outage_retry_wait_s_max", 0.1)
    alice = await user(mesh, "alice")
    deposit = {"idempotency_key": "kept-waiting", "user_id": alice, "amount": 7, "currency": "EUR"}
    async with elsewhere_inbox(mesh) as inbox, second_driver(mesh, database, None) as (saga, _):
        await mesh.js.publish("elsewhere.deposits", json.dumps(deposit).encode())
        (msg,) = [as_ingested(msg) for msg in await inbox.fetch(1, timeout=5)]
        async with asyncio.TaskGroup() as group:
            loader = group.create_task(saga.by_key.run())
            async with table_locked(database, "transactions", "transactions"):
                handled = group.create_task(ingest.handle(msg, saga))
                await asyncio.sleep(3 * (schemas.database.postgres_command_timeout_s + 0.1) + 1.0)
                assert not handled.done()
            async with asyncio.timeout(10):
                await handled
            loader.cancel()
        with pytest.raises(nats.errors.TimeoutError):  # acknowledged, never nak'd: nothing comes again
            await inbox.fetch(1, timeout=1)
    listed = await mesh.ok("transactions.transactions.list", {"user_id": alice})
    assert [(item["idempotency_key"], item["status"]) for item in listed["items"]] == [("kept-waiting", "committed")]


ELSEWHERE = "ELSEWHERE"


@contextlib.asynccontextmanager
async def elsewhere_inbox(mesh: Mesh) -> AsyncIterator[JetStreamContext.PullSubscription]:
    """A stream of the test's own (`elsewhere.>`) and a consumer of it, deleted after: the
    service's consumer reads all of INGEST. Its messages go to `ingest` as INGEST's (`as_ingested`)."""
    await mesh.js.add_stream(name=ELSEWHERE, subjects=["elsewhere.>"])
    try:
        yield await mesh.js.pull_subscribe("elsewhere.>", stream=ELSEWHERE)
    finally:
        await mesh.js.delete_stream(ELSEWHERE)


def as_ingested(msg: Msg) -> Msg:
    """A message of `elsewhere.<kind>` as if published to `ingest.transactions.<kind>`."""
    return dataclasses.replace(msg, subject="ingest.transactions." + msg.subject.removeprefix("elsewhere."))


async def test_recovery_leaves_a_transaction_this_process_drives_to_its_driver(core_mesh: Mesh, database: str) -> None:
    """A live request whose ledger answers slower than `recovery_age_s` keeps its row pending:
    the recovery loop drove it a second time (safe since session 20, but a second ledger
    request for nothing). An orphan is still driven. No transactions service runs beside."""
    alice = await user(core_mesh, "alice")
    new = NewTransaction("slow", "f", "deposit", "world", f"user:{alice}", 5, "EUR")
    async with second_driver(core_mesh, database, None) as (saga, _):
        pending = await saga.repo.commits.apply(saga.sql.insert_pending, new)
        past = datetime.now(UTC) - timedelta(seconds=10 * transactions.recovery_age_s)

        async def age(conn: AsyncConnection) -> None:
            await conn.execute(update(transactions_table).values(updated_at=past))

        await saga.repo.commits.run(age)
        saga.driving[pending.id] += 1  # its driver waits for the ledger
        assert await transactions.recover_once(saga) == 0
        saga.driving.clear()  # its driver died
        assert await transactions.recover_once(saga) == 1
    listed = await core_mesh.ok("ledger.history", {"account": f"user:{alice}"})
    assert [entry["id"] for entry in listed["items"]] == ["tx:slow"]


async def test_purchase_pays_the_seller_and_takes_the_stock(mesh: Mesh) -> None:
    buyer, seller = await user(mesh, "buyer"), await user(mesh, "seller")
    product = await mesh.ok(
        "products.products.create",
        {"sku": "P", "name": "P", "price": 250, "currency": "EUR", "stock": 5, "seller_id": seller},
    )
    await mesh.ok(
        "transactions.deposits.create", {"idempotency_key": "fund", "user_id": buyer, "amount": 1000, "currency": "EUR"}
    )
    purchase = await mesh.ok(
        "transactions.purchases.create",
        {"idempotency_key": "buy", "buyer_id": buyer, "product_id": product["id"], "quantity": 2},
    )
    assert (purchase["kind"], purchase["amount"], purchase["product_id"], purchase["quantity"]) == (
        "purchase",
        500,
        product["id"],
        2,
    )
    assert purchase["to_account"] == f"user:{seller}"
    assert (await balance(mesh, buyer), await balance(mesh, seller)) == (500, 500)
    assert (await mesh.ok("products.products.get", {"id": product["id"]}))["stock"] == 3
    seller_view = await mesh.ok("transactions.transactions.list", {"user_id": seller})
    assert [item["idempotency_key"] for item in seller_view["items"]] == ["buy"]


async def test_purchase_refused_by_the_ledger_gives_the_stock_back(mesh: Mesh) -> None:
    buyer, seller = await user(mesh, "buyer"), await user(mesh, "seller")
    product = await mesh.ok(
        "products.products.create",
        {"sku": "P", "name": "P", "price": 250, "currency": "EUR", "stock": 5, "seller_id": seller},
    )
    code, reply = await mesh.request(
        "transactions.purchases.create",
        {"idempotency_key": "broke", "buyer_id": buyer, "product_id": product["id"], "quantity": 1},
    )
    assert code == 422 and reply["error"]["type"] == "insufficient_funds"
    assert (await mesh.ok("products.products.get", {"id": product["id"]}))["stock"] == 5
    code, reply = await mesh.request(
        "transactions.purchases.create",
        {"idempotency_key": "many", "buyer_id": buyer, "product_id": product["id"], "quantity": 6},
    )
    assert code == 422 and reply["error"]["type"] == "out_of_stock"
    assert (await mesh.ok("products.products.get", {"id": product["id"]}))["stock"] == 5
    events = await mesh.events(7)  # 2 users, product created, reserve and release, 2 rejected
    rejected = [
        envelope["data"]["idempotency_key"]
        for subject, _, envelope in events
        if subject == "events.transactions.transaction.rejected"
    ]
    assert sorted(rejected) == ["broke", "many"]


async def test_each_outcome_publishes_its_event(mesh: Mesh) -> None:
    alice = await user(mesh, "alice")
    committed = await mesh.ok(
        "transactions.deposits.create", {"idempotency_key": "e1", "user_id": alice, "amount": 5, "currency": "EUR"}
    )
    await mesh.request(
        "transactions.withdrawals.create", {"idempotency_key": "e2", "user_id": alice, "amount": 6, "currency": "EUR"}
    )
    events = await mesh.events(4)  # user created, ledger entry, committed, rejected
    by_subject = {subject: envelope for subject, _, envelope in events}
    assert by_subject["events.transactions.transaction.committed"]["data"] == committed
    assert by_subject["events.transactions.transaction.rejected"]["data"]["idempotency_key"] == "e2"
    assert by_subject["events.transactions.transaction.rejected"]["data"]["status"] == "rejected"


async def test_ingested_messages_are_applied_once_each_and_malformed_ones_rejected(mesh: Mesh) -> None:
    alice = await user(mesh, "alice")
    deposit = {"idempotency_key": "in-1", "user_id": alice, "amount": 70, "currency": "EUR"}
    for body in (deposit, deposit, {**deposit, "idempotency_key": "in-2"}):
        await mesh.js.publish("ingest.transactions.deposits", json.dumps(body).encode())
    await mesh.js.publish("ingest.transactions.deposits", b'{"idempotency_key": "in-3", "amount": "lots"}')
    await mesh.js.publish("ingest.transactions.transfers", b"not json")
    # subjects the contract does not name, in INGEST all the same: rejected, not left unread
    await mesh.js.publish("ingest.transaction.deposits", json.dumps({**deposit, "idempotency_key": "in-4"}).encode())
    await mesh.js.publish("ingest.transactions.deposits.x", json.dumps({**deposit, "idempotency_key": "in-5"}).encode())
    await wait_until(lambda: committed_keys(mesh, alice), ["in-1", "in-2"])  # the ledger commits first
    assert await balance(mesh, alice) == 140
    events = await mesh.events(9)  # user, 2 ledger entries, 2 committed, and the 4 rejections
    rejections = {
        str(envelope["data"]["idempotency_key"]): envelope["data"]["error"]
        for subject, _, envelope in events
        if subject == "events.transactions.transaction.rejected"
    }
    assert sorted(rejections) == ["None", "in-3", "in-4", "in-5"]
    assert all(error["code"] == 400 and error["type"] == "bad_request" for error in rejections.values())
    assert rejections["in-4"]["details"] == ["subject"]
    assert rejections["in-4"]["message"].startswith("no ingest subject ingest.transaction.deposits: the mesh takes")
    assert rejections["in-5"]["details"] == ["subject"]
    await asyncio.sleep(0.5)
    info = await mesh.js.consumer_info(INGEST_STREAM, ingest.CONSUMER)
    assert info.num_ack_pending == 0 and info.num_pending == 0
    assert (await mesh.js.stream_info(INGEST_STREAM)).state.messages == 0  # a work queue: acknowledged, gone


@pytest.mark.parametrize("gone", ["stream", "consumer"])
async def test_ingest_deleted_while_the_mesh_runs_is_made_again_without_a_crash(
    mesh: Mesh, gone: str, caplog: pytest.LogCaptureFixture
) -> None:
    """INGEST, or the mesh's consumer of it, deleted while transactions serves (an operator, a
    JetStream that lost its store): made again, and what is published after is applied. Until
    session 24 the consumer's task crashed with its traceback at each try, and three crashes in
    5 s ended the process."""
    alice = await user(mesh, "alice")
    await asyncio.sleep(0.3)  # the consumer task fetches
    if gone == "stream":
        await mesh.js.delete_stream(INGEST_STREAM)
    else:
        await mesh.js.delete_consumer(INGEST_STREAM, ingest.CONSUMER)
    deadline = asyncio.get_running_loop().time() + 5.0
    while True:  # a publish before the stream is back gets no ack; the publisher tries again
        with contextlib.suppress(NotFoundError):
            await mesh.js.consumer_info(INGEST_STREAM, ingest.CONSUMER)
            break
        assert asyncio.get_running_loop().time() < deadline, "not made again within 5 s"
        await asyncio.sleep(0.1)
    deposit = {"idempotency_key": "after-gone", "user_id": alice, "amount": 5, "currency": "EUR"}
    await mesh.js.publish("ingest.transactions.deposits", json.dumps(deposit).encode())
    await wait_until(lambda: committed_keys(mesh, alice), ["after-gone"])
    assert not [record for record in caplog.records if record.levelno >= logging.ERROR]


async def committed_keys(mesh: Mesh, user_id: int) -> list[str]:
    page = await mesh.ok("transactions.transactions.list", {"user_id": user_id})
    return sorted(item["idempotency_key"] for item in page["items"] if item["status"] == "committed")


async def wait_until(read, expected, timeout_s: float = 15.0) -> None:  # type: ignore[no-untyped-def]
    deadline = asyncio.get_running_loop().time() + timeout_s
    while (value := await read()) != expected:
        assert asyncio.get_running_loop().time() < deadline, f"{value} != {expected}"
        await asyncio.sleep(0.05)


async def test_an_ingest_consumer_left_by_an_older_version_takes_this_versions_limits(core_mesh: Mesh) -> None:
    from nats.js.api import AckPolicy, ConsumerConfig

    from handlers import ingest, transactions

    older = ConsumerConfig(
        durable_name=ingest.CONSUMER,
        ack_policy=AckPolicy.EXPLICIT,
        max_ack_pending=128,
        filter_subject="ingest.transactions.*",
    )
    await core_mesh.js.add_consumer(ingest.INGEST_STREAM, older)
    async with transactions.serving(core_mesh.nc):
        await asyncio.sleep(0.3)  # the consumer task has started
        info = await core_mesh.js.consumer_info(ingest.INGEST_STREAM, ingest.CONSUMER)
    assert info.config.max_ack_pending == ingest.in_flight_max
    assert info.config.filter_subject == "ingest.>"  # it read only ingest.transactions.* until session 25


async def test_beside_an_operators_consumer_of_ingest_the_mesh_reads_only_its_own_subjects(
    core_mesh: Mesh, caplog: pytest.LogCaptureFixture
) -> None:
    """A work queue gives each subject one consumer: where another reads some of INGEST, the mesh
    reads `ingest.transactions.*` (as every version before session 25 did), says so in one
    line, and leaves the rest of the stream to that consumer."""
    from nats.js.api import AckPolicy, ConsumerConfig

    from handlers import transactions

    operators = ConsumerConfig(durable_name="audit", ack_policy=AckPolicy.EXPLICIT, filter_subject="ingest.audit.*")
    await core_mesh.js.add_consumer(ingest.INGEST_STREAM, operators)
    alice = await user(core_mesh, "alice")
    await core_mesh.js.publish("ingest.audit.seen", b"{}")
    deposit = {"idempotency_key": "beside", "user_id": alice, "amount": 5, "currency": "EUR"}
    await core_mesh.js.publish("ingest.transactions.deposits", json.dumps(deposit).encode())
    async with transactions.serving(core_mesh.nc):
        await wait_until(lambda: committed_keys(core_mesh, alice), ["beside"])
        info = await core_mesh.js.consumer_info(ingest.INGEST_STREAM, ingest.CONSUMER)
    assert info.config.filter_subject == "ingest.transactions.*"
    assert (await core_mesh.js.consumer_info(ingest.INGEST_STREAM, "audit")).num_pending == 1
    warnings = [record.getMessage() for record in caplog.records if record.levelno == logging.WARNING]
    assert any("another consumer of INGEST reads some of its subjects" in line for line in warnings)
    assert not [record for record in caplog.records if record.levelno >= logging.ERROR]


async def test_an_ingest_message_whose_dependency_answers_500_is_retried_not_rejected(
    nc: Client, database: str
) -> None:
    import ledger.events as ledger_events
    import ledger.service as ledger
    from handlers import transactions

    failures = 2

    async def flaky_get(request: UserId) -> User:
        nonlocal failures
        if failures:
            failures -= 1
            raise RuntimeError("accounts is having a bad moment")  # answered 500
        return User(request.id, "a@x.io", "a", "2026-01-01T00:00:00.000000Z", "2026-01-01T00:00:00.000000Z")

    accounts = Service(nc, "accounts", "0.0.1")
    accounts.add_endpoint("accounts.users.get", flaky_get)
    mesh = Mesh(nc)
    await fresh_streams(mesh)
    async with ledger_events.serving(nc), ledger.serving(nc), accounts.serving(), transactions.serving(nc):
        body = {"idempotency_key": "in-500", "user_id": 7, "amount": 70, "currency": "EUR"}
        await mesh.js.publish("ingest.transactions.deposits", json.dumps(body).encode())
        await wait_until(lambda: committed_keys(mesh, 7), ["in-500"])
        assert failures == 0 and await balance(mesh, 7) == 70
        events = await mesh.events(2)  # the ledger entry and the committed transaction: no rejection
    assert sorted(subject for subject, _, _ in events) == [
        "events.ledger.transfer.recorded",
        "events.transactions.transaction.committed",
    ]
