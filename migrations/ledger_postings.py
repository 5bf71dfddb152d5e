"""History's index in runs (`ledger_postings`, see `ledger.postings`) in place of two indexes on
(account, seq): ledger_0002 on SQLite, ledger_0005 on Postgres."""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

backfill_run_entries = 10_000


def create_from_chain() -> None:
    """The table, the chain so far indexed in it, its cursor; the two indexes dropped."""
    postings = op.create_table(
        "ledger_postings",
        sa.Column(
            "account", sa.String(128).with_variant(sa.String(128, collation="C"), "postgresql"), primary_key=True
        ),
        sa.Column("last_seq", sa.BigInteger, primary_key=True, autoincrement=False),
        sa.Column("seqs", sa.Text, nullable=False),
        sqlite_with_rowid=False,
    )
    indexed = _backfill(postings)
    op.execute(sa.text("INSERT INTO ledger_cursors (name, seq) VALUES ('postings', :seq)").bindparams(seq=indexed))
    op.drop_index("ledger_entries_to_seq", "ledger_entries")
    op.drop_index("ledger_entries_from_seq", "ledger_entries")


def drop_back_to_indexes() -> None:
    op.create_index("ledger_entries_from_seq", "ledger_entries", ["from_account", "seq"])
    op.create_index("ledger_entries_to_seq", "ledger_entries", ["to_account", "seq"])
    op.execute("DELETE FROM ledger_cursors WHERE name = 'postings'")
    op.drop_table("ledger_postings")


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
