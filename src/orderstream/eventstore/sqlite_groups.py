"""Persistent subscription groups for the SQLite event store: the SQL side.

Every function here is synchronous and takes a connection: the ``*_tx`` ones run
on the store's write connection inside the writer's transaction (one SAVEPOINT
each), the others on a read connection. See :mod:`orderstream.eventstore.sqlite`
for the semantics; in short:

- ``subscription_events`` holds, per group, every matching event between the
  checkpoint and the scan cursor that is not finished (``pending`` or
  ``inflight``), plus the ``parked`` ones. Acked and skipped rows are deleted.
- A claim first *fills* (copies matching events after the cursor, at most
  :data:`WINDOW` unfinished rows per group), then *expires* leases whose ack
  timeout passed, then hands out *runs*: of the streams that have nothing in
  flight, oldest first, each one's pending rows in revision order (at most
  :data:`RUN` of them), until ``limit`` rows are handed out (the first run goes
  whole). A hot stream's events then go out many at a time instead of one per
  claim and settle, and other consumers still find streams to take.
- A nack (RETRY or PARK) of event k of a run hands the events after k that the
  same consumer still holds back to pending, taking back their delivery count:
  they were never looked at, and delivering them before k again would break the
  stream's order.
"""

from __future__ import annotations

import json
import sqlite3
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from orderstream.eventstore.base import (
    EventFilter,
    GroupInfo,
    NackAction,
    ParkedEvent,
    ParkedEventNotFound,
    RecordedEvent,
    SkippedEvent,
    SubscriptionGroupExists,
    SubscriptionGroupNotFound,
    SubscriptionSettings,
)
from orderstream.eventstore.sqlite_schema import EVENT_COLUMNS, event_columns, filter_sql, to_event

WINDOW = 1000
"""Unfinished (pending + in flight) rows a group keeps materialised at most."""

RUN = 256
"""Events of one stream handed out in one claim at most (a projection's batch)."""


@dataclass(frozen=True, slots=True)
class Group:
    name: str
    filter: EventFilter
    from_position: int | None
    max_retry: int
    ack_timeout_seconds: float
    cursor: int

    @property
    def start(self) -> int:
        return self.from_position if self.from_position is not None else 0


@dataclass(frozen=True, slots=True)
class Claimed:
    event: RecordedEvent
    attempt: int
    lease_expires: float


def _now_iso() -> str:
    return datetime.now(UTC).isoformat()


def load_group(conn: sqlite3.Connection, name: str) -> Group:
    row = conn.execute(
        "SELECT categories, types, from_position, max_retry, ack_timeout_seconds, cursor"
        " FROM subscription_groups WHERE name = ?",
        (name,),
    ).fetchone()
    if row is None:
        raise SubscriptionGroupNotFound(name)
    categories, types, from_position, max_retry, ack_timeout, cursor = row
    return Group(
        name=name,
        filter=EventFilter(categories=tuple(json.loads(categories)), types=tuple(json.loads(types))),
        from_position=from_position,
        max_retry=max_retry,
        ack_timeout_seconds=ack_timeout,
        cursor=cursor,
    )


# ------------------------------------------------------------------ writes (writer thread)


def create_tx(conn: sqlite3.Connection, name: str, settings: SubscriptionSettings, *, exist_ok: bool) -> None:
    if conn.execute("SELECT 1 FROM subscription_groups WHERE name = ?", (name,)).fetchone():
        if exist_ok:
            return
        raise SubscriptionGroupExists(name)
    if settings.ack_timeout_seconds <= 0:
        raise ValueError("ack_timeout_seconds must be positive")
    conn.execute(
        "INSERT INTO subscription_groups (name, categories, types, from_position, max_retry,"
        " ack_timeout_seconds, cursor, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
        (
            name,
            json.dumps(list(settings.filter.categories)),
            json.dumps(list(settings.filter.types)),
            settings.from_position,
            max(1, settings.max_retry),
            settings.ack_timeout_seconds,
            settings.from_position if settings.from_position is not None else 0,
            _now_iso(),
        ),
    )


def delete_tx(conn: sqlite3.Connection, name: str) -> None:
    conn.execute("DELETE FROM subscription_events WHERE group_name = ?", (name,))
    if conn.execute("DELETE FROM subscription_groups WHERE name = ?", (name,)).rowcount == 0:
        raise SubscriptionGroupNotFound(name)


def _fill(conn: sqlite3.Connection, group: Group) -> None:
    """Copy matching events after the scan cursor, keeping at most WINDOW unfinished rows."""
    unfinished = conn.execute(
        "SELECT count(*) FROM subscription_events WHERE group_name = ? AND state != 'parked'",
        (group.name,),
    ).fetchone()[0]
    room = WINDOW - unfinished
    if room <= 0:
        return
    head = conn.execute("SELECT max(position) FROM events").fetchone()[0]
    if head is None or head <= group.cursor:
        return
    where, params = filter_sql(group.filter)
    rows = conn.execute(
        f"SELECT position, stream FROM events WHERE position > ? AND position <= ?{where}"
        " ORDER BY position LIMIT ?",
        [group.cursor, head, *params, room],
    ).fetchall()
    conn.executemany(
        "INSERT INTO subscription_events (group_name, position, stream, state) VALUES (?, ?, ?, 'pending')",
        [(group.name, position, stream) for position, stream in rows],
    )
    # Fewer rows than room: everything up to head was scanned (non-matching events are done).
    cursor = rows[-1][0] if len(rows) == room else head
    conn.execute("UPDATE subscription_groups SET cursor = ? WHERE name = ?", (cursor, group.name))


def _expire(conn: sqlite3.Connection, group: Group, now: float) -> None:
    """In-flight events whose lease ran out count as a failed delivery."""
    conn.execute(
        "UPDATE subscription_events SET"
        " state = CASE WHEN attempts >= ? THEN 'parked' ELSE 'pending' END,"
        " reason = CASE WHEN attempts >= ? THEN 'no ack within ' || ? || ' s after ' || attempts"
        "   || ' deliveries' ELSE reason END,"
        " parked_at = CASE WHEN attempts >= ? THEN ? ELSE parked_at END,"
        " lease_expires = NULL"
        " WHERE group_name = ? AND state = 'inflight' AND lease_expires <= ?",
        (
            group.max_retry,
            group.max_retry,
            group.ack_timeout_seconds,
            group.max_retry,
            _now_iso(),
            group.name,
            now,
        ),
    )


def claim_tx(conn: sqlite3.Connection, name: str, consumer: str, limit: int, now: float) -> list[Claimed]:
    """Hand ``consumer`` whole runs (each a stream's pending events in order, at most
    :data:`RUN`) of streams with nothing in flight, oldest first, until ``limit``
    events are handed out: at least one run, however long."""
    group = load_group(conn, name)
    _fill(conn, group)
    _expire(conn, group, now)
    streams = [
        row[0]
        for row in conn.execute(
            # Each candidate costs two index seeks, so a full window (WINDOW rows) takes ~1 ms.
            "SELECT e.stream FROM subscription_events e INDEXED BY subscription_events_by_state"
            " WHERE e.group_name = ? AND e.state = 'pending'"
            " AND NOT EXISTS (SELECT 1 FROM subscription_events o INDEXED BY subscription_events_by_stream"
            "   WHERE o.group_name = e.group_name AND o.stream = e.stream AND o.state = 'pending'"
            "   AND o.position < e.position)"
            " AND NOT EXISTS (SELECT 1 FROM subscription_events o INDEXED BY subscription_events_by_stream"
            "   WHERE o.group_name = e.group_name AND o.stream = e.stream AND o.state = 'inflight')"
            " ORDER BY e.position LIMIT ?",
            (name, limit),
        )
    ]
    positions: list[int] = []
    for stream in streams:
        if len(positions) >= limit:  # whole runs only; streams left over go to other consumers
            break
        positions += [
            row[0]
            for row in conn.execute(
                "SELECT position FROM subscription_events INDEXED BY subscription_events_by_stream"
                " WHERE group_name = ? AND stream = ? AND state = 'pending' ORDER BY position LIMIT ?",
                (name, stream, RUN),
            )
        ]
    if not positions:
        return []
    lease_expires = now + group.ack_timeout_seconds
    marks = ", ".join("?" * len(positions))
    conn.execute(
        "UPDATE subscription_events SET state = 'inflight', consumer = ?, lease_expires = ?,"
        f" attempts = attempts + 1 WHERE group_name = ? AND position IN ({marks})",
        [consumer, lease_expires, name, *positions],
    )
    attempts = dict(
        conn.execute(
            "SELECT position, attempts FROM subscription_events"
            f" WHERE group_name = ? AND position IN ({marks})",
            [name, *positions],
        ).fetchall()
    )
    rows = conn.execute(
        f"SELECT {EVENT_COLUMNS} FROM events WHERE position IN ({marks}) ORDER BY position", positions
    ).fetchall()
    return [Claimed(to_event(row), attempts[row[0]], lease_expires) for row in rows]


def settle_tx(
    conn: sqlite3.Connection,
    name: str,
    consumer: str,
    position: int,
    action: NackAction | None,
    reason: str,
) -> None:
    """Ack (``action`` None) or nack one event delivered to ``consumer``.

    Only the consumer holding the event may settle it; an ack or nack that
    arrives after the lease was taken over by another consumer changes nothing
    (the event was, or will be, delivered again).
    """
    row = conn.execute(
        "SELECT s.state, s.attempts, g.max_retry FROM subscription_events s"
        " JOIN subscription_groups g ON g.name = s.group_name"
        " WHERE s.group_name = ? AND s.position = ? AND s.consumer = ?",
        (name, position, consumer),
    ).fetchone()
    if row is None:
        return
    state, attempts, max_retry = row
    if state == "parked" or (state == "pending" and action is not None):
        return  # lease expired: the event is someone else's business now
    key = (name, position)
    if action is None or action is NackAction.SKIP:
        conn.execute("DELETE FROM subscription_events WHERE group_name = ? AND position = ?", key)
    elif action is NackAction.PARK or attempts >= max_retry:
        if action is NackAction.RETRY:
            reason = f"{reason or 'retried'} (parked after {attempts} deliveries)"
        conn.execute(
            "UPDATE subscription_events SET state = 'parked', reason = ?, parked_at = ?, consumer = NULL,"
            " lease_expires = NULL WHERE group_name = ? AND position = ?",
            (reason, _now_iso(), *key),
        )
    else:
        conn.execute(
            "UPDATE subscription_events SET state = 'pending', reason = ?, consumer = NULL,"
            " lease_expires = NULL WHERE group_name = ? AND position = ?",
            (reason, *key),
        )
    if action is not None and action is not NackAction.SKIP:
        _return_rest_of_run(conn, name, consumer, position)


def ack_many_tx(conn: sqlite3.Connection, name: str, consumer: str, positions: list[int]) -> None:
    """Ack several events delivered to ``consumer`` in one statement per 500, as
    :func:`settle_tx` acks one: an event whose lease another consumer took over (or
    that is parked) is left alone."""
    for start in range(0, len(positions), 500):
        chunk = positions[start : start + 500]
        conn.execute(
            "DELETE FROM subscription_events WHERE group_name = ? AND consumer = ? AND state != 'parked'"
            f" AND position IN ({', '.join('?' * len(chunk))})",
            [name, consumer, *chunk],
        )


def _return_rest_of_run(conn: sqlite3.Connection, name: str, consumer: str, position: int) -> None:
    """The events after ``position`` in its stream that ``consumer`` holds go back to
    pending uncounted: the consumer must not handle them before the nacked one."""
    conn.execute(
        "UPDATE subscription_events SET state = 'pending', attempts = max(attempts - 1, 0),"
        " consumer = NULL, lease_expires = NULL"
        " WHERE group_name = ? AND consumer = ? AND state = 'inflight' AND position > ?"
        " AND stream = (SELECT stream FROM subscription_events WHERE group_name = ? AND position = ?)",
        (name, consumer, position, name, position),
    )


def touch_tx(conn: sqlite3.Connection, name: str, consumer: str, now: float) -> tuple[float, set[int]]:
    """Renew the leases of every event in flight at ``consumer`` (it is alive and still
    working on them); no delivery is counted. Returns the new expiry and the positions
    renewed.

    A lease that already ran out is NOT renewed: the consumer drops such an event from
    its buffer (it belongs to whoever claims it next), so renewing it would hold an event
    nobody processes, and with it the rest of its stream, for ever."""
    lease_expires = now + load_group(conn, name).ack_timeout_seconds
    renewed = conn.execute(
        "UPDATE subscription_events SET lease_expires = ?"
        " WHERE group_name = ? AND consumer = ? AND state = 'inflight' AND lease_expires > ?"
        " RETURNING position",
        (lease_expires, name, consumer, now),
    ).fetchall()
    return lease_expires, {row[0] for row in renewed}


def release_tx(conn: sqlite3.Connection, name: str, consumer: str) -> None:
    """A consumer that closes hands its in-flight events back (the delivery still counts)."""
    conn.execute(
        "UPDATE subscription_events SET state = 'pending', consumer = NULL, lease_expires = NULL"
        " WHERE group_name = ? AND consumer = ? AND state = 'inflight'",
        (name, consumer),
    )


def replay_parked_tx(conn: sqlite3.Connection, name: str) -> int:
    load_group(conn, name)
    return conn.execute(
        "UPDATE subscription_events SET state = 'pending', attempts = 0, replayed = 1, reason = NULL,"
        " parked_at = NULL, consumer = NULL, lease_expires = NULL"
        " WHERE group_name = ? AND state = 'parked'",
        (name,),
    ).rowcount


def skip_parked_tx(conn: sqlite3.Connection, name: str, position: int, actor: str, reason: str) -> None:
    """Drop a parked event for good, recording who and why in ``subscription_skips``
    (in the same transaction). A skipped event is finished: it no longer holds the
    checkpoint, nor a projection's applied mark, back."""
    load_group(conn, name)
    row = conn.execute(
        "DELETE FROM subscription_events WHERE group_name = ? AND position = ? AND state = 'parked'"
        " RETURNING reason, attempts",
        (name, position),
    ).fetchone()
    if row is None:
        raise ParkedEventNotFound(name, position)
    conn.execute(
        "INSERT OR REPLACE INTO subscription_skips (group_name, position, actor, reason, parked_reason,"
        " attempts, skipped_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
        (name, position, actor, reason, row[0], row[1], _now_iso()),
    )


# ------------------------------------------------------------------ reads (reader threads)


def info(conn: sqlite3.Connection, name: str) -> GroupInfo:
    conn.execute("BEGIN")  # one snapshot for every figure
    try:
        group = load_group(conn, name)
        low, in_flight, parked, unfinished = conn.execute(
            "SELECT min(CASE WHEN state != 'parked' AND replayed = 0 THEN position END),"
            " count(CASE WHEN state = 'inflight' THEN 1 END),"
            " count(CASE WHEN state = 'parked' THEN 1 END),"
            " count(CASE WHEN state != 'parked' THEN 1 END)"
            " FROM subscription_events WHERE group_name = ?",
            (name,),
        ).fetchone()
        where, params = filter_sql(group.filter)
        unscanned, head = conn.execute(
            f"SELECT (SELECT count(*) FROM events WHERE position > ?{where}),"
            " (SELECT max(position) FROM events)",
            [group.cursor, *params],
        ).fetchone()
    finally:
        conn.execute("COMMIT")
    # Every matching event below the oldest unfinished one is finished; with none
    # unfinished, everything up to the scan cursor is.
    mark = low - 1 if low is not None else group.cursor
    return GroupInfo(
        group=name,
        checkpoint=mark if mark > group.start else None,
        last_position=head,
        in_flight=in_flight,
        parked=parked,
        lag_events=unfinished + unscanned,
    )


def list_parked(conn: sqlite3.Connection, name: str, limit: int) -> list[ParkedEvent]:
    conn.execute("BEGIN")
    try:
        load_group(conn, name)
        columns = event_columns("e")
        rows = conn.execute(
            f"SELECT {columns}, s.reason, s.attempts, s.parked_at FROM subscription_events s"
            " JOIN events e ON e.position = s.position"
            " WHERE s.group_name = ? AND s.state = 'parked' ORDER BY s.position LIMIT ?",
            (name, limit),
        ).fetchall()
    finally:
        conn.execute("COMMIT")
    return [_parked(row) for row in rows]


def list_skipped(
    conn: sqlite3.Connection, name: str, limit: int, *, position: int | None = None
) -> list[SkippedEvent]:
    """The group's skipped events (only the one at ``position``, if given)."""
    rows = conn.execute(
        f"SELECT {event_columns('e')}, s.actor, s.reason, s.parked_reason, s.attempts, s.skipped_at"
        " FROM subscription_skips s JOIN events e ON e.position = s.position"
        " WHERE s.group_name = ? AND (? IS NULL OR s.position = ?) ORDER BY s.position LIMIT ?",
        (name, position, position, limit),
    ).fetchall()
    skipped = []
    for row in rows:
        *event, actor, reason, parked_reason, attempts, skipped_at = row
        skipped.append(
            SkippedEvent(
                event=to_event(tuple(event)),
                actor=actor,
                reason=reason,
                parked_reason=parked_reason or "",
                attempts=attempts,
                skipped_at=datetime.fromisoformat(skipped_at),
            )
        )
    return skipped


def _parked(row: tuple[Any, ...]) -> ParkedEvent:
    *event, reason, attempts, parked_at = row
    return ParkedEvent(
        event=to_event(tuple(event)),
        reason=reason or "",
        attempts=attempts,
        parked_at=datetime.fromisoformat(parked_at),
    )


def has_work(conn: sqlite3.Connection, name: str, now: float) -> bool:
    """A cheap read-only guess whether a claim could hand anything out (or must fill/expire)."""
    row = conn.execute(
        "SELECT g.cursor < coalesce((SELECT max(position) FROM events), 0)"
        " OR EXISTS (SELECT 1 FROM subscription_events s WHERE s.group_name = g.name"
        "   AND (s.state = 'pending' OR (s.state = 'inflight' AND s.lease_expires <= ?)))"
        " FROM subscription_groups g WHERE g.name = ?",
        (now, name),
    ).fetchone()
    if row is None:
        raise SubscriptionGroupNotFound(name)
    return bool(row[0])
