"""accounts: users and the accounts outbox

Revision ID: accounts_0001
Revises:
Create Date: 2026-11-27
"""

import sqlalchemy as sa
from alembic import op

from schemas.database import UtcDateTime

revision = "accounts_0001"
down_revision = None
branch_labels = ("accounts",)
depends_on = None

BigId = sa.BigInteger().with_variant(sa.Integer, "sqlite")


def upgrade() -> None:
    op.create_table(
        "users",
        sa.Column("id", BigId, primary_key=True, autoincrement=True),
        sa.Column("email", sa.String(254), nullable=False, unique=True),
        sa.Column("name", sa.String(255), nullable=False),
        sa.Column("password_hash", sa.String(255), nullable=False),
        sa.Column("inserted_at", UtcDateTime, nullable=False),
        sa.Column("updated_at", UtcDateTime, nullable=False),
        sqlite_autoincrement=True,
    )
    op.create_table(
        "accounts_outbox",
        sa.Column("seq", BigId, primary_key=True, autoincrement=True),
        sa.Column("event_id", sa.String(36), nullable=False, unique=True),
        sa.Column("subject", sa.String(255), nullable=False),
        sa.Column("payload", sa.LargeBinary, nullable=False),
        sa.Column("created_at", UtcDateTime, nullable=False),
        sqlite_autoincrement=True,
    )


def downgrade() -> None:
    op.drop_table("accounts_outbox")
    op.drop_table("users")
