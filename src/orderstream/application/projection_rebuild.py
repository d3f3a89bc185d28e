"""Zero-downtime rebuild of a projection: replay ``$all`` into a new physical
table/index while queries read the old one, catch up to the head, switch the alias,
catch up once more (events written during the switch), drop the old one.

With the version the alias already points at, it builds into a fresh suffixed table
(``orders_v2_r1a2b3c4d``) while the live runner keeps the old one current; after the
switch the live runner follows the alias. A rebuild cannot deliver an event again,
so an event it cannot fold is logged and passed over (``failed``).
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

import msgspec

from orderstream.application.projection_plan import Plan
from orderstream.application.projection_writer import ProjectionWriter
from orderstream.eventstore.base import EventFilter, EventStore, RecordedEvent, SubscriptionSettings
from orderstream.readstore.base import ReadCheckpoint, ReadStore
from projections.base import Projection

log = logging.getLogger(__name__)

ProgressCallback = Callable[[int, int], None]
AppliedCallback = Callable[[str, int], None]
Planner = Callable[[Sequence[RecordedEvent], str], Awaitable[Plan]]
"""Reads what a page needs and folds it (without holding: see the module docstring)."""


class RebuildResult(msgspec.Struct, frozen=True, kw_only=True):
    physical: str
    previous: str | None
    events: int
    """Events read from ``$all`` (matching the projection's filter)."""
    failed: int
    """Events that could not be folded (logged; the documents miss them)."""
    position: int | None
    """The last position replayed before the switch."""


@dataclass(slots=True)
class _ReplayState:
    position: int | None = None
    before_last: int | None = None
    events: int = 0
    failed: int = 0


class Rebuild:
    def __init__(
        self,
        event_store: EventStore,
        read_store: ReadStore,
        projection: Projection,
        *,
        planner: Planner,
        writer: ProjectionWriter,
        group: str,
        group_settings: Callable[[int | None], SubscriptionSettings],
        version_of: Callable[[str | None], int | None],
        on_applied: AppliedCallback | None = None,
    ) -> None:
        self.event_store = event_store
        self.read_store = read_store
        self.projection = projection
        self.planner = planner
        self.writer = writer
        self.group = group
        self.group_settings = group_settings
        self.version_of = version_of
        self.on_applied = on_applied
        self.name = projection.schema.name
        self.filter = EventFilter(
            categories=tuple(projection.categories), types=tuple(sorted(projection.handles))
        )

    async def run(self, progress: ProgressCallback | None = None, *, page_size: int = 500) -> RebuildResult:
        """``progress(position, head_position)`` is called after every page: how far
        through ``$all`` the replay is (positions need not be contiguous, so read it
        as a fraction). The group of this version is created, if missing, to continue
        right after the replay."""
        schema = self.projection.schema
        previous = await self.read_store.alias_target(self.name)
        same_version = previous is not None and self.version_of(previous) == schema.version
        suffix = f"r{uuid.uuid4().hex[:8]}" if same_version else None
        physical = await self.read_store.ensure_collection(schema, suffix=suffix)
        log.info("%s: rebuilding into %s (alias at %s)", self.name, physical, previous)

        state = _ReplayState()
        try:
            await self._replay(physical, state, progress, page_size)
            # The live group of this version continues after the replay. It starts at
            # the event before the last one replayed so the low-water mark becomes
            # defined as soon as that one (already applied: skipped) is acknowledged.
            await self.event_store.ensure_subscription_group(
                self.group, self.group_settings(state.before_last)
            )
            await self.read_store.write_checkpoint(
                physical, ReadCheckpoint(group=self.group, position=state.before_last)
            )
            old = await self.read_store.switch_alias(self.name, physical)
        except BaseException:
            await self._drop_unfinished(physical)
            raise
        await self._replay(physical, state, progress, page_size)
        for stale in {old, previous} - {None, physical}:
            if stale is not None and self.version_of(stale) is not None:
                await self.read_store.drop_physical(stale)
        if progress is not None:
            progress(state.position or 0, state.position or 0)
        log.info("%s: rebuilt %s from %d events (%d failed)", self.name, physical, state.events, state.failed)
        return RebuildResult(
            physical=physical, previous=old, events=state.events, failed=state.failed, position=state.position
        )

    async def _drop_unfinished(self, physical: str) -> None:
        """A rebuild that failed or was interrupted (Ctrl-C, the read store down) before
        its switch leaves no half-filled index behind, unless the alias points at it (the
        first build of a collection makes its alias at once). A killed rebuild cannot
        clean up: its index stays, unused, until dropped by hand (docs/read-models.md)."""
        try:
            if await self.read_store.alias_target(self.name) != physical:
                await self.read_store.drop_physical(physical)
                log.warning("%s: rebuild into %s did not finish; dropped it", self.name, physical)
        except Exception as exc:  # the store that failed the rebuild may fail this too
            log.warning(
                "%s: rebuild into %s did not finish, and dropping it failed: %s", self.name, physical, exc
            )

    async def _replay(
        self, physical: str, state: _ReplayState, progress: ProgressCallback | None, page_size: int
    ) -> None:
        while True:
            page = await self.event_store.read_all(after=state.position, filter=self.filter, limit=page_size)
            if not page:
                return
            plan = await self.planner(page, physical)
            applied = plan.applied
            await self.writer.write(plan, physical)
            for event, reason in plan.failed:
                log.error(
                    "%s rebuild: %s@%d (%s) skipped: %s",
                    self.name,
                    event.stream,
                    event.revision,
                    event.type,
                    reason,
                )
            state.events += len(page)
            state.failed += len(plan.failed)
            state.before_last = page[-2].position if len(page) > 1 else state.position
            state.position = page[-1].position
            if self.on_applied is not None and applied:
                self.on_applied(self.name, applied)
            if progress is not None:
                head = await self.event_store.head_position()
                progress(state.position, max(head or 0, state.position))
