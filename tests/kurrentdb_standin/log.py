"""The stand-in's in-memory transaction log: ``$all``, streams, expectations, links.

STAND-IN, NOT KURRENTDB. The behaviours below follow KurrentDB's documentation and the
assertions of kurrentdbclient's test suite (``tests/test_client.py`` of
github.com/pyeventsourcing/kurrentdbclient); each non-obvious one cites its source.
What could not be confirmed is listed in docs/kurrentdb.md ("What the stand-in can't
prove").
"""

from __future__ import annotations

import asyncio
import re
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

TICKS_PER_SECOND = 10_000_000
"""KurrentDB's "created" metadata is .NET ticks (100 ns) since the Unix epoch, as
the client reads it (``construct_recorded_event``: ``int(created) / 10000000``)."""

LINK_TYPE = "$>"
METADATA_TYPE = "$metadata"


@dataclass(frozen=True)
class Record:
    """One event in the log. Positions are byte offsets in the real server (increasing,
    not contiguous); here each record advances the position by its size plus a header,
    so neighbouring positions differ by more than one, as on a real server."""

    id: uuid.UUID
    stream: str
    revision: int
    type: str
    content_type: str
    data: bytes
    custom_metadata: bytes
    created: int
    position: int


@dataclass(frozen=True)
class Proposed:
    id: uuid.UUID
    type: str
    content_type: str
    data: bytes
    custom_metadata: bytes


class WrongVersion(Exception):
    """An append's or delete's expectation failed; ``current`` is the stream's last
    revision, ``None`` when the stream does not exist (or is deleted)."""

    def __init__(self, current: int | None) -> None:
        super().__init__(current)
        self.current = current


class StreamNotFound(Exception):
    """Deleting a stream that does not exist (NOT_FOUND on the wire: kurrentdbclient
    test_client.py ``test_stream_delete_with_any_current_version`` expects NotFoundError)."""


class Expect:
    """Expected stream state as the gRPC requests carry it."""

    ANY = "any"
    NO_STREAM = "no_stream"
    EXISTS = "stream_exists"


Expectation = int | str


@dataclass
class _Stream:
    records: list[Record] = field(default_factory=list)
    truncate_before: int = 0
    """``$tb``: revisions below are gone (a soft delete sets it past the last event)."""
    deleted: bool = False

    def visible(self) -> list[Record]:
        return [r for r in self.records if r.revision >= self.truncate_before]

    @property
    def last_revision(self) -> int | None:
        """What reads report as the current revision: ``None`` for a missing or
        soft-deleted stream (``get_current_version`` gives NO_STREAM after a delete)."""
        if self.deleted or not self.records:
            return None
        return self.records[-1].revision

    def check(self, expected: Expectation) -> None:
        """An append's expectation. A soft-deleted stream keeps its last revision for
        this: kurrentdbclient test_client.py ``test_stream_delete_with_any_current_version``
        appends after a delete with the pre-delete revision (and fails with the one
        before it). ``NO_STREAM`` on a soft-deleted stream is ASSUMED to succeed."""
        last = self.records[-1].revision if self.records else None
        if expected == Expect.NO_STREAM:
            ok = last is None or self.deleted
        elif expected == Expect.EXISTS:
            ok = self.last_revision is not None
        elif isinstance(expected, int):
            ok = expected == last
        else:
            ok = True
        if not ok:
            raise WrongVersion(last)


class Log:
    """All events in commit order, with per-stream indexes and a change signal for
    live subscriptions. Used from one event loop only."""

    def __init__(self) -> None:
        self.records: list[Record] = []
        self._streams: dict[str, _Stream] = {}
        self._next_position = 0
        self.changed = asyncio.Condition()
        # A real log starts with system records (epoch information), so no user
        # event is ever at position 0; the adapter relies on that (see its _append_events).
        self._write("$epoch-information", [_system("$epoch-information", b"{}")])

    # ------------------------------------------------------------------ writing

    def append(self, stream: str, events: Sequence[Proposed], expected: Expectation) -> tuple[int, int]:
        """Append atomically. Returns ``(last revision, commit position of the last
        event)``; each event has its own commit position (kurrentdbclient test_client.py
        ``test_stream_append_to_stream``).

        An idempotent re-append writes nothing and answers what the first append did
        (test_client.py ``test_stream_append_event_with_current_version``: "Idempotent
        write of event1, event2" returns event2's original commit position).
        Idempotency (KurrentDB docs, "Idempotence"): with an expected revision or
        NO_STREAM the events at the expected revisions are compared by id; with ANY or
        STREAM_EXISTS the first id is looked up (the server's id cache, best effort on a
        real server: ASSUMED here always to hit). All match -> already committed;
        some match -> WrongExpectedVersion (ASSUMED: the server's "corrupted idempotency").
        """
        s = self._streams.setdefault(stream, _Stream())
        already = self._already_written(s, events, expected)
        if already is not None:
            return already.revision, already.position
        s.check(expected)
        s.deleted = False
        last = self._write(stream, events)
        return last.revision, last.position

    def _already_written(
        self, s: _Stream, events: Sequence[Proposed], expected: Expectation
    ) -> Record | None:
        if not events or not s.records:
            return None
        if isinstance(expected, int) or expected == Expect.NO_STREAM:
            start = expected + 1 if isinstance(expected, int) else 0
            if start >= len(s.records) or s.records[start].revision != start:
                return None
        else:  # ANY, and STREAM_EXISTS, which the server checks like ANY once the stream exists
            first = next((r for r in s.records if r.id == events[0].id), None)
            if first is None:
                return None
            start = first.revision
        stored = s.records[start : start + len(events)]
        matching = [a.id == b.id for a, b in zip(stored, events, strict=False)]
        if matching and all(matching) and len(stored) == len(events):
            return stored[-1]
        if any(matching):
            raise WrongVersion(s.last_revision)
        return None

    def _write(self, stream: str, events: Sequence[Proposed]) -> Record:
        s = self._streams.setdefault(stream, _Stream())
        created = time.time_ns() // 100
        last: Record | None = None
        for e in events:
            revision = s.records[-1].revision + 1 if s.records else 0
            self._next_position += 64 + len(e.data) + len(e.custom_metadata)
            last = Record(
                id=e.id,
                stream=stream,
                revision=revision,
                type=e.type,
                content_type=e.content_type,
                data=e.data,
                custom_metadata=e.custom_metadata,
                created=created,
                position=self._next_position,
            )
            s.records.append(last)
            self.records.append(last)
        assert last is not None
        return last

    def write_system(self, stream: str, event_type: str, data: bytes, metadata: bytes = b"") -> Record:
        """A record the server writes itself (links, checkpoints): no expectation."""
        return self._write(stream, [_system(event_type, data, metadata)])

    def delete(self, stream: str, expected: Expectation) -> None:
        """Soft delete: the stream reads as not found; its events stay in ``$all`` until a
        scavenge (KurrentDB docs, "Deleting events")."""
        s = self._streams.get(stream)
        current = s.last_revision if s else None
        if (
            (expected == Expect.NO_STREAM and current is not None)
            or (expected == Expect.EXISTS and current is None)
            or (isinstance(expected, int) and expected != current)
        ):
            raise WrongVersion(current)
        if s is not None and s.deleted and expected == Expect.ANY:
            return  # deleting again is no error (test_stream_delete_with_any_current_version)
        if s is None or current is None:
            raise StreamNotFound(stream)
        s.truncate_before = current + 1
        s.deleted = True
        self.write_system(f"$${stream}", METADATA_TYPE, b'{"$tb":%d}' % s.truncate_before)

    def truncate(self, stream: str, before: int) -> None:
        """Set ``$tb`` (what the server does to a parked stream after replaying it)."""
        s = self._streams.setdefault(stream, _Stream())
        s.truncate_before = max(s.truncate_before, before)
        self.write_system(f"$${stream}", METADATA_TYPE, b'{"$tb":%d}' % before)

    async def notify(self) -> None:
        async with self.changed:
            self.changed.notify_all()

    # ------------------------------------------------------------------ reading

    def stream(self, stream: str) -> list[Record] | None:
        """The stream's readable events, ``None`` when it does not exist (or is deleted)."""
        s = self._streams.get(stream)
        if s is None or s.deleted or not s.records:
            return None
        return s.visible()

    def last_revision(self, stream: str) -> int | None:
        s = self._streams.get(stream)
        return s.last_revision if s else None

    def resolve(self, link: Record) -> Record | None:
        """The event a link (``$>``, data ``"{revision}@{stream}"``) points to."""
        revision, _, stream = link.data.decode().partition("@")
        records = self.stream(stream) or []
        return next((r for r in records if r.revision == int(revision)), None)

    def index_after(self, position: int | None, *, inclusive: bool) -> int:
        """Index into :attr:`records` of the first record after (or at) ``position``."""
        if position is None:
            return 0
        for i, r in enumerate(self.records):
            if r.position > position or (inclusive and r.position == position):
                return i
        return len(self.records)

    def scan(self, start: int, *, backwards: bool = False) -> Iterator[Record]:
        if backwards:
            yield from reversed(self.records[:start])
        else:
            yield from self.records[start:]


def _system(event_type: str, data: bytes, metadata: bytes = b"") -> Proposed:
    return Proposed(
        id=uuid.uuid4(), type=event_type, content_type="application/json", data=data, custom_metadata=metadata
    )


@dataclass(frozen=True)
class RegexFilter:
    """A server-side ``$all`` filter: a .NET regex on the stream name or the event type.
    The client's patterns (``^(...)$`` / ``^(?!(...$))``) are valid Python regexes too."""

    pattern: re.Pattern[str] | None
    prefixes: tuple[str, ...]
    by_stream_name: bool

    def matches(self, record: Record) -> bool:
        text = record.stream if self.by_stream_name else record.type
        if self.prefixes and not text.startswith(self.prefixes):
            return False
        return self.pattern is None or self.pattern.search(text) is not None
