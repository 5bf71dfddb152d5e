"""The ledger as real processes: two writers on one database, kills, restarts."""

from __future__ import annotations

import asyncio
import json
import signal
from pathlib import Path
from subprocess import Popen

import nats.errors
import pytest
from nats.aio.client import Client

from bus.connection import Settings, connect
from bus.embedded import EmbeddedNats, free_port
from bus.events import ensure_events_stream
from tests.conftest import Mesh, events_parked, fresh_streams
from tests.ledger_checks import assert_ledger_invariants
from tests.test_faults import start_service, wait_until_serving


async def test_two_ledger_processes_on_one_database_never_fork_reuse_a_seq_or_overspend(
    nc: Client, database: str, nats_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("BITNEXUS_LEDGER_POSTINGS_RUN", "16")  # both writers index history in runs
    mesh = Mesh(nc)
    await ensure_events_stream(mesh.js)
    ledgers = [start_service("ledger", nats_url, database) for _ in range(2)]
    try:
        await wait_until_serving(nc, "ledger")
        await asyncio.sleep(1.0)  # both subscribed: the queue group spreads requests over them
        await mesh.ok(
            "ledger.record", {"id": "fund", "from": "world", "to": "user:1", "amount": 300, "currency": "EUR"}
        )
        transfers = [
            {"id": f"spend{n}", "from": "user:1", "to": f"user:{2 + n % 5}", "amount": 1, "currency": "EUR"}
            for n in range(600)
        ] + [
            {"id": f"dep{n}", "from": "world", "to": f"user:{2 + n % 5}", "amount": 3, "currency": "EUR"}
            for n in range(300)
        ]
        results = await asyncio.gather(*(mesh.request("ledger.record", body) for body in transfers))
        codes = [code for code, _ in results]
        assert codes.count(None) == 300 + 300 and codes.count(422) == 300
        served_by = await served_requests_by_instance(nc)
        assert len(served_by) == 2 and all(count > 50 for count in served_by.values()), served_by
        entries = await assert_ledger_invariants(mesh)
        assert len(entries) == 601
    finally:
        for ledger in ledgers:
            ledger.send_signal(signal.SIGTERM)
        for ledger in ledgers:
            assert ledger.wait(15) == 0


async def start_relay_and_ledger(nc: Client, nats_url: str, database: str) -> tuple[Popen, Popen]:
    """The event relay, then the ledger (the supervisor's order); returns once the ledger serves."""
    relay = start_service("ledger_events", nats_url, database)
    ledger = start_service("ledger", nats_url, database)
    await wait_until_serving(nc, "ledger")
    return relay, ledger


async def served_requests_by_instance(nc: Client) -> dict[str, int]:
    inbox = nc.new_inbox()
    sub = await nc.subscribe(inbox)
    await nc.publish("$SRV.STATS.ledger", b"", reply=inbox)
    counts = {}
    for _ in range(2):
        stats = json.loads((await sub.next_msg(timeout=2)).data)
        counts[stats["id"]] = next(e["num_requests"] for e in stats["endpoints"] if e["name"] == "record")
    await sub.unsubscribe()
    return counts


async def test_ledger_killed_after_commit_recovers_its_head_and_publishes_every_entry_once(
    nc: Client, database: str, nats_url: str
) -> None:
    mesh = Mesh(nc)
    await fresh_streams(mesh)
    relay, ledger = await start_relay_and_ledger(nc, nats_url, database)
    try:
        first = await mesh.ok(
            "ledger.record", {"id": "a", "from": "world", "to": "u:1", "amount": 5, "currency": "EUR"}
        )
        await mesh.events(1)
        async with events_parked(mesh):  # JetStream takes no event: entries stay unpublished
            body = {"id": "b", "from": "u:1", "to": "u:2", "amount": 2, "currency": "EUR"}
            second = await mesh.ok("ledger.record", body)
            await asyncio.sleep(0.3)
            for process in (relay, ledger):
                process.send_signal(signal.SIGKILL)
                process.wait(10)
        relay, ledger = await start_relay_and_ledger(nc, nats_url, database)
        third = await mesh.ok("ledger.record", {"id": "c", "from": "u:2", "to": "u:1", "amount": 1, "currency": "EUR"})
        assert (first["seq"], second["seq"], third["seq"]) == (1, 2, 3)
        assert third["prev_hash"] == second["hash"]
        events = await mesh.events(2)
        assert [envelope["data"]["seq"] for _, _, envelope in events] == [2, 3]
        await asyncio.sleep(0.5)
        assert await mesh.event_count() == 2
        await assert_ledger_invariants(mesh)
    finally:
        for process in (ledger, relay):
            process.send_signal(signal.SIGTERM)
            assert process.wait(10) == 0


async def test_entries_committed_while_the_event_relay_is_down_are_published_once_when_it_is_back(
    nc: Client, database: str, nats_url: str
) -> None:
    mesh = Mesh(nc)
    await fresh_streams(mesh)
    relay, ledger = await start_relay_and_ledger(nc, nats_url, database)
    try:
        deposits = [
            {"id": f"d{n}", "from": "world", "to": f"u:{n % 3}", "amount": 1, "currency": "EUR"} for n in range(50)
        ]
        await asyncio.gather(*(mesh.ok("ledger.record", body) for body in deposits[:20]))
        await mesh.events(20)
        relay.send_signal(signal.SIGKILL)
        relay.wait(10)
        await asyncio.gather(*(mesh.ok("ledger.record", body) for body in deposits[20:]))
        await asyncio.sleep(0.5)
        assert await mesh.event_count() == 20  # nobody publishes while the relay is down
        relay = start_service("ledger_events", nats_url, database)
        events = await mesh.events(50)
        assert sorted(envelope["data"]["seq"] for _, _, envelope in events) == list(range(1, 51))
        await asyncio.sleep(0.5)
        assert await mesh.event_count() == 50
    finally:
        for process in (ledger, relay):
            process.send_signal(signal.SIGTERM)
            assert process.wait(10) == 0


async def test_a_nats_server_killed_and_restarted_under_load_loses_no_acknowledged_transfer_or_event(
    database: str, tmp_path: Path
) -> None:
    """nats-server SIGKILLed mid-load and started again on its port and JetStream directory:
    the ledger and its relay reconnect on their own, clients retrying a timed-out transfer
    (same id and body) get its one entry, and every entry's event is stored once."""
    server = EmbeddedNats(data_dir=tmp_path / "nats", port=free_port())
    url = server.start()
    nc = await connect(Settings(servers=[url]), name="test")
    mesh = Mesh(nc)
    await ensure_events_stream(mesh.js)
    relay, ledger = await start_relay_and_ledger(nc, url, database)
    acknowledged: dict[str, dict] = {}
    loading = True

    async def client(worker: int) -> None:
        sent = 0
        while loading:
            sent += 1
            body = {"id": f"w{worker}-{sent}", "from": "world", "to": f"u:{worker}", "amount": 1, "currency": "EUR"}
            while True:  # the same transfer until it is answered: a timeout says nothing of its fate
                try:
                    code, reply = await mesh.request("ledger.record", body, timeout_s=1.0)
                except (nats.errors.TimeoutError, nats.errors.NoRespondersError):
                    await asyncio.sleep(0.1)
                    continue
                assert code is None, reply
                acknowledged[body["id"]] = reply
                break

    try:
        clients = [asyncio.create_task(client(worker)) for worker in range(16)]
        await asyncio.sleep(1.0)
        before = len(acknowledged)
        server.process.send_signal(signal.SIGKILL)  # type: ignore[union-attr]
        server.process.wait()  # type: ignore[union-attr]
        await asyncio.sleep(0.5)
        server.start()
        await asyncio.sleep(3.0)  # everyone reconnects within 2 s (bus.connection), then serves again
        loading = False
        await asyncio.wait_for(asyncio.gather(*clients), 30)
        assert before > 0 and len(acknowledged) > before + 100, (before, len(acknowledged))
        entries = await assert_ledger_invariants(mesh)
        assert {entry["id"]: entry for entry in entries} == acknowledged
        events = await mesh.events(len(entries), timeout_s=20)
        assert sorted(envelope["data"]["seq"] for _, _, envelope in events) == list(range(1, len(entries) + 1))
        await asyncio.sleep(0.5)
        assert await mesh.event_count() == len(entries)
    finally:
        for process in (ledger, relay):
            process.send_signal(signal.SIGTERM)
        for process in (ledger, relay):
            assert process.wait(15) == 0
        await nc.close()
        server.stop()
