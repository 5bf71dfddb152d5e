"""products: products, stock reservations and the products outbox

Revision ID: products_0001
Revises:
Create Date: 2026-11-27
"""

import sqlalchemy as sa
from alembic import op

from schemas.database import UtcDateTime

revision = "products_0001"
down_revision = None
branch_labels = ("products",)
depends_on = None

BigId = sa.BigInteger().with_variant(sa.Integer, "sqlite")


def upgrade() -> None:
    op.create_table(
        "products",
        sa.Column("id", BigId, primary_key=True, autoincrement=True),
        sa.Column("sku", sa.String(64), nullable=False, unique=True),
        sa.Column("name", sa.String(255), nullable=False),
        sa.Column("description", sa.Text, nullable=False),
        sa.Column("price", sa.BigInteger, nullable=False),
        sa.Column("currency", sa.String(3), nullable=False),
        sa.Column("stock", sa.BigInteger, nullable=False),
        sa.Column("seller_id", sa.BigInteger, nullable=False),
        sa.Column("inserted_at", UtcDateTime, nullable=False),
        sa.Column("updated_at", UtcDateTime, nullable=False),
        sa.CheckConstraint("stock >= 0", name="products_stock_not_negative"),
        sa.CheckConstraint("price >= 0", name="products_price_not_negative"),
        sqlite_autoincrement=True,
    )
    op.create_table(
        "product_reservations",
        sa.Column("id", sa.String(160), primary_key=True),
        sa.Column("product_id", sa.BigInteger, nullable=False),
        sa.Column("quantity", sa.BigInteger, nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("inserted_at", UtcDateTime, nullable=False),
        sa.Column("updated_at", UtcDateTime, nullable=False),
        sa.CheckConstraint("status IN ('reserved', 'released')", name="product_reservations_status"),
    )
    op.create_table(
        "products_outbox",
        sa.Column("seq", BigId, primary_key=True, autoincrement=True),
        sa.Column("event_id", sa.String(36), nullable=False, unique=True),
        sa.Column("subject", sa.String(255), nullable=False),
        sa.Column("payload", sa.LargeBinary, nullable=False),
        sa.Column("created_at", UtcDateTime, nullable=False),
        sqlite_autoincrement=True,
    )


def downgrade() -> None:
    op.drop_table("products_outbox")
    op.drop_table("product_reservations")
    op.drop_table("products")
