"""Prometheus metrics, on a registry of their own (not the process-wide default),
so that tests and tools can build many apps in one process.

- ``orderstream_command_duration_seconds`` histogram: ``command``, ``outcome``
- ``orderstream_http_requests_total`` counter: ``method``, ``route`` (template), ``status``
- ``orderstream_events_appended_total`` counter: ``category``
- ``orderstream_concurrency_conflicts_total`` counter: ``outcome`` (``retried``: lost a
  race and retried; ``rejected``: stale ``If-Match``)
- ``orderstream_projection_checkpoint``, ``orderstream_projection_lag_events``,
  ``orderstream_projection_parked``, ``orderstream_projection_rebuilding`` gauges:
  ``projection`` (updated on scrape from the runners' status)
- ``orderstream_saga_trigger_lag_events``, ``orderstream_saga_trigger_in_flight``,
  ``orderstream_saga_trigger_parked``, ``orderstream_saga_workflows_running`` gauges
  (updated on scrape: the trigger group's status and Temporal's count of running sagas)

``outcome`` of a command is ``ok``, ``noop`` (decided nothing), ``replayed``
(idempotency key seen before), or the error's code (``illegal-transition``,
``wrong-expected-version``, ...).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)

from orderstream.application.commands import (
    C,
    Clock,
    CommandContext,
    CommandHandler,
    CommandResult,
    ConcurrencyRetriesExhausted,
    E,
    Loaded,
    Outcome,
    Request,
    S,
)
from orderstream.application.snapshots import SnapshotStore
from orderstream.domain.common import Decider, DomainError
from orderstream.eventstore.base import EventStore, WrongExpectedVersion, category_of

COMMAND_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class Metrics:
    def __init__(self) -> None:
        disable_created_metrics()  # type: ignore[no-untyped-call]  # no ``*_created`` series: noise for this service
        self.registry = CollectorRegistry(auto_describe=True)
        self.command_duration = Histogram(
            "orderstream_command_duration_seconds",
            "Time to handle one command (load, decide, append), by command type and outcome.",
            ["command", "outcome"],
            buckets=COMMAND_BUCKETS,
            registry=self.registry,
        )
        self.http_requests = Counter(
            "orderstream_http_requests",
            "HTTP requests answered, by method, route template and status code.",
            ["method", "route", "status"],
            registry=self.registry,
        )
        self.events_appended = Counter(
            "orderstream_events_appended",
            "Events appended by the command handler, by stream category.",
            ["category"],
            registry=self.registry,
        )
        self.concurrency_conflicts = Counter(
            "orderstream_concurrency_conflicts",
            "Expected-revision conflicts: retried internally, or rejected (stale If-Match).",
            ["outcome"],
            registry=self.registry,
        )
        self.projection_checkpoint = Gauge(
            "orderstream_projection_checkpoint",
            "Commit position every event at or below which the projection has applied.",
            ["projection"],
            registry=self.registry,
        )
        self.projection_lag = Gauge(
            "orderstream_projection_lag_events",
            "Events in the store that the projection has not applied yet.",
            ["projection"],
            registry=self.registry,
        )
        self.projection_parked = Gauge(
            "orderstream_projection_parked",
            "Events parked in the projection's group (replay or skip them with the `orderstream` CLI).",
            ["projection"],
            registry=self.registry,
        )
        self.projection_rebuilding = Gauge(
            "orderstream_projection_rebuilding",
            "1 while a lost read model is being filled again from the beginning, else 0.",
            ["projection"],
            registry=self.registry,
        )

        self.saga_trigger_lag = Gauge(
            "orderstream_saga_trigger_lag_events",
            "Order and payment events the saga trigger has not handed to Temporal yet.",
            registry=self.registry,
        )
        self.saga_trigger_in_flight = Gauge(
            "orderstream_saga_trigger_in_flight",
            "Events the saga trigger has claimed and not settled yet.",
            registry=self.registry,
        )
        self.saga_trigger_parked = Gauge(
            "orderstream_saga_trigger_parked",
            "Events the saga trigger parked (see `orderstream` CLI to replay them).",
            registry=self.registry,
        )
        self.saga_workflows_running = Gauge(
            "orderstream_saga_workflows_running",
            "Fulfilment workflows running, from Temporal's visibility store.",
            registry=self.registry,
        )

    def set_saga(self, lag_events: int, in_flight: int, parked: int, running: int | None) -> None:
        self.saga_trigger_lag.set(lag_events)
        self.saga_trigger_in_flight.set(in_flight)
        self.saga_trigger_parked.set(parked)
        if running is not None:
            self.saga_workflows_running.set(running)

    def conflict_retried(self, _stream: str) -> None:
        self.concurrency_conflicts.labels(outcome="retried").inc()

    def set_projection(
        self,
        name: str,
        checkpoint: int | None,
        lag_events: int | None,
        *,
        parked: int | None = None,
        rebuilding: bool | None = None,
    ) -> None:
        self.projection_checkpoint.labels(projection=name).set(-1 if checkpoint is None else checkpoint)
        if lag_events is not None:
            self.projection_lag.labels(projection=name).set(lag_events)
        if parked is not None:
            self.projection_parked.labels(projection=name).set(parked)
        if rebuilding is not None:
            self.projection_rebuilding.labels(projection=name).set(int(rebuilding))

    def render(self) -> tuple[bytes, str]:
        """The exposition text and its content type."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


def outcome_of(exc: BaseException) -> str:
    if isinstance(exc, WrongExpectedVersion):
        return "wrong-expected-version"
    if isinstance(exc, ConcurrencyRetriesExhausted):
        return "retries-exhausted"
    if isinstance(exc, DomainError):
        return exc.code
    return "error"


class MeteredCommandHandler:
    """The command handler, timed and counted: a wrapper that forwards every call to
    ``inner`` and observes its outcome. Serves HTTP and saga activities alike.

    Build the handler with ``on_conflict=metrics.conflict_retried`` to count the
    races it retried (they happen inside ``inner``)."""

    def __init__(self, inner: CommandHandler, metrics: Metrics) -> None:
        self.inner = inner
        self.metrics = metrics
        self.clock: Clock = inner.clock

    @property
    def snapshots(self) -> SnapshotStore | None:
        return self.inner.snapshots

    @property
    def event_store(self) -> EventStore:
        return self.inner.event_store

    async def load(self, decider: Decider[C, E, S], stream: str, *, up_to: int | None = None) -> Loaded[S]:
        return await self.inner.load(decider, stream, up_to=up_to)

    async def close(self) -> None:
        await self.inner.close()

    async def handle(
        self,
        decider: Decider[C, E, S],
        stream: str,
        command: C | Callable[[S], C],
        *,
        expected: int | None = None,
        context: CommandContext | None = None,
    ) -> CommandResult[S]:
        with self._observe(_name(decider, command), stream) as observe:
            result = await self.inner.handle(decider, stream, command, expected=expected, context=context)
            observe(result)
            return result

    async def create(
        self, decider: Decider[C, E, S], stream: str, command: C, *, context: CommandContext | None = None
    ) -> CommandResult[S]:
        with self._observe(_name(decider, command), stream) as observe:
            result = await self.inner.create(decider, stream, command, context=context)
            observe(result)
            return result

    async def handle_batch(
        self, decider: Decider[C, E, S], stream: str, requests: Sequence[Request[C, S]]
    ) -> list[Outcome[S]]:
        """Each command of the batch is observed with the batch's duration."""
        started = time.perf_counter()
        try:
            outcomes = await self.inner.handle_batch(decider, stream, requests)
        except BaseException as exc:
            seconds = time.perf_counter() - started
            for request in requests:
                self._record(_name(decider, request.command), outcome_of(exc), seconds)
            raise
        seconds = time.perf_counter() - started
        for request, outcome in zip(requests, outcomes, strict=True):
            if isinstance(outcome, DomainError):
                self._record(_name(decider, request.command), outcome_of(outcome), seconds)
            else:
                self._count(stream, outcome)
                self._record(_name(decider, request.command), _result_outcome(outcome), seconds)
        return outcomes

    @contextlib.contextmanager
    def _observe(self, name: str, stream: str) -> Iterator[Callable[[CommandResult[Any]], None]]:
        started = time.perf_counter()
        outcome = "error"

        def observe(result: CommandResult[Any]) -> None:
            nonlocal outcome
            outcome = _result_outcome(result)
            self._count(stream, result)

        try:
            yield observe
        except BaseException as exc:
            outcome = outcome_of(exc)
            if isinstance(exc, WrongExpectedVersion):
                self.metrics.concurrency_conflicts.labels(outcome="rejected").inc()
            raise
        finally:
            self._record(name, outcome, time.perf_counter() - started)

    def _count(self, stream: str, result: CommandResult[Any]) -> None:
        if result.appended:
            self.metrics.events_appended.labels(category=category_of(stream)).inc(len(result.appended))

    def _record(self, name: str, outcome: str, seconds: float) -> None:
        self.metrics.command_duration.labels(command=name, outcome=outcome).observe(seconds)


def _name(decider: Decider[Any, Any, Any], command: object) -> str:
    return type(command).__name__ if not callable(command) else f"{decider.category}:computed"


def _result_outcome(result: CommandResult[Any]) -> str:
    return "replayed" if result.replayed else ("ok" if result.appended else "noop")
