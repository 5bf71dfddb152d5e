"""ledger, SQLite only: history's index in runs (`ledger_postings`), not two indexes on (account, seq)

Revision ID: ledger_0002
Revises: ledger_0001
Create Date: 2026-11-27
"""

from alembic import op

from migrations.ledger_postings import create_from_chain, drop_back_to_indexes

revision = "ledger_0002"
down_revision = "ledger_0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    if op.get_bind().dialect.name != "sqlite":
        return  # Postgres kept its indexes until ledger_0005
    create_from_chain()


def downgrade() -> None:
    if op.get_bind().dialect.name != "sqlite":
        return
    drop_back_to_indexes()
