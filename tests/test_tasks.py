"""The in-process task supervisor."""

from __future__ import annotations

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
