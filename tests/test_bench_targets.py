"""The ledger bench's verdict line: each c512 figure against issue 4's targets."""

from __future__ import annotations

from bench.harness import Result
from bench.ledger import against_targets


def row(label: str, requests: int, p99_ms: float) -> Result:
    return Result(label=label, concurrency=512, requests=requests, seconds=4.0, p50_ms=1.0, p99_ms=p99_ms, errors=0)


def test_a_row_meeting_every_target_says_so() -> None:
    echo, measured = row("raw nats-py", 160_000, 20.0), row("ledger.record sqlite", 84_000, 37.0)
    assert against_targets(echo, measured) == (
        "ledger.record sqlite c512 against the targets: 21,000/s (>= 10,000: met), "
        "ratio 0.53 (>= 0.5: met), p99 37.0 ms (< 50: met)"
    )


def test_each_target_missed_is_named() -> None:
    echo, measured = row("raw nats-py", 180_000, 20.0), row("ledger.record postgres", 36_000, 50.0)
    verdict = against_targets(echo, measured)
    assert "9,000/s (>= 10,000: NOT met)" in verdict
    assert "ratio 0.20 (>= 0.5: NOT met)" in verdict
    assert "p99 50.0 ms (< 50: NOT met)" in verdict
