"""The embedded default event store: one SQLite file, WAL mode, ``synchronous=FULL``.

Usage::

    store = await SqliteEventStore.open(data_dir / "events.db")
    try:
        result = await store.append("order-7f3c", [event], NO_STREAM)
    finally:
        await store.close()

Design
------
*Threads, not aiosqlite.* The stdlib :mod:`sqlite3` runs in our own threads:
one dedicated writer thread owns the write connection; a small pool owns one
read connection per thread (WAL lets readers run beside the writer). aiosqlite
hops to its thread and back for every statement; here a whole write batch
(BEGIN, every append's checks and inserts, COMMIT) is one synchronous call in
the writer thread, so there are two thread hand-offs per *batch*, and the
transaction never waits on the event loop while it holds SQLite's write lock.

*No hand-off where it costs more than it saves* (issue 7: a thread hand-off
costs more CPU than the SQLite work of an indexed look-up, and two of them made
a lone writer's append 0.6x raw sqlite3):

- Bounded reads (idempotency look-ups, a stream's revision, the first
  :data:`INLINE_ROWS` events of a stream) run on the event loop's thread, on a
  read connection of its own: an indexed SQLite look-up takes microseconds,
  and converting rows to events holds the GIL in any thread anyway. What is
  left of a longer stream, ``$all`` reads and the subscription groups' queries
  stay in the reader pool.
- A lone append runs on the event loop's thread too (:meth:`_flush_tick`): jobs
  submitted while the writer thread is idle wait for the end of the current
  event-loop iteration; if exactly one came, it is an append, no write was
  concurrent lately and no other process is writing (a non-blocking ``flock``),
  it is written right there. Otherwise (several
  in the iteration, or the writer busy) they go to the writer thread and its
  group commit. So a single awaited append pays no hand-off, while concurrent
  ones still share an fsync; the price is that the event loop waits out that
  one fsync, which only happens when it had nothing else to hand over. An append
  that opens the iteration's batch flushes it from its own task after one turn of
  the loop (:meth:`_lead_tick`), so when it is written there it returns without
  a further turn.
- One event at ``NO_STREAM`` or at a revision is written by one ``INSERT``, with
  no read first (:func:`_append_one`): the table's unique constraints and a
  ``CASE WHEN EXISTS`` refuse what the read would have, and a refusal (nothing
  written) takes the checked path, which says why.

*Group commit.* ``append`` validates its input, puts a job on a thread-safe
queue and awaits a future. The writer thread takes everything queued (up to
:data:`MAX_BATCH` jobs) and runs it in one ``BEGIN IMMEDIATE ... COMMIT``, each
job inside its own ``SAVEPOINT`` (a job that fails, e.g. with
:class:`WrongExpectedVersion`, is rolled back alone), then hands the outcomes
to the event loop (``call_soon_threadsafe``), which resolves the futures. While
one batch is written and fsynced, the next one gathers, so N concurrent
writers share one fsync. Several processes on one file (``--workers``,
``serve``) take turns through a ``flock``; the writer thread takes it *before*
gathering its batch, so the appends that queued while another process committed
share one transaction after the wait. A future is resolved only after COMMIT returned: an
acknowledged append is in the WAL on disk and survives a process crash.
Persistent subscription bookkeeping (claims, acks, nacks) goes through the
same writer; a batch holding no append runs with ``synchronous=NORMAL`` (in WAL
mode still safe against a process crash; an OS crash may lose the last acks,
which means redelivery, never loss).

*Positions* are the ``INTEGER PRIMARY KEY AUTOINCREMENT`` of ``events``.
SQLite serialises write transactions, so positions become visible in commit
order: a reader never sees position P+1 before P, and catch-up readers need no
gap handling.

*Idempotent append.* If any event id of an append is already stored, the append
succeeds without writing only when *all* ids are stored in this stream, at
consecutive revisions in the given order, and the expectation matches what it
was the first time (``NO_STREAM``: first revision 0; ``STREAM_EXISTS``: first
revision > 0; revision r: first revision r + 1; ``ANY``: always). It then
returns the original :class:`AppendResult`. Otherwise it raises
:class:`WrongExpectedVersion`, or :class:`DuplicateEventId` when an id is
stored in another stream (ids are unique in the whole store).

*Empty append* checks the expectation and writes nothing. It returns the
stream's current revision and the position of its last event, or ``-1, -1``
for a stream that does not exist.

*Subscriptions* (catch-up and persistent) wake on an in-process signal fired
after every commit. Commits of other processes on the same file (``--workers``,
``orderstream api`` beside ``orderstream project``) are noticed by SQLite's
``PRAGMA data_version``, which changes when another connection commits: while a
subscription waits, it is read every :data:`WATCH_INTERVAL` seconds (a few
microseconds, no table read), and ``poll_interval`` (0.2 s by default) remains
the fallback look at the tables. Measured (bench.freshness, issue 8): with the
0.2 s poll alone an order placed through ``orderstream api`` became searchable
through ``orderstream project`` at p50 166 ms; the projector's wait was most of it.

Persistent subscription groups
------------------------------
State lives in two tables (see :mod:`orderstream.eventstore.sqlite_schema`),
so groups survive restarts and consumers in several processes can share one.

- Each group has a *scan cursor*. A consumer's claim (a write transaction)
  copies the matching events after the cursor into ``subscription_events``
  (at most :data:`~orderstream.eventstore.sqlite_groups.WINDOW` unfinished
  ones), then hands out whole *runs* of streams that have nothing in flight
  (each stream's pending events in revision order, at most
  :data:`~orderstream.eventstore.sqlite_groups.RUN`) until ``prefetch`` events
  are out (the first run goes whole). So one stream is delivered to one
  consumer at a time, in revision order, many events at once when it is hot;
  different streams go out in parallel.
- A claimed event is leased to the consumer until ``now + ack_timeout_seconds``.
  A consumer that dies without acking loses the lease when it expires, and the
  event goes to whichever consumer claims next. ``close()`` hands leases back at
  once. ``keep_alive()`` renews every lease the consumer holds (no delivery is
  counted): a consumer that works on events longer than the ack timeout (a
  projection waiting out a read-store outage) keeps them.
- Every delivery counts as an attempt. ``nack(RETRY)`` (or an expired lease)
  makes the event pending again, unless it has had ``max_retry`` deliveries:
  then it is parked with the reason. ``PARK`` parks now; ``SKIP`` and ``ack``
  delete the row (done). A RETRY or PARK nack also hands the rest of the
  event's run back to pending without counting a delivery (and drops it from
  the consumer's buffer), so the stream's order holds.
- A parked event does not block later events of its stream (as in KurrentDB):
  the group goes on, and the parked event waits for an operator.
  ``replay_parked`` makes parked events pending again with their attempts reset;
  they are delivered in order with the rest of their stream, but no longer hold
  back the checkpoint, so it never moves backwards.
- ``checkpoint`` is the low-water mark: one less than the oldest unfinished
  (pending or in-flight, not replayed) position, or the scan cursor when there
  is none. Events that do not match the filter are never copied, so once the
  cursor is past them they count as done. The figure comes from the tables in
  one read transaction, so it is exact whichever consumers, in whichever
  processes, acknowledged what.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import fcntl
import os
import queue
import sqlite3
import threading
import time
import uuid
import weakref
from collections import deque
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import Any, Generic, Self, TypeVar

import msgspec

from orderstream.application.errors import is_storage_full
from orderstream.eventstore import sqlite_groups as groups
from orderstream.eventstore.base import (
    ANY,
    NO_STREAM,
    STREAM_EXISTS,
    AppendResult,
    EventFilter,
    EventStoreError,
    EventStoreFull,
    EventStoreUnavailable,
    Expected,
    GroupInfo,
    IdempotencyClaim,
    IdempotencyKeyTaken,
    IdempotencyRecord,
    NackAction,
    NewEvent,
    ParkedEvent,
    RecordedEvent,
    SkippedEvent,
    StreamState,
    SubscriptionSettings,
    WrongExpectedVersion,
    category_of,
)
from orderstream.eventstore.sqlite_schema import EVENT_COLUMNS, connect, create_schema, filter_sql, to_event

T = TypeVar("T")

MAX_BATCH = 512
"""Jobs (appends, acks, claims) written in one transaction at most."""

READ_BATCH = 500
"""Events a catch-up subscription reads per query."""

CONCURRENT_SECONDS = 0.1
"""After writes were seen to be concurrent, how long every write goes to the writer thread."""

LONE_WRITER_HOLD_SECONDS = 0.002
"""A task writing append after append at once yields the loop after this long (see
:meth:`SqliteEventStore._wrote_at_once`)."""

PROBE_SECONDS = 0.02
"""At most this long between two lone writes that go to the writer thread to see whether
others join them (see :meth:`SqliteEventStore._flush_tick`)."""

INLINE_ROWS = 256
"""Events of a stream read on the event loop's thread; the rest (if any) in the reader pool."""


class EventStoreClosed(EventStoreError):
    """The store was closed; nothing more can be appended or read."""


class DuplicateEventId(EventStoreError):
    """An event id of the append is already stored in another stream. Nothing was written."""

    def __init__(self, stream: str, event_id: str, other_stream: str) -> None:
        self.stream = stream
        self.event_id = event_id
        self.other_stream = other_stream
        super().__init__(f"{stream}: event id {event_id} is already stored in stream {other_stream}")


# A prepared event: id, type, schema_version, data (JSON text), metadata (JSON text).
_Row = tuple[str, str, int, str, str]


@dataclass(slots=True)
class WriterStats:
    """What the writer did since the store was opened (for benchmarks and metrics)."""

    transactions: int = 0
    """Committed write transactions: one fsync each when they held an append."""
    jobs: int = 0
    """Appends and subscription-group writes they held."""
    appends: int = 0
    on_loop_thread: int = 0
    """Of the transactions, those written on the event loop's thread (a lone job, no hand-off)."""


@dataclass(eq=False, slots=True)
class _Job(Generic[T]):
    run: Callable[[sqlite3.Connection], T]
    future: asyncio.Future[T]
    appends: bool


WATCH_INTERVAL = 0.01
"""Seconds between two looks at ``PRAGMA data_version`` while a subscription waits."""


def _data_version(conn: sqlite3.Connection) -> int:
    """Moves whenever another connection (of any process) commits to the file."""
    return int(conn.execute("PRAGMA data_version").fetchone()[0])


class _Signal:
    """Wakes every waiter. Take :meth:`token` *before* looking, then wait on it: a
    fire between the look and the wait is not lost."""

    __slots__ = ("_event",)

    def __init__(self) -> None:
        self._event: asyncio.Event | None = None

    def token(self) -> asyncio.Event:
        if self._event is None:
            self._event = asyncio.Event()
        return self._event

    def fire(self) -> None:
        """Every commit fires: an event is made only when someone took a token since the
        last fire (building two per commit showed in the single writer's profile)."""
        if self._event is not None:
            self._event.set()
            self._event = None

    @staticmethod
    async def wait(token: asyncio.Event, seconds: float) -> None:
        try:
            async with asyncio.timeout(seconds):
                await token.wait()
        except TimeoutError:
            pass


class SqliteEventStore:
    """:class:`~orderstream.eventstore.base.EventStore` on one SQLite file. Build it with :meth:`open`."""

    def __init__(
        self,
        path: str,
        connection: sqlite3.Connection,
        *,
        readers: int,
        poll_interval: float,
        prefetch: int,
    ) -> None:
        self.path = path
        self.poll_interval = poll_interval
        self.prefetch = prefetch
        self.stats = WriterStats()
        self.on_commit: Callable[[int, int, float], None] | None = None
        """Told of each committed transaction: its jobs, its appends, the seconds its COMMIT (fsync) took."""
        self._loop = asyncio.get_running_loop()
        self._connection = connection
        self._sync_full = True
        self._jobs: queue.SimpleQueue[_Job[Any] | None] = queue.SimpleQueue()
        self._tick: list[_Job[Any]] | None = None
        """Jobs submitted in this event-loop iteration while the writer thread was idle."""
        self._handed_over = 0
        """Jobs given to the writer thread and not finished yet (kept on the loop's thread)."""
        self._concurrent_until = 0.0
        """Until when (``time.monotonic()``) writes count as concurrent: see :meth:`_flush_tick`."""
        self._next_probe = 0.0
        """When (``time.monotonic()``) the next lone write goes to the writer thread as a probe."""
        self._last_writer: weakref.ref[asyncio.Task[Any]] | None = None
        """The task of the last append that found no tick open (weakly: a finished task's
        frames are not kept alive)."""
        self._last_turn = 0.0
        """When (``time.monotonic()``) an append last waited out a loop turn."""
        self._loop_reader: sqlite3.Connection | None = None
        row = connection.execute("SELECT up_to FROM idempotency_legacy").fetchone()
        self._legacy_up_to: int | None = None if row is None else row[0]
        """Set only when :func:`create_schema` upgrades a schema-1 file, which happens at open."""
        self._writer_done: asyncio.Future[None] = self._loop.create_future()
        self._readers = ThreadPoolExecutor(readers, thread_name_prefix="orderstream-sqlite-reader")
        self._local = threading.local()
        self._reader_connections: list[sqlite3.Connection] = []
        self._reader_lock = threading.Lock()
        self._appended = _Signal()
        self._changed = _Signal()
        self._closed = False
        # The writers of several processes on this file (``--workers``) queue here: flock wakes the
        # next one when a COMMIT is done, where SQLite's busy handler sleeps up to 100 ms between
        # tries (p99 of POST /orders with 2 workers: 120-270 ms without, 44-108 ms with; issue 7).
        self._process_lock = open(f"{path}.writer-lock", "ab")  # noqa: SIM115 (the writer closes it)
        # A daemon thread: a program that forgets close() still exits (what was acknowledged is on disk).
        self._writer = threading.Thread(target=self._write_loop, name=f"sqlite-writer:{path}", daemon=True)
        self._writer.start()
        self._data_version = self._read_now(_data_version)  # the baseline other processes' commits move

    @classmethod
    async def open(
        cls,
        path: str | os.PathLike[str],
        *,
        readers: int = 4,
        poll_interval: float = 0.2,
        prefetch: int = 16,
    ) -> SqliteEventStore:
        """Open (creating file, parent folder and schema if needed) the store at ``path``.

        ``poll_interval``: how often subscriptions look for events written by
        other processes. ``prefetch``: events a persistent-subscription consumer
        claims at a time (but one stream's run goes whole).
        """
        location = os.fspath(path)
        if location == ":memory:" or location.startswith("file:"):
            raise ValueError("SqliteEventStore needs a file path (WAL mode and several connections)")
        try:
            connection = await asyncio.to_thread(_open_writer, location)
        except sqlite3.Error as exc:
            raise outage(f"cannot open event store {location}", exc) from exc
        return cls(location, connection, readers=readers, poll_interval=poll_interval, prefetch=prefetch)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def close(self) -> None:
        """Write every append queued so far, then close. Live subscriptions end."""
        if self._closed:
            return
        self._closed = True
        if self._tick is not None:  # submitted this iteration: written before the store closes
            self._hand_over(self._tick)
            self._tick = None
        self._jobs.put(None)  # after every job queued so far
        try:
            await asyncio.shield(self._writer_done)
        finally:
            self._appended.fire()
            self._changed.fire()
            await asyncio.to_thread(self._readers.shutdown, True)
            with self._reader_lock:
                for connection in self._reader_connections:
                    connection.close()
                self._reader_connections.clear()
            if self._loop_reader is not None:
                self._loop_reader.close()
                self._loop_reader = None

    # ------------------------------------------------------------------ writing

    async def append(
        self,
        stream: str,
        events: Sequence[NewEvent],
        expected: Expected,
        *,
        idempotency: Sequence[IdempotencyClaim] = (),
    ) -> AppendResult:
        rows = _prepare(stream, events, expected)
        claims = _check_claims(stream, idempotency, len(rows))
        category = category_of(stream)
        legacy = self._legacy_up_to
        job = self._new_job(
            lambda conn: _append_tx(conn, stream, category, rows, expected, claims, legacy), appends=True
        )
        if self._tick is None and not self._handed_over:
            if not self._wrote_at_once(job):
                await self._lead_tick(job)
        else:
            self._enqueue(job)
        return await job.future  # no wait when it was written on the loop's thread

    async def find_idempotency(self, actor: str, key: str, stream: str) -> IdempotencyRecord | None:
        legacy = self._legacy_up_to
        return self._read_now(lambda conn: _find_idempotency(conn, actor, key, stream, legacy))

    async def find_idempotency_many(
        self, stream: str, keys: Sequence[tuple[str, str]]
    ) -> dict[tuple[str, str], IdempotencyRecord]:
        wanted = list(dict.fromkeys(keys))
        legacy = self._legacy_up_to
        return (
            self._read_now(lambda conn: _find_idempotency_many(conn, stream, wanted, legacy))
            if wanted
            else {}
        )

    def _submit(self, run: Callable[[sqlite3.Connection], T], *, appends: bool = False) -> asyncio.Future[T]:
        job = self._new_job(run, appends=appends)
        self._enqueue(job)
        return job.future

    def _new_job(self, run: Callable[[sqlite3.Connection], T], *, appends: bool) -> _Job[T]:
        if self._closed:
            raise EventStoreClosed(f"event store {self.path} is closed")
        return _Job(run, self._loop.create_future(), appends)

    def _wrote_at_once(self, job: _Job[Any]) -> bool:
        """Write a lone writer's next append without waiting out the loop's turn.

        The turn (:meth:`_lead_tick`) lets the appends of other tasks in the same
        iteration share the commit. A task appending again right after its own last
        append, with no other task's append in between and no concurrency seen, is a
        lone writer (a replay, an import, a script): its append is written here at once
        (issue 7: the turn was about 10 us of a lone append's 125 us of CPU). Another
        task's append takes the turn as before (the requests of an API are tasks of their
        own), and so does the probe (due :data:`PROBE_SECONDS` after the last, it goes to
        the writer thread). A lone writer still yields the loop once
        :data:`LONE_WRITER_HOLD_SECONDS` passed since its last turn, so that other tasks
        of the process (requests beside an import) wait at most that long plus one
        commit."""
        now = time.monotonic()
        task = asyncio.current_task()
        last = self._last_writer() if self._last_writer is not None else None
        if task is not last:
            self._last_writer = None if task is None else weakref.ref(task)
            return False
        if now - self._last_turn >= LONE_WRITER_HOLD_SECONDS or now >= self._next_probe:
            return False
        return self._may_write_here(job, now) and self._write_here(job)

    async def _lead_tick(self, job: _Job[Any]) -> None:
        """Open this loop iteration's tick with an append and flush it from the appending
        task itself after one turn of the loop, where :meth:`_enqueue` would schedule
        :meth:`_flush_tick` and the task would wake from its future one turn later still.
        Jobs submitted meanwhile join the tick as usual; a lone append is then written here
        and its future resolved before the task resumes, so awaiting it costs no turn
        (issue 7: a lone append's second turn of the loop, an ``epoll_wait`` and a callback,
        was a tenth of its CPU)."""
        tick = self._tick = [job]
        try:
            await asyncio.sleep(0)  # the end of this iteration: did other writes come?
            self._last_turn = time.monotonic()
        except asyncio.CancelledError:
            job.future.cancel()  # not written; the others in the tick still are
            raise
        finally:
            if self._tick is tick:  # else close() handed it over
                self._flush_tick()

    def _enqueue(self, job: _Job[Any]) -> None:
        if self._tick is not None:
            self._tick.append(job)
        elif self._handed_over:
            self._concurrent_until = time.monotonic() + CONCURRENT_SECONDS
            self._hand_over([job])  # the writer is busy: this joins its next batch
        else:
            self._tick = [job]
            self._loop.call_soon(self._flush_tick)

    def _hand_over(self, jobs: list[_Job[Any]]) -> None:
        self._handed_over += len(jobs)
        for job in jobs:
            self._jobs.put(job)

    def _flush_tick(self) -> None:
        """End of the event-loop iteration in which the first job found the writer idle:
        a lone job is written here, on the loop's thread (no hand-off); several go to
        the writer thread as one group commit.

        Writing here makes the event loop wait out the fsync, which is right only when
        nobody else is writing: the concurrent requests of a busy API would each get an
        fsync of their own and the loop would sit idle through them (measured: 2,682 ->
        1,661 POST/s). So once writes are seen to be concurrent (several in one
        iteration, or one arriving while the writer thread is busy) every write goes to
        the writer thread for :data:`CONCURRENT_SECONDS`; and a lone write goes there
        anyway once every :data:`PROBE_SECONDS`, to notice concurrency that writes done
        here would hide (nothing can join them). By time, not by count: a probe's two
        thread hand-offs cost a single writer about 15 us of CPU per append when one in
        16 went (issue 7), and what bounds the blind spell is time."""
        jobs, self._tick = self._tick, None
        if not jobs:
            return  # close() handed them over already
        now = time.monotonic()
        if len(jobs) > 1:
            self._concurrent_until = now + CONCURRENT_SECONDS
        elif self._may_write_here(jobs[0], now):
            if now < self._next_probe:
                if self._write_here(jobs[0]):
                    return
            else:
                self._next_probe = now + PROBE_SECONDS
        self._hand_over(jobs)

    def _may_write_here(self, job: _Job[Any], now: float) -> bool:
        """Only an append: the subscription groups' claims can copy many rows, work that
        runs in SQLite's C code beside the event loop when the writer thread does it."""
        idle = not self._handed_over and now >= self._concurrent_until
        return idle and job.appends and not job.future.cancelled()

    def _write_here(self, job: _Job[Any]) -> bool:
        """Write one job on the loop's thread, unless another process holds the writer lock
        (then the writer thread waits for it, not the event loop). The writer thread has
        nothing handed over, so it neither touches the connection nor holds the lock
        meanwhile (it lets go before the loop hears of its last batch, :meth:`_take_turn`).

        This is :meth:`_execute` and :meth:`_finish` for a batch of one, without the
        batch's loops and lists: their generality was 16k of the 197k instructions of a
        lone append (issue 7, callgrind). A job that fails takes the general
        :meth:`_finish`, so the bookkeeping of every outcome stays in one place."""
        try:
            fcntl.flock(self._process_lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:  # held by another process (or no locks here: the writer thread says so)
            return False
        conn = self._connection
        try:
            if not self._sync_full:
                conn.execute("PRAGMA synchronous=FULL")
                self._sync_full = True
            conn.execute("BEGIN IMMEDIATE")
            try:
                value = job.run(conn)
            except Exception as exc:
                if not conn.in_transaction:
                    raise  # SQLite rolled the whole transaction back (I/O error, disk full)
                conn.execute("ROLLBACK")
                self.stats.on_loop_thread += 1
                self._finish([job], [(False, _translate(exc))], False)
                return True
            committing = time.perf_counter()
            conn.execute("COMMIT")
            commit_seconds = time.perf_counter() - committing
        except Exception as exc:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            self._failed([job], exc)
            return True
        finally:
            fcntl.flock(self._process_lock, fcntl.LOCK_UN)
        stats = self.stats
        stats.transactions += 1
        stats.on_loop_thread += 1
        stats.jobs += 1
        stats.appends += job.appends
        if self.on_commit is not None:
            self.on_commit(1, int(job.appends), commit_seconds)
        job.future.set_result(value)
        self._appended.fire()
        self._changed.fire()
        return True

    def _write_loop(self) -> None:
        """Writer thread: take everything queued, write it in one transaction, hand the outcomes
        back to the event loop; until close() queues ``None``.

        The writer lock shared with other processes is taken *before* the batch is gathered:
        while another process commits, this one's appends keep queueing, and they all join
        the transaction that follows the wait instead of waiting for one of their own (issue
        7: under ``serve`` each API worker's writer waited for the lock half the time, and
        every transaction is an fsync)."""
        try:
            stopping = False
            while not stopping:
                item = self._jobs.get()
                if item is None:
                    break  # queued last by close(): nothing before it is left
                done, args, stopping = self._take_turn(item)
                self._loop.call_soon_threadsafe(done, *args)
        finally:
            self._connection.close()
            self._process_lock.close()
            with contextlib.suppress(RuntimeError):  # the event loop is gone already
                self._loop.call_soon_threadsafe(_resolve, self._writer_done)

    def _take_turn(self, first: _Job[Any]) -> tuple[Callable[..., None], tuple[Any, ...], bool]:
        """One turn at the writer lock: wait for it, gather the batch, write it, let go.

        Returns the event loop's side of the outcome (:meth:`_finish` or :meth:`_failed`
        and their arguments) for the caller to schedule *after* the lock is let go: once
        the loop hears that the batch is done, it may write a lone append on its own
        thread (:meth:`_write_here`), whose non-blocking ``flock`` on the same open file
        would succeed while this thread still held the lock, and this thread's unlock
        would then drop it under that transaction. Also returns whether close()'s
        ``None`` came."""
        try:
            fcntl.flock(self._process_lock, fcntl.LOCK_EX)
        except OSError as exc:  # no locks on this file system (ENOLCK): fail the batch, not the thread
            batch, handed, stopping = self._gather(first)
            return self._failed, (batch, exc, handed), stopping
        try:
            batch, handed, stopping = self._gather(first)
            if not batch:
                return self._finish, (batch, [], False, handed), stopping
            try:
                outcomes, changed, commit_seconds = self._execute(batch)
            except Exception as exc:  # the transaction as a whole failed: none of it was written
                return self._failed, (batch, exc, handed), stopping
            return self._finish, (batch, outcomes, changed, handed, commit_seconds), stopping
        finally:
            fcntl.flock(self._process_lock, fcntl.LOCK_UN)

    def _gather(self, item: _Job[Any] | None) -> tuple[list[_Job[Any]], int, bool]:
        """``item`` and what else is queued, up to :data:`MAX_BATCH` jobs: the batch (cancelled
        jobs left out), how many jobs were taken off the queue, and whether close()'s ``None``
        came (everything queued before it is in the batch)."""
        batch: list[_Job[Any]] = []
        handed = 0
        while item is not None:
            handed += 1
            if not item.future.cancelled():  # a racy read, but only an optimisation
                batch.append(item)
            if len(batch) >= MAX_BATCH:
                return batch, handed, False
            try:
                item = self._jobs.get_nowait()
            except queue.Empty:
                return batch, handed, False
        return batch, handed, True

    def _failed(self, batch: list[_Job[Any]], exc: Exception, handed: int = 0) -> None:
        self._handed_over -= handed
        for job in batch:
            if not job.future.done():
                job.future.set_exception(outage(f"write to {self.path} failed", exc))

    def _finish(
        self,
        batch: list[_Job[Any]],
        outcomes: list[tuple[bool, Any]],
        changed: bool,
        handed: int = 0,
        commit_seconds: float = 0.0,
    ) -> None:
        self._handed_over -= handed
        if not batch:
            return
        self.stats.transactions += 1
        if self.on_commit is not None:
            self.on_commit(len(batch), sum(job.appends for job in batch), commit_seconds)
        self.stats.jobs += len(batch)
        appended = False
        for job, (ok, value) in zip(batch, outcomes, strict=True):
            self.stats.appends += job.appends
            appended = appended or (ok and job.appends)
            if job.future.done():
                continue
            if ok:
                job.future.set_result(value)
            else:
                job.future.set_exception(value)
        if appended:
            self._appended.fire()
        if changed or appended:
            self._changed.fire()

    def _execute(self, batch: list[_Job[Any]]) -> tuple[list[tuple[bool, Any]], bool, float]:
        """One transaction, one savepoint per job, one fsync, in the writer thread, which
        holds the writer lock. Returns the jobs' outcomes, whether anything changed, and
        the seconds COMMIT took."""
        conn = self._connection
        durable = any(job.appends for job in batch)
        if durable != self._sync_full:
            conn.execute(f"PRAGMA synchronous={'FULL' if durable else 'NORMAL'}")
            self._sync_full = durable
        before = conn.total_changes
        outcomes: list[tuple[bool, Any]] = []
        alone = len(batch) == 1  # no savepoint needed: a failure rolls the transaction back
        try:
            conn.execute("BEGIN IMMEDIATE")
            for job in batch:
                if not alone:
                    conn.execute("SAVEPOINT job")
                try:
                    value = job.run(conn)
                except Exception as exc:
                    if not conn.in_transaction:
                        raise  # SQLite rolled the whole transaction back (I/O error, disk full)
                    if alone:
                        conn.execute("ROLLBACK")
                    else:
                        conn.execute("ROLLBACK TO job")
                        conn.execute("RELEASE job")
                    outcomes.append((False, _translate(exc)))
                else:
                    if not alone:
                        conn.execute("RELEASE job")
                    outcomes.append((True, value))
            committing = time.perf_counter()
            if conn.in_transaction:
                conn.execute("COMMIT")
            commit_seconds = time.perf_counter() - committing
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        return outcomes, conn.total_changes != before, commit_seconds

    # ------------------------------------------------------------------ reading

    async def _read(self, run: Callable[[sqlite3.Connection], T]) -> T:
        if self._closed:
            raise EventStoreClosed(f"event store {self.path} is closed")
        return await asyncio.get_running_loop().run_in_executor(self._readers, self._in_reader, run)

    def _read_now(self, run: Callable[[sqlite3.Connection], T]) -> T:
        """A bounded read on the event loop's thread, on its own connection (see Design)."""
        if self._closed:
            raise EventStoreClosed(f"event store {self.path} is closed")
        conn = self._loop_reader
        try:
            if conn is None:
                conn = self._loop_reader = connect(self.path, writer=False)
            return run(conn)
        except sqlite3.Error as exc:
            raise EventStoreUnavailable(f"read from {self.path} failed: {exc}") from exc

    async def _wait_for_change(self, token: asyncio.Event, seconds: float) -> None:
        """Wait until this process commits (``token``), another process commits (the
        file's ``data_version`` moves), or ``seconds`` pass. A change seen here fires the
        store's signal, so every waiter of this process wakes, not only this one."""
        deadline = time.monotonic() + seconds
        while (remaining := deadline - time.monotonic()) > 0:
            await _Signal.wait(token, min(WATCH_INTERVAL, remaining))
            if token.is_set() or self._closed:
                return
            try:
                version = self._read_now(_data_version)
            except EventStoreError:
                return  # the caller's next look reports it
            seen, self._data_version = self._data_version, version
            if version != seen:
                self._changed.fire()
                return

    def _in_reader(self, run: Callable[[sqlite3.Connection], T]) -> T:
        conn: sqlite3.Connection | None = getattr(self._local, "connection", None)
        if conn is None:
            conn = connect(self.path, writer=False)
            self._local.connection = conn
            with self._reader_lock:
                self._reader_connections.append(conn)
        try:
            return run(conn)
        except sqlite3.Error as exc:
            raise outage(f"read from {self.path} failed", exc) from exc

    async def read_stream(
        self,
        stream: str,
        *,
        from_revision: int | None = None,
        backwards: bool = False,
        limit: int | None = None,
    ) -> list[RecordedEvent]:
        if from_revision is not None and from_revision < 0:
            raise ValueError("from_revision must be >= 0")
        _check_limit(limit)
        if backwards:
            sql = f"SELECT {EVENT_COLUMNS} FROM events WHERE stream = ? AND revision <= ?"
            sql += " ORDER BY revision DESC LIMIT ?"
            start = from_revision if from_revision is not None else 2**62
        else:
            sql = f"SELECT {EVENT_COLUMNS} FROM events WHERE stream = ? AND revision >= ?"
            sql += " ORDER BY revision LIMIT ?"
            start = from_revision or 0
        first = INLINE_ROWS if limit is None or limit < 0 else min(limit, INLINE_ROWS)
        events = self._read_now(
            lambda conn: [to_event(row) for row in conn.execute(sql, (stream, start, first))]
        )
        if len(events) < first or (limit is not None and limit <= INLINE_ROWS):
            return events
        # A long stream: the rest in the reader pool, after the last event read here.
        after = events[-1].revision + (-1 if backwards else 1)
        if after < 0:
            return events
        rest = -1 if limit is None else limit - len(events)
        params = (stream, after, rest)
        return events + await self._read(lambda conn: [to_event(row) for row in conn.execute(sql, params)])

    async def stream_revision(self, stream: str) -> int | None:
        def run(conn: sqlite3.Connection) -> int | None:
            revision: int | None = conn.execute(
                "SELECT max(revision) FROM events WHERE stream = ?", (stream,)
            ).fetchone()[0]
            return revision

        return self._read_now(run)

    async def read_all(
        self,
        *,
        after: int | None = None,
        filter: EventFilter | None = None,
        limit: int | None = None,
    ) -> list[RecordedEvent]:
        _check_limit(limit)
        events, _ = await self._read(lambda conn: _read_all(conn, after, filter, limit))
        return events

    async def head_position(self) -> int | None:
        def run(conn: sqlite3.Connection) -> int | None:
            head: int | None = conn.execute("SELECT max(position) FROM events").fetchone()[0]
            return head

        return self._read_now(run)

    async def subscribe(
        self, *, after: int | None = None, filter: EventFilter | None = None
    ) -> AsyncIterator[RecordedEvent]:
        cursor = after
        while not self._closed:
            token = self._appended.token()
            try:
                events, scanned = await self._read(
                    lambda conn: _read_all(conn, cursor, filter, READ_BATCH)  # noqa: B023
                )
            except EventStoreClosed:
                return
            for event in events:
                yield event
            cursor = scanned
            if len(events) < READ_BATCH:
                await self._wait_for_change(token, self.poll_interval)

    # ------------------------------------------------------------------ persistent subscriptions

    async def create_subscription_group(self, group: str, settings: SubscriptionSettings) -> None:
        await self._submit(lambda conn: groups.create_tx(conn, group, settings, exist_ok=False))

    async def ensure_subscription_group(self, group: str, settings: SubscriptionSettings) -> None:
        await self._submit(lambda conn: groups.create_tx(conn, group, settings, exist_ok=True))

    async def delete_subscription_group(self, group: str) -> None:
        await self._submit(lambda conn: groups.delete_tx(conn, group))

    async def connect_subscription_group(
        self, group: str, *, prefetch: int | None = None
    ) -> SqlitePersistentSubscription:
        await self._read(lambda conn: groups.load_group(conn, group))
        return SqlitePersistentSubscription(self, group, prefetch or self.prefetch)

    async def subscription_group_info(self, group: str) -> GroupInfo:
        return await self._read(lambda conn: groups.info(conn, group))

    async def list_parked(self, group: str, *, limit: int = 100) -> list[ParkedEvent]:
        _check_limit(limit)
        return await self._read(lambda conn: groups.list_parked(conn, group, limit))

    async def replay_parked(self, group: str) -> int:
        return await self._submit(lambda conn: groups.replay_parked_tx(conn, group))

    async def skip_parked(self, group: str, position: int, *, actor: str, reason: str) -> SkippedEvent:
        await self._submit(lambda conn: groups.skip_parked_tx(conn, group, position, actor, reason))
        (skipped,) = await self._read(lambda conn: groups.list_skipped(conn, group, 1, position=position))
        return skipped

    async def list_skipped(self, group: str, *, limit: int = 100) -> list[SkippedEvent]:
        _check_limit(limit)
        return await self._read(lambda conn: groups.list_skipped(conn, group, limit))


class SqlitePersistentSubscription:
    """One consumer of a group. Iterate it for events; ack or nack each one.

    Leaving the ``async for`` loop does not give the events up: only
    :meth:`close` does, or the ack timeout (a consumer that vanished).
    """

    def __init__(self, store: SqliteEventStore, group: str, prefetch: int) -> None:
        self.group = group
        self.prefetch = prefetch
        self.consumer_id = uuid.uuid4().hex
        self._store = store
        self._buffer: deque[groups.Claimed] = deque()
        self._claiming: asyncio.Future[list[groups.Claimed]] | None = None
        self._acks: list[int] = []
        self._acked: asyncio.Future[None] | None = None
        self._closed = False

    async def __aiter__(self) -> AsyncIterator[RecordedEvent]:
        while True:
            event = await self._next()
            if event is None:
                return
            yield event

    async def _next(self) -> RecordedEvent | None:
        store = self._store
        while not (self._closed or store._closed):
            while self._buffer:
                claimed = self._buffer.popleft()
                if claimed.lease_expires > time.time():
                    return claimed.event
                # Its lease ran out while it waited here: it belongs to whoever claims it next.
            token = store._changed.token()
            try:
                if self._claiming is None:
                    now = time.time()
                    if not await store._read(lambda conn: groups.has_work(conn, self.group, now)):  # noqa: B023
                        await store._wait_for_change(token, store.poll_interval)
                        continue
                    self._claiming = self._claim()
                # Shielded: if this iterator is cancelled, the claimed events still land in the buffer.
                await asyncio.shield(self._claiming)
            except EventStoreClosed:
                return None
            if not self._buffer:
                await store._wait_for_change(token, store.poll_interval)
        return None

    def _claim(self) -> asyncio.Future[list[groups.Claimed]]:
        group, consumer, limit = self.group, self.consumer_id, self.prefetch
        future = self._store._submit(lambda conn: groups.claim_tx(conn, group, consumer, limit, time.time()))

        def done(future: asyncio.Future[list[groups.Claimed]]) -> None:
            self._claiming = None
            if not future.cancelled() and future.exception() is None:
                self._buffer.extend(future.result())

        future.add_done_callback(done)
        return future

    async def ack(self, event: RecordedEvent) -> None:
        """Acks made in one turn of the event loop (a batch's, gathered) go to the
        writer as one job and one statement, not one of each per event."""
        if self._acked is None:
            self._acked = self._store._loop.create_future()
            self._store._loop.call_soon(self._send_acks)
        self._acks.append(event.position)
        await asyncio.shield(self._acked)  # a cancelled caller must not cancel the others' acks

    def _send_acks(self) -> None:
        positions, self._acks = self._acks, []
        acked, self._acked = self._acked, None
        assert acked is not None
        group, consumer = self.group, self.consumer_id
        try:
            job = self._store._submit(lambda conn: groups.ack_many_tx(conn, group, consumer, positions))
        except EventStoreClosed as exc:
            acked.set_exception(exc)
            return

        def done(job: asyncio.Future[None]) -> None:
            if job.cancelled():
                acked.cancel()
            elif (error := job.exception()) is not None:
                acked.set_exception(error)
            else:
                acked.set_result(None)

        job.add_done_callback(done)

    async def nack(self, event: RecordedEvent, action: NackAction, reason: str = "") -> None:
        await self._settle(event, action, reason)
        if action is not NackAction.SKIP:
            # The group took the rest of this event's run back: never hand it out after it.
            self._buffer = deque(
                claimed
                for claimed in self._buffer
                if claimed.event.stream != event.stream or claimed.event.position < event.position
            )

    async def keep_alive(self) -> None:
        """Renew the leases of every event this consumer holds, the claimed ones still
        waiting in its buffer included; no delivery is counted."""
        group, consumer = self.group, self.consumer_id
        lease_expires, renewed = await self._store._submit(
            lambda conn: groups.touch_tx(conn, group, consumer, time.time())
        )
        self._buffer = deque(
            dataclasses.replace(claimed, lease_expires=max(claimed.lease_expires, lease_expires))
            if claimed.event.position in renewed
            else claimed
            for claimed in self._buffer
        )

    async def _settle(self, event: RecordedEvent, action: NackAction | None, reason: str) -> None:
        group, consumer, position = self.group, self.consumer_id, event.position
        await self._store._submit(
            lambda conn: groups.settle_tx(conn, group, consumer, position, action, reason)
        )

    async def close(self) -> None:
        """Stop consuming and hand this consumer's in-flight events to the others now."""
        if self._closed:
            return
        self._closed = True
        self._buffer.clear()
        group, consumer = self.group, self.consumer_id
        with contextlib.suppress(EventStoreClosed):  # closed store: the leases simply expire
            await self._store._submit(lambda conn: groups.release_tx(conn, group, consumer))


# ---------------------------------------------------------------------- helpers


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


def _open_writer(path: str) -> sqlite3.Connection:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    connection = connect(path, writer=True)
    try:
        create_schema(connection)
    except BaseException:
        connection.close()
        raise
    return connection


def _check_limit(limit: int | None) -> None:
    if limit is not None and limit < 0:
        raise ValueError("limit must be >= 0")


def _prepare(stream: str, events: Sequence[NewEvent], expected: Expected) -> list[_Row]:
    if not isinstance(stream, str) or not stream:
        raise ValueError("stream must be a non-empty string")
    if isinstance(expected, bool) or not isinstance(expected, int | StreamState):
        raise TypeError(f"expected must be a revision or a StreamState, not {expected!r}")
    if isinstance(expected, int) and expected < 0:
        raise ValueError("an expected revision is >= 0 (use NO_STREAM for a new stream)")
    rows: list[_Row] = []
    for event in events:
        try:
            data = event.data.decode()
        except UnicodeDecodeError as exc:
            raise EventStoreError(f"{stream}: event {event.id} data must be UTF-8 JSON") from exc
        metadata = event.metadata.to_json().decode()  # encoded once, here
        rows.append((_uuid_text(event.id), event.type, event.schema_version, data, metadata))
    return rows


_encoder = msgspec.json.Encoder()


def _utc_text(moment: datetime) -> str:
    """``moment.isoformat()`` of a UTC datetime (``...+00:00``), the same text at half the
    CPU: msgspec writes it in C (``"...Z"``), ``isoformat`` goes through ``printf``."""
    return _encoder.encode(moment)[1:-2].decode() + "+00:00"


def _uuid_text(id_: uuid.UUID) -> str:
    """``str(id_)``, the same text at a third of the CPU (``UUID.__str__`` is Python code)."""
    return _encoder.encode(id_)[1:-1].decode()


def _append_tx(
    conn: sqlite3.Connection,
    stream: str,
    category: str,
    rows: list[_Row],
    expected: Expected,
    claims: Sequence[IdempotencyClaim] = (),
    legacy_up_to: int | None = None,
) -> AppendResult:
    result = _append_one(conn, stream, category, rows, expected)
    if result is None:
        result = _append_checked(conn, stream, category, rows, expected)
    if claims and not result.already_stored and rows:
        # One transaction, one writer: the append's positions are consecutive.
        first = result.revision - len(rows) + 1
        _insert_claims(conn, stream, claims, first, result.position - len(rows) + 1, legacy_up_to)
    return result


def _append_one(
    conn: sqlite3.Connection, stream: str, category: str, rows: list[_Row], expected: Expected
) -> AppendResult | None:
    """One event at an expectation that names its revision (``NO_STREAM``: 0; revision r:
    r + 1), written without reading first: ``UNIQUE (stream, revision)`` refuses a stream
    that is further on, ``UNIQUE (id)`` an id stored already, and the ``EXISTS`` a stream
    that is not as far as ``expected``. ``None`` when refused: nothing was written, and
    :func:`_append_checked` finds out why (idempotent replay, conflict, invalid JSON).
    The common append (a new order, a command at a known revision) runs one statement
    instead of a read and an insert (issue 7: the read was a tenth of a lone append's
    instructions)."""
    if len(rows) != 1 or expected is ANY or expected is STREAM_EXISTS:
        return None
    id_, type_, version, data, metadata = rows[0]
    recorded_at = _utc_text(datetime.now(UTC))
    try:
        if expected is NO_STREAM:
            revision = 0
            params: tuple[Any, ...] = (id_, stream, category, 0, type_, version, data, metadata, recorded_at)
            position = conn.execute(_INSERT, params).lastrowid
        else:
            assert isinstance(expected, int)
            revision = expected + 1
            params = (id_, stream, category, stream, expected, revision)
            params += (type_, version, data, metadata, recorded_at)
            position = conn.execute(_INSERT_AFTER, params).lastrowid
    except sqlite3.IntegrityError:
        return None
    assert position is not None
    return AppendResult(revision, position)


def _append_checked(
    conn: sqlite3.Connection, stream: str, category: str, rows: list[_Row], expected: Expected
) -> AppendResult:
    """Any append: read the stream's revision and look for stored ids, then insert."""
    ids = [row[0] for row in rows]
    check_ids = 0 < len(ids) <= 500
    marks = ", ".join("?" * len(ids)) if check_ids else ""
    actual, last_position, any_stored = conn.execute(
        # One statement: the stream's last revision and position, and whether an id is stored already.
        "SELECT (SELECT revision FROM events WHERE stream = ? ORDER BY revision DESC LIMIT 1),"
        " (SELECT position FROM events WHERE stream = ? ORDER BY revision DESC LIMIT 1),"
        + (f" EXISTS (SELECT 1 FROM events WHERE id IN ({marks}))" if check_ids else " 1"),
        [stream, stream, *(ids if check_ids else ())],
    ).fetchone()
    if rows and any_stored:
        stored = _stored(conn, ids)
        if stored:
            return _idempotent(stream, rows, expected, actual, stored)
    _check_expected(stream, expected, actual)
    if not rows:
        return AppendResult(-1, -1) if actual is None else AppendResult(actual, last_position)
    first = 0 if actual is None else actual + 1
    recorded_at = _utc_text(datetime.now(UTC))
    values = [
        (id_, stream, category, first + i, type_, version, data, metadata, recorded_at)
        for i, (id_, type_, version, data, metadata) in enumerate(rows)
    ]
    if len(values) == 1:
        position = conn.execute(_INSERT, values[0]).lastrowid
    else:
        conn.executemany(_INSERT, values)
        position = conn.execute("SELECT last_insert_rowid()").fetchone()[0]
    assert position is not None
    return AppendResult(first + len(rows) - 1, position)


def _insert_claims(
    conn: sqlite3.Connection,
    stream: str,
    claims: Sequence[IdempotencyClaim],
    first_revision: int,
    first_position: int,
    legacy_up_to: int | None,
) -> None:
    """Store each claim's record beside the events (the caller's savepoint undoes
    both if a key is taken)."""
    for claim in claims:
        inserted = conn.execute(
            "INSERT INTO idempotency (actor, key, stream, request_hash, revision, position)"
            " VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING",
            (
                claim.actor,
                claim.key,
                stream,
                claim.request_hash,
                first_revision + claim.last,
                first_position + claim.last,
            ),
        ).rowcount
        if not inserted:
            taken = _find_idempotency(conn, claim.actor, claim.key, stream, legacy_up_to)
            assert taken is not None
            raise IdempotencyKeyTaken(taken)


def _find_idempotency(
    conn: sqlite3.Connection, actor: str, key: str, stream: str, legacy_up_to: int | None
) -> IdempotencyRecord | None:
    """``legacy_up_to``: see :func:`_find_legacy_idempotency` (``None``: the file never had
    keys without records, so a miss needs no second query)."""
    row = conn.execute(
        "SELECT request_hash, revision, position FROM idempotency WHERE actor = ? AND key = ? AND stream = ?",
        (actor, key, stream),
    ).fetchone()
    if row is not None:
        return IdempotencyRecord(
            actor=actor, key=key, stream=stream, request_hash=row[0], revision=row[1], position=row[2]
        )
    if legacy_up_to is None:
        return None
    return _find_legacy_idempotency(conn, actor, key, stream, legacy_up_to)


def _find_idempotency_many(
    conn: sqlite3.Connection, stream: str, keys: list[tuple[str, str]], legacy_up_to: int | None
) -> dict[tuple[str, str], IdempotencyRecord]:
    found: dict[tuple[str, str], IdempotencyRecord] = {}
    for start in range(0, len(keys), 400):  # 2 parameters each, under SQLite's 999
        chunk = keys[start : start + 400]
        pairs = ", ".join("(?, ?)" for _ in chunk)
        rows = conn.execute(
            "SELECT actor, key, request_hash, revision, position FROM idempotency"
            f" WHERE stream = ? AND (actor, key) IN (VALUES {pairs})",
            [stream, *(part for pair in chunk for part in pair)],
        )
        for actor, key, request_hash, revision, position in rows:
            found[(actor, key)] = IdempotencyRecord(
                actor=actor,
                key=key,
                stream=stream,
                request_hash=request_hash,
                revision=revision,
                position=position,
            )
    if legacy_up_to is not None:
        for actor, key in keys:
            legacy = (
                None
                if (actor, key) in found
                else _find_legacy_idempotency(conn, actor, key, stream, legacy_up_to)
            )
            if legacy is not None:
                found[(actor, key)] = legacy
    return found


def _find_legacy_idempotency(
    conn: sqlite3.Connection, actor: str, key: str, stream: str, up_to: int
) -> IdempotencyRecord | None:
    """The slow fallback for a store upgraded from schema 1: the stream's events up to
    the upgrade (position ``up_to``), searched by their metadata (the last event of the
    key wins; a key seen with several request hashes matches no request)."""
    rows = conn.execute(
        "SELECT revision, position, json_extract(metadata, '$.request_hash') FROM events"
        " WHERE stream = ? AND position <= ?"
        " AND json_extract(metadata, '$.idempotency_key') = ? AND json_extract(metadata, '$.actor') = ?"
        " ORDER BY revision",
        (stream, up_to, key, actor),
    ).fetchall()
    if not rows:
        return None
    hashes = {row[2] for row in rows}
    revision, position, request_hash = rows[-1]
    return IdempotencyRecord(
        actor=actor,
        key=key,
        stream=stream,
        request_hash=request_hash if len(hashes) == 1 else MIXED_HASHES,
        revision=revision,
        position=position,
    )


MIXED_HASHES = "!mixed"
"""``request_hash`` of a legacy key seen with several digests: not a hex digest, so it
matches no request and the key is refused."""


def _check_claims(stream: str, claims: Sequence[IdempotencyClaim], events: int) -> Sequence[IdempotencyClaim]:
    for claim in claims:
        if not 0 <= claim.last < events:
            raise ValueError(f"{stream}: idempotency claim for event {claim.last} of an append of {events}")
    return claims


_INSERT = (
    "INSERT INTO events (id, stream, category, revision, type, schema_version, data, metadata, recorded_at)"
    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)"
)
_INSERT_AFTER = (
    "INSERT INTO events (id, stream, category, revision, type, schema_version, data, metadata, recorded_at)"
    " VALUES (?, ?, ?, CASE WHEN EXISTS (SELECT 1 FROM events WHERE stream = ? AND revision = ?) THEN ? END,"
    " ?, ?, ?, ?, ?)"
)
"""Insert an event after the expected revision: a NULL revision (refused, ``NOT NULL``) when
the stream has no event at that revision, and ``UNIQUE (stream, revision)`` refuses it when
the stream is further on. (Not ``INSERT ... SELECT ... WHERE``: SQLite copies a SELECT from
the table it inserts into through a temporary table, which cost more than the read it saves.)"""


def _stored(conn: sqlite3.Connection, ids: list[str]) -> dict[str, tuple[str, int, int]]:
    """Event id -> (stream, revision, position) of those already stored."""
    found: dict[str, tuple[str, int, int]] = {}
    for start in range(0, len(ids), 500):
        chunk = ids[start : start + 500]
        marks = ", ".join("?" * len(chunk))
        for id_, stream, revision, position in conn.execute(
            f"SELECT id, stream, revision, position FROM events WHERE id IN ({marks})", chunk
        ):
            found[id_] = (stream, revision, position)
    return found


def _idempotent(
    stream: str,
    rows: list[_Row],
    expected: Expected,
    actual: int | None,
    stored: dict[str, tuple[str, int, int]],
) -> AppendResult:
    for id_, (other, _, _) in stored.items():
        if other != stream:
            raise DuplicateEventId(stream, id_, other)
    if len(stored) == len(rows):
        revisions = [stored[row[0]][1] for row in rows]
        first = revisions[0]
        if revisions == list(range(first, first + len(rows))) and _matched_first_time(expected, first):
            return AppendResult(revisions[-1], stored[rows[-1][0]][2], already_stored=True)
    raise WrongExpectedVersion(stream, expected, actual)


def _matched_first_time(expected: Expected, first: int) -> bool:
    """Whether ``expected`` held when the stored events were appended at revision ``first``."""
    if expected is ANY:
        return True
    if expected is NO_STREAM:
        return first == 0
    if expected is STREAM_EXISTS:
        return first > 0
    return first == expected + 1 if isinstance(expected, int) else False


def _check_expected(stream: str, expected: Expected, actual: int | None) -> None:
    if expected is ANY:
        return
    if expected is NO_STREAM:
        ok = actual is None
    elif expected is STREAM_EXISTS:
        ok = actual is not None
    else:
        ok = actual == expected
    if not ok:
        raise WrongExpectedVersion(stream, expected, actual)


def _read_all(
    conn: sqlite3.Connection, after: int | None, event_filter: EventFilter | None, limit: int | None
) -> tuple[list[RecordedEvent], int | None]:
    """Events after ``after`` and the position up to which ``$all`` was looked at."""
    head: int | None = conn.execute("SELECT max(position) FROM events").fetchone()[0]
    start = after if after is not None else 0
    if head is None or head <= start or limit == 0:
        return [], after
    where, params = filter_sql(event_filter)
    rows = conn.execute(
        f"SELECT {EVENT_COLUMNS} FROM events WHERE position > ? AND position <= ?{where}"
        " ORDER BY position LIMIT ?",
        [start, head, *params, -1 if limit is None else limit],
    ).fetchall()
    scanned = rows[-1][0] if limit is not None and len(rows) == limit else head
    return [to_event(row) for row in rows], scanned


def _translate(exc: Exception) -> Exception:
    if isinstance(exc, sqlite3.IntegrityError):
        return EventStoreError(f"rejected by the event store: {exc}")
    if isinstance(exc, sqlite3.Error):
        return outage("event store error", exc)
    return exc


def outage(what: str, exc: BaseException) -> EventStoreUnavailable:
    """The error for a store that cannot do its work now: :class:`EventStoreFull`
    when the disk is full (a 507 at the API), else :class:`EventStoreUnavailable`."""
    if is_storage_full(exc):
        return EventStoreFull(exc)
    return EventStoreUnavailable(f"{what}: {exc}")
