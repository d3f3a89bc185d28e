"""The projection writer: a plan's documents into the read store, in one bulk call.

Read-store failures are not the events' fault. A bulk write that fails is tried
again a few times (``attempts``, short back-off); when it still fails and the batch
has several documents, they are written one by one: if some go through, the store
is up and refuses the others, which are *poison documents*: their events fail on
their own (nacked RETRY, parked after the group's ``max_retry``), and they are
remembered so that the next time a batch holding only them fails, they fail at once
instead of being taken for an outage. If every write fails, the store is down:
:class:`~orderstream.application.batch_consumer.Outage`, the consumer keeps the
events and tries again later.
"""

from __future__ import annotations

import asyncio
import logging

from orderstream.application.batch_consumer import Outage
from orderstream.application.projection_plan import Plan
from orderstream.readstore.base import ReadStore

log = logging.getLogger(__name__)

REMEMBERED_REFUSALS = 10_000


class ProjectionWriter:
    def __init__(self, read_store: ReadStore, collection: str, *, attempts: int = 3) -> None:
        self.read_store = read_store
        self.collection = collection
        self.attempts = max(1, attempts)
        self._refused: set[int] = set()
        """Positions of events whose document the store refused while others of
        their batch were written."""

    async def write(self, plan: Plan, physical: str) -> None:
        """Write every document of ``plan`` in one call; their events become done.
        Raises what the store raises (a rebuild stops on it)."""
        if plan.writes:
            await self.read_store.write(self.collection, [w.op for w in plan.writes], physical=physical)
        for write in plan.writes:
            plan.done.extend(write.events)
        plan.writes = []

    async def write_live(self, plan: Plan, physical: str) -> None:
        """:meth:`write` for a live group: retried, a refused document isolated
        (its events move to ``plan.failed``); :class:`Outage` when the store is down."""
        error: Exception | None = None
        delay = 0.02
        for attempt in range(1, self.attempts + 1):
            try:
                await self.write(plan, physical)
            except Exception as exc:
                error = exc
                # Debug only: when the tries run out the consumer's outage log says so, once.
                log.debug("%s: writing a batch failed (attempt %d): %s", self.collection, attempt, exc)
                if self._only_refused(plan):
                    self._fail_all(plan, f"read store refused the document again: {exc}")
                    return
                if attempt < self.attempts:
                    await asyncio.sleep(delay)
                    delay *= 2
                continue
            for event in plan.done:
                self._refused.discard(event.position)
            return
        if len(plan.writes) > 1 and await self._write_each(plan, physical):
            return
        raise Outage(f"the read store cannot take the writes: {error}")

    async def _write_each(self, plan: Plan, physical: str) -> bool:
        """Write document by document; the events of a refused one fail. False
        (nothing changed) when every write fails: the store is down, not a document."""
        results: list[Exception | None] = []
        for write in plan.writes:
            try:
                await self.read_store.write(self.collection, [write.op], physical=physical)
                results.append(None)
            except Exception as exc:
                results.append(exc)
        if all(r is not None for r in results):
            return False
        for write, error in zip(plan.writes, results, strict=True):
            if error is None:
                plan.done.extend(write.events)
            else:
                plan.failed.extend((e, f"read store refused the document: {error}") for e in write.events)
                if len(self._refused) > REMEMBERED_REFUSALS:
                    self._refused.clear()
                self._refused.update(e.position for e in write.events)
        plan.writes = []
        return True

    def _only_refused(self, plan: Plan) -> bool:
        return bool(plan.writes) and all(e.position in self._refused for w in plan.writes for e in w.events)

    @staticmethod
    def _fail_all(plan: Plan, reason: str) -> None:
        for write in plan.writes:
            plan.failed.extend((e, reason) for e in write.events)
        plan.writes = []
