"""`ledger.*` as the contract writes them (§4, §5), on SQLite and on Postgres."""

from __future__ import annotations

import asyncio
import json
import re
from datetime import UTC, datetime

import nats.errors
import pytest
from alembic import command
from sqlalchemy import Executable, func, insert, select, update

import ledger.events
import ledger.service
import migrations
from bus.codec import encode, timestamp
from bus.events import relay_poll_interval_s
from bus.jetstream import BatchPublisher, Message
from ledger import postings, writer
from ledger.chain import make_entry
from ledger.events import COMMITTED_SUBJECT, ChainRelay, committed_message, event_message, handed_over, stored
from ledger.writer import LEDGER_LOCK_KEY
from schemas.database import Database, DatabaseTimeout, open_database, service_url
from schemas.events import Envelope
from schemas.ledger import Entry, Verification, ledger_balances, ledger_cursors, ledger_entries, ledger_postings
from tests.conftest import Mesh, events_parked
from tests.ledger_checks import GENESIS, assert_ledger_invariants, outside_hash, whole_chain, whole_history

INT64_MAX = 2**63 - 1
ENTRY_FIELDS = ["seq", "id", "from", "to", "amount", "currency", "memo", "recorded_at", "prev_hash", "hash"]


def transfer(id: str, from_: str, to: str, amount: int, currency: str = "EUR", **extra: object) -> dict:
    return {"id": id, "from": from_, "to": to, "amount": amount, "currency": currency, **extra}


async def write_straight_into_the_tables(database: str, entry: Entry, recorded_at: datetime, *also: Executable) -> None:
    """`entry` inserted past the ledger service, and `also` run, in one transaction: as another
    writer would commit it, or as a commit whose handover was lost."""
    db = open_database(service_url("ledger", database))
    try:
        async with db.writer.begin() as conn:
            row = {
                name: getattr(entry, name) for name in ("seq", "id", "amount", "currency", "memo", "prev_hash", "hash")
            }
            await conn.execute(
                insert(ledger_entries).values(
                    **row, from_account=entry.from_, to_account=entry.to, recorded_at=recorded_at
                )
            )
            for statement in also:
                await conn.execute(statement)
    finally:
        await db.dispose()


async def another_writer_records(
    database: str, seq: int, id: str, from_: str, to: str, amount: int, prev_hash: str
) -> Entry:
    """A transfer in EUR to an account with no balance yet, committed as another writer would
    (here: straight into the tables): its entry, and both balances moved."""
    moment = datetime.now(UTC)
    entry = make_entry(seq, id, from_, to, amount, "EUR", "", timestamp(moment), prev_hash)
    balance = ledger_balances.c.balance
    await write_straight_into_the_tables(
        database,
        entry,
        moment,
        update(ledger_balances).where(ledger_balances.c.account == from_).values(balance=balance - amount),
        insert(ledger_balances).values(account=to, currency="EUR", balance=amount),
    )
    return entry


async def test_first_entry_follows_genesis_and_hashes_as_the_contract_says(mesh: Mesh) -> None:
    entry = await mesh.ok("ledger.record", transfer("t1", "world", "user:1", 500, memo='hello ✓ "quoted"\n'))
    assert list(entry) == ENTRY_FIELDS
    assert entry["seq"] == 1 and entry["prev_hash"] == GENESIS
    assert entry["memo"] == 'hello ✓ "quoted"\n'
    assert re.fullmatch(r"[0-9a-f]{64}", entry["hash"])
    assert entry["hash"] == outside_hash(entry)
    second = await mesh.ok("ledger.record", transfer("t2", "user:1", "user:2", 200))
    assert second["seq"] == 2 and second["prev_hash"] == entry["hash"] and second["memo"] == ""
    assert second["hash"] == outside_hash(second)


async def test_balances_follow_the_transfers_and_unknown_accounts_are_empty(mesh: Mesh) -> None:
    await mesh.ok("ledger.record", transfer("d1", "world", "user:1", 1000))
    await mesh.ok("ledger.record", transfer("d2", "world", "user:1", 7, currency="USD"))
    await mesh.ok("ledger.record", transfer("t1", "user:1", "user:2", 300))
    assert await mesh.ok("ledger.balance", {"account": "user:1"}) == {
        "account": "user:1",
        "balances": {"EUR": 700, "USD": 7},
    }
    assert await mesh.ok("ledger.balance", {"account": "world"}) == {
        "account": "world",
        "balances": {"EUR": -1000, "USD": -7},
    }
    assert await mesh.ok("ledger.balance", {"account": "nobody"}) == {"account": "nobody", "balances": {}}


async def test_balances_asked_together_are_each_accounts_own(mesh: Mesh) -> None:
    """Balance reads that come together are one statement (`balances_loader`): each answer holds
    its own account's currencies, in currency order, and an unknown account's is empty."""
    currencies = ["USD", "EUR", "BTC"]
    transfers = [
        transfer(f"b{n}-{currency}", "world", f"acct:{n}", 10 * n + k + 1, currency=currency)
        for n in range(20)
        for k, currency in enumerate(currencies[: n % 3 + 1])
    ]
    await mesh.ok("ledger.record_batch", {"transfers": transfers})
    accounts = [f"acct:{n}" for n in range(20)] * 3 + ["acct:none", "world"]
    answers = await asyncio.gather(*(mesh.ok("ledger.balance", {"account": account}) for account in accounts))
    for account, answer in zip(accounts, answers, strict=True):
        expected: dict[str, int] = {}
        for t in sorted(transfers, key=lambda t: t["currency"]):
            if account in (t["to"], t["from"]):
                expected[t["currency"]] = expected.get(t["currency"], 0) + (
                    t["amount"] if t["to"] == account else -t["amount"]
                )
        assert answer == {"account": account, "balances": expected}
        assert list(answer["balances"]) == sorted(answer["balances"])


async def test_business_rules_refuse_with_422_and_record_nothing(mesh: Mesh) -> None:
    await mesh.ok("ledger.record", transfer("d1", "world", "user:1", 100))
    cases = [
        (transfer("x1", "user:1", "user:2", 101), "insufficient_funds"),
        (transfer("x2", "user:2", "user:1", 1), "insufficient_funds"),
        (transfer("x3", "user:1", "user:1", 1), "same_account"),
        (transfer("x4", "world", "world", 1), "same_account"),
        (transfer("x5", "world", "user:1", INT64_MAX), "amount_overflow"),
    ]
    for body, error_type in cases:
        code, reply = await mesh.request("ledger.record", body)
        assert (code, reply["error"]["type"]) == (422, error_type), body
    assert len(await whole_chain(mesh)) == 1
    await assert_ledger_invariants(mesh)


async def test_world_may_go_negative_but_not_past_int64(mesh: Mesh) -> None:
    await mesh.ok("ledger.record", transfer("a", "world", "user:a", INT64_MAX))
    code, reply = await mesh.request("ledger.record", transfer("b", "world", "user:b", 2))
    assert code == 422 and reply["error"]["type"] == "amount_overflow"
    await mesh.ok("ledger.record", transfer("c", "world", "user:b", 1))
    assert (await mesh.ok("ledger.balance", {"account": "world"}))["balances"] == {"EUR": -(2**63)}


async def test_retry_with_same_id_and_body_returns_the_original_and_moves_nothing(mesh: Mesh) -> None:
    first = await mesh.ok("ledger.record", transfer("same", "world", "user:1", 50, memo="m"))
    again = await mesh.ok("ledger.record", transfer("same", "world", "user:1", 50, memo="m"))
    assert again == first
    assert (await mesh.ok("ledger.balance", {"account": "user:1"}))["balances"] == {"EUR": 50}
    for changed in ({"amount": 51}, {"memo": "other"}, {"to": "user:2"}, {"currency": "USD"}):
        code, reply = await mesh.request(
            "ledger.record", {**transfer("same", "world", "user:1", 50, memo="m"), **changed}
        )
        assert code == 409 and reply["error"]["type"] == "idempotency_conflict", changed


async def test_a_retry_answers_with_its_entry_even_where_repeating_it_would_be_refused(mesh: Mesh) -> None:
    """Each request below is a batch of its own: a retry of a spent transfer is its entry, not
    `insufficient_funds`, alone or in a batch."""
    await mesh.ok("ledger.record", transfer("fund-once", "world", "user:1", 10))
    spent = await mesh.ok("ledger.record", transfer("spend-all", "user:1", "user:2", 10))
    assert await mesh.ok("ledger.record", transfer("spend-all", "user:1", "user:2", 10)) == spent
    batch = await mesh.ok(
        "ledger.record_batch",
        {"transfers": [transfer("spend-all", "user:1", "user:2", 10), transfer("back", "user:2", "user:1", 4)]},
    )
    assert batch["items"][0] == spent and batch["items"][1]["seq"] == 3
    again = await mesh.ok("ledger.record", transfer("back", "user:2", "user:1", 4))
    assert again == batch["items"][1]
    assert (await mesh.ok("ledger.balance", {"account": "user:1"}))["balances"] == {"EUR": 4}
    await assert_ledger_invariants(mesh)


async def test_a_retry_older_than_the_writers_recent_ids_is_answered_with_its_entry(
    mesh: Mesh, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On Postgres such a retry is guessed new, and the write fails on the id's unique key,
    writing nothing; the batch is then read first. Here the writer keeps one batch's ids."""
    monkeypatch.setattr(writer, "recent_ids_max", 1)
    old = await mesh.ok("ledger.record", transfer("old", "world", "user:1", 10))
    newer = await mesh.ok("ledger.record", transfer("newer", "world", "user:2", 10))
    assert await mesh.ok("ledger.record", transfer("old", "world", "user:1", 10)) == old
    batch = await mesh.ok(
        "ledger.record_batch",
        {"transfers": [transfer("fresh", "user:1", "user:3", 5), transfer("old", "world", "user:1", 10)]},
    )
    assert batch["items"][1] == old and (batch["items"][0]["seq"], batch["items"][0]["prev_hash"]) == (3, newer["hash"])
    assert (await mesh.ok("ledger.balance", {"account": "user:1"}))["balances"] == {"EUR": 5}
    await assert_ledger_invariants(mesh)


async def test_the_batch_after_another_replicas_entry_follows_it(mesh: Mesh, database: str) -> None:
    """An entry committed by another writer (here: straight into the tables) after this writer's
    last batch: its next batch is planned on that entry and its balances, not on what it cached,
    and a retry of that entry's id (unknown to this writer, and refused if planned anew) is
    answered with it."""
    first = await mesh.ok("ledger.record", transfer("mine", "world", "user:1", 10))
    theirs = await another_writer_records(database, 2, "theirs", "user:1", "user:2", 10, first["hash"])
    code, reply = await mesh.request("ledger.record", transfer("overspend", "user:1", "user:3", 5))
    assert code == 422 and reply["error"]["type"] == "insufficient_funds"
    after = await mesh.ok("ledger.record", transfer("next", "world", "user:3", 5))
    assert (after["seq"], after["prev_hash"]) == (3, theirs.hash)
    again = await mesh.ok("ledger.record", transfer("theirs", "user:1", "user:2", 10))  # recorded by them, not us
    assert (again["seq"], again["hash"]) == (2, theirs.hash)
    await assert_ledger_invariants(mesh)


async def test_a_writer_holding_the_ledgers_lock_holds_back_every_batch(mesh: Mesh, database: str) -> None:
    """Another writer in its batch (here, this test holding the lock a batch holds: Postgres'
    advisory lock, SQLite's write lock): nothing is written until it lets go, not even a batch
    the writer would plan on the head it committed last, without reading."""
    await mesh.ok("ledger.record", transfer("before", "world", "user:1", 1))
    db = open_database(service_url("ledger", database))
    try:
        async with asyncio.TaskGroup() as group:
            async with db.writer.begin() as conn:
                if db.is_sqlite:
                    await conn.execute(update(ledger_cursors).values(seq=ledger_cursors.c.seq))
                else:
                    await conn.execute(select(func.pg_advisory_xact_lock(LEDGER_LOCK_KEY)))
                recording = group.create_task(mesh.ok("ledger.record", transfer("during", "world", "user:1", 1)))
                await asyncio.sleep(0.5)
                assert not recording.done()
        assert recording.result()["seq"] == 2
    finally:
        await db.dispose()
    await assert_ledger_invariants(mesh)


async def test_a_refused_transfer_id_may_be_used_again(mesh: Mesh) -> None:
    code, _ = await mesh.request("ledger.record", transfer("retry-me", "user:1", "user:2", 10))
    assert code == 422
    await mesh.ok("ledger.record", transfer("fund", "world", "user:1", 10))
    entry = await mesh.ok("ledger.record", transfer("retry-me", "user:1", "user:2", 10))
    assert entry["seq"] == 2


async def test_the_sagas_record_keeps_its_refusals_so_a_later_try_is_refused_the_same(mesh: Mesh) -> None:
    """`ledger.internal.record`: a transaction driven twice at once (a retry beside its recovery)
    gets one answer from the ledger, whatever the balances did between the two tries."""
    spend = transfer("tx:w1", "user:1", "world", 50)
    code, refused = await mesh.request("ledger.internal.record", spend)
    assert code == 422 and refused["error"]["type"] == "insufficient_funds"
    await mesh.ok("ledger.record", transfer("fund", "world", "user:1", 100))
    assert await mesh.request("ledger.internal.record", spend) == (422, refused)
    code, conflict = await mesh.request("ledger.internal.record", {**spend, "amount": 60})
    assert code == 409 and conflict["error"]["type"] == "idempotency_conflict"
    assert (await mesh.ok("ledger.balance", {"account": "user:1"}))["balances"] == {"EUR": 100}

    code, _ = await mesh.request("ledger.internal.record", transfer("tx:w2", "user:1", "world", 40))
    assert code is None  # an id never refused is recorded
    entry = await mesh.ok("ledger.record", spend)  # contract §5: ledger.record's refused ids are free
    assert await mesh.ok("ledger.internal.record", spend) == entry  # and a recorded entry comes first
    assert (await mesh.ok("ledger.balance", {"account": "user:1"}))["balances"] == {"EUR": 10}


async def test_concurrent_retries_of_one_id_record_it_once(mesh: Mesh) -> None:
    results = await asyncio.gather(
        *(mesh.ok("ledger.record", transfer("dup", "world", "user:1", 5)) for _ in range(20))
    )
    assert len({entry["seq"] for entry in results}) == 1
    assert (await mesh.ok("ledger.balance", {"account": "user:1"}))["balances"] == {"EUR": 5}


async def test_retries_spread_over_batches_in_flight_return_the_original(mesh: Mesh) -> None:
    """Copies of a request reach the writer in later batches, some while the first is still in
    flight: each copy answers with the one entry, and the chain holds each transfer once."""
    bodies = [transfer(f"r{n}", "world", f"user:{n % 7}", 1 + n % 3) for n in range(300)]

    async def send_late(body: dict, delay_s: float) -> dict:
        await asyncio.sleep(delay_s)
        return await mesh.ok("ledger.record", body)

    copies = [(body, round_ * 0.002) for round_ in range(4) for body in bodies]
    replies = await asyncio.gather(*(send_late(body, delay_s) for body, delay_s in copies))
    by_id: dict[str, list[dict]] = {}
    for reply in replies:
        by_id.setdefault(reply["id"], []).append(reply)
    assert all(len(same) == 4 and all(copy == same[0] for copy in same) for same in by_id.values())
    entries = await assert_ledger_invariants(mesh)
    assert sorted(entry["id"] for entry in entries) == sorted(by_id)


async def test_record_batch_is_all_or_nothing_and_names_the_refused_index(mesh: Mesh) -> None:
    batch = [
        transfer("b1", "world", "user:1", 100),
        transfer("b2", "user:1", "user:2", 60),
        transfer("b3", "user:1", "user:2", 60),
    ]
    code, reply = await mesh.request("ledger.record_batch", {"transfers": batch})
    assert code == 422
    assert reply["error"]["type"] == "insufficient_funds" and reply["error"]["details"] == ["$.transfers[2]"]
    assert await whole_chain(mesh) == []
    result = await mesh.ok("ledger.record_batch", {"transfers": batch[:2]})
    assert [entry["seq"] for entry in result["items"]] == [1, 2]
    assert result["items"][1]["prev_hash"] == result["items"][0]["hash"]
    retried = await mesh.ok("ledger.record_batch", {"transfers": batch[:2]})
    assert retried == result
    code, reply = await mesh.request(
        "ledger.record_batch", {"transfers": [transfer("n", "world", "u", 1), {**batch[0], "amount": 1}]}
    )
    assert code == 409 and reply["error"]["details"] == ["$.transfers[1]"]


async def test_record_batch_bounds(mesh: Mesh) -> None:
    code, reply = await mesh.request("ledger.record_batch", {"transfers": []})
    assert code == 400
    too_many = [transfer(f"t{n}", "world", "user:1", 1) for n in range(1001)]
    code, reply = await mesh.request("ledger.record_batch", {"transfers": too_many})
    assert code == 400 and reply["error"]["details"] == ["$.transfers"]
    full = await mesh.ok("ledger.record_batch", {"transfers": too_many[:1000]})
    assert len(full["items"]) == 1000
    code, reply = await mesh.request("ledger.record_batch", {"transfers": [transfer("x", "world", "u", 0)]})
    assert code == 400 and reply["error"]["details"] == ["$.transfers[0].amount"]


async def test_a_batch_whose_reply_would_not_fit_the_servers_max_payload_is_refused_with_nothing_recorded(
    mesh: Mesh,
) -> None:
    """Its request fits (868 KB), its reply would not (over 1 MiB): it was recorded, then
    answered 500, and every retry the same (session 23)."""
    long_memo = "m" * 770
    batch = [transfer(f"long-{n}", "world", f"user:{n}", 1, memo=long_memo) for n in range(1000)]
    code, reply = await mesh.request("ledger.record_batch", {"transfers": batch})
    assert code == 400 and reply["error"]["details"] == ["$.transfers"], reply
    assert "max payload of 1048576: send fewer at a time" in reply["error"]["message"]
    assert await whole_chain(mesh) == []
    first = await mesh.ok("ledger.record_batch", {"transfers": batch[:900]})
    assert len(first["items"]) == 900


async def test_a_page_too_large_for_the_servers_max_payload_is_cut_short_and_paging_goes_on(mesh: Mesh) -> None:
    """1,000 entries with memos of 1,000 characters make 1.4 MB: the page was a 500, and a client
    could never read past it (session 23). Cut, it ends where the server's max payload does."""
    long_memo = "m" * 1000
    for part in range(2):
        batch = [transfer(f"p{part}-{n}", "world", "user:1", 1, memo=long_memo) for n in range(500)]
        await mesh.ok("ledger.record_batch", {"transfers": batch})
    reply = await mesh.nc.request("ledger.chain", b'{"limit": 1000}', timeout=10)
    page = json.loads(reply.data)
    assert 500 < len(page["items"]) < 1000 and len(reply.data) <= mesh.nc.max_payload
    assert page["next_after_seq"] == page["items"][-1]["seq"]
    chain = await whole_chain(mesh)
    assert [entry["seq"] for entry in chain] == list(range(1, 1001))
    history = await whole_history(mesh, "user:1", limit=1000)
    assert history == chain


async def test_invalid_transfers_are_400(mesh: Mesh) -> None:
    for body, field in [
        (transfer("", "world", "a", 1), "$.id"),
        (transfer("x" * 129, "world", "a", 1), "$.id"),
        (transfer("ok", "world", "bad account", 1), "$.to"),
        (transfer("ok", "w" * 129, "a", 1), "$.from"),
        (transfer("ok", "world", "a", 1, currency="eur"), "$.currency"),
        (transfer("ok", "world", "a", INT64_MAX + 1), "$.amount"),
        (transfer("ok", "world", "a", 1, memo="m" * 1025), "$.memo"),
        ({"id": "ok", "from": "world", "to": "a", "amount": 1}, "$.currency"),
    ]:
        code, reply = await mesh.request("ledger.record", body)
        assert (code, reply["error"]["details"]) == (400, [field]), body


async def test_history_and_chain_page_in_seq_order(mesh: Mesh) -> None:
    await mesh.ok(
        "ledger.record_batch", {"transfers": [transfer(f"d{n}", "world", f"user:{n % 2}", 10) for n in range(5)]}
    )
    history = await mesh.ok("ledger.history", {"account": "user:0", "limit": 2})
    assert [e["seq"] for e in history["items"]] == [1, 3] and history["next_after_seq"] == 3
    rest = await mesh.ok("ledger.history", {"account": "user:0", "after_seq": 3, "limit": 2})
    assert [e["seq"] for e in rest["items"]] == [5] and rest["next_after_seq"] is None
    chain = await mesh.ok("ledger.chain", {"limit": 5})
    assert [e["seq"] for e in chain["items"]] == [1, 2, 3, 4, 5] and chain["next_after_seq"] is None
    assert (await mesh.ok("ledger.history", {"account": "nobody"})) == {"items": [], "next_after_seq": None}


async def test_verify_names_the_first_tampered_seq(mesh: Mesh, database: str) -> None:
    await mesh.ok("ledger.record_batch", {"transfers": [transfer(f"v{n}", "world", "user:1", 10) for n in range(6)]})
    assert (await mesh.ok("ledger.verify", {}))["ok"] is True
    db = open_database(service_url("ledger", database))
    async with db.writer.begin() as conn:
        await conn.execute(update(ledger_entries).where(ledger_entries.c.seq == 4).values(amount=1_000_000))
    await db.dispose()
    verification = await mesh.ok("ledger.verify", {})
    assert verification["ok"] is False and verification["first_bad_seq"] == 4
    assert verification["length"] == 3


async def test_verifies_asked_while_one_runs_share_the_next_which_began_after_they_were_asked(
    mesh: Mesh, database: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each run recomputes the chain and then takes 0.3 s more to answer: a request that comes
    in that time is answered by a run that recomputed it after it came (here, after a change)."""
    await mesh.ok("ledger.record_batch", {"transfers": [transfer(f"s{n}", "world", "user:1", 1) for n in range(3)]})
    runs = []
    recompute = ledger.service.verify_chain

    async def slow_to_answer(db: Database) -> Verification:
        runs.append(await recompute(db))
        await asyncio.sleep(0.3)
        return runs[-1]

    monkeypatch.setattr(ledger.service, "verify_chain", slow_to_answer)
    answers = await asyncio.gather(*(mesh.ok("ledger.verify", {}) for _ in range(12)))
    assert len(runs) <= 2 and all(answer == answers[0] for answer in answers)
    assert answers[0]["ok"] is True and answers[0]["length"] == 3
    runs_before = len(runs)
    first = asyncio.create_task(mesh.ok("ledger.verify", {}))
    async with asyncio.timeout(5):
        while len(runs) == runs_before:  # it has recomputed the chain, and answers in 0.3 s
            await asyncio.sleep(0.01)
    db = open_database(service_url("ledger", database))
    try:
        async with db.writer.begin() as conn:
            await conn.execute(update(ledger_entries).where(ledger_entries.c.seq == 2).values(memo="changed"))
    finally:
        await db.dispose()
    later = await mesh.ok("ledger.verify", {})
    assert (await first)["ok"] is True
    assert (later["ok"], later["first_bad_seq"]) == (False, 2) and len(runs) == runs_before + 2


async def test_verifies_waiting_on_one_the_database_did_not_answer_share_its_503(
    mesh: Mesh, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Not one after another, each waiting out the same outage in a run of its own."""
    runs = 0

    async def unanswered(db: Database) -> Verification:
        nonlocal runs
        runs += 1
        await asyncio.sleep(0.3)
        raise DatabaseTimeout("the database did not answer in time")

    monkeypatch.setattr(ledger.service, "verify_chain", unanswered)
    answers = await asyncio.gather(*(mesh.request("ledger.verify", {}) for _ in range(12)))
    assert [code for code, _ in answers] == [503] * 12 and runs <= 2


AWKWARD_MEMOS = [
    "".join(map(chr, range(1, 32))),
    '\x7f " \\ / \u2028 \u2029 \ufeff é ✓ 𝄞 😀 <&>',
    "e\u0301 \U0010ffff \\u0041",
    "",
]


async def test_verify_holds_for_every_character_and_names_a_change_to_any_hashed_field(
    mesh: Mesh, database: str
) -> None:
    """On Postgres the server writes the canonical body itself (`POSTGRES_CANONICAL_BODY`): every
    escape, character and integer has to come out as `ledger.chain.canonical_body` writes it."""
    transfers = [
        transfer(f"A.z-0:{n}", "world", f"Z_9.a:{n}", INT64_MAX - 6 if n == 0 else n, memo=memo)
        for n, memo in enumerate(AWKWARD_MEMOS)
    ]
    entries = (await mesh.ok("ledger.record_batch", {"transfers": transfers}))["items"]
    entries.append(await mesh.ok("ledger.record", transfer("last", "world", "Z_9.a:0", 1, currency="BTC")))
    assert [entry["hash"] for entry in entries] == [outside_hash(entry) for entry in entries]
    assert await mesh.ok("ledger.verify", {}) == {
        "ok": True,
        "length": len(entries),
        "head": entries[-1]["hash"],
        "first_bad_seq": None,
    }
    c = ledger_entries.c
    changes = [
        (c.id, "A.z-0:9"),
        (c.from_account, "world2"),
        (c.to_account, "Z_9.a:9"),
        (c.amount, 7),
        (c.currency, "USD"),
        (c.memo, AWKWARD_MEMOS[0] + " "),
        (c.recorded_at, datetime(2026, 1, 1, tzinfo=UTC)),
        (c.prev_hash, "0" * 64),
        (c.hash, "f" * 64),
    ]
    db = open_database(service_url("ledger", database))
    try:
        for column, value in changes:
            async with db.writer.begin() as conn:
                stored = (await conn.execute(select(column).where(c.seq == 2))).scalar_one()
                await conn.execute(update(ledger_entries).where(c.seq == 2).values({column: value}))
            verification = await mesh.ok("ledger.verify", {})
            assert verification == {"ok": False, "length": 1, "head": entries[0]["hash"], "first_bad_seq": 2}, column
            async with db.writer.begin() as conn:
                await conn.execute(update(ledger_entries).where(c.seq == 2).values({column: stored}))
        assert (await mesh.ok("ledger.verify", {}))["ok"] is True
    finally:
        await db.dispose()


async def test_a_deleted_entry_is_named_by_verify_and_paging_goes_on_past_it_wherever_it_was(
    mesh: Mesh, database: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Pages are read as the seq range they would cover when dense; a range that held one entry
    fewer once ended verify (`ok`, the chain cut short) and `ledger.chain`'s paging there."""
    monkeypatch.setattr(ledger.service, "verify_page_entries", 5)  # SQLite's pages, read here
    monkeypatch.setattr(ledger.service, "verify_range_entries", 5)  # Postgres' ranges, checked there
    await mesh.ok("ledger.record_batch", {"transfers": [transfer(f"g{n}", "world", "user:1", 1) for n in range(14)]})
    db = open_database(service_url("ledger", database))
    try:
        for seq in range(1, 14):  # every position within and at the edge of a page; the last one cannot be told
            async with db.writer.begin() as conn:
                row = (await conn.execute(select(ledger_entries).where(ledger_entries.c.seq == seq))).one()
                await conn.execute(ledger_entries.delete().where(ledger_entries.c.seq == seq))
            verification = await mesh.ok("ledger.verify", {})
            assert (verification["ok"], verification["first_bad_seq"], verification["length"]) == (False, seq, seq - 1)
            seqs, after = [], 0
            while after is not None:
                page = await mesh.ok("ledger.chain", {"after_seq": after, "limit": 4})
                seqs += [entry["seq"] for entry in page["items"]]
                after = page["next_after_seq"]
            assert seqs == [n for n in range(1, 15) if n != seq]
            async with db.writer.begin() as conn:
                await conn.execute(insert(ledger_entries).values(row._mapping))
        assert (await mesh.ok("ledger.verify", {}))["ok"] is True
    finally:
        await db.dispose()


async def test_concurrent_spending_never_overspends_and_keeps_every_invariant(mesh: Mesh) -> None:
    await mesh.ok("ledger.record", transfer("fund", "world", "user:rich", 100))
    results = await asyncio.gather(
        *(mesh.request("ledger.record", transfer(f"spend{n}", "user:rich", f"user:{n % 7}", 1)) for n in range(250))
    )
    codes = [code for code, _ in results]
    assert codes.count(None) == 100 and codes.count(422) == 150
    assert (await mesh.ok("ledger.balance", {"account": "user:rich"}))["balances"] == {"EUR": 0}
    entries = await assert_ledger_invariants(mesh)
    assert len(entries) == 101


async def test_every_entry_publishes_a_recorded_event(mesh: Mesh) -> None:
    batch = await mesh.ok(
        "ledger.record_batch", {"transfers": [transfer(f"e{n}", "world", "user:1", 1) for n in range(3)]}
    )
    events = await mesh.events(3)
    for (subject, msg_id, envelope), entry in zip(events, batch["items"], strict=True):
        assert subject == "events.ledger.transfer.recorded"
        assert msg_id == envelope["id"]
        assert envelope["type"] == "ledger.transfer.recorded" and envelope["source"] == "ledger"
        assert envelope["data"] == entry and envelope["occurred_at"] == entry["recorded_at"]
    await asyncio.sleep(0.3)
    assert await mesh.event_count() == 3


async def test_handed_over_entries_are_published_only_where_they_continue_the_chain(mesh: Mesh) -> None:
    """The ledger hands each committed batch to the relay; a message that does not continue what was
    published (a gap, or a forged entry whose prev_hash does not link) sends the relay to the
    database instead: every event is an entry of the chain, each once, in order."""
    first = (await mesh.ok("ledger.record_batch", {"transfers": [transfer("h1", "world", "user:1", 1)]}))["items"]
    await mesh.events(1)
    forged = [{**first[0], "seq": 2, "id": "forged", "hash": "f" * 64}]  # links by seq, not by hash
    ahead = [{**first[0], "seq": 7, "id": "ahead", "prev_hash": "a" * 64}]  # a gap
    for entries in (forged, ahead, [{**forged[0], "prev_hash": first[0]["hash"], "seq": 9}]):
        await mesh.nc.publish(COMMITTED_SUBJECT, json.dumps(entries).encode())
    await mesh.ok("ledger.record_batch", {"transfers": [transfer(f"h{n}", "world", "user:1", 1) for n in (2, 3)]})
    events = await mesh.events(3)
    chain = await whole_chain(mesh)
    assert [envelope["data"] for _, _, envelope in events] == chain
    await asyncio.sleep(0.3)
    assert await mesh.event_count() == 3


async def test_an_entry_never_handed_over_is_published_from_the_database(mesh: Mesh, database: str) -> None:
    """Committed with no `ledger.internal.committed` after it (here: written straight into the
    table, as if that message were lost): the relay still finds it, within its poll interval."""
    (first,) = (await mesh.ok("ledger.record_batch", {"transfers": [transfer("p1", "world", "user:1", 1)]}))["items"]
    await mesh.events(1)
    moment = datetime.now(UTC)
    second = make_entry(2, "p2", "world", "user:1", 1, "EUR", "", timestamp(moment), first["hash"])
    await write_straight_into_the_tables(database, second, moment)
    events = await mesh.events(2, timeout_s=3 * relay_poll_interval_s)
    assert [envelope["data"]["seq"] for _, _, envelope in events] == [1, 2]
    assert events[1][2]["data"]["hash"] == second.hash


async def test_a_batch_too_large_to_hand_over_is_published_from_the_database(mesh: Mesh) -> None:
    """Entries with 1 KiB memos from four concurrent requests: a writer batch holding more than
    about 750 of them does not fit in one NATS message (1 MiB), so the ledger hands over
    nothing and the relay reads them back; smaller batches are handed over. Either way every
    entry is published, once, in order."""
    entry = make_entry(1, "x", "world", "user:1", 1, "EUR", "m" * 1024, "2026-01-01T00:00:00.000000Z", GENESIS)
    assert committed_message([entry], 1024) == b""  # does not fit: nothing handed over
    assert json.loads(committed_message([entry], 2048))[0]["hash"] == entry.hash
    memo = "m" * 1024
    requests = [
        {"transfers": [transfer(f"big{r}-{n}", "world", "user:1", 1, memo=memo) for n in range(250)]} for r in range(4)
    ]
    await asyncio.gather(*(mesh.ok("ledger.record_batch", body) for body in requests))
    events = await mesh.events(1000)
    assert [envelope["data"]["seq"] for _, _, envelope in events] == list(range(1, 1001))
    await asyncio.sleep(0.3)
    assert await mesh.event_count() == 1000


async def test_handed_over_entries_that_could_not_be_published_are_tried_again_from_the_database(
    mesh: Mesh, database: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A relay whose publish failed retries it from the database at once, so its back-off grows.
    Until session 24 the failed handover was dropped, the next try found nothing to do and
    counted as a success, and the relay retried once per poll interval, with a warning each time."""
    monkeypatch.setattr(ledger.events, "relay_poll_interval_s", 60.0)  # no poll falls inside the test
    db = open_database(service_url("ledger", database))
    relay = ChainRelay(BatchPublisher(mesh.nc), db)
    try:
        await relay.publish_pending()  # caught up: nothing in the chain yet
        async with events_parked(mesh):
            body = {"transfers": [transfer("r1", "world", "user:1", 1)]}
            (entry,) = (await mesh.ok("ledger.record_batch", body))["items"]
            relay.hand_over(json.dumps([entry]).encode())
            for _ in range(2):
                with pytest.raises(nats.errors.NoRespondersError):
                    await relay.publish_pending()
        await relay.publish_pending()
    finally:
        await db.dispose()
    events = await mesh.events(1)
    assert [envelope["data"] for _, _, envelope in events] == [entry]


def test_an_event_is_the_envelope_around_the_entry_handed_over_or_read_back() -> None:
    """The relay wraps the entry's JSON as it came in the envelope: byte for byte what encoding
    the envelope would give, whether the entry was handed over or read from the database."""
    entry = make_entry(
        7, "id-7", "world", "user:1", 5, "EUR", 'é "quoted" \\ \u2028', "2026-01-01T00:00:00.000001Z", GENESIS
    )
    digest = entry.hash
    envelope = Envelope(
        id=f"{digest[:8]}-{digest[8:12]}-{digest[12:16]}-{digest[16:20]}-{digest[20:32]}",
        type="ledger.transfer.recorded",
        source="ledger",
        occurred_at=entry.recorded_at,
        data=entry,
    )
    expected = Message("events.ledger.transfer.recorded", encode(envelope), envelope.id)
    (handed,) = handed_over(committed_message([entry], 2048))
    (read_back,) = stored([entry])
    assert event_message(handed) == event_message(read_back) == expected
    assert handed.link == read_back.link
    assert json.loads(expected.payload)["data"]["memo"] == entry.memo


async def postings_of(database: str, account: str) -> tuple[int, list[tuple[int, list[int]]]]:
    """The `postings` cursor and the account's runs (last seq, seqs), read from the database."""
    db = open_database(service_url("ledger", database))
    async with db.reader.connect() as conn:
        cursor = await conn.scalar(select(ledger_cursors.c.seq).where(ledger_cursors.c.name == "postings"))
        query = select(ledger_postings.c.last_seq, ledger_postings.c.seqs).where(ledger_postings.c.account == account)
        runs = [(row.last_seq, json.loads(row.seqs)) for row in await conn.execute(query.order_by("last_seq"))]
    await db.dispose()
    return cursor, runs


async def test_history_pages_from_any_seq_across_runs_and_the_tail_past_them(
    mesh: Mesh, database: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """History is read from runs and from the chain past them, on both stores."""
    monkeypatch.setattr(postings, "postings_run_entries", 4)
    for n in range(7):  # a batch of 3 each: a run is written once 4 or more entries are past the cursor
        await mesh.ok(
            "ledger.record_batch", {"transfers": [transfer(f"h{n}-{k}", "world", f"user:{k}", 10) for k in range(3)]}
        )
    assert await postings_of(database, "user:0") == (18, [(4, [1, 4]), (10, [7, 10]), (16, [13, 16])])
    chain = await whole_chain(mesh)
    mine = [entry for entry in chain if entry["to"] == "user:0"]
    assert [entry["seq"] for entry in mine] == [1, 4, 7, 10, 13, 16, 19]  # 19: past the cursor
    for after in range(22):
        for limit in (2, 5):  # 5 from 0: all three runs and the tail
            page = await mesh.ok("ledger.history", {"account": "user:0", "after_seq": after, "limit": limit})
            assert page["items"] == [entry for entry in mine if entry["seq"] > after][:limit], (after, limit)
    assert await whole_history(mesh, "world", limit=3) == chain
    accounts = ["world", "user:0", "user:1", "user:2", "nobody"]
    reads = [(account, after, limit) for account in accounts for after in range(22) for limit in (1, 2, 5)]
    pages = await asyncio.gather(
        *(mesh.ok("ledger.history", {"account": a, "after_seq": after, "limit": n}) for a, after, n in reads)
    )
    for (account, after, limit), page in zip(reads, pages, strict=True):  # asked together: one statement
        rest = [entry for entry in chain if account in (entry["from"], entry["to"]) and entry["seq"] > after]
        assert page["items"] == rest[:limit], (account, after, limit)
        assert page["next_after_seq"] == (rest[limit - 1]["seq"] if len(rest) > limit else None)


async def postings_state(database: str) -> tuple[int, int, int, int]:
    """The cursors `postings`, `postings_run`, `postings_rows`, and the rows past `postings`."""
    db = open_database(service_url("ledger", database))
    async with db.reader.connect() as conn:
        cursors = dict((await conn.execute(select(ledger_cursors.c.name, ledger_cursors.c.seq))).all())
        past = select(func.count()).where(ledger_postings.c.last_seq > cursors["postings"])
        rows_past = await conn.scalar(past)
    await db.dispose()
    return cursors["postings"], cursors["postings_run"], cursors["postings_rows"], rows_past


async def test_a_run_is_stored_a_share_per_batch_and_read_only_once_whole(
    mesh: Mesh, database: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Runs of 8 entries: each batch of 2 stores its share (2 of a run's 7 rows), history reads a
    run only once all of it is stored, and a writer that finds another writer's entry on its head
    reads the index, then the run being stored back from the chain, and stores the rest."""
    monkeypatch.setattr(postings, "postings_run_entries", 8)
    accounts = ["world", *(f"user:{k}" for k in range(6)), "user:9"]

    async def record_batch(n: int) -> None:
        transfers = [transfer(f"p{n}-{k}", "world", f"user:{(2 * n + k) % 6}", 10) for k in range(2)]
        await mesh.ok("ledger.record_batch", {"transfers": transfers})
        chain = await whole_chain(mesh)
        for account in accounts:
            mine = [entry for entry in chain if account in (entry["from"], entry["to"])]
            assert await whole_history(mesh, account, limit=3) == mine, (n, account)

    states = []
    for n in range(8):
        await record_batch(n)
        states.append(await postings_state(database))
    assert states == [
        *[(0, 0, 0, 0)] * 3,
        (0, 8, 2, 2),  # seqs 7, 8: the run (0, 8] is due, its first 2 of 7 rows stored
        (0, 8, 4, 4),
        (0, 8, 6, 6),
        (8, 8, 0, 0),  # whole: history reads it, and scans the chain past seq 8
        (8, 16, 2, 2),
    ]
    head = (await whole_chain(mesh))[-1]
    await another_writer_records(database, 17, "theirs", "world", "user:9", 10, head["hash"])
    states = []
    for n in range(8, 12):
        await record_batch(n)  # seqs 18-25
        states.append(await postings_state(database))
    assert states == [
        (8, 16, 2, 2),  # a writer that read the index stores no share
        (8, 16, 4, 4),  # the next batch does: the run (8, 16] read back from the chain
        (8, 16, 6, 6),
        (16, 25, 2, 2),  # (8, 16] whole; the run (16, 25] of 9 entries (17 theirs): 8 rows, read from the chain
    ]
    await assert_ledger_invariants(mesh)


async def test_the_migration_to_runs_indexes_the_chain_recorded_before_it(mesh: Mesh, database: str) -> None:
    await mesh.ok(
        "ledger.record_batch", {"transfers": [transfer(f"m{n}", "world", f"user:{n % 3}", 5) for n in range(12)]}
    )
    chain = await whole_chain(mesh)
    config = migrations._config(service_url("ledger", database))
    await asyncio.to_thread(command.downgrade, config, "ledger_0001")  # two indexes on (account, seq), no runs
    await migrations.upgrade_async(database)  # runs, on both stores
    assert await postings_of(database, "user:1") == (12, [(11, [2, 5, 8, 11])])
    for account in ("world", "user:0", "user:1", "user:2"):
        assert await whole_history(mesh, account, limit=5) == [e for e in chain if account in (e["from"], e["to"])]
