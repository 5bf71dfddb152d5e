"""The history index (`ledger_postings`, both stores): written in runs, each run paced across batches.

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
from collections.abc import Awaitable, Callable, Generator, Iterable
from dataclasses import dataclass

from bus.codec import encode
from ledger.plan import Head
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


def stored_index(cursors: dict[str, int], head: Head) -> Index:
    """The index's state from its stored cursors (`READ_CURSORS` on SQLite; on Postgres read with
    the head), for a writer that did not append the stored head."""
    cursor, through, stored = (cursors[name] for name in CURSORS)
    assert 0 <= cursor <= through <= head.seq, (cursor, through, head.seq)
    run = Run(cursor, through, None, stored) if through > cursor else None
    assert run or stored == 0
    return Index(cursor, run, {} if through == head.seq else None)


Read = tuple[int, int]
"""Entries (after, through] whose postings `index_appended` needs back from the chain."""
Chained = list[tuple[str, str, int]]
"""(from, to, seq) of the entries read, in seq order."""


@dataclass
class IndexWrite:
    """What a batch adds to the index in its transaction: rows, and the cursors (None: unchanged)."""

    rows: list[Row]
    cursors: tuple[int, int, int] | None


def index_appended(index: Index, entries: list[Entry], pace: bool) -> Generator[Read, Chained, IndexWrite]:
    """After `entries` are appended in this transaction: their postings gathered, this batch's
    share of the run to store, and a run started once `postings_run_entries` are past the last.

    Without I/O: yields the ranges of stored entries it needs read back (before `entries`, which it
    adds itself) and returns what to write, so that SQLite's thread and Postgres' connection each
    do the reading and writing (`drive`, `drive_async`). `pace`: this writer appended the stored
    head before this batch too. One that read the index instead (after a start, or another
    writer's batch) stores no share, which would cost it the run's rows read back in every batch
    while writers take turns; only, once the next run is due, the rest of this one. Updates
    `index` in place: if the transaction does not commit, the writer forgets it."""
    assert entries and entries[0].seq > index.through
    last = entries[-1].seq
    write = IndexWrite([], None)
    if index.unindexed is not None:
        add_postings(index.unindexed, ((entry.from_, entry.to, entry.seq) for entry in entries))
    if index.run is not None and last - index.run.through >= postings_run_entries:
        yield from _store(index, index.run, None, entries, write)  # the next run is due: the rest of this one first
    elif index.run is not None and pace:
        yield from _store(index, index.run, len(entries), entries, write)
    if index.run is None and last - index.cursor >= postings_run_entries:
        gathered = index.unindexed
        run = Run(index.cursor, last, None if gathered is None else run_rows(gathered, index.cursor, last))
        index.run, index.unindexed = run, {}
        if pace:
            yield from _store(index, run, len(entries), entries, write)
        else:
            write.cursors = _cursors(index)
    return write


def _store(
    index: Index, run: Run, share: int | None, entries: list[Entry], write: IndexWrite
) -> Generator[Read, Chained, None]:
    """The run's rows in proportion to `share` entries appended (rounded up, so the whole run
    within a run's entries), or all the rest (None); the cursor moved once they are all stored."""
    if run.rows is None:
        stored_through = min(run.through, entries[0].seq - 1)
        chained = (yield (run.after, stored_through)) if stored_through > run.after else []
        postings: Postings = {}
        add_postings(postings, chained)
        add_postings(postings, ((e.from_, e.to, e.seq) for e in entries if e.seq <= run.through))
        run.rows = run_rows(postings, run.after, run.through)
    count = len(run.rows) if share is None else -(-len(run.rows) * share // postings_run_entries)
    write.rows += run.rows[run.stored : run.stored + count]
    run.stored = min(run.stored + count, len(run.rows))
    if run.stored == len(run.rows):
        index.cursor, index.run = run.through, None
    write.cursors = _cursors(index)


def _cursors(index: Index) -> tuple[int, int, int]:
    """`postings`, `postings_run`, `postings_rows`, as `CURSORS` names them."""
    return index.cursor, index.through, index.run.stored if index.run else 0


def drive(steps: Generator[Read, Chained, IndexWrite], read: Callable[[int, int], Chained]) -> IndexWrite:
    """Run `index_appended`, reading what it asks for with `read(after, through)`."""
    try:
        wanted = next(steps)
        while True:
            wanted = steps.send(read(*wanted))
    except StopIteration as done:
        return done.value


async def drive_async(
    steps: Generator[Read, Chained, IndexWrite], read: Callable[[int, int], Awaitable[Chained]]
) -> IndexWrite:
    """`drive`, for a driver whose reads are awaited."""
    try:
        wanted = next(steps)
        while True:
            wanted = steps.send(await read(*wanted))
    except StopIteration as done:
        return done.value
