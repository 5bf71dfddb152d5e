"""ledger, SQLite only: history's index in runs (`ledger_postings`), not two indexes on (account, seq)

Revision ID: ledger_0002
Revises: ledger_0001
Create Date: 2026-11-27
"""

import sqlalchemy as sa
from alembic import op

revision = "ledger_0002"
down_revision = "ledger_0001"
branch_labels = None
depends_on = None

backfill_run_entries = 10_000


def upgrade() -> None:
    if op.get_bind().dialect.name != "sqlite":
        return  # Postgres keeps its indexes (ledger/storage.py says why)
    postings = op.create_table(
        "ledger_postings",
        sa.Column("account", sa.String(128), primary_key=True),
        sa.Column("last_seq", sa.BigInteger, primary_key=True, autoincrement=False),
        sa.Column("seqs", sa.Text, nullable=False),
        sqlite_with_rowid=False,
    )
    indexed = _backfill(postings)
    op.execute(sa.text("INSERT INTO ledger_cursors (name, seq) VALUES ('postings', :seq)").bindparams(seq=indexed))
    op.drop_index("ledger_entries_to_seq", "ledger_entries")
    op.drop_index("ledger_entries_from_seq", "ledger_entries")


def _backfill(postings: sa.Table) -> int:
    """The chain so far, in runs of `backfill_run_entries`; returns the last seq indexed."""
    bind = op.get_bind()
    tail = sa.text("SELECT from_account, to_account, seq FROM ledger_entries WHERE seq > :after ORDER BY seq LIMIT :n")
    indexed = 0
    while rows := bind.execute(tail, {"after": indexed, "n": backfill_run_entries}).all():
        seqs_of: dict[str, list[int]] = {}
        for from_account, to_account, seq in rows:
            seqs_of.setdefault(from_account, []).append(seq)
            seqs_of.setdefault(to_account, []).append(seq)
        bind.execute(
            postings.insert(),
            [{"account": a, "last_seq": s[-1], "seqs": _json(s)} for a, s in sorted(seqs_of.items())],
        )
        indexed = rows[-1][2]
    return indexed


def _json(seqs: list[int]) -> str:
    return "[" + ",".join(map(str, seqs)) + "]"


def downgrade() -> None:
    if op.get_bind().dialect.name != "sqlite":
        return
    op.create_index("ledger_entries_from_seq", "ledger_entries", ["from_account", "seq"])
    op.create_index("ledger_entries_to_seq", "ledger_entries", ["to_account", "seq"])
    op.execute("DELETE FROM ledger_cursors WHERE name = 'postings'")
    op.drop_table("ledger_postings")
