"""A subscription on one SQLite store object wakes for a commit made through
another (another process on the same file, as ``orderstream api`` beside
``orderstream project``): SQLite's ``data_version`` tells it, so it does not wait
for its poll. The reader's poll is set to a minute here: without the watch each
event would take that long, so a bound of a few seconds fails on the old code."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

from orderstream.eventstore.base import NO_STREAM, NewEvent, SubscriptionSettings
from orderstream.eventstore.sqlite import SqliteEventStore

POLL = 60.0
BOUND = 10.0


def _event() -> NewEvent:
    return NewEvent(id=uuid.uuid4(), type="Placed", data=b"{}")


async def _next(events: AsyncIterator[object]) -> object:
    async with asyncio.timeout(BOUND):
        return await anext(events)


async def test_a_catch_up_subscription_sees_another_connections_commit(tmp_path: Path) -> None:
    path = tmp_path / "events.db"
    async with (
        await SqliteEventStore.open(path) as writer,
        await SqliteEventStore.open(path, poll_interval=POLL) as reader,
    ):
        live = reader.subscribe()
        first = asyncio.ensure_future(_next(live))
        await asyncio.sleep(0.2)  # the subscription has read the empty store and waits
        for n in range(3):
            await writer.append(f"order-{n}", [_event()], NO_STREAM)
            got = await (first if n == 0 else _next(live))
            assert getattr(got, "stream", None) == f"order-{n}"
        await live.aclose()  # type: ignore[attr-defined]


async def test_a_persistent_subscription_sees_another_connections_commit(tmp_path: Path) -> None:
    path = tmp_path / "events.db"
    async with (
        await SqliteEventStore.open(path) as writer,
        await SqliteEventStore.open(path, poll_interval=POLL) as reader,
    ):
        await reader.create_subscription_group("g", SubscriptionSettings())
        subscription = await reader.connect_subscription_group("g")
        events = aiter(subscription)
        first = asyncio.ensure_future(_next(events))
        await asyncio.sleep(0.2)
        await writer.append("order-1", [_event()], NO_STREAM)
        got = await first
        assert getattr(got, "stream", None) == "order-1"
        await subscription.close()
