"""A chaos soak of the whole mesh: clients that retry until they get a final answer, a fault
every few seconds, then every invariant across the services checked from what they answer.

    python -m bench.chaos [--duration 60] [--store postgres|sqlite] [--replicas 1] [--seed 1]
                          [--faults kill nats stop lock postgres] [--log mesh.log]

`bitnexus up` runs in a temporary directory with its own nats-server, on a fresh Postgres
database (`bitnexus_chaos`, dropped after) or SQLite. Clients send deposits, withdrawals,
transfers and purchases, each under a new key, a fifth of them through ingest; a request that
times out or gets a 503 or a 500 is sent again with the same key until it gets a final answer,
and a tenth of the answered ones are sent again and must get the same answer. Faults: SIGKILL
of a service process (`kill`) or of nats-server (`nats`), a 6 s SIGSTOP of a service (`stop`),
a table locked for 1-12 s (`lock`), a Postgres stop of 0.5-3 s (`postgres`: `pg_ctlcluster`,
root only). Afterwards: the chain verifies and replays to the stored balances, every answer
stands as given, every committed transaction has its one entry and no other has one, stock
adds up, every ingest message was applied, and each change has exactly one event.

It counts the tracebacks in the mesh's log; `--log` keeps the log, which otherwise goes with the
run's temporary directory.

Not a test: it restarts the machine's Postgres. A session 20 version of it (lost with a scratch
directory) found money moved under rejected transactions and five more bugs (docs/decisions.md).
Exit status 1 when a check fails.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import asyncpg
import nats
from nats.aio.client import Client

from bench.services import POSTGRES_ADMIN, fresh_postgres, table_locked
from bus.embedded import free_port

CHAOS_DATABASE = "bitnexus_chaos"
CURRENCY = "EUR"
USERS = 12
PRODUCTS = 3
STOCK = 1_000_000
FINAL = {200, 404, 409, 422}
"""Answers a client stops at; it sends the same request again after anything else."""
request_timeout_s = 6.0
retry_pause_s = 0.2
settle_timeout_s = 90.0
LOCKED_TABLES = (
    ("transactions", "transactions"),
    ("ledger", "ledger_entries"),
    ("products", "product_reservations"),
    ("accounts", "users"),
)
"""A service and a table of it (on SQLite the service's whole file is locked)."""


class Chaos:
    """What the clients asked and were answered, and what the faults did."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.answers: dict[str, tuple[int, dict]] = {}
        """A request's final answer by idempotency key: the code (200 for none) and the reply."""
        self.ingested: list[str] = []
        self.counts: collections.Counter[str] = collections.Counter()
        self.problems: list[str] = []


async def request(nc: Client, subject: str, body: dict) -> tuple[int | str, dict]:
    try:
        reply = await nc.request(subject, json.dumps(body).encode(), timeout=request_timeout_s)
    except Exception as exc:  # no responders while a service restarts, a timeout while it is stopped
        return type(exc).__name__, {}
    code = reply.headers.get("Nats-Service-Error-Code") if reply.headers else None
    return (int(code) if code else 200), json.loads(reply.data)


async def final_answer(nc: Client, chaos: Chaos, subject: str, body: dict) -> tuple[int, dict]:
    """The same request until a final answer, as a patient client sends it."""
    while True:
        code, reply = await request(nc, subject, body)
        chaos.counts[f"answer {code}"] += 1
        if code in FINAL:
            assert isinstance(code, int)
            return code, reply
        await asyncio.sleep(retry_pause_s)


def new_request(chaos: Chaos, client: int, n: int, users: list[int], products: list[int]) -> tuple[str, dict]:
    """A kind of transaction and its body, under a key of its own."""
    rng, key = chaos.rng, f"c{client}-{n}"
    kind = rng.choice(["deposits", "withdrawals", "transfers", "purchases"])
    if kind == "purchases":
        body = {"buyer_id": rng.choice(users), "product_id": rng.choice(products), "quantity": rng.randint(1, 3)}
    elif kind == "transfers":
        payer, payee = rng.sample(users, 2)
        body = {"from_user_id": payer, "to_user_id": payee, "amount": rng.randint(1, 300), "currency": CURRENCY}
    else:
        body = {"user_id": rng.choice(users), "amount": rng.randint(1, 500), "currency": CURRENCY}
    return kind, {"idempotency_key": key, **body}


async def client(
    nc: Client, chaos: Chaos, number: int, users: list[int], products: list[int], stop: asyncio.Event
) -> None:
    js = nc.jetstream()
    n = 0
    while not stop.is_set():
        n += 1
        kind, body = new_request(chaos, number, n, users, products)
        if chaos.rng.random() < 0.2:
            with contextlib.suppress(Exception):  # a publish JetStream did not acknowledge: the key is not counted
                await js.publish(f"ingest.transactions.{kind}", json.dumps(body).encode(), timeout=request_timeout_s)
                chaos.ingested.append(body["idempotency_key"])
            continue
        subject = f"transactions.{kind}.create"
        answer = await final_answer(nc, chaos, subject, body)
        chaos.answers[body["idempotency_key"]] = answer
        if chaos.rng.random() < 0.1:
            again = await final_answer(nc, chaos, subject, body)
            if again != answer:
                chaos.problems.append(f"{subject} {body} answered {answer}, then {again}")


async def mesh_children(nc: Client) -> list[dict]:
    code, status = await request(nc, "mesh.status", {})
    return status.get("children", []) if code == 200 else []


async def faults(
    nc: Client, chaos: Chaos, kinds: list[str], up: subprocess.Popen, database_url: str, stop: asyncio.Event
) -> None:
    while not stop.is_set():
        await asyncio.sleep(chaos.rng.uniform(6, 10))
        if stop.is_set():
            return
        kind = chaos.rng.choice(kinds)
        chaos.counts[f"fault {kind}"] += 1
        if kind in ("kill", "stop"):
            pids = [child["pid"] for child in await mesh_children(nc) if child["pid"]]
            if not pids:
                continue
            pid = chaos.rng.choice(pids)
            if kind == "kill":
                os.kill(pid, signal.SIGKILL)
            else:
                os.kill(pid, signal.SIGSTOP)
                await asyncio.sleep(6)
                os.kill(pid, signal.SIGCONT)
        elif kind == "nats":
            server = subprocess.run(["pgrep", "-P", str(up.pid), "nats-server"], capture_output=True, text=True)
            for pid in server.stdout.split():
                os.kill(int(pid), signal.SIGKILL)
        elif kind == "postgres":
            cluster = ["pg_ctlcluster", "--skip-systemctl-redirect", os.listdir("/etc/postgresql")[0], "main"]
            subprocess.run([*cluster, "stop", "-m", "fast"], check=True, capture_output=True)
            await asyncio.sleep(chaos.rng.uniform(0.5, 3))
            subprocess.run([*cluster, "start"], check=True, capture_output=True)
        else:
            service, table = chaos.rng.choice(LOCKED_TABLES)
            async with table_locked(database_url, service, table, "ACCESS EXCLUSIVE"):
                await asyncio.sleep(chaos.rng.uniform(1, 12))


async def paged(nc: Client, subject: str, body: dict, cursor: str, after: str) -> list[dict]:
    items: list[dict] = []
    while True:
        code, page = await request(nc, subject, body)
        assert code == 200, (subject, code, page)
        items += page["items"]
        if page[cursor] is None:
            return items
        body = {**body, after: page[cursor]}


async def settled_transactions(nc: Client, chaos: Chaos, deadline: float) -> list[dict]:
    """Every transaction, once every child runs and every ingested key has its end."""
    while time.monotonic() < deadline:
        children = await mesh_children(nc)
        if children and all(child["state"] == "running" for child in children):
            listed = await paged(nc, "transactions.transactions.list", {"limit": 1000}, "next_after_id", "after_id")
            keys = {item["idempotency_key"] for item in listed}
            if all(key in keys for key in chaos.ingested):
                return listed
        await asyncio.sleep(1)
    chaos.problems.append("not settled: children not running, or ingested keys without an end")
    return await paged(nc, "transactions.transactions.list", {"limit": 1000}, "next_after_id", "after_id")


async def events(nc: Client) -> list[dict]:
    subscription = await nc.jetstream().pull_subscribe("events.>", stream="EVENTS")
    found = []
    while True:
        try:
            batch = await subscription.fetch(500, timeout=2)
        except nats.errors.TimeoutError:
            return found
        for msg in batch:
            await msg.ack()
            found.append(json.loads(msg.data))


async def check(nc: Client, chaos: Chaos, initial_stock: dict[int, int]) -> None:
    transactions = await settled_transactions(nc, chaos, time.monotonic() + settle_timeout_s)
    chain = await check_chain(nc, chaos.problems.append)
    check_transactions(chaos, chain, transactions)
    await check_stock(nc, chaos.problems.append, transactions, initial_stock)
    published = await check_events(nc, chaos.problems.append, chain, transactions)
    chaos.counts |= {"transactions": len(transactions), "entries": len(chain), "events": published}


async def check_chain(nc: Client, problem: Callable[[str], None]) -> list[dict]:
    """The chain verifies, its seqs are dense, and the stored balances are its replay: summing to
    zero, none below zero but `world`'s."""
    code, verified = await request(nc, "ledger.verify", {})
    if code != 200 or not verified["ok"]:
        problem(f"ledger.verify: {code} {verified}")
    chain = await paged(nc, "ledger.chain", {"limit": 1000}, "next_after_seq", "after_seq")
    if [entry["seq"] for entry in chain] != list(range(1, len(chain) + 1)):
        problem("the chain's seqs are not dense from 1")
    balances: dict[str, int] = collections.defaultdict(int)
    for entry in chain:
        balances[entry["from"]] -= entry["amount"]
        balances[entry["to"]] += entry["amount"]
    for account, replayed in balances.items():
        _, stored = await request(nc, "ledger.balance", {"account": account})
        if stored.get("balances", {}).get(CURRENCY, 0) != replayed:
            problem(f"{account}: stored {stored}, replayed {replayed}")
        if replayed < 0 and account != "world":
            problem(f"{account} below zero: {replayed}")
    if sum(balances.values()) != 0:
        problem(f"balances sum to {sum(balances.values())}")
    return chain


def check_transactions(chaos: Chaos, chain: list[dict], transactions: list[dict]) -> None:
    """Every committed transaction has its one entry and no other has one; every answer stands."""
    problem = chaos.problems.append
    entries = {entry["id"]: entry for entry in chain}
    by_key = {item["idempotency_key"]: item for item in transactions}
    for key, item in by_key.items():
        entry = entries.get(f"tx:{key}")
        if item["status"] == "committed" and item["amount"] is not None:
            if entry is None or (entry["seq"], entry["hash"]) != (item["ledger_seq"], item["ledger_hash"]):
                problem(f"committed {key} without its entry: {entry}")
        elif entry is not None:
            problem(f"{item['status']} {key} has an entry: money moved ({entry['seq']})")
    for entry_id in entries:
        if entry_id.startswith("tx:") and by_key.get(entry_id[3:], {}).get("status") != "committed":
            problem(f"entry {entry_id} without a committed transaction")
    for key, (code, reply) in chaos.answers.items():
        item = by_key.get(key)
        expected = {200: "committed", 422: "rejected"}.get(code)
        if (item["status"] if item else None) != expected:
            problem(f"{key} answered {code} {reply}, stored {item}")
        elif code == 200 and reply["id"] != item["id"]:
            problem(f"{key} answered id {reply['id']}, stored {item['id']}")


async def check_stock(
    nc: Client, problem: Callable[[str], None], transactions: list[dict], initial_stock: dict[int, int]
) -> None:
    """Each product's stock is what it started with less what committed purchases took."""
    for product_id, stock in initial_stock.items():
        sold = sum(
            item["quantity"]
            for item in transactions
            if item["kind"] == "purchase" and item["status"] == "committed" and item["product_id"] == product_id
        )
        _, product = await request(nc, "products.products.get", {"id": product_id})
        if product.get("stock") != stock - sold:
            problem(f"product {product_id}: stock {product.get('stock')}, expected {stock} - {sold}")


async def check_events(nc: Client, problem: Callable[[str], None], chain: list[dict], transactions: list[dict]) -> int:
    """No event id twice; one `transfer.recorded` per entry, one end per transaction. How many."""
    published = await events(nc)
    ids = collections.Counter(event["id"] for event in published)
    if twice := [event_id for event_id, count in ids.items() if count > 1]:
        problem(f"{len(twice)} event ids published twice, say {twice[:3]}")
    recorded = collections.Counter(e["data"]["seq"] for e in published if e["type"] == "ledger.transfer.recorded")
    if recorded != collections.Counter(entry["seq"] for entry in chain):
        problem(f"transfer.recorded events: {len(recorded)} seqs for {len(chain)} entries, or some twice")
    ends = collections.Counter(
        e["data"]["idempotency_key"] for e in published if e["type"].startswith("transactions.transaction.")
    )
    if wrong := [item["idempotency_key"] for item in transactions if ends[item["idempotency_key"]] != 1]:
        problem(f"{len(wrong)} transactions without exactly one committed or rejected event, say {wrong[:3]}")
    return len(published)


async def seed(nc: Client, chaos: Chaos) -> tuple[list[int], dict[int, int]]:
    """The users (ids), and the products with their stock, before any fault."""
    users = []
    for n in range(USERS):
        user = {"email": f"chaos{n}@example.com", "name": f"Chaos {n}", "password": "chaos password"}
        users.append((await final_answer(nc, chaos, "accounts.users.create", user))[1]["id"])
    stock = {}
    for n in range(PRODUCTS):
        product = {"sku": f"CHAOS-{n}", "name": f"Chaos {n}", "price": 10 * (n + 1), "currency": CURRENCY}
        product |= {"stock": STOCK, "seller_id": users[n]}
        stock[(await final_answer(nc, chaos, "products.products.create", product))[1]["id"]] = STOCK
    return users, stock


async def soak(url: str, up: subprocess.Popen, database_url: str, options: argparse.Namespace) -> Chaos:
    chaos = Chaos(random.Random(options.seed))

    async def said(exc: Exception) -> None:  # nats-server killed: nats-py reconnects by itself
        chaos.counts["client connection errors"] += 1

    nc = await nats.connect(url, max_reconnect_attempts=-1, reconnect_time_wait=0.2, error_cb=said)
    try:
        users, stock = await seed(nc, chaos)
        stop = asyncio.Event()
        async with asyncio.TaskGroup() as group:
            for number in range(options.clients):
                group.create_task(client(nc, chaos, number, users, list(stock), stop))
            group.create_task(faults(nc, chaos, options.faults, up, database_url, stop))
            await asyncio.sleep(options.duration)
            stop.set()
        await check(nc, chaos, stock)
    finally:
        await nc.close()
    return chaos


def mesh_config(directory: Path, replicas: int) -> Path:
    """deploy/mesh.toml with `replicas` of every service but the event relay."""
    text = Path("deploy/mesh.toml").read_text()
    relay, rest = text.split('name = "ledger"', 1)
    config = directory / "mesh.toml"
    config.write_text(relay + 'name = "ledger"' + rest.replace("replicas = 1", f"replicas = {replicas}"))
    return config


async def drop_database() -> None:
    admin = await asyncpg.connect(POSTGRES_ADMIN)
    await admin.execute(f'DROP DATABASE IF EXISTS "{CHAOS_DATABASE}" WITH (FORCE)')
    await admin.close()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--duration", type=float, default=60.0)
    parser.add_argument("--store", choices=["postgres", "sqlite"], default="postgres")
    parser.add_argument("--replicas", type=int, default=1)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--faults", nargs="+", default=["kill", "nats", "stop", "lock", "postgres"])
    parser.add_argument("--log", type=Path, help="where to keep the mesh's log (it goes with the run's directory)")
    options = parser.parse_args()
    if options.store == "sqlite" or os.geteuid() != 0:
        options.faults = [fault for fault in options.faults if fault != "postgres"]
    with tempfile.TemporaryDirectory() as directory:
        data = Path(directory)
        if options.store == "postgres":
            database_url = asyncio.run(fresh_postgres(CHAOS_DATABASE))
        else:
            database_url = f"sqlite+aiosqlite:///{data}/mesh.db"
        env = {**os.environ, "BITNEXUS_DATA_DIR": str(data), "DATABASE_URL": database_url}
        env["BITNEXUS_NATS_PORT"] = str(free_port())
        env.pop("NATS_URL", None)
        command = [sys.executable, "-m", "supervisor", "up", "--config", str(mesh_config(data, options.replicas))]
        with open(data / "mesh.log", "w") as log:
            up = subprocess.Popen(command, env=env, stderr=log)
            try:
                deadline = time.monotonic() + 60
                while not (data / "nats.url").exists() and time.monotonic() < deadline:
                    time.sleep(0.2)
                url = (data / "nats.url").read_text().strip()
                chaos = asyncio.run(soak(url, up, database_url, options))
            finally:
                up.send_signal(signal.SIGTERM)
                up.wait(120)
        tracebacks = (data / "mesh.log").read_text().count("Traceback")
        if options.log is not None:
            shutil.copyfile(data / "mesh.log", options.log)
        if options.store == "postgres":
            asyncio.run(drop_database())
    print(f"{options.duration:g} s, {options.clients} clients, store {options.store}, replicas {options.replicas}")
    print(", ".join(f"{name} {count}" for name, count in sorted(chaos.counts.items())))
    print(f"tracebacks in the mesh's log: {tracebacks}; supervisor exit {up.returncode}")
    for problem in chaos.problems:
        print(f"PROBLEM {problem}")
    print(f"{len(chaos.problems)} problems")
    sys.exit(1 if chaos.problems else 0)


if __name__ == "__main__":
    main()
