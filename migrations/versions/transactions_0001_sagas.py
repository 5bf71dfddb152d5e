"""transactions: the saga table and the transactions outbox

Revision ID: transactions_0001
Revises:
Create Date: 2026-11-27
"""

import sqlalchemy as sa
from alembic import op

from schemas.database import UtcDateTime

revision = "transactions_0001"
down_revision = None
branch_labels = ("transactions",)
depends_on = None

BigId = sa.BigInteger().with_variant(sa.Integer, "sqlite")


def upgrade() -> None:
    op.create_table(
        "transactions",
        sa.Column("id", BigId, primary_key=True, autoincrement=True),
        sa.Column("idempotency_key", sa.String(128), nullable=False, unique=True),
        sa.Column("fingerprint", sa.String(64), nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("from_account", sa.String(128), nullable=False),
        sa.Column("to_account", sa.String(128), nullable=True),
        sa.Column("amount", sa.BigInteger, nullable=True),
        sa.Column("currency", sa.String(3), nullable=True),
        sa.Column("product_id", sa.BigInteger, nullable=True),
        sa.Column("quantity", sa.BigInteger, nullable=True),
        sa.Column("memo", sa.Text, nullable=False),
        sa.Column("ledger_seq", sa.BigInteger, nullable=True),
        sa.Column("ledger_hash", sa.String(64), nullable=True),
        sa.Column("refusal", sa.Text, nullable=True),
        sa.Column("inserted_at", UtcDateTime, nullable=False),
        sa.Column("updated_at", UtcDateTime, nullable=False),
        sa.CheckConstraint("status IN ('pending', 'committed', 'rejected')", name="transactions_status"),
        sa.CheckConstraint("kind IN ('deposit', 'withdrawal', 'transfer', 'purchase')", name="transactions_kind"),
        sqlite_autoincrement=True,
    )
    op.create_index("transactions_from_account", "transactions", ["from_account", "id"])
    op.create_index("transactions_to_account", "transactions", ["to_account", "id"])
    op.create_index("transactions_pending", "transactions", ["status", "updated_at"])
    op.create_table(
        "transactions_outbox",
        sa.Column("seq", BigId, primary_key=True, autoincrement=True),
        sa.Column("event_id", sa.String(36), nullable=False, unique=True),
        sa.Column("subject", sa.String(255), nullable=False),
        sa.Column("payload", sa.LargeBinary, nullable=False),
        sa.Column("created_at", UtcDateTime, nullable=False),
        sqlite_autoincrement=True,
    )


def downgrade() -> None:
    op.drop_table("transactions_outbox")
    op.drop_index("transactions_pending", "transactions")
    op.drop_index("transactions_to_account", "transactions")
    op.drop_index("transactions_from_account", "transactions")
    op.drop_table("transactions")
