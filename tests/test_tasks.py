"""The in-process task supervisor."""

from __future__ import annotations

import asyncio

import pytest

from bus.tasks import supervised


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
