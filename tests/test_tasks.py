"""The in-process task supervisor."""

from __future__ import annotations

import asyncio

import pytest

import bus.tasks
from bus.tasks import stop, supervised
from schemas.database import DatabaseTimeout


async def test_a_crashed_task_is_restarted_until_it_finishes() -> None:
    attempts = []

    async def flaky() -> None:
        attempts.append(1)
        if len(attempts) < 3:
            raise RuntimeError("transient")

    await supervised("flaky", flaky, restarts_max=3, restart_period_s=5)
    assert len(attempts) == 3


async def test_past_the_intensity_the_crash_propagates() -> None:
    attempts = []

    async def broken() -> None:
        attempts.append(1)
        raise RuntimeError("always")

    with pytest.raises(RuntimeError, match="always"):
        await supervised("broken", broken, restarts_max=2, restart_period_s=5)
    assert len(attempts) == 3


async def test_a_task_failing_because_it_is_stopped_stops() -> None:
    """Cancelled while a TaskGroup inside it has children that fail on cancellation (their
    dependency stopped at the same moment): the group raises their errors, not CancelledError.
    The task must end, not be restarted (it was: its owner then waited for it forever)."""
    runs = []

    async def dependent() -> None:
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            raise RuntimeError("the group commit stopped") from None

    async def consumer() -> None:
        runs.append(1)
        async with asyncio.TaskGroup() as group:
            group.create_task(dependent())

    task = asyncio.create_task(supervised("consumer", consumer))
    await asyncio.sleep(0.01)
    task.cancel()
    done, _ = await asyncio.wait([task], timeout=2)
    assert done == {task} and task.cancelled()
    assert runs == [1]


async def test_stop_asks_again_when_a_cancellation_was_lost(monkeypatch: pytest.MonkeyPatch) -> None:
    """A loop around a wait that returns instead of raising when it is cancelled (Python 3.11's
    `asyncio.wait_for` when its result arrived first; nats-py's `next_msg`) runs on after one
    `cancel()`; `stop` cancels it again, and it ends. With one `cancel()` only, this test hangs
    until its timeout."""
    monkeypatch.setattr(bus.tasks, "recancel_interval_s", 0.05)
    turns = []

    async def loses_its_first_cancellation() -> None:
        while True:
            turns.append(1)
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                if len(turns) > 1:
                    raise

    task = asyncio.create_task(supervised("consumer", loses_its_first_cancellation))
    await asyncio.sleep(0.01)
    await asyncio.wait_for(stop(task, "consumer"), timeout=2)
    assert task.cancelled()
    assert len(turns) == 2, "the first cancellation was lost, the second ended it"


@pytest.fixture
def short_outages(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(bus.tasks, "outage_max_s", 0.5)
    monkeypatch.setattr(bus.tasks, "outage_over_s", 0.2)
    monkeypatch.setattr(bus.tasks, "outage_pause_first_s", 0.01)
    monkeypatch.setattr(bus.tasks, "outage_pause_max_s", 0.02)


@pytest.mark.parametrize(
    "failure",
    [ConnectionRefusedError(111, "Connect call failed"), DatabaseTimeout("the database did not answer in time")],
)
async def test_a_lost_database_is_waited_out_without_counting_but_not_past_outage_max_s(
    short_outages: None, failure: Exception
) -> None:
    """And so is one too slow to answer (`DatabaseTimeout`, session 21)."""
    attempts = []

    async def no_database() -> None:
        attempts.append(asyncio.get_running_loop().time())
        raise failure

    with pytest.raises(type(failure)):
        await supervised("relay", no_database, restarts_max=1)
    assert len(attempts) > 10  # past restarts_max: an outage is not a crash
    assert len(attempts) <= 0.5 / 0.01 + 1  # paused between attempts
    assert 0.5 <= attempts[-1] - attempts[0] <= 0.5 + 0.1


async def test_outages_the_task_ran_between_are_bounded_each_on_its_own(short_outages: None) -> None:
    """A database that comes back between outages: together they last longer than
    outage_max_s, each of them less."""
    outages = 4
    attempts = []

    async def flapping_database() -> None:
        attempts.append(1)
        if len(attempts) % 10 == 0:  # back: runs a while, then the next outage
            await asyncio.sleep(0.3)
            if len(attempts) == 10 * outages:
                return
        await asyncio.sleep(0.01)
        raise ConnectionRefusedError(111, "Connect call failed")

    await supervised("relay", flapping_database, restarts_max=1)
    assert len(attempts) == 10 * outages
