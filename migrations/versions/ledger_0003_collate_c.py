"""ledger, Postgres only: the key columns compare bytewise (COLLATE "C")

Revision ID: ledger_0003
Revises: ledger_0002
Create Date: 2026-11-27
"""

from alembic import op

revision = "ledger_0003"
down_revision = "ledger_0002"
branch_labels = None
depends_on = None

KEY_COLUMNS = {
    "ledger_entries": {"id": 128, "from_account": 128, "to_account": 128, "currency": 3},
    "ledger_balances": {"account": 128, "currency": 3},
}


def upgrade() -> None:
    _collate('"C"')


def downgrade() -> None:
    _collate("pg_catalog.default")


def _collate(collation: str) -> None:
    """One ALTER TABLE per table. The rows stay as they are (same type, only the collation
    changes); the indexes on those columns are rebuilt, under a lock that stops the ledger's
    writes meanwhile: on a long chain, run it in a quiet moment."""
    if op.get_bind().dialect.name != "postgresql":
        return  # SQLite compares text bytewise already (BINARY)
    for table, columns in KEY_COLUMNS.items():
        changes = ", ".join(
            f"ALTER COLUMN {column} TYPE varchar({length}) COLLATE {collation}" for column, length in columns.items()
        )
        op.execute(f"ALTER TABLE {table} {changes}")
