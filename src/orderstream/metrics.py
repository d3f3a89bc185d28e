"""Prometheus metrics, on a registry of their own (not the process-wide default),
so that tests and tools can build many apps in one process.

- ``orderstream_command_duration_seconds`` histogram: ``command``, ``outcome``
- ``orderstream_http_requests_total`` counter: ``method``, ``route`` (template), ``status``
- ``orderstream_events_appended_total`` counter: ``category``
- ``orderstream_concurrency_conflicts_total`` counter: ``outcome`` (``retried``: lost a
  race and retried; ``rejected``: stale ``If-Match``)
- ``orderstream_projection_checkpoint``, ``orderstream_projection_lag_events`` gauges:
  ``projection`` (updated on scrape from the runners' status)
- ``orderstream_saga_trigger_lag_events``, ``orderstream_saga_trigger_in_flight``,
  ``orderstream_saga_trigger_parked``, ``orderstream_saga_workflows_running`` gauges
  (updated on scrape: the trigger group's status and Temporal's count of running sagas)

``outcome`` of a command is ``ok``, ``noop`` (decided nothing), ``replayed``
(idempotency key seen before), or the error's code (``illegal-transition``,
``wrong-expected-version``, ...).
"""

from __future__ import annotations

import time
from collections.abc import Callable

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
    S,
    utc_now,
)
from orderstream.domain.common import Decider, DomainError
from orderstream.events import EventRegistry
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

    def set_projection(self, name: str, checkpoint: int | None, lag_events: int | None) -> None:
        self.projection_checkpoint.labels(projection=name).set(-1 if checkpoint is None else checkpoint)
        if lag_events is not None:
            self.projection_lag.labels(projection=name).set(lag_events)

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


class MeteredCommandHandler(CommandHandler):
    """The command handler, timed and counted. Serves HTTP and saga activities alike."""

    def __init__(
        self,
        event_store: EventStore,
        registry: EventRegistry,
        *,
        metrics: Metrics,
        clock: Clock = utc_now,
        max_attempts: int = 8,
    ) -> None:
        super().__init__(
            event_store,
            registry,
            clock=clock,
            max_attempts=max_attempts,
            on_conflict=metrics.conflict_retried,
        )
        self.metrics = metrics

    async def handle(
        self,
        decider: Decider[C, E, S],
        stream: str,
        command: C | Callable[[S], C],
        *,
        expected: int | None = None,
        context: CommandContext | None = None,
    ) -> CommandResult[S]:
        name = type(command).__name__ if not callable(command) else f"{decider.category}:computed"
        started = time.perf_counter()
        outcome = "error"
        try:
            result = await super().handle(decider, stream, command, expected=expected, context=context)
        except BaseException as exc:
            outcome = outcome_of(exc)
            if isinstance(exc, WrongExpectedVersion):
                self.metrics.concurrency_conflicts.labels(outcome="rejected").inc()
            raise
        else:
            outcome = "replayed" if result.replayed else ("ok" if result.appended else "noop")
            if result.appended:
                self.metrics.events_appended.labels(category=category_of(stream)).inc(len(result.appended))
            return result
        finally:
            self.metrics.command_duration.labels(command=name, outcome=outcome).observe(
                time.perf_counter() - started
            )
