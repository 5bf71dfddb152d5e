"""Postgres statements of the hot paths: index lookups even in tables never analyzed, and
array literals that read back exactly what was written.

A young mesh's tables have no statistics (autovacuum looks once a minute), and with none the
planner took a list of 200 keys (`key = ANY($1)`) or an open range (`seq > $1 ORDER BY seq
LIMIT $2`) to match a large share of the table, and scanned it whole at every batch. Each
statement is explained here on freshly created tables holding a few thousand rows; the control
shows those tables do provoke the scan.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sqlalchemy.ext.asyncio import create_async_engine

import migrations
from handlers.accounts import USERS_BY_IDS_POSTGRES, USERS_PAGE
from handlers.batching import postgres_pages
from handlers.products import PRODUCTS_BY_IDS, PRODUCTS_PAGE
from handlers.transaction_store import CLOSED_PAGE, CLOSED_PAGE_OF_ACCOUNT, TransactionSql
from ledger.storage import (
    POSTGRES_BALANCES_OF_ACCOUNTS,
    POSTGRES_ENTRIES_AFTER,
    POSTGRES_HISTORIES,
    POSTGRES_VERIFY_RANGE,
    PostgresLedgerSql,
)
from schemas.database import postgres_int_array, postgres_text_array

ROWS = 5_000
KEYS = 200

FILL = [
    """INSERT INTO ledger_entries SELECT n, 'transfer-' || n, 'user:' || n % 1000, 'user:' || (n + 1) % 1000,
           1, 'EUR', '', now(), repeat('0', 64), repeat('0', 64) FROM generate_series(1, $1::bigint) AS n""",
    """INSERT INTO ledger_balances SELECT 'user:' || n, 'EUR', 1 FROM generate_series(1, $1::bigint) AS n""",
    """INSERT INTO ledger_postings SELECT 'user:' || n % 1000, n, '[' || n || ']'
           FROM generate_series(1, $1::bigint) AS n""",
    """INSERT INTO transactions (idempotency_key, fingerprint, kind, status, from_account, to_account, memo,
           inserted_at, updated_at)
           SELECT 'key-' || n, '', 'transfer', CASE WHEN n % 100 = 0 THEN 'pending' ELSE 'committed' END,
                  'user:' || n % 1000, 'user:' || (n + 1) % 1000, '', now(), now()
           FROM generate_series(1, $1::bigint) AS n""",
    """INSERT INTO products (sku, name, description, price, currency, stock, seller_id, inserted_at, updated_at)
           SELECT 'sku-' || n, '', '', 1, 'EUR', 1, n, now(), now() FROM generate_series(1, $1::bigint) AS n""",
    """INSERT INTO users (email, name, password_hash, inserted_at, updated_at)
           SELECT 'user' || n || '@example.com', '', '', now(), now() FROM generate_series(1, $1::bigint) AS n""",
]
ids = [f"transfer-{n}" for n in range(1, KEYS + 1)]
numbers = list(range(1, KEYS + 1))
accounts = [f"user:{n}" for n in numbers]
hashes = ["0" * 64] * KEYS
WRITE_ARGS = [numbers, ids, accounts, accounts[1:] + accounts[:1], [1] * KEYS, ["EUR"] * KEYS, [""] * KEYS]
WRITE_ARGS += ["2026-11-27 00:00:00+00", hashes, hashes, accounts, ["EUR"] * KEYS, [1] * KEYS, ROWS, "0" * 64, 1]
WRITE_ARGS += [accounts, [ROWS + 1] * KEYS, ["[1]"] * KEYS, ROWS, ROWS + 1, 2]
STATEMENTS: list[tuple[str, str, list[Any]]] = [
    ("ledger id check", PostgresLedgerSql.head_and_ids, [ids]),
    ("ledger write and its checks", PostgresLedgerSql.write, WRITE_ARGS),
    ("ledger balances", PostgresLedgerSql.balances_of, [accounts, ["EUR"] * KEYS]),
    ("ledger chain page", POSTGRES_ENTRIES_AFTER, [10, 1_000]),
    ("ledger history", POSTGRES_HISTORIES, [["user:7"], [0], [51]]),
    ("ledger histories", POSTGRES_HISTORIES, [["user:7", "user:8", "world"], [0, 2_000, 10], [51, 11, 1_001]]),
    ("ledger balance reads", POSTGRES_BALANCES_OF_ACCOUNTS, [accounts]),
    ("ledger verify range", POSTGRES_VERIFY_RANGE, [10, "0" * 64, 1_000]),
    ("transactions by key", TransactionSql(sqlite=False)._by_keys, [[f"key-{n}" for n in numbers]]),
    ("transactions by id", TransactionSql(sqlite=False)._by_ids, [numbers]),
    ("users by id", USERS_BY_IDS_POSTGRES, [numbers]),
    ("products by id", PRODUCTS_BY_IDS[1], [numbers]),
    ("transactions by id, read", TransactionSql(sqlite=False)._read_by_ids, [numbers]),
    ("transactions page of an account", CLOSED_PAGE_OF_ACCOUNT[1], [10, 51, "user:1"]),
    (
        "transactions pages of accounts",
        postgres_pages(CLOSED_PAGE_OF_ACCOUNT[1], ("bigint", "bigint", "text")),
        [[10, 2_000, 0], [51, 11, 1_001], ["user:1", "user:1", "user:7"]],
    ),
]
PAGES: list[tuple[str, str, list[Any]]] = [
    ("users page", USERS_PAGE[1], [10, 51]),
    ("products page", PRODUCTS_PAGE[1], [10, 51]),
    ("transactions page", CLOSED_PAGE[1], [10, 51]),
    ("users pages", postgres_pages(USERS_PAGE[1], ("bigint", "bigint")), [[10, 2_000, 0], [51, 11, 1_001]]),
    ("products pages", postgres_pages(PRODUCTS_PAGE[1], ("bigint", "bigint")), [[10, 2_000, 0], [51, 11, 1_001]]),
    ("transactions pages", postgres_pages(CLOSED_PAGE[1], ("bigint", "bigint")), [[10, 2_000, 0], [51, 11, 1_001]]),
]
"""Open ranges of ids, which may have gaps (deleted rows): a never-analyzed table is scanned
whole, as the control shows, until autovacuum's first analyze (within a minute of the first
50 rows); from then on, one range of the primary key."""


def scanned_whole(plan: dict) -> list[str]:
    """The tables a plan reads with a sequential scan."""
    found = [plan["Relation Name"]] if plan["Node Type"] == "Seq Scan" else []
    for child in plan.get("Plans", []):
        found += scanned_whole(child)
    return found


@pytest.fixture
async def young_tables(postgres_url: str) -> AsyncIterator[Any]:
    """Every service's tables created afresh in a schema of their own, filled, never analyzed;
    all of it in one transaction rolled back at the end. Yields the asyncpg connection."""
    engine = create_async_engine(postgres_url)
    try:
        async with engine.connect() as conn:
            transaction = await conn.begin()
            await conn.exec_driver_sql("CREATE SCHEMA young")
            await conn.exec_driver_sql("SET LOCAL search_path = young")
            await conn.run_sync(migrations.target_metadata().create_all)
            driver = (await conn.get_raw_connection()).driver_connection
            for fill in FILL:
                await driver.execute(fill, ROWS)
            yield driver
            await transaction.rollback()
    finally:
        await engine.dispose()


def literal(value: Any) -> str:
    """An argument written into `EXECUTE` (which takes no protocol parameters)."""
    if isinstance(value, list):
        value = postgres_int_array(value) if value and isinstance(value[0], int) else postgres_text_array(value)
    return str(value) if isinstance(value, int) else "'" + value.replace("'", "''") + "'"


async def explain(driver: Any, sql: str, args: list[Any], plans: str = "force_custom_plan") -> dict:
    """The plan Postgres picks for these arguments (`force_custom_plan`), or for any arguments
    (`force_generic_plan`, as for a prepared statement run often). SQLAlchemy's connection
    decodes the JSON."""
    await driver.execute(f"SET LOCAL plan_cache_mode = {plans}")
    await driver.execute(f"PREPARE probe AS {sql}")
    try:
        arguments = ", ".join(literal(arg) for arg in args)
        return (await driver.fetchval(f"EXPLAIN (FORMAT JSON) EXECUTE probe({arguments})"))[0]["Plan"]
    finally:
        await driver.execute("DEALLOCATE probe")


async def test_the_young_tables_provoke_a_scan_of_a_key_list(young_tables: Any) -> None:
    plan = await explain(young_tables, "SELECT seq FROM ledger_entries WHERE id = ANY($1::text[])", [ids])
    assert scanned_whole(plan) == ["ledger_entries"]
    open_range = "SELECT seq FROM ledger_entries WHERE seq > $1 ORDER BY seq LIMIT $2"
    plan = await explain(young_tables, open_range, [10, 1_000])
    assert scanned_whole(plan) == ["ledger_entries"]


@pytest.mark.parametrize("plans", ["force_custom_plan", "force_generic_plan"])
@pytest.mark.parametrize(("name", "sql", "args"), STATEMENTS, ids=[name for name, _, _ in STATEMENTS])
async def test_hot_statements_use_indexes_on_young_tables(
    young_tables: Any, name: str, sql: str, args: list, plans: str
) -> None:
    plan = await explain(young_tables, sql, args, plans)
    assert scanned_whole(plan) == [], (name, json.dumps(plan, indent=1))


@pytest.mark.parametrize("plans", ["force_custom_plan", "force_generic_plan"])
@pytest.mark.parametrize(("name", "sql", "args"), PAGES, ids=[name for name, _, _ in PAGES])
async def test_pages_use_indexes_once_analyzed(young_tables: Any, name: str, sql: str, args: list, plans: str) -> None:
    await young_tables.execute("ANALYZE")
    plan = await explain(young_tables, sql, args, plans)
    assert scanned_whole(plan) == [], (name, json.dumps(plan, indent=1))


stored_text = st.text(st.characters(blacklist_categories=["Cs"], blacklist_characters="\x00"), max_size=20)


async def test_array_literals_read_back_exactly(young_tables: Any) -> None:
    """Quotes, backslashes, braces, commas, blanks, `NULL` and empty strings stay what they were."""
    fixed = ['"', "\\", '\\"', "{", "}", ",", " ", " x ", "NULL", "null", "", "é ✓", "a\nb"]
    assert await young_tables.fetchval("SELECT $1::text::text[]", postgres_text_array(fixed)) == fixed
    assert await young_tables.fetchval("SELECT $1::text::text[]", postgres_text_array([])) == []
    numbers = [0, -1, 2**63 - 1, -(2**63)]
    assert await young_tables.fetchval("SELECT $1::text::bigint[]", postgres_int_array(numbers)) == numbers
    assert await young_tables.fetchval("SELECT $1::text::bigint[]", postgres_int_array(())) == []
    loop = asyncio.get_running_loop()

    @settings(max_examples=200, deadline=None)
    @given(st.lists(stored_text, max_size=8))
    def round_trip(values: list[str]) -> None:
        query = young_tables.fetchval("SELECT $1::text::text[]", postgres_text_array(values))
        assert asyncio.run_coroutine_threadsafe(query, loop).result(10) == values

    await asyncio.to_thread(round_trip)


BYTEWISE_KEYS = {
    ("ledger_balances", "account"),
    ("ledger_balances", "currency"),
    ("ledger_entries", "currency"),
    ("ledger_entries", "from_account"),
    ("ledger_entries", "id"),
    ("ledger_entries", "to_account"),
    ("ledger_refusals", "currency"),
    ("ledger_refusals", "from_account"),
    ("ledger_refusals", "id"),
    ("ledger_refusals", "to_account"),
    ("ledger_postings", "account"),
}
COLLATED_COLUMNS = """SELECT table_name, column_name, collation_name FROM information_schema.columns
    WHERE table_schema = $1 AND table_name LIKE 'ledger%' AND collation_name IS NOT NULL"""


async def test_ledger_keys_compare_bytewise_as_migrated_and_as_declared(postgres_url: str, young_tables: Any) -> None:
    """The migrations and the tables' declaration (what `young_tables` created) agree: the
    ledger's key columns, and only those, collate "C"."""
    await migrations.upgrade_async(postgres_url)
    for schema in ("public", "young"):
        collated = {
            (table, column): collation
            for table, column, collation in await young_tables.fetch(COLLATED_COLUMNS, schema)
        }
        assert collated == dict.fromkeys(BYTEWISE_KEYS, "C"), schema
