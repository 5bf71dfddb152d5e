"""ledger, Postgres: history's index in runs too (`ledger_postings`), not two indexes on (account, seq)

The two indexes took ≈ 40 % of Postgres' CPU per transfer at c512 (bench/RESULTS.md, session 13).

Revision ID: ledger_0005
Revises: ledger_0004
Create Date: 2026-11-28
"""

from alembic import op

from migrations.ledger_postings import create_from_chain, drop_back_to_indexes

revision = "ledger_0005"
down_revision = "ledger_0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return  # SQLite has had runs since ledger_0002
    create_from_chain()
    op.execute(  # as ledger_0004 on SQLite: no run is being stored
        "INSERT INTO ledger_cursors (name, seq) "
        "SELECT 'postings_run', seq FROM ledger_cursors WHERE name = 'postings' UNION ALL SELECT 'postings_rows', 0"
    )


def downgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    op.execute("DELETE FROM ledger_cursors WHERE name IN ('postings_run', 'postings_rows')")
    drop_back_to_indexes()
