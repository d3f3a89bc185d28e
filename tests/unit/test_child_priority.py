"""Background child processes run nicer than the process that starts them
(:func:`orderstream.services.run_child_process`, ``nice=``): what ``serve`` does for the
saga worker processes (the dev server: ``tests/reliability/test_temporal_supervision.py``)."""

from __future__ import annotations

import asyncio
import os
import sys

from orderstream.services import run_child_process

REPORT = (
    "import os, time; time.sleep(0.5); print(os.getpriority(os.PRIO_PROCESS, 0), flush=True); time.sleep(30)"
)


async def _priority_of_a_child(nice: int) -> int:
    stop = asyncio.Event()
    seen: list[int] = []

    def on_line(line: str) -> None:
        seen.append(int(line))
        stop.set()

    argv = [sys.executable, "-c", REPORT]
    await asyncio.wait_for(run_child_process("child", argv, stop, on_line=on_line, nice=nice), 20)
    return seen[0]


async def test_a_child_started_with_nice_runs_that_many_steps_below_us() -> None:
    ours = os.getpriority(os.PRIO_PROCESS, 0)
    assert await _priority_of_a_child(5) == min(19, ours + 5)
    assert await _priority_of_a_child(0) == ours
