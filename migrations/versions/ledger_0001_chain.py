"""ledger: entries (the chain), balances and the events cursor

Revision ID: ledger_0001
Revises:
Create Date: 2026-11-27
"""

import sqlalchemy as sa
from alembic import op

from schemas.database import UtcDateTime

revision = "ledger_0001"
down_revision = None
branch_labels = ("ledger",)
depends_on = None


def upgrade() -> None:
    op.create_table(
        "ledger_entries",
        sa.Column("seq", sa.BigInteger, primary_key=True, autoincrement=False),
        sa.Column("id", sa.String(128), nullable=False, unique=True),
        sa.Column("from_account", sa.String(128), nullable=False),
        sa.Column("to_account", sa.String(128), nullable=False),
        sa.Column("amount", sa.BigInteger, nullable=False),
        sa.Column("currency", sa.String(3), nullable=False),
        sa.Column("memo", sa.Text, nullable=False),
        sa.Column("recorded_at", UtcDateTime, nullable=False),
        sa.Column("prev_hash", sa.String(64), nullable=False),
        sa.Column("hash", sa.String(64), nullable=False),
        sa.CheckConstraint("amount > 0", name="ledger_entries_amount_positive"),
        sa.CheckConstraint("from_account <> to_account", name="ledger_entries_two_accounts"),
    )
    op.create_index("ledger_entries_from_seq", "ledger_entries", ["from_account", "seq"])
    op.create_index("ledger_entries_to_seq", "ledger_entries", ["to_account", "seq"])
    op.create_table(
        "ledger_balances",
        sa.Column("account", sa.String(128), primary_key=True),
        sa.Column("currency", sa.String(3), primary_key=True),
        sa.Column("balance", sa.BigInteger, nullable=False),
    )
    cursors = op.create_table(
        "ledger_cursors",
        sa.Column("name", sa.String(64), primary_key=True),
        sa.Column("seq", sa.BigInteger, nullable=False),
    )
    op.bulk_insert(cursors, [{"name": "events", "seq": 0}])


def downgrade() -> None:
    op.drop_table("ledger_cursors")
    op.drop_table("ledger_balances")
    op.drop_index("ledger_entries_to_seq", "ledger_entries")
    op.drop_index("ledger_entries_from_seq", "ledger_entries")
    op.drop_table("ledger_entries")
