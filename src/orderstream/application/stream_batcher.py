"""One writer per hot stream: concurrent commands for a stream queue up, and one
task drains the queue into batches (:meth:`CommandHandler.handle_batch`).

Why: every order reserves, commits or releases stock on ``product-{sku}``. With
each command loading, deciding and appending on its own, N concurrent orders of
one product race for one expected revision: one wins each round, the others
reload and retry, so a flash sale spends its time in conflicts and exhausts its
retries. Here the commands that arrive while one batch is written wait in the
queue and go together in the next: one load, N decisions against the evolving
state, one append (one fsync) of all their events, each with its own
metadata, derived ids and idempotency record. A broken business rule fails only
its own command.

This serialises the stream *within one process*. Several processes (or a saga
worker beside the API) still race between their batches; those races are
retried by the handler as before, and the expected revision keeps the
invariant whatever the interleaving.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Generic

from orderstream.application.commands import C, CommandContext, CommandResult, Commands, E, Request, S
from orderstream.domain.common import Decider, DomainError

DEFAULT_MAX_BATCH = 256
"""Commands decided and appended together at most."""


@dataclass(eq=False)
class _Lane(Generic[C, E, S]):
    """The queue of one stream and the task draining it."""

    decider: Decider[C, E, S]
    waiting: list[tuple[Request[C, S], asyncio.Future[CommandResult[S]]]] = field(default_factory=list)
    drainer: asyncio.Task[None] | None = None


class StreamBatcher:
    """Batches the concurrent commands of each stream through one handler."""

    def __init__(self, handler: Commands, *, max_batch: int = DEFAULT_MAX_BATCH) -> None:
        self.handler = handler
        self.max_batch = max_batch
        self._lanes: dict[str, _Lane[Any, Any, Any]] = {}

    async def handle(
        self,
        decider: Decider[C, E, S],
        stream: str,
        command: C | Callable[[S], C],
        *,
        context: CommandContext | None = None,
    ) -> CommandResult[S]:
        """Like :meth:`CommandHandler.handle` without ``expected`` (a batch has none of
        its own: a command that needs ``If-Match`` goes to the handler directly)."""
        lane: _Lane[C, E, S] | None = self._lanes.get(stream)
        if lane is None:
            lane = self._lanes[stream] = _Lane(decider)
        future: asyncio.Future[CommandResult[S]] = asyncio.get_running_loop().create_future()
        lane.waiting.append((Request(command, context or CommandContext()), future))
        if lane.drainer is None:
            lane.drainer = asyncio.create_task(self._drain(stream, lane), name=f"batcher:{stream}")
        return await future

    async def _drain(self, stream: str, lane: _Lane[C, E, S]) -> None:
        """Write batches until the queue is empty, then forget the stream."""
        batch: list[tuple[Request[C, S], asyncio.Future[CommandResult[S]]]] = []
        try:
            while lane.waiting:
                batch, lane.waiting = lane.waiting[: self.max_batch], lane.waiting[self.max_batch :]
                try:
                    outcomes = await self.handler.handle_batch(lane.decider, stream, [r for r, _ in batch])
                except Exception as exc:  # the batch as a whole failed (store down, retries exhausted)
                    for _, future in batch:
                        if not future.done():
                            future.set_exception(exc)
                    continue
                for (_, future), outcome in zip(batch, outcomes, strict=True):
                    if future.done():
                        continue  # the caller was cancelled; its command is decided all the same
                    if isinstance(outcome, DomainError):
                        future.set_exception(outcome)
                    else:
                        future.set_result(outcome)
        finally:
            del self._lanes[stream]
            for _, future in [*batch, *lane.waiting]:  # left undone only if this task was cancelled
                future.cancel()
