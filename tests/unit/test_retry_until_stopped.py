"""The one retry loop of the services that wait for something to come back
(:func:`orderstream.services.retry_until_stopped`: Temporal's link, the dev server, the
batch consumer's reconnection and outage hold)."""

from __future__ import annotations

import asyncio
import logging

import pytest
from tenacity import RetryCallState, wait_fixed

from orderstream.application.batch_consumer import OutageBackoff
from orderstream.application.outage_log import OutageLog
from orderstream.eventstore.base import EventStoreError
from orderstream.services import retry_until_stopped


class Away(Exception):
    pass


async def test_it_retries_until_the_attempt_succeeds_and_logs_each_failure() -> None:
    calls: list[int] = []
    logged: list[tuple[int, float]] = []

    async def attempt() -> str:
        calls.append(1)
        if len(calls) < 3:
            raise Away
        return "back"

    got = await retry_until_stopped(
        attempt,
        asyncio.Event(),
        errors=(Away,),
        log_retry=lambda n, s: logged.append((n, s)),
        wait=wait_fixed(0),
    )
    assert got == "back"
    assert logged == [(1, 0.0), (2, 0.0)]


async def test_stop_ends_the_wait_at_once_and_answers_none() -> None:
    stop = asyncio.Event()

    async def attempt() -> str:
        raise Away

    task = asyncio.create_task(
        retry_until_stopped(attempt, stop, errors=(Away,), log_retry=lambda n, s: None, wait=wait_fixed(60))
    )
    await asyncio.sleep(0.05)
    stop.set()
    assert await asyncio.wait_for(task, 2) is None


async def test_another_error_is_not_retried() -> None:
    async def attempt() -> str:
        raise KeyError("bug")

    with pytest.raises(KeyError):
        await retry_until_stopped(attempt, asyncio.Event(), errors=(Away,), log_retry=lambda n, s: None)


def test_the_batch_consumers_reconnection_wait_grows_within_an_outage_and_starts_short_after_it() -> None:
    """Counted by the consumer's outage log, not by tenacity's attempts (which grow over
    the consumer's whole life): a failure after batches went through waits ``first``."""
    outage = OutageLog(logging.getLogger("test"), "consumer")
    wait = OutageBackoff(outage, 0.05, 0.3)
    state = RetryCallState(None, None, (), {})
    seen = []
    for _ in range(5):
        outage.failed(EventStoreError("gone"))
        seen.append(wait(state))
    assert seen == [0.05, 0.1, 0.2, 0.3, 0.3]
    outage.succeeded()
    outage.failed(EventStoreError("gone again"))
    assert wait(state) == 0.05
