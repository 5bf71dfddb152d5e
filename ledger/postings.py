"""SQLite's history index (`ledger_postings`): written in runs, each run paced across batches.

A run is the postings of `postings_run_entries` consecutive entries: per account, one row with
the seqs of its entries in the run. Written by one batch, a run rewrote a page of the table per
account at once: in the bench (1,000 accounts) one batch in a dozen took 15-30 ms more than the
others, growing with the table, and those requests were the p99 (bench/RESULTS.md, session 11).
So every batch that appends entries also stores a slice of the pending run's rows, in
proportion to the entries it appends: the run is stored by the time the next one is due, and no
batch does more than its share. TigerBeetle paces its compaction across beats for the same reason.

The state is in `ledger_cursors`: `postings`, the seq through which runs are complete (history
reads the runs up to it and scans the chain past it); `postings_run`, the last seq of the run
being stored (`postings` when none is); `postings_rows`, how many of its rows, in account order,
are stored. Only batches that append entries touch the index, so a writer whose last head is
still the stored head knows this state without reading it (`Index`).
"""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Iterable
from dataclasses import dataclass

from bus.codec import encode
from ledger.plan import Head
from schemas.database import sqlite_insert_rows
from schemas.ledger import Entry

postings_run_entries = int(os.environ.get("BITNEXUS_LEDGER_POSTINGS_RUN", "8192"))
"""Entries indexed together: a history read scans at most two runs and one writer batch past
the `postings` cursor (the run being stored, and the entries after it: ≈ 1.6 ms for 16k entries).

Smaller runs cost the writer more: an account in several entries of a run gets one row, and
once the table is large every row dirties a page of its own (each account's rows fill pages of
their own). In the bench (1,000 accounts), with runs of 2,048 the ledger wrote 7.6 KB per
transfer after 400k entries and its CPU per transfer grew by a third; with 8,192, 2.6 KB and
≈ a fifth less CPU than that (bench/RESULTS.md, session 13). Accounts seen once per run gain
nothing either way."""

CURSORS = ("postings", "postings_run", "postings_rows")
READ_CURSORS = f"SELECT name, seq FROM ledger_cursors WHERE name IN {CURSORS}"
WRITE_CURSORS = (
    "UPDATE ledger_cursors SET seq = CASE name WHEN 'postings' THEN ?1 WHEN 'postings_run' THEN ?2 ELSE ?3 END "
    f"WHERE name IN {CURSORS}"
)
INSERT_ROWS = "INSERT INTO ledger_postings (account, last_seq, seqs)"
RUN_ENTRIES = "SELECT from_account, to_account, seq FROM ledger_entries WHERE seq > ? AND seq <= ? ORDER BY seq"

Postings = dict[str, list[int]]
"""Each account's seqs, ascending."""
Row = tuple[str, int, str]
"""A `ledger_postings` row: account, last seq, seqs as a JSON array."""


def add_postings(postings: Postings, entries: Iterable[tuple[str, str, int]]) -> None:
    """The entries (from, to, seq), in seq order, added to both their accounts' seqs."""
    for from_account, to_account, seq in entries:
        postings.setdefault(from_account, []).append(seq)
        postings.setdefault(to_account, []).append(seq)


def run_rows(postings: Postings, after: int, through: int) -> list[Row]:
    """The rows of the run (after, through], in account order: every entry in it twice, once per side."""
    assert sum(len(seqs) for seqs in postings.values()) == 2 * (through - after), (after, through)
    assert all(after < seqs[0] and seqs[-1] <= through for seqs in postings.values())
    return [(account, seqs[-1], encode(seqs).decode()) for account, seqs in sorted(postings.items())]


@dataclass
class Run:
    """The run (after, through] being stored: its rows (None until needed: not read back yet), the
    first `stored` of them in the table."""

    after: int
    through: int
    rows: list[Row] | None
    stored: int = 0

    def __post_init__(self) -> None:
        assert self.after < self.through and 0 <= self.stored
        assert self.rows is None or self.stored < len(self.rows)


@dataclass
class Index:
    """The index as of a head: complete through `cursor`, the run being stored, and the postings
    of the entries after those when this writer appended all of them (else None: read them)."""

    cursor: int
    run: Run | None
    unindexed: Postings | None

    @property
    def through(self) -> int:
        """The last seq in a run, stored or being stored."""
        return self.run.through if self.run else self.cursor


def read_index(conn: sqlite3.Connection, head: Head) -> Index:
    """The index's state from the database, for a writer that did not append the stored head."""
    cursors = dict(conn.execute(READ_CURSORS).fetchall())
    cursor, through, stored = (cursors[name] for name in CURSORS)
    assert 0 <= cursor <= through <= head.seq, (cursor, through, head.seq)
    run = Run(cursor, through, None, stored) if through > cursor else None
    assert run or stored == 0
    return Index(cursor, run, {} if through == head.seq else None)


def index_appended(conn: sqlite3.Connection, index: Index, entries: list[Entry], pace: bool) -> None:
    """After `entries` were appended in this transaction: their postings gathered, this batch's
    share of the run stored, and a run started once `postings_run_entries` are past the last.

    `pace`: this writer appended the stored head before this batch too. One that read the index
    instead (after a start, or another writer's batch) stores no share, which would cost it the
    run's rows read back in every batch while writers take turns; only, once the next run is
    due, the rest of this one. Updates `index` in place: after a rollback the writer forgets it."""
    assert entries and entries[0].seq > index.through
    last = entries[-1].seq
    if index.unindexed is not None:
        add_postings(index.unindexed, ((entry.from_, entry.to, entry.seq) for entry in entries))
    if index.run is not None and last - index.run.through >= postings_run_entries:
        _store(conn, index, index.run, None)  # the next run is due: the rest of this one first
    elif index.run is not None and pace:
        _store(conn, index, index.run, len(entries))
    if index.run is None and last - index.cursor >= postings_run_entries:
        gathered = index.unindexed
        run = Run(index.cursor, last, None if gathered is None else run_rows(gathered, index.cursor, last))
        index.run, index.unindexed = run, {}
        if pace:
            _store(conn, index, run, len(entries))
        else:
            _write_cursors(conn, index)


def _store(conn: sqlite3.Connection, index: Index, run: Run, entries: int | None) -> None:
    """The run's rows in proportion to `entries` appended (rounded up, so the whole run within a
    run's entries), or all the rest (None); the cursor moved once they are all stored."""
    if run.rows is None:
        run.rows = _read_rows(conn, run.after, run.through)
    count = len(run.rows) if entries is None else -(-len(run.rows) * entries // postings_run_entries)
    sqlite_insert_rows(conn, INSERT_ROWS, 3, "", run.rows[run.stored : run.stored + count])
    run.stored = min(run.stored + count, len(run.rows))
    if run.stored == len(run.rows):
        index.cursor, index.run = run.through, None
    _write_cursors(conn, index)


def _write_cursors(conn: sqlite3.Connection, index: Index) -> None:
    conn.execute(WRITE_CURSORS, (index.cursor, index.through, index.run.stored if index.run else 0))


def _read_rows(conn: sqlite3.Connection, after: int, through: int) -> list[Row]:
    postings: Postings = {}
    add_postings(postings, conn.execute(RUN_ENTRIES, (after, through)))
    return run_rows(postings, after, through)
