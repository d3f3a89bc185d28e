"""The projection runner: persistent subscription -> pure projection -> read store.

One :class:`ProjectionRunner` drives one projection. Several runners (in one or
several processes) may share its group; the event store hands each stream to
one consumer at a time, in revision order, in *runs* (a hot stream's pending
events go out together), and the runner claims a batch's worth at a time
(``prefetch=batch_size``).

For every batch of delivered events the runner makes one
:meth:`~orderstream.readstore.base.ReadStore.get_many` of the documents the
batch touches, folds each document's events whose stream revision is above its
stored version (older or repeated ones are skipped: redelivery and replay are
harmless), writes one conditional upsert per document in ONE read-store call,
then settles the batch (the acks of a batch reach the SQLite store as one job).
An event that cannot be decoded or folded is nacked with RETRY, and the events
after it in its stream are *held*: not folded, handed back (the group takes the
rest of a run back with the nack) so that they come again after its retry.
After the group's ``max_retry`` deliveries the event store parks it and the
group goes on: the later events then apply (on top of the document as it was
before the failed event), as the event store does not hold a stream back behind
a parked event; replaying the parked event after a fix finds it already passed,
so fix such a document by a rebuild. (Held events are found per stream within a
batch: exact for the contiguous projections, one stream per document.)

Read-store failures are not the events' fault: the batch is retried with
backoff for as long as the store is down (the events stay in flight, and a
heartbeat renews their leases every third of the ack timeout, so they are
neither redelivered nor parked while this runner lives). Only a document the
store refuses while others of the batch are written counts as a poison
document: its events are nacked like a failed fold.

The fold itself, held events and gap filling (a document that missed events of
its stream gets them read and folded first) are the planner's:
:mod:`orderstream.application.projection_plan`, pure; this module does the I/O.

"Reached position P" means applied: a parked event is not, so the projection has
not reached its position (nor any later one) until it is replayed and applied,
although the group's checkpoint counts it as done.

Versions and rebuilds. The group is named after the projection version
(``projection-orders-v2``) and the runner writes to the physical table/index the
alias points at, as long as that belongs to its version:

- no collection yet: it is created (and aliased) and the group starts at the
  beginning of ``$all``;
- the alias points at an *older* version (the projection's version was bumped):
  :meth:`ProjectionRunner.run` first does a zero-downtime :meth:`rebuild`
  (queries keep reading the old version until the switch), unless
  ``auto_rebuild=False``;
- the alias points at a *newer* version: this runner is superseded, it stops.
  A runner that sees the alias move to another version while running stops too.

:meth:`ProjectionRunner.rebuild` with the version the alias already points at
builds into a fresh suffixed table (``orders_v2_r1a2b3c4d``) while the live
runner keeps the old one current, switches, then the live runner follows the alias.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

import msgspec

from orderstream.application import projection_plan
from orderstream.application.projection_plan import EventView as EventView  # re-exported
from orderstream.application.projection_plan import Plan
from orderstream.application.projection_plan import fold_events as fold_events  # re-exported
from orderstream.events import EventRegistry
from orderstream.events import registry as default_registry
from orderstream.eventstore.base import (
    EventFilter,
    EventStore,
    EventStoreError,
    NackAction,
    PersistentSubscription,
    RecordedEvent,
    SubscriptionGroupNotFound,
    SubscriptionSettings,
)
from orderstream.logging_setup import event_context
from orderstream.readstore.base import ReadStore
from projections.base import Projection

log = logging.getLogger(__name__)

ProgressCallback = Callable[[int, int], None]
AppliedCallback = Callable[[str, int], None]


# ----------------------------------------------------------------------------- reports


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


class RebuildResult(msgspec.Struct, frozen=True, kw_only=True):
    physical: str
    previous: str | None
    events: int
    """Events read from ``$all`` (matching the projection's filter)."""
    failed: int
    """Events that could not be folded (logged; the documents miss them)."""
    position: int | None
    """The last position replayed before the switch."""


class _Superseded(Exception):
    def __init__(self, target: str | None) -> None:
        self.target = target
        super().__init__(f"the alias points at {target}")


_END = object()
_HELD = "held behind a failed event of its stream"


# ------------------------------------------------------------------------------ runner


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
        self.batch_size = batch_size
        self.linger_seconds = linger_seconds
        self.max_retry = max_retry
        self.ack_timeout_seconds = ack_timeout_seconds
        self.write_attempts = write_attempts
        self.auto_rebuild = auto_rebuild
        self.on_applied = on_applied
        schema = projection.schema
        self.name = schema.name
        self.version = schema.version
        self.group = f"{group_prefix}{schema.name}-v{schema.version}"
        self.filter = EventFilter(
            categories=tuple(projection.categories), types=tuple(sorted(projection.handles))
        )
        self._progress = asyncio.Event()
        self._refused: set[int] = set()
        """Positions of events whose document the read store refused while others
        were written: a poison document, not an outage, when it fails again."""

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
        """The physical name to write to: the alias target if it is this version."""
        target = await self.read_store.alias_target(self.name)
        if target is None:
            return await self.read_store.ensure_collection(self.projection.schema)
        if self.version_of(target) != self.version:
            raise _Superseded(target)
        return target

    def _notify(self) -> None:
        self._progress.set()
        self._progress = asyncio.Event()

    # ------------------------------------------------------------------------- run

    async def run(self, stop: asyncio.Event) -> None:
        """Project until ``stop`` is set, or until another version takes the collection
        over. Store failures are logged and retried with backoff."""
        prepared = False
        delay = 0.1
        while not stop.is_set():
            subscription: PersistentSubscription | None = None
            try:
                if not prepared:
                    if not await self._prepare():
                        return
                    prepared = True
                subscription = await self.event_store.connect_subscription_group(
                    self.group, prefetch=self.batch_size
                )
                delay = 0.1
                await self._consume(subscription, stop)
            except _Superseded as exc:
                log.warning("%s v%d: superseded (%s); stopping", self.name, self.version, exc)
                return
            except Exception as exc:
                log.warning(
                    "%s: %s, retrying in %.1fs",
                    self.name,
                    exc,
                    delay,
                    exc_info=not isinstance(exc, EventStoreError),
                )
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), delay)
                delay = min(delay * 2, 5.0)
            finally:
                if subscription is not None:
                    with contextlib.suppress(Exception):
                        await subscription.close()

    async def _prepare(self) -> bool:
        """Collection and group in place (rebuilding first after a version bump);
        False if a newer version owns the collection."""
        target = await self.read_store.alias_target(self.name)
        target_version = self.version_of(target)
        if target is None:
            await self.read_store.ensure_collection(self.projection.schema)
        elif target_version is not None and target_version < self.version and self.auto_rebuild:
            log.info("%s: alias at %s, rebuilding into version %d", self.name, target, self.version)
            await self.rebuild()
        elif target_version != self.version:
            log.warning("%s v%d: the alias points at %s; not running", self.name, self.version, target)
            return False
        await self.event_store.ensure_subscription_group(self.group, self._settings(None))
        return True

    async def _consume(self, subscription: PersistentSubscription, stop: asyncio.Event) -> None:
        queue: asyncio.Queue[object] = asyncio.Queue(maxsize=self.batch_size * 2)

        async def pump() -> None:
            try:
                async for event in subscription:
                    await queue.put(event)
            except asyncio.CancelledError:
                raise
            except BaseException as exc:
                await queue.put(exc)
            else:
                await queue.put(_END)

        async def heartbeat() -> None:
            # Events wait in flight while a batch is retried (a read store outage) and
            # in the queue behind it: renew their leases so that they are not taken
            # back, counted as failed deliveries and parked while this runner is alive.
            interval = max(self.ack_timeout_seconds / 3, 0.01)
            while True:
                await asyncio.sleep(interval)
                try:
                    await subscription.keep_alive()
                except Exception as exc:
                    log.warning("%s: renewing leases failed: %s", self.name, exc)

        pump_task = asyncio.create_task(pump(), name=f"projection-{self.name}-pump")
        heartbeat_task = asyncio.create_task(heartbeat(), name=f"projection-{self.name}-heartbeat")
        stop_task = asyncio.create_task(stop.wait())
        try:
            while not stop.is_set():
                get_task = asyncio.create_task(queue.get())
                await asyncio.wait({get_task, stop_task}, return_when=asyncio.FIRST_COMPLETED)
                if not get_task.done():
                    get_task.cancel()
                    return
                batch: list[RecordedEvent] = []
                item = get_task.result()
                deadline = time.monotonic() + self.linger_seconds
                while True:
                    if isinstance(item, RecordedEvent):
                        batch.append(item)
                    elif item is _END:
                        if batch:
                            await self._process(subscription, batch, stop)
                        raise EventStoreError("the subscription ended")
                    elif isinstance(item, BaseException):
                        if batch:
                            await self._process(subscription, batch, stop)
                        raise item
                    if len(batch) >= self.batch_size:
                        break
                    remaining = deadline - time.monotonic()
                    try:
                        item = (
                            queue.get_nowait()
                            if remaining <= 0
                            else await asyncio.wait_for(queue.get(), remaining)
                        )
                    except (asyncio.QueueEmpty, TimeoutError):
                        break
                await self._process(subscription, batch, stop)
        finally:
            stop_task.cancel()
            pump_task.cancel()
            heartbeat_task.cancel()
            for task in (pump_task, heartbeat_task):
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task

    async def _process(
        self, subscription: PersistentSubscription, batch: list[RecordedEvent], stop: asyncio.Event
    ) -> None:
        """Apply a batch, then ack what is done and nack (RETRY) what failed.

        Read-store failures are retried with backoff for as long as it takes (the
        events stay in flight: nothing can be projected during an outage anyway,
        and parking them would need an operator). After ``write_attempts`` failures
        the documents are written one by one, so that one the store refuses is
        nacked alone and the rest go on."""
        delay = 0.05
        attempt = 0
        while True:
            plan: Plan | None = None
            try:
                target = await self._target()  # re-resolved: follows a same-version rebuild's switch
                plan = await self._plan(batch, target)
                await self._write(plan, target)
                break
            except _Superseded:
                raise
            except Exception as exc:
                attempt += 1
                log.warning("%s: applying a batch failed (attempt %d): %s", self.name, attempt, exc)
                if plan is not None and plan.writes and self._only_refused(plan):
                    for write in plan.writes:
                        plan.failed.extend(
                            (e, f"read store refused the document again: {exc}") for e in write.events
                        )
                    plan.writes = []
                    break
                isolate = plan is not None and attempt >= self.write_attempts and len(plan.writes) > 1
                if isolate and plan is not None and await self._write_each(plan, target):
                    break
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), delay)
                if stop.is_set():
                    return  # unacked: closing the subscription hands the events back
                delay = min(delay * 2, 5.0)
        # Settled concurrently: the event store's group commit turns a batch's acks
        # into one transaction instead of one write (and fsync) per event.
        for event, reason in plan.failed:
            with event_context(event):
                log.warning(
                    "%s: %s@%d (%s) failed: %s", self.name, event.stream, event.revision, event.type, reason
                )
        # One gather, held nacks last: every settle is queued to the event store in this
        # order before anything else runs (a claim among them could hand a held event out
        # again, and its stale nack would then count against the new delivery). A group
        # that hands a run back with its nacked event (SQLite) ignores the held nacks;
        # another retries them.
        await asyncio.gather(
            *(subscription.ack(event) for event in plan.done),
            *(subscription.nack(event, NackAction.RETRY, reason[:500]) for event, reason in plan.failed),
            *(subscription.nack(event, NackAction.RETRY, _HELD) for event in plan.held),
        )
        for event in plan.done:
            self._refused.discard(event.position)
        if plan.applied and self.on_applied is not None:
            self.on_applied(self.name, plan.applied)
        self._notify()

    async def _write(self, plan: Plan, physical: str) -> None:
        if plan.writes:
            await self.read_store.write(self.name, [w.op for w in plan.writes], physical=physical)
        for write in plan.writes:
            plan.done.extend(write.events)

    async def _write_each(self, plan: Plan, physical: str) -> bool:
        """Write document by document; the events of a refused one fail. False
        (nothing changed) when every write fails: the store is down, not a document."""
        results: list[Exception | None] = []
        for write in plan.writes:
            try:
                await self.read_store.write(self.name, [write.op], physical=physical)
                results.append(None)
            except Exception as exc:
                results.append(exc)
        if all(r is not None for r in results):
            return False
        kept = []
        for write, error in zip(plan.writes, results, strict=True):
            if error is None:
                plan.done.extend(write.events)
                kept.append(write)
            else:
                plan.failed.extend((e, f"read store refused the document: {error}") for e in write.events)
                if len(self._refused) > 10_000:
                    self._refused.clear()
                self._refused.update(e.position for e in write.events)
        plan.writes = kept
        return True

    def _only_refused(self, plan: Plan) -> bool:
        return all(e.position in self._refused for w in plan.writes for e in w.events)

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

    async def _applied_mark(self) -> int | None:
        """Every event of this projection at or below the mark is applied (``None``:
        nothing is known to be). The group's checkpoint counts parked events as done
        (as KurrentDB does); a parked event is not applied, so the mark stays below
        the oldest one."""
        try:
            info = await self.event_store.subscription_group_info(self.group)
        except SubscriptionGroupNotFound:
            return None
        mark = info.checkpoint
        if info.parked:
            parked = await self.event_store.list_parked(self.group, limit=min(info.parked, 1000))
            if parked:
                oldest = min(p.event.position for p in parked)
                if mark is None or oldest <= mark:
                    mark = oldest - 1
        return mark

    async def reached_position(self) -> int | None:
        """The applied low-water mark now (``None``: nothing processed yet)."""
        return await self._applied_mark()

    async def _reached(self, position: int) -> bool:
        mark = await self._applied_mark()
        if mark is not None and mark >= position:
            return True
        # Below the mark everything is applied; above it, is anything at or below
        # ``position`` still waiting (or parked)? (Non-matching events never wait.)
        waiting = await self.event_store.read_all(after=mark, filter=self.filter, limit=1)
        return not waiting or waiting[0].position > position

    async def wait_for_position(self, position: int, timeout: float) -> bool:  # noqa: ASYNC109 (the API shape)
        """True once every event of this projection at or below ``position`` is
        applied (parked ones are not), False if that takes longer than
        ``timeout`` seconds. Woken by this runner's batches, else polls."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + max(0.0, timeout)
        delay = 0.005
        while True:
            progress = self._progress
            if await self._reached(position):
                return True
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
        )

    async def _count_waiting(self, cap: int = 1000) -> int:
        """Matching events in the store (at most ``cap``): the lag of a group never created."""
        return len(await self.event_store.read_all(filter=self.filter, limit=cap))

    # --------------------------------------------------------------------- rebuild

    async def rebuild(
        self, progress: ProgressCallback | None = None, *, page_size: int = 500
    ) -> RebuildResult:
        """Zero-downtime rebuild: replay ``$all`` into a new physical table/index
        while queries read the old one, catch up to the head, switch the alias,
        catch up once more (events written during the switch), drop the old one.

        ``progress(position, head_position)`` is called after every page: how far
        through ``$all`` the replay is (positions need not be contiguous, so read
        it as a fraction). The group of this version is created, if missing, to
        continue right after the replay.
        """
        schema = self.projection.schema
        previous = await self.read_store.alias_target(self.name)
        suffix = (
            f"r{uuid.uuid4().hex[:8]}"
            if previous is not None and self.version_of(previous) == self.version
            else None
        )
        physical = await self.read_store.ensure_collection(schema, suffix=suffix)
        log.info("%s: rebuilding into %s (alias at %s)", self.name, physical, previous)

        state = _ReplayState()
        await self._replay(physical, state, progress, page_size)
        # The live group of this version continues after the replay. It starts at
        # the event before the last one replayed so the low-water mark becomes
        # defined as soon as that one (already applied: skipped) is acknowledged.
        await self.event_store.ensure_subscription_group(self.group, self._settings(state.before_last))
        old = await self.read_store.switch_alias(self.name, physical)
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

    async def _replay(
        self, physical: str, state: _ReplayState, progress: ProgressCallback | None, page_size: int
    ) -> None:
        while True:
            page = await self.event_store.read_all(after=state.position, filter=self.filter, limit=page_size)
            if not page:
                return
            outcome = await self._plan(page, physical, hold=False)
            await self._write(outcome, physical)
            for event, reason in outcome.failed:
                log.error(
                    "%s rebuild: %s@%d (%s) skipped: %s",
                    self.name,
                    event.stream,
                    event.revision,
                    event.type,
                    reason,
                )
            state.events += len(page)
            state.failed += len(outcome.failed)
            state.before_last = page[-2].position if len(page) > 1 else state.position
            state.position = page[-1].position
            if self.on_applied is not None and outcome.applied:
                self.on_applied(self.name, outcome.applied)
            if progress is not None:
                head = await self.event_store.head_position()
                progress(state.position, max(head or 0, state.position))


@dataclass(slots=True)
class _ReplayState:
    position: int | None = None
    before_last: int | None = None
    events: int = 0
    failed: int = 0
