"""Projection progress: the applied low-water mark, read-your-writes, status.

"Reached position P" means *applied*: every event of the projection at or below P is
in the read model. The group's checkpoint counts parked events as done (as KurrentDB
does); a parked event is not applied, so the mark stays below the oldest one until it
is replayed and applied, or skipped by an operator (then the read model is declared
to do without it).

A read-your-writes wait for a position at or past a parked event would wait for ever:
it raises :class:`ParkedEventBlocks` at once instead, naming the event, so the client
(and whoever reads the problem) knows what is wrong and what to do.
"""

from __future__ import annotations

import asyncio
import contextlib
from datetime import UTC, datetime

import msgspec

from orderstream.eventstore.base import (
    EventFilter,
    EventStore,
    ParkedEvent,
    SubscriptionGroupNotFound,
)
from orderstream.readstore.base import ReadStore

PARKED_SCAN = 1000
"""Parked events looked at for the oldest one (they are listed in position order)."""


class ParkedEventBlocks(Exception):
    """A read-your-writes query waits for a position the projection cannot reach:
    an event at or below it is parked in the projection's group."""

    def __init__(self, projection: str, group: str, position: int, parked: ParkedEvent) -> None:
        self.projection = projection
        self.group = group
        self.position = position
        self.parked = parked
        event = parked.event
        super().__init__(
            f"the {projection} read model cannot reach position {position}: event {event.type} "
            f"{event.stream}@{event.revision} (position {event.position}) is parked in group {group} "
            f"({parked.reason}); an operator replays it (orderstream projections replay-parked) "
            "or skips it (orderstream projections skip)"
        )


class ProjectionStatus(msgspec.Struct, frozen=True, kw_only=True):
    name: str
    version: int
    group: str
    group_exists: bool
    physical: str | None
    """The physical table/index the collection's alias points at."""
    checkpoint: int | None
    """Low-water mark: every matching event at or below it is applied (or parked)."""
    head_position: int | None
    lag_events: int
    lag_seconds: float
    """Age of the oldest matching event not yet processed; 0 when caught up."""
    in_flight: int
    parked: int
    oldest_parked_position: int | None = None
    rebuilding: bool = False
    """The read model was found lost and is being filled again from the beginning of
    the store: ``checkpoint`` out of ``refill_until`` says how far."""
    refill_until: int | None = None


class ProjectionProgress:
    def __init__(
        self,
        event_store: EventStore,
        read_store: ReadStore,
        *,
        name: str,
        version: int,
        group: str,
        filter: EventFilter,
    ) -> None:
        self.event_store = event_store
        self.read_store = read_store
        self.name = name
        self.version = version
        self.group = group
        self.filter = filter
        self._progress = asyncio.Event()
        self._present = False

    def notify(self) -> None:
        """A batch was settled: wake the read-your-writes waiters."""
        self._progress.set()
        self._progress = asyncio.Event()

    async def oldest_parked(self) -> ParkedEvent | None:
        try:
            parked = await self.event_store.list_parked(self.group, limit=PARKED_SCAN)
        except SubscriptionGroupNotFound:
            return None
        return min(parked, key=lambda p: p.event.position) if parked else None

    async def applied_mark(self) -> int | None:
        """Every event of this projection at or below the mark is applied (``None``:
        nothing is known to be): the group's checkpoint, kept below the oldest parked."""
        try:
            info = await self.event_store.subscription_group_info(self.group)
        except SubscriptionGroupNotFound:
            return None
        mark = info.checkpoint
        if info.parked:
            oldest = await self.oldest_parked()
            if oldest is not None and (mark is None or oldest.event.position <= mark):
                mark = oldest.event.position - 1
        return mark

    async def reached(self, position: int) -> bool:
        if not await self._read_model_present():
            return False
        mark = await self.applied_mark()
        if mark is not None and mark >= position:
            return True
        # Below the mark everything is applied; above it, is anything at or below
        # ``position`` still waiting (or parked)? (Non-matching events never wait.)
        waiting = await self.event_store.read_all(after=mark, filter=self.filter, limit=1)
        return not waiting or waiting[0].position > position

    async def _read_model_present(self) -> bool:
        """The read model holds this group's checkpoint: the group's progress is
        progress *in it*. Not so after the read model was lost, until the runner's
        start has noticed and restarted the group. Checked until seen once."""
        if self._present:
            return True
        physical = await self.read_store.alias_target(self.name)
        kept = await self.read_store.read_checkpoint(physical) if physical is not None else None
        self._present = kept is not None and kept.group == self.group
        return self._present

    async def check_not_blocked(self, position: int) -> None:
        """Raise :class:`ParkedEventBlocks` if a parked event at or below ``position``
        keeps the projection from reaching it."""
        oldest = await self.oldest_parked()
        if oldest is not None and oldest.event.position <= position:
            raise ParkedEventBlocks(self.name, self.group, position, oldest)

    async def wait_for_position(self, position: int, timeout: float, *, stop_at_parked: bool = True) -> bool:  # noqa: ASYNC109
        """True once every event of this projection at or below ``position`` is
        applied, False if that takes longer than ``timeout`` seconds. With
        ``stop_at_parked`` it raises :class:`ParkedEventBlocks` at once when a parked
        event stands in the way (without, it waits: a caller that has another way to
        tell, such as a document's own position, polls on)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + max(0.0, timeout)
        delay = 0.005
        while True:
            progress = self._progress
            if await self.reached(position):
                return True
            if stop_at_parked:
                await self.check_not_blocked(position)
            remaining = deadline - loop.time()
            if remaining <= 0:
                return False
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(progress.wait(), min(delay, remaining))
            delay = min(delay * 2, 0.1)

    async def status(self) -> ProjectionStatus:
        try:
            info = await self.event_store.subscription_group_info(self.group)
        except SubscriptionGroupNotFound:
            info = None
        physical = await self.read_store.alias_target(self.name)
        checkpoint = info.checkpoint if info else None
        head = info.last_position if info else await self.event_store.head_position()
        lag_seconds = 0.0
        waiting = await self.event_store.read_all(after=checkpoint, filter=self.filter, limit=1)
        if waiting:
            lag_seconds = max(0.0, (datetime.now(UTC) - waiting[0].recorded_at).total_seconds())
        oldest = await self.oldest_parked() if info and info.parked else None
        kept = await self.read_store.read_checkpoint(physical) if physical is not None else None
        refill_until = kept.refill_until if kept is not None and kept.group == self.group else None
        return ProjectionStatus(
            name=self.name,
            version=self.version,
            group=self.group,
            group_exists=info is not None,
            physical=physical,
            checkpoint=checkpoint,
            head_position=head,
            lag_events=info.lag_events if info else await self._count_waiting(),
            lag_seconds=lag_seconds,
            in_flight=info.in_flight if info else 0,
            parked=info.parked if info else 0,
            oldest_parked_position=oldest.event.position if oldest else None,
            rebuilding=refill_until is not None and (checkpoint is None or checkpoint < refill_until),
            refill_until=refill_until,
        )

    async def _count_waiting(self, cap: int = 1000) -> int:
        """Matching events in the store (at most ``cap``): the lag of a group never created."""
        return len(await self.event_store.read_all(filter=self.filter, limit=cap))
