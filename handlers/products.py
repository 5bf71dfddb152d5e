"""The products service: `products.products.*` (contract §4) and the internal stock subjects.

`products.internal.stock.reserve` / `.release` take `{reservation_id, product_id, quantity}`
and answer `{reservation_id, status, quantity, product}`; stock moves by a conditional update
(`stock = stock - n WHERE stock >= n`), once per reservation id however often it is retried.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from datetime import UTC, datetime
from typing import Any

from msgspec import UNSET, structs
from nats.aio.client import Client
from sqlalchemy import delete, func, insert, select, update
from sqlalchemy.engine import Row
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection
from sqlalchemy.sql.elements import ColumnElement

from bus.client import call
from bus.codec import timestamp
from bus.errors import Conflict, NotFound, RemoteError, Unprocessable
from bus.events import write_event
from bus.service import Service
from handlers.batching import BatchLoader, PageKey, page_loader, read_loader
from handlers.runtime import Repo, serving_with_outbox
from schemas.accounts import User, UserId
from schemas.common import INT64_MAX, Deleted
from schemas.database import both_stores, lookup_rows, postgres_lookup, settled, stored_timestamp, transaction
from schemas.products import (
    CreateProduct,
    ListProducts,
    Product,
    ProductId,
    ProductPage,
    Reservation,
    StockChange,
    UpdateProduct,
    product_reservations,
    products,
    products_outbox,
)

SOURCE = "products"
RESERVATION_LOCK_CLASS = 0x50524F44  # "PROD": Postgres advisory locks (class, hash of a reservation id)
PRODUCT_COLUMNS = tuple(products.c)
accounts_timeout_s = 2.0


def product_from(row: Row) -> Product:
    return Product(
        id=row.id,
        sku=row.sku,
        name=row.name,
        description=row.description,
        price=row.price,
        currency=row.currency,
        stock=row.stock,
        seller_id=row.seller_id,
        inserted_at=timestamp(row.inserted_at),
        updated_at=timestamp(row.updated_at),
    )


def sku_taken() -> Conflict:
    return Conflict("sku is already taken", type="sku_taken")


def product_not_found(product_id: int) -> NotFound:
    return NotFound(f"product {product_id} not found")


async def check_seller(repo: Repo, seller_id: int) -> None:
    """The seller must be a user; accounts not answering is a 503 (raised by `call`)."""
    try:
        await call(repo.nc, "accounts.users.get", UserId(seller_id), User, timeout_s=accounts_timeout_s)
    except RemoteError as error:
        if error.code == 404:
            raise NotFound(f"seller {seller_id} not found") from None
        raise


async def create_product(request: CreateProduct, repo: Repo) -> Product:
    await check_seller(repo, request.seller_id)
    now = datetime.now(UTC)

    async def insert_product() -> Product:
        async with transaction(repo.db.writer) as conn:
            statement = insert(products).values(**structs.asdict(request), inserted_at=now, updated_at=now)
            product = product_from((await conn.execute(statement.returning(*PRODUCT_COLUMNS))).one())
            await write_event(conn, products_outbox, SOURCE, "products.product.created", product, now)
        return product

    def inserted() -> Awaitable[Product | None]:
        return _product_where(repo, (products.c.sku == request.sku) & (products.c.inserted_at == now))

    try:
        product = await settled(insert_product, inserted)
    except IntegrityError:
        raise sku_taken() from None
    repo.relay.wake()
    return product


async def get_product(request: ProductId, products_by_id: BatchLoader[int, Product]) -> Product:
    product = await products_by_id.load(request.id)
    if product is None:
        raise product_not_found(request.id)
    return product


PRODUCT_FIELDS = "id, sku, name, description, price, currency, stock, seller_id, inserted_at, updated_at"
PRODUCTS_BY_IDS = (
    f"SELECT {PRODUCT_FIELDS} FROM products WHERE id IN (SELECT value FROM json_each(?))",
    postgres_lookup(PRODUCT_FIELDS, "products", {"id": "bigint"}),
)


def products_loader(repo: Repo) -> BatchLoader[int, Product]:
    """`products.products.get`: those that come together, one statement on the driver (`read_loader`)."""

    async def lookup(driver: Any, ids: list[int]) -> dict[int, Product]:
        stamp = stored_timestamp(repo.db.is_sqlite)
        rows = await lookup_rows(driver, repo.db.is_sqlite, PRODUCTS_BY_IDS, ids)
        return {row[0]: _product_of(row, stamp) for row in rows}

    return read_loader(repo.db, lookup)


def _product_of(row: Any, stamp: Callable[[Any], str]) -> Product:
    """A product from a row of `PRODUCT_FIELDS` read on the driver."""
    return Product(*row[:8], inserted_at=stamp(row[8]), updated_at=stamp(row[9]))


PRODUCTS_PAGE = both_stores(f"SELECT {PRODUCT_FIELDS} FROM products WHERE id > $1 ORDER BY id LIMIT $2")


async def list_products(request: ListProducts, pages: BatchLoader[PageKey, list[Product]]) -> ProductPage:
    """Gathered, as the gets (`handlers.accounts.list_users` says why)."""
    return ProductPage.of(await pages.load((request.after_id, request.limit + 1)) or [], request.limit)


async def update_product(request: UpdateProduct, repo: Repo) -> Product:
    changes = {key: value for key, value in structs.asdict(request).items() if value is not UNSET and key != "id"}
    if "seller_id" in changes:
        await check_seller(repo, request.seller_id)  # type: ignore[arg-type]
    now = datetime.now(UTC)
    statement = update(products).where(products.c.id == request.id).values(**changes, updated_at=now)

    async def update_once() -> Product:
        async with transaction(repo.db.writer) as conn:
            return await _changed(conn, statement, request.id, "products.product.updated", now)

    def updated() -> Awaitable[Product | None]:
        return _product_where(repo, (products.c.id == request.id) & (products.c.updated_at == now))

    try:
        product = await settled(update_once, updated)
    except IntegrityError:
        raise sku_taken() from None
    repo.relay.wake()
    return product


async def delete_product(request: ProductId, repo: Repo) -> Deleted:
    now = datetime.now(UTC)

    async def delete_once() -> Deleted:
        async with transaction(repo.db.writer) as conn:
            statement = delete(products).where(products.c.id == request.id)
            await _changed(conn, statement, request.id, "products.product.deleted", now)
        return Deleted(id=request.id)

    async def gone() -> Deleted | None:
        """It stood (the row was there when the DELETE was sent: else a 404 before any commit)."""
        return Deleted(id=request.id) if await _product_where(repo, products.c.id == request.id) is None else None

    deleted = await settled(delete_once, gone)
    repo.relay.wake()
    return deleted


async def _product_where(repo: Repo, condition: ColumnElement[bool]) -> Product | None:
    """The product `condition` finds; after a commit went unanswered, whether it stood (a
    product written at this request's own microsecond, `settled`)."""
    row = await repo.db.read_one(select(*PRODUCT_COLUMNS).where(condition))
    return product_from(row) if row is not None else None


async def _changed(conn: AsyncConnection, statement, product_id: int, event_type: str, now: datetime) -> Product:  # type: ignore[no-untyped-def]
    """Run an update or delete of one product, 404 if there is none, and write its event."""
    row = (await conn.execute(statement.returning(*PRODUCT_COLUMNS))).one_or_none()
    if row is None:
        raise product_not_found(product_id)
    product = product_from(row)
    await write_event(conn, products_outbox, SOURCE, event_type, product, now)
    return product


async def reserve_stock(request: StockChange, repo: Repo) -> Reservation:
    """Take `quantity` from stock once per reservation id; 422 `out_of_stock` if there is not
    enough, and then never: the refusal leaves a tombstone, as a release does, so a later try of
    the same id (a saga's second driver, after the stock grew) takes nothing while the first
    closes its purchase as rejected."""
    return await _change_stock(request, repo, "reserved")


async def release_stock(request: StockChange, repo: Repo) -> Reservation:
    """Give a reservation's quantity back once; a release before its reserve leaves a tombstone."""
    return await _change_stock(request, repo, "released")


async def _change_stock(request: StockChange, repo: Repo, status: str) -> Reservation:
    """Idempotent per reservation id, so a change whose COMMIT went unanswered is made again once
    the database is back (a chaos soak, session 20: the saga passed the 500 on)."""
    return await settled(lambda: _change_stock_once(request, repo, status))


async def _change_stock_once(request: StockChange, repo: Repo, status: str) -> Reservation:
    now = datetime.now(UTC)
    async with transaction(repo.db.writer) as conn:
        if not repo.db.is_sqlite:  # SQLite's writer holds the file's write lock already
            await _lock_reservation(conn, request.reservation_id)
        existing = (
            await conn.execute(select(product_reservations).where(product_reservations.c.id == request.reservation_id))
        ).one_or_none()
        if existing is not None and (existing.product_id, existing.quantity) != (request.product_id, request.quantity):
            raise Conflict("reservation id reused with another product or quantity", type="idempotency_conflict")
        if existing is not None and (existing.status == "released" or status == "reserved"):
            product = await _product_in(conn, request.product_id)  # nothing to move: replay or tombstone
            return Reservation(request.reservation_id, existing.status, existing.quantity, product)
        refusal: Unprocessable | None = None
        if existing is None and status == "released":
            product = await _product_in(conn, request.product_id)  # release before reserve: tombstone only
        else:
            try:
                product = await _move_stock(
                    conn, request, -request.quantity if status == "reserved" else request.quantity
                )
            except Unprocessable as refused:
                if status == "released":
                    raise
                refusal, status = refused, "released"  # a tombstone: the id's later reserves take nothing
                product = await _product_in(conn, request.product_id)
            else:
                await write_event(conn, products_outbox, SOURCE, "products.product.updated", product, now)
        await _record_reservation(conn, request, status, existing is None, now)
    if refusal is not None:
        raise refusal
    repo.relay.wake()
    return Reservation(request.reservation_id, status, request.quantity, product)


async def _lock_reservation(conn: AsyncConnection, reservation_id: str) -> None:
    """Changes of one reservation take turns, so each reads what the one before it left. Read
    unlocked, two replicas (or one replica's concurrent requests) each released the same
    reservation's stock, or each inserted the same tombstone, and one answered 500."""
    key = func.hashtext(reservation_id)  # two ids may share a hash: they only take turns too
    await conn.execute(select(func.pg_advisory_xact_lock(RESERVATION_LOCK_CLASS, key)))


async def _move_stock(conn: AsyncConnection, request: StockChange, delta: int) -> Product:
    condition = products.c.stock >= -delta if delta < 0 else products.c.stock <= INT64_MAX - delta
    statement = (
        update(products)
        .where(products.c.id == request.product_id, condition)
        .values(stock=products.c.stock + delta, updated_at=datetime.now(UTC))
        .returning(*PRODUCT_COLUMNS)
    )
    row = (await conn.execute(statement)).one_or_none()
    if row is None:
        await _product_in(conn, request.product_id)  # 404 when it does not exist
        if delta < 0:
            raise Unprocessable(f"product {request.product_id} has less than {-delta} in stock", type="out_of_stock")
        raise Unprocessable("stock would leave the signed 64-bit range", type="amount_overflow")
    return product_from(row)


async def _record_reservation(
    conn: AsyncConnection, request: StockChange, status: str, new: bool, now: datetime
) -> None:
    table = product_reservations
    if new:
        await conn.execute(
            insert(table).values(
                id=request.reservation_id,
                product_id=request.product_id,
                quantity=request.quantity,
                status=status,
                inserted_at=now,
                updated_at=now,
            )
        )
    else:
        await conn.execute(
            update(table).where(table.c.id == request.reservation_id).values(status=status, updated_at=now)
        )


async def _product_in(conn: AsyncConnection, product_id: int) -> Product:
    row = (await conn.execute(select(*PRODUCT_COLUMNS).where(products.c.id == product_id))).one_or_none()
    if row is None:
        raise product_not_found(product_id)
    return product_from(row)


def add_endpoints(service: Service, repo: Repo) -> None:
    service.add_endpoint("products.products.create", create_product, repo)
    products_by_id = products_loader(repo)
    repo.background.append(products_by_id.run)
    service.add_endpoint("products.products.get", get_product, products_by_id)
    stamp = stored_timestamp(repo.db.is_sqlite)
    products_pages = page_loader(repo.db, PRODUCTS_PAGE, ("bigint", "bigint"), lambda row: _product_of(row, stamp))
    repo.background.append(products_pages.run)
    service.add_endpoint("products.products.list", list_products, products_pages)
    service.add_endpoint("products.products.update", update_product, repo)
    service.add_endpoint("products.products.delete", delete_product, repo)
    service.add_endpoint("products.internal.stock.reserve", reserve_stock, repo, name="stock_reserve")
    service.add_endpoint("products.internal.stock.release", release_stock, repo, name="stock_release")


def serving(nc: Client) -> AbstractAsyncContextManager[Service]:
    return serving_with_outbox(nc, "products", "the catalogue and its stock", products_outbox, add_endpoints)
