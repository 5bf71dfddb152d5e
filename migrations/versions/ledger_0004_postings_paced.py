"""ledger, SQLite only: a run of history's index is stored a slice per batch (`ledger.postings`)

Revision ID: ledger_0004
Revises: ledger_0003
Create Date: 2026-11-28
"""

from alembic import op

revision = "ledger_0004"
down_revision = "ledger_0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    if op.get_bind().dialect.name != "sqlite":
        return  # Postgres has no runs
    # no run is being stored: the runs so far were each written whole
    op.execute(
        "INSERT INTO ledger_cursors (name, seq) "
        "SELECT 'postings_run', seq FROM ledger_cursors WHERE name = 'postings' UNION ALL SELECT 'postings_rows', 0"
    )


def downgrade() -> None:
    if op.get_bind().dialect.name != "sqlite":
        return
    # the rows of a run being stored go: ledger_0002's writer writes the run whole once it is due
    op.execute("DELETE FROM ledger_postings WHERE last_seq > (SELECT seq FROM ledger_cursors WHERE name = 'postings')")
    op.execute("DELETE FROM ledger_cursors WHERE name IN ('postings_run', 'postings_rows')")
