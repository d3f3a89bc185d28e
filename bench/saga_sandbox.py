"""The workflow sandbox's cost per new saga: ``python -m bench.saga_sandbox [-n 300]``.

Every new workflow run gets a fresh sandbox, which executes the workflow's
module again unless it is passed through (``orderstream.sagas.fulfilment.worker.WORKFLOW_RUNNER``).
This replays one recorded history of a shipped saga (``tests/sagas/histories``,
local steps) ``-n`` times, each replay a new run, with the SDK's default sandbox
and with ours, and prints the worker CPU per run of each: the reference is the
default sandbox measured in the same run. No server is needed.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

from temporalio.client import WorkflowHistory
from temporalio.worker import Replayer, WorkflowRunner
from temporalio.worker.workflow_sandbox import SandboxedWorkflowRunner

from orderstream.sagas.fulfilment.worker import WORKFLOW_RUNNER
from orderstream.sagas.fulfilment.workflow import OrderFulfilment

HISTORY = Path(__file__).resolve().parents[1] / "tests/sagas/histories/shipped-local-steps.json"


async def copies(history: WorkflowHistory, runs: int) -> AsyncIterator[WorkflowHistory]:
    for _ in range(runs):
        yield history


async def cpu_ms_per_run(runner: WorkflowRunner, history: WorkflowHistory, runs: int) -> float:
    replayer = Replayer(workflows=[OrderFulfilment], workflow_runner=runner)
    await replayer.replay_workflow(history)  # warm up: imports, the first sandbox
    start = time.process_time()
    async with replayer.workflow_replay_iterator(copies(history, runs)) as replays:
        async for result in replays:
            assert result.replay_failure is None, result.replay_failure
    return (time.process_time() - start) * 1000 / runs


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", "--runs", type=int, default=300)
    args = parser.parse_args()
    history = WorkflowHistory.from_json("order-fulfilment-bench", HISTORY.read_text())
    default = await cpu_ms_per_run(SandboxedWorkflowRunner(), history, args.runs)
    ours = await cpu_ms_per_run(WORKFLOW_RUNNER, history, args.runs)
    print(f"replay of a shipped saga, {args.runs} new runs each, CPU ms per run:")
    print(f"  default sandbox (reference)          {default:6.2f}")
    print(f"  WORKFLOW_RUNNER (module passed through) {ours:6.2f}   ({default / ours:.1f}x less)")


if __name__ == "__main__":
    asyncio.run(main())
