"""ledger: the refusals of the saga's transfers, kept per id (`ledger.internal.record`)

Revision ID: ledger_0006
Revises: ledger_0005
Create Date: 2026-11-29
"""

import sqlalchemy as sa
from alembic import op

from schemas.database import UtcDateTime
from schemas.ledger import key_text

revision = "ledger_0006"
down_revision = "ledger_0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "ledger_refusals",
        sa.Column("id", key_text(128), primary_key=True),
        sa.Column("from_account", key_text(128), nullable=False),
        sa.Column("to_account", key_text(128), nullable=False),
        sa.Column("amount", sa.BigInteger, nullable=False),
        sa.Column("currency", key_text(3), nullable=False),
        sa.Column("memo", sa.Text, nullable=False),
        sa.Column("error", sa.Text, nullable=False),
        sa.Column("refused_at", UtcDateTime, nullable=False),
    )


def downgrade() -> None:
    op.drop_table("ledger_refusals")
