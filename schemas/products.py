"""Messages and tables of the products service (contract §4, `products.products.*`)."""

from __future__ import annotations

from typing import Annotated

import msgspec
from msgspec import UNSET, Meta, UnsetType
from sqlalchemy import BigInteger, CheckConstraint, Column, String, Table, Text

from schemas.common import (
    NO_NUL,
    BigId,
    ById,
    Cents,
    Currency,
    Id,
    Name,
    NonNegative,
    Page,
    PageRequest,
    Request,
    metadata,
)
from schemas.database import UtcDateTime
from schemas.events import outbox_table

Sku = Annotated[str, Meta(pattern=r"^[A-Za-z0-9._-]{1,64}\Z")]
Description = Annotated[str, Meta(max_length=4096, pattern=NO_NUL)]

products = Table(
    "products",
    metadata,
    Column("id", BigId, primary_key=True, autoincrement=True),
    Column("sku", String(64), nullable=False, unique=True),
    Column("name", String(255), nullable=False),
    Column("description", Text, nullable=False),
    Column("price", BigInteger, nullable=False),
    Column("currency", String(3), nullable=False),
    Column("stock", BigInteger, nullable=False),
    Column("seller_id", BigInteger, nullable=False),
    Column("inserted_at", UtcDateTime, nullable=False),
    Column("updated_at", UtcDateTime, nullable=False),
    CheckConstraint("stock >= 0", name="products_stock_not_negative"),
    CheckConstraint("price >= 0", name="products_price_not_negative"),
    sqlite_autoincrement=True,  # never reuse the id of a deleted product
)
product_reservations = Table(
    "product_reservations",
    metadata,
    Column("id", String(160), primary_key=True),
    Column("product_id", BigInteger, nullable=False),
    Column("quantity", BigInteger, nullable=False),
    Column("status", String(16), nullable=False),
    Column("inserted_at", UtcDateTime, nullable=False),
    Column("updated_at", UtcDateTime, nullable=False),
    CheckConstraint("status IN ('reserved', 'released')", name="product_reservations_status"),
)
"""One row per reservation id: a retried reserve or release changes stock at most once."""
products_outbox = outbox_table("products")


class CreateProduct(Request):
    sku: Sku
    name: Name
    price: NonNegative
    currency: Currency
    stock: NonNegative
    seller_id: Id
    description: Description = ""


ProductId = ById
ListProducts = PageRequest


class UpdateProduct(Request):
    id: Id
    sku: Sku | UnsetType = UNSET
    name: Name | UnsetType = UNSET
    description: Description | UnsetType = UNSET
    price: NonNegative | UnsetType = UNSET
    currency: Currency | UnsetType = UNSET
    stock: NonNegative | UnsetType = UNSET
    seller_id: Id | UnsetType = UNSET


ReservationId = Annotated[str, Meta(pattern=r"^[A-Za-z0-9._:-]{1,160}\Z")]


class StockChange(Request):
    """`products.internal.stock.reserve` / `.release`, for the transactions service only.

    The reservation id makes both idempotent; a release that arrives before its reserve
    leaves a tombstone, so the late reserve then takes nothing.
    """

    reservation_id: ReservationId
    product_id: Id
    quantity: Cents


class Product(msgspec.Struct, frozen=True):
    id: int
    sku: str
    name: str
    description: str
    price: int
    currency: str
    stock: int
    seller_id: int
    inserted_at: str
    updated_at: str


class Reservation(msgspec.Struct, frozen=True):
    reservation_id: str
    status: str
    quantity: int
    product: Product


class ProductPage(Page, frozen=True):
    key = "id"
    items: list[Product]
    next_after_id: int | None
