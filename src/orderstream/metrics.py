"""Prometheus metrics, on a registry of their own (not the process-wide default),
so that tests and tools can build many apps in one process.

docs/operations.md lists every metric, what it means and the alert it deserves;
this docstring says where each comes from.

Observed on the way (the code calls a method of :class:`Metrics`):

- ``orderstream_command_duration_seconds`` histogram: ``command``, ``outcome``
  (``ok``, ``noop``: decided nothing, ``replayed``: idempotency key seen before,
  or the error's code: ``illegal-transition``, ``wrong-expected-version``, ...)
- ``orderstream_commands_total`` counter: ``command``, ``result`` (the outcome
  above in four kinds: ``accepted``, ``conflict``, ``refused``, ``error``)
- ``orderstream_http_requests_total`` counter: ``method``, ``route`` (template), ``status``
- ``orderstream_http_request_duration_seconds`` histogram: ``method``, ``route``
  (the ``GET`` routes are the read-model queries)
- ``orderstream_events_appended_total`` counter: ``category``
- ``orderstream_concurrency_conflicts_total`` counter: ``outcome`` (``retried``: lost a
  race and retried; ``rejected``: stale ``If-Match``)
- ``orderstream_writer_batch_jobs`` and ``orderstream_writer_commit_seconds``
  histograms: the SQLite writer's transactions (jobs in each; the COMMIT, which is
  the fsync)
- ``orderstream_saga_starts_total`` and ``orderstream_saga_outcomes_total`` counters:
  ``saga``, ``outcome`` (the saga code calls :meth:`Metrics.saga_started` and
  :meth:`Metrics.saga_ended`)

Set on scrape (``/metrics`` asks the runners and the trigger group first):

- ``orderstream_projection_checkpoint``, ``_lag_events``, ``_lag_seconds``,
  ``_parked``, ``_rebuilding`` (1 while a lost read model is filled again) gauges: ``projection``
- ``orderstream_saga_trigger_lag_events``, ``_in_flight``, ``_parked``,
  ``orderstream_saga_workflows_running`` gauges

Counted where the code keeps its own statistics (``WriterStats``, ``SnapshotStats``),
told by the store through a callback (:meth:`Metrics.watch`):

- ``orderstream_writer_transactions_total``, ``_jobs_total``, ``_appends_total``
  (SQLite event store only: KurrentDB exports its own metrics)
- ``orderstream_snapshot_writes_total`` (``outcome``: ``written``, ``failed``,
  ``skipped``) and ``orderstream_snapshot_reads_total`` (``outcome``: ``hit``,
  ``miss``: none stored, ``ignored``: stored but unusable)

Several processes (``--workers N``, saga worker processes). Each process would count
in its own memory while a scrape reaches one of them. With ``PROMETHEUS_MULTIPROC_DIR``
set (an empty directory, the same for every process of the service) prometheus_client
keeps every value in a file per process there, and ``/metrics`` answers with the sum
over all of them (gauges: the value set last): prometheus_client's multiprocess mode.
The process that starts the others sets it to a fresh directory by default
(:func:`metrics_shared_across_processes`); one process alone keeps the in-memory registry.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator, MutableMapping, Sequence
from pathlib import Path
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
    multiprocess,
    values,
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
from orderstream.eventstore.base import EventStore, IdempotencyRecord, WrongExpectedVersion, category_of
from orderstream.eventstore.sqlite import SqliteEventStore
from orderstream.logging_setup import bound

log = logging.getLogger("orderstream.commands")

COMMAND_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
HTTP_BUCKETS = COMMAND_BUCKETS
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
COMMIT_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)

COMMAND_RESULTS = ("accepted", "conflict", "refused", "error")
SAGA_OUTCOMES = ("shipped", "cancelled", "rejected", "compensated", "failed")
"""How a saga ends (docs/sagas.md); ``failed`` is the one that needs a human."""
SAGAS = ("fulfilment",)
MULTIPROCESS_ENV = "PROMETHEUS_MULTIPROC_DIR"
MEMORY_DIR = "/dev/shm"
"""Where the processes of one service keep their values by default (see
:func:`metrics_shared_across_processes`)."""
SNAPSHOT_COUNTERS = {
    # SnapshotStats field -> (metric, outcome label)
    "written": ("writes", "written"),
    "failed": ("writes", "failed"),
    "skipped": ("writes", "skipped"),
    "hits": ("reads", "hit"),
    "misses": ("reads", "miss"),
    "ignored": ("reads", "ignored"),
}


@contextlib.contextmanager
def metrics_shared_across_processes(
    several: bool = True, env: MutableMapping[str, str] = os.environ
) -> Iterator[Path | None]:
    """Around a process that starts others (``several``: API workers, saga worker
    processes), entered before it builds its :class:`Metrics`: every process of
    the service counts into one fresh directory, named in ``env`` for the
    children, which inherit it; removed on the way out, when they have stopped.

    Yields the directory, or ``None``: one process (its registry stays in
    memory), or the operator set one (left as it is: theirs to empty before each
    start).

    Where: in memory (``/dev/shm`` where it exists), never beside the data.
    prometheus_client maps each process's file into memory and grows it as new
    label values appear; on a full disk the next write into a grown page kills
    the process with SIGBUS (seen: ``serve`` vanished without a word when the
    data disk filled), which would turn a full disk into an outage.

    prometheus_client reads the variable when it is imported, which in this
    process happened before we knew we would start others: its choice is made
    again here (``values.ValueClass``, what each new metric's values use)."""
    if not several or env.get(MULTIPROCESS_ENV):
        yield None
        return
    memory = Path(MEMORY_DIR)
    parent = memory if memory.is_dir() and os.access(memory, os.W_OK) else None
    directory = Path(tempfile.mkdtemp(prefix="orderstream-metrics-", dir=parent))
    env[MULTIPROCESS_ENV] = str(directory)
    _choose_value_class(env)
    log.info("metrics: every process of this service counts into %s", directory)
    try:
        yield directory
    finally:
        del env[MULTIPROCESS_ENV]
        _choose_value_class(env)
        shutil.rmtree(directory, ignore_errors=True)


def _choose_value_class(env: MutableMapping[str, str]) -> None:
    if env is os.environ:
        values.ValueClass = values.get_value_class()  # type: ignore[no-untyped-call]


class Metrics:
    """Every metric of the process, and the small methods the code reports through."""

    def __init__(self) -> None:
        disable_created_metrics()  # type: ignore[no-untyped-call]  # no ``*_created`` series: noise for this service
        self.registry = CollectorRegistry(auto_describe=True)
        if directory := os.environ.get(MULTIPROCESS_ENV):
            os.makedirs(directory, exist_ok=True)  # each process's values file goes there
        self.command_duration = Histogram(
            "orderstream_command_duration_seconds",
            "Time to handle one command (load, decide, append), by command type and outcome.",
            ["command", "outcome"],
            buckets=COMMAND_BUCKETS,
            registry=self.registry,
        )
        self.commands = Counter(
            "orderstream_commands",
            "Commands handled, by type and result: accepted, conflict, refused (a domain rule), error.",
            ["command", "result"],
            registry=self.registry,
        )
        self.http_requests = Counter(
            "orderstream_http_requests",
            "HTTP requests answered, by method, route template and status code.",
            ["method", "route", "status"],
            registry=self.registry,
        )
        self.http_duration = Histogram(
            "orderstream_http_request_duration_seconds",
            "Time to answer an HTTP request, by method and route template (GET: read-model queries).",
            ["method", "route"],
            buckets=HTTP_BUCKETS,
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
        self.writer_batch = Histogram(
            "orderstream_writer_batch_jobs",
            "Jobs (appends, subscription-group writes) in one SQLite write transaction.",
            buckets=BATCH_BUCKETS,
            registry=self.registry,
        )
        self.writer_commit = Histogram(
            "orderstream_writer_commit_seconds",
            "Time of one SQLite COMMIT (the fsync of the write-ahead log when it holds an append).",
            buckets=COMMIT_BUCKETS,
            registry=self.registry,
        )
        self.writer_transactions = Counter(
            "orderstream_writer_transactions",
            "SQLite write transactions committed.",
            registry=self.registry,
        )
        self.writer_jobs = Counter(
            "orderstream_writer_jobs",
            "Appends and subscription-group writes committed.",
            registry=self.registry,
        )
        self.writer_appends = Counter(
            "orderstream_writer_appends", "Appends committed.", registry=self.registry
        )
        self.snapshot_writes = Counter(
            "orderstream_snapshot_writes",
            "Snapshot writes, by outcome.",
            ["outcome"],
            registry=self.registry,
        )
        self.snapshot_reads = Counter(
            "orderstream_snapshot_reads",
            "Snapshot look-ups by commands: hit (used), miss (none stored), ignored (unusable).",
            ["outcome"],
            registry=self.registry,
        )
        self.projection_checkpoint = Gauge(
            "orderstream_projection_checkpoint",
            "Commit position every event at or below which the projection has applied.",
            ["projection"],
            registry=self.registry,
            multiprocess_mode="mostrecent",
        )
        self.projection_lag = Gauge(
            "orderstream_projection_lag_events",
            "Events in the store that the projection has not applied yet.",
            ["projection"],
            registry=self.registry,
            multiprocess_mode="mostrecent",
        )
        self.projection_lag_seconds = Gauge(
            "orderstream_projection_lag_seconds",
            "Age of the oldest event the projection has not applied yet; 0 when caught up.",
            ["projection"],
            registry=self.registry,
            multiprocess_mode="mostrecent",
        )
        self.projection_parked = Gauge(
            "orderstream_projection_parked",
            "Events parked in the projection's group (replay or skip them with the `orderstream` CLI).",
            ["projection"],
            registry=self.registry,
            multiprocess_mode="mostrecent",
        )
        self.projection_rebuilding = Gauge(
            "orderstream_projection_rebuilding",
            "1 while a lost read model is being filled again from the beginning, else 0.",
            ["projection"],
            registry=self.registry,
            multiprocess_mode="mostrecent",
        )

        self.saga_trigger_lag = Gauge(
            "orderstream_saga_trigger_lag_events",
            "Order and payment events the saga trigger has not handed to Temporal yet.",
            registry=self.registry,
            multiprocess_mode="mostrecent",
        )
        self.saga_trigger_in_flight = Gauge(
            "orderstream_saga_trigger_in_flight",
            "Events the saga trigger has claimed and not settled yet.",
            registry=self.registry,
            multiprocess_mode="mostrecent",
        )
        self.saga_trigger_parked = Gauge(
            "orderstream_saga_trigger_parked",
            "Events the saga trigger parked (see `orderstream` CLI to replay them).",
            registry=self.registry,
            multiprocess_mode="mostrecent",
        )
        self.saga_workflows_running = Gauge(
            "orderstream_saga_workflows_running",
            "Fulfilment workflows running, from Temporal's visibility store (NaN: Temporal not reached).",
            registry=self.registry,
            multiprocess_mode="mostrecent",
        )
        self.saga_starts = Counter(
            "orderstream_saga_starts",
            "Sagas started, by saga.",
            ["saga"],
            registry=self.registry,
        )
        self.saga_outcomes = Counter(
            "orderstream_saga_outcomes",
            "Sagas ended, by saga and outcome (failed: needs a human).",
            ["saga", "outcome"],
            registry=self.registry,
        )
        # Known label values start at 0, so that rate() and alerts have a series
        # before the first one happens.
        for saga in SAGAS:
            self.saga_starts.labels(saga=saga)
            for outcome in SAGA_OUTCOMES:
                self.saga_outcomes.labels(saga=saga, outcome=outcome)
        for outcome in ("retried", "rejected"):
            self.concurrency_conflicts.labels(outcome=outcome)
        self._snapshot_counters = {
            field: (self.snapshot_writes if metric == "writes" else self.snapshot_reads).labels(
                outcome=outcome
            )
            for field, (metric, outcome) in SNAPSHOT_COUNTERS.items()
        }

    # ------------------------------------------------------------- the API the code calls

    def saga_started(self, saga: str = "fulfilment") -> None:
        """A saga's workflow was started (not when an existing one was found)."""
        self.saga_starts.labels(saga=saga).inc()

    def saga_ended(self, outcome: str, saga: str = "fulfilment") -> None:
        """A saga's workflow ended with ``outcome`` (one of :data:`SAGA_OUTCOMES`)."""
        self.saga_outcomes.labels(saga=saga, outcome=outcome).inc()

    def set_saga(self, lag_events: int, in_flight: int, parked: int, running: float | None) -> None:
        """``running``: NaN while Temporal cannot be asked (rather than the count from
        before the outage); ``None`` from a process with no Temporal client, which
        leaves the gauge to the processes that have one."""
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
        lag_seconds: float | None = None,
        parked: int | None = None,
        rebuilding: bool | None = None,
    ) -> None:
        self.projection_checkpoint.labels(projection=name).set(-1 if checkpoint is None else checkpoint)
        if lag_events is not None:
            self.projection_lag.labels(projection=name).set(lag_events)
        if lag_seconds is not None:
            self.projection_lag_seconds.labels(projection=name).set(lag_seconds)
        if parked is not None:
            self.projection_parked.labels(projection=name).set(parked)
        if rebuilding is not None:
            self.projection_rebuilding.labels(projection=name).set(int(rebuilding))

    def writer_committed(self, jobs: int, appends: int, commit_seconds: float) -> None:
        """The SQLite writer committed a transaction of ``jobs`` jobs, ``appends`` of them appends."""
        self.writer_transactions.inc()
        self.writer_jobs.inc(jobs)
        self.writer_appends.inc(appends)
        self.writer_batch.observe(jobs)
        self.writer_commit.observe(commit_seconds)

    def snapshot_counted(self, field: str) -> None:
        """The snapshot store incremented ``field`` of its ``SnapshotStats``."""
        self._snapshot_counters[field].inc()

    def watch(self, event_store: EventStore, snapshots: SnapshotStore | None) -> None:
        """Count what the SQLite writer (when the store is SQLite's) and ``snapshots``
        count for themselves: each tells us as it counts."""
        if isinstance(event_store, SqliteEventStore):
            event_store.on_commit = self.writer_committed
        if snapshots is not None:
            snapshots.stats.observer = self.snapshot_counted

    def scraped(self) -> CollectorRegistry:
        """What a scrape reads: this process's registry, or with
        ``PROMETHEUS_MULTIPROC_DIR`` set, one that sums the files of every process of
        the service (read again at each collection)."""
        if os.environ.get(MULTIPROCESS_ENV):
            merged = CollectorRegistry()
            multiprocess.MultiProcessCollector(merged)  # type: ignore[no-untyped-call]
            return merged
        return self.registry

    def render(self) -> tuple[bytes, str]:
        """The exposition text and its content type: this process's metrics, or with
        ``PROMETHEUS_MULTIPROC_DIR`` set, those of every process of the service."""
        return generate_latest(self.scraped()), CONTENT_TYPE_LATEST


def command_result(outcome: str) -> str:
    """The kind of a command's ``outcome``: what a dashboard and an alert look at."""
    if outcome in ("ok", "noop", "replayed"):
        return "accepted"
    if outcome in ("wrong-expected-version", "retries-exhausted"):
        return "conflict"
    if outcome == "error":
        return "error"
    return "refused"


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
        # Labelled children, looked up once each: ``labels()`` takes a lock and builds
        # its key on every call, the largest cost of observing a command (profile of
        # bench.observability).
        self._recorders: dict[tuple[str, str], tuple[Any, Any]] = {}
        self._appended: dict[str, Any] = {}
        self._rejected = metrics.concurrency_conflicts.labels(outcome="rejected")

    @property
    def snapshots(self) -> SnapshotStore | None:
        return self.inner.snapshots

    @property
    def event_store(self) -> EventStore:
        return self.inner.event_store

    async def load(self, decider: Decider[C, E, S], stream: str, *, up_to: int | None = None) -> Loaded[S]:
        return await self.inner.load(decider, stream, up_to=up_to)

    async def find_idempotency(self, actor: str, key: str, stream: str) -> IdempotencyRecord | None:
        return await self.inner.find_idempotency(actor, key, stream)

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
        return await self._observed(
            _name(decider, command),
            stream,
            context,
            self.inner.handle(decider, stream, command, expected=expected, context=context),
        )

    async def create(
        self, decider: Decider[C, E, S], stream: str, command: C, *, context: CommandContext | None = None
    ) -> CommandResult[S]:
        return await self._observed(
            _name(decider, command),
            stream,
            context,
            self.inner.create(decider, stream, command, context=context),
        )

    async def handle_batch(
        self, decider: Decider[C, E, S], stream: str, requests: Sequence[Request[C, S]]
    ) -> list[Outcome[S]]:
        """Each command of the batch is observed with the batch's duration."""
        started = time.perf_counter()
        try:
            with bound(stream=stream):
                outcomes = await self.inner.handle_batch(decider, stream, requests)
        except BaseException as exc:
            seconds = time.perf_counter() - started
            for request in requests:
                self._record(_name(decider, request.command), outcome_of(exc), seconds)
            raise
        seconds = time.perf_counter() - started
        with bound(stream=stream):
            for request, outcome in zip(requests, outcomes, strict=True):
                if isinstance(outcome, DomainError):
                    self._record(_name(decider, request.command), outcome_of(outcome), seconds)
                else:
                    self._count(stream, outcome)
                    self._record(_name(decider, request.command), _result_outcome(outcome), seconds)
        return outcomes

    async def _observed(
        self, name: str, stream: str, context: CommandContext | None, call: Awaitable[CommandResult[S]]
    ) -> CommandResult[S]:
        """Time and count one command; what is logged meanwhile names its stream and
        ids (the request's correlation id, bound by the API already, is not bound again).
        A straight try, not a ``@contextmanager`` generator: its set-up, and binding the
        logging context twice, were 11-14 us of a ``POST /orders`` (issue 7)."""
        started = time.perf_counter()
        with bound(
            stream=stream,
            correlation_id=context.correlation_id if context else None,
            causation_id=context.causation_id if context else None,
        ):
            try:
                result = await call
            except BaseException as exc:
                if isinstance(exc, WrongExpectedVersion):
                    self._rejected.inc()
                self._record(name, outcome_of(exc), time.perf_counter() - started)
                raise
            self._count(stream, result)
            self._record(name, _result_outcome(result), time.perf_counter() - started)
            return result

    def _count(self, stream: str, result: CommandResult[Any]) -> None:
        if not result.appended:
            return
        category = category_of(stream)
        counter = self._appended.get(category)
        if counter is None:
            counter = self._appended[category] = self.metrics.events_appended.labels(category=category)
        counter.inc(len(result.appended))

    def _record(self, name: str, outcome: str, seconds: float) -> None:
        if log.isEnabledFor(logging.DEBUG):
            log.debug("%s: %s in %.1f ms", name, outcome, seconds * 1000)
        recorders = self._recorders.get((name, outcome))
        if recorders is None:
            recorders = self._recorders[(name, outcome)] = (
                self.metrics.command_duration.labels(command=name, outcome=outcome),
                self.metrics.commands.labels(command=name, result=command_result(outcome)),
            )
        duration, count = recorders
        duration.observe(seconds)
        count.inc()


def _name(decider: Decider[Any, Any, Any], command: object) -> str:
    return type(command).__name__ if not callable(command) else f"{decider.category}:computed"


def _result_outcome(result: CommandResult[Any]) -> str:
    return "replayed" if result.replayed else ("ok" if result.appended else "noop")
