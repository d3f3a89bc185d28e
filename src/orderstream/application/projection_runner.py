"""The projection runner: persistent subscription -> pure projection -> read store.

One :class:`ProjectionRunner` drives one projection by composing parts that each do
one job:

- :mod:`~orderstream.application.batch_consumer`: the subscription pump, lease
  renewal, batches, settling, and holding events through an outage (shared with the
  saga trigger);
- :mod:`~orderstream.application.projection_plan`: the pure fold of a batch onto the
  stored documents (held events, gap filling);
- :mod:`~orderstream.application.projection_writer`: the bulk write, its retries,
  and isolating the one document a store refuses;
- :mod:`~orderstream.application.projection_progress`: the applied low-water mark,
  read-your-writes (and the parked event that blocks it), status;
- :mod:`~orderstream.application.projection_rebuild`: the zero-downtime rebuild.

This module is what is left: the batch handler (one ``get_many``, the fold, one bulk
write) and the versioned collection lifecycle.

Several runners (in one or several processes) may share the group; the event store
hands each stream to one consumer at a time, in revision order, in *runs*. An event
that cannot be decoded or folded is nacked with RETRY and the events after it in its
stream are *held* (handed back uncounted, they come again after its retry); after the
group's ``max_retry`` deliveries the event store parks it and the group goes on.
Parked events are listed, replayed and skipped from the CLI; while one is parked,
read-your-writes queries past it fail at once with a problem naming it.

Versions and rebuilds. The group is named after the projection version
(``projection-orders-v2``) and the runner writes to the physical table/index the
alias points at, as long as that belongs to its version:

- no collection yet: it is created (and aliased) and the group starts at the
  beginning of ``$all``; if the group had already made progress, the read model was
  lost (a deleted ``read.db``, a deleted index): the group is started again from the
  beginning so the new collection is filled (``status().rebuilding`` meanwhile);
- the alias points at an *older* version (the projection's version was bumped):
  :meth:`ProjectionRunner.run` first does a zero-downtime :meth:`rebuild`
  (queries keep reading the old version until the switch), unless
  ``auto_rebuild=False``;
- the alias points at a *newer* version: this runner is superseded, it stops.
  A runner that sees the alias move to another version while running stops too.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Sequence

from orderstream.application import projection_plan
from orderstream.application.batch_consumer import BatchConsumer, Outage, Outcome, PrepareAgain, StopConsuming
from orderstream.application.projection_plan import EventView as EventView  # re-exported
from orderstream.application.projection_plan import Plan
from orderstream.application.projection_plan import fold_events as fold_events  # re-exported
from orderstream.application.projection_progress import ParkedEventBlocks as ParkedEventBlocks  # re-exported
from orderstream.application.projection_progress import ProjectionProgress
from orderstream.application.projection_progress import ProjectionStatus as ProjectionStatus  # re-exported
from orderstream.application.projection_rebuild import AppliedCallback, ProgressCallback, Rebuild
from orderstream.application.projection_rebuild import RebuildResult as RebuildResult  # re-exported
from orderstream.application.projection_writer import ProjectionWriter
from orderstream.events import EventRegistry
from orderstream.events import registry as default_registry
from orderstream.eventstore.base import (
    EventFilter,
    EventStore,
    RecordedEvent,
    SubscriptionGroupNotFound,
    SubscriptionSettings,
)
from orderstream.readstore.base import ReadCheckpoint, ReadStore
from projections.base import Projection

log = logging.getLogger(__name__)

CHECKPOINT_INTERVAL = 1.0
"""Seconds between writes of the checkpoint kept with the read model."""


class _Superseded(StopConsuming):
    def __init__(self, target: str | None) -> None:
        self.target = target
        super().__init__(f"superseded: the alias points at {target}")


class ProjectionRunner:
    def __init__(
        self,
        event_store: EventStore,
        read_store: ReadStore,
        projection: Projection,
        *,
        group_prefix: str = "projection-",
        registry: EventRegistry = default_registry,
        batch_size: int = 256,
        linger_seconds: float = 0.0,
        max_retry: int = 5,
        ack_timeout_seconds: float = 30.0,
        write_attempts: int = 3,
        auto_rebuild: bool = True,
        on_applied: AppliedCallback | None = None,
    ) -> None:
        """``linger_seconds``: how long a batch waits for more events once it has one.
        0 by default: a batch takes what is queued, and while one is applied the next
        fills up by itself (a 5 ms linger halved a hot stream's live rate: each run of
        the stream waited it out, as the next run cannot be claimed before this one
        is settled)."""
        self.event_store = event_store
        self.read_store = read_store
        self.projection = projection
        self.registry = registry
        self.max_retry = max_retry
        self.ack_timeout_seconds = ack_timeout_seconds
        self.auto_rebuild = auto_rebuild
        self.on_applied = on_applied
        schema = projection.schema
        self.name = schema.name
        self.version = schema.version
        self.group = f"{group_prefix}{schema.name}-v{schema.version}"
        self.filter = EventFilter(
            categories=tuple(projection.categories), types=tuple(sorted(projection.handles))
        )
        self.writer = ProjectionWriter(read_store, self.name, attempts=write_attempts)
        self.progress = ProjectionProgress(
            event_store,
            read_store,
            name=self.name,
            version=self.version,
            group=self.group,
            filter=self.filter,
        )
        self.consumer = BatchConsumer(
            event_store,
            self.group,
            self._handle,
            name=f"projection {self.name}",
            batch_size=batch_size,
            linger_seconds=linger_seconds,
            ack_timeout_seconds=ack_timeout_seconds,
            prepare=self._prepare,
            on_settled=self.progress.notify,
        )
        self._refill_until: int | None = None
        self._checkpointed_at = float("-inf")
        self._rebuild = Rebuild(
            event_store,
            read_store,
            projection,
            planner=lambda events, physical: self._plan(events, physical, hold=False),
            writer=self.writer,
            group=self.group,
            group_settings=self._settings,
            version_of=self.version_of,
            on_applied=on_applied,
        )

    # --------------------------------------------------------------------- helpers

    def _settings(self, from_position: int | None) -> SubscriptionSettings:
        return SubscriptionSettings(
            filter=self.filter,
            from_position=from_position,
            max_retry=self.max_retry,
            ack_timeout_seconds=self.ack_timeout_seconds,
        )

    def version_of(self, physical: str | None) -> int | None:
        """The projection version a physical name belongs to (``orders_v3_r12ab`` -> 3)."""
        if physical is None:
            return None
        found = re.search(rf"{re.escape(self.name)}_v(\d+)(?:_[A-Za-z0-9]+)?$", physical)
        return int(found.group(1)) if found else None

    async def _target(self) -> str:
        """The physical name to write to: the alias target if it is this version. No
        alias while running: the read model was deleted under us (its index, and its
        alias with it); creating an empty one here and writing on would hide the loss
        for good, so the runner prepares again, which notices it and fills it again."""
        target = await self.read_store.alias_target(self.name)
        if target is None:
            raise PrepareAgain(f"the read model {self.name} is gone")
        if self.version_of(target) != self.version:
            raise _Superseded(target)
        return target

    # ------------------------------------------------------------------------- run

    async def run(self, stop: asyncio.Event) -> None:
        """Project until ``stop`` is set, or until another version takes the collection
        over. Store failures are logged and retried with backoff."""
        await self.consumer.run(stop)

    async def _prepare(self) -> bool:
        """Collection and group in place (rebuilding first after a version bump, filling
        a lost read model again); False if a newer version owns the collection."""
        target = await self.read_store.alias_target(self.name)
        target_version = self.version_of(target)
        if target is None:
            target = await self.read_store.ensure_collection(self.projection.schema)
        elif target_version is not None and target_version < self.version and self.auto_rebuild:
            log.info("%s: alias at %s, rebuilding into version %d", self.name, target, self.version)
            await self.rebuild()
            return await self._prepare()
        elif target_version != self.version:
            log.warning("%s v%d: the alias points at %s; not running", self.name, self.version, target)
            return False
        await self._check_read_model(target)
        await self.event_store.ensure_subscription_group(self.group, self._settings(None))
        return True

    async def _check_read_model(self, physical: str) -> None:
        """The checkpoint kept with the read model says whether it is the one the group
        filled. None (a deleted file or index, recreated empty just now; or one made
        before checkpoints were kept) while the group has made progress: the read model
        was lost, so the group starts again from the beginning and fills it (redelivery
        is harmless: a document skips what it has already applied)."""
        checkpoint = await self.read_store.read_checkpoint(physical)
        if checkpoint is not None and checkpoint.group == self.group:
            self._refill_until = checkpoint.refill_until
            return
        refill_until: int | None = None
        try:
            info = await self.event_store.subscription_group_info(self.group)
        except SubscriptionGroupNotFound:
            info = None
        if info is not None and (info.checkpoint is not None or info.parked or info.in_flight):
            refill_until = await self.event_store.head_position()
            log.warning(
                "%s: %s has no checkpoint of group %s (at position %s): the read model was lost; "
                "projecting again from the beginning (up to %s now)",
                self.name,
                physical,
                self.group,
                info.checkpoint,
                refill_until,
            )
            await self.event_store.delete_subscription_group(self.group)
        self._refill_until = refill_until
        await self.read_store.write_checkpoint(
            physical, ReadCheckpoint(group=self.group, position=None, refill_until=refill_until)
        )

    async def _save_checkpoint(self, physical: str) -> None:
        """Keep the read model's checkpoint (at most once every ``CHECKPOINT_INTERVAL``):
        the applied mark, a lower bound of what the read model holds."""
        now = time.monotonic()
        if now - self._checkpointed_at < CHECKPOINT_INTERVAL:
            return
        self._checkpointed_at = now
        mark = await self.progress.applied_mark()
        if self._refill_until is not None and mark is not None and mark >= self._refill_until:
            log.info("%s: the lost read model is filled again (position %d)", self.name, mark)
            self._refill_until = None
        await self.read_store.write_checkpoint(
            physical, ReadCheckpoint(group=self.group, position=mark, refill_until=self._refill_until)
        )

    async def _handle(self, batch: list[RecordedEvent]) -> Outcome:
        """One batch: one ``get_many``, the fold, one bulk write. Whatever the stores
        raise while reading or writing is an outage (the batch is held); an event that
        cannot be folded fails on its own (the planner's)."""
        try:
            target = await self._target()  # re-resolved: follows a same-version rebuild's switch
            plan = await self._plan(batch, target)
        except (StopConsuming, PrepareAgain):
            raise
        except Exception as exc:
            raise Outage(f"reading what the batch needs failed: {type(exc).__name__}: {exc}") from exc
        applied = plan.applied
        await self.writer.write_live(plan, target)
        if applied and self.on_applied is not None:
            self.on_applied(self.name, applied)
        try:
            await self._save_checkpoint(target)
        except Exception as exc:  # the next batch writes it again
            log.warning("%s: keeping the checkpoint failed: %s", self.name, exc)
        return Outcome(done=plan.done, retry=plan.failed, held=plan.held)

    async def _plan(self, events: Sequence[RecordedEvent], physical: str, *, hold: bool = True) -> Plan:
        """Read what the batch needs (one ``get_many``; the events a document missed,
        rarely) and fold it (:func:`projection_plan.plan`). ``hold``: a live group,
        which delivers a failed event again; a rebuild cannot, and folds on."""
        decoded = projection_plan.decode(self.projection, self.registry, events)
        stored = await self.read_store.get_many(self.name, list(decoded.by_document), physical=physical)
        missing = {
            gap: await self.event_store.read_stream(
                gap.stream, from_revision=gap.start, limit=gap.end - gap.start
            )
            for gap in projection_plan.gaps(self.projection, decoded, stored)
        }
        return projection_plan.plan(self.projection, self.registry, decoded, stored, missing, hold=hold)

    # --------------------------------------------------------------- observation

    async def reached_position(self) -> int | None:
        """The applied low-water mark now (``None``: nothing processed yet)."""
        return await self.progress.applied_mark()

    async def wait_for_position(self, position: int, timeout: float, *, stop_at_parked: bool = True) -> bool:  # noqa: ASYNC109
        """See :meth:`ProjectionProgress.wait_for_position` (raises
        :class:`ParkedEventBlocks` when a parked event stands in the way)."""
        return await self.progress.wait_for_position(position, timeout, stop_at_parked=stop_at_parked)

    async def status(self) -> ProjectionStatus:
        return await self.progress.status()

    # --------------------------------------------------------------------- rebuild

    async def rebuild(
        self, progress: ProgressCallback | None = None, *, page_size: int = 500
    ) -> RebuildResult:
        """Zero-downtime rebuild (:class:`~orderstream.application.projection_rebuild.Rebuild`)."""
        return await self._rebuild.run(progress, page_size=page_size)
