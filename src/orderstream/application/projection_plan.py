"""The projection planner: a batch of events and the documents it touches -> the writes to make.

Pure: no I/O. The runner (:mod:`orderstream.application.projection_runner`) reads
what a plan needs (the stored documents, one ``get_many``; the events a document
missed, see :func:`gaps`) and writes and settles what it says.

- :func:`decode` groups a batch by document; an event that cannot be decoded fails.
- :func:`plan` folds each document's events in order onto the stored document,
  skipping those at or below its stored version (redelivery and replay are
  harmless), and makes one write per document. An event whose fold fails fails;
  with ``hold`` (a live group, which will deliver it again) the events after it in
  its stream are *held*, so that they come after its retry, never before it.
- Gaps. For a ``contiguous`` projection (one stream per document, version = stream
  revision) an event is never folded onto a document that missed earlier events of
  its stream: the missing ones (read by the runner, :func:`gaps`) are folded first.
  This is what keeps a same-version rebuild and the live runner, which take turns
  on the new table around the alias switch, from leaving holes.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import msgspec

from orderstream.events import EventRegistry
from orderstream.events import registry as default_registry
from orderstream.eventstore.base import RecordedEvent
from orderstream.readstore.base import Delete, Document, Stored, Upsert, WriteOp
from projections.base import Projection

log = logging.getLogger(__name__)
_encoder = msgspec.json.Encoder()


@dataclass(frozen=True, slots=True)
class EventView:
    """A recorded event as a projection sees it (:class:`projections.base.ProjectedEvent`)."""

    type: str
    stream: str
    revision: int
    position: int
    data: Mapping[str, Any]
    recorded_at_iso: str

    @classmethod
    def from_recorded(cls, recorded: RecordedEvent, registry: EventRegistry = default_registry) -> EventView:
        """Decode the data at the current schema version (upcasting older ones)."""
        return cls(
            type=recorded.type,
            stream=recorded.stream,
            revision=recorded.revision,
            position=recorded.position,
            data=registry.decode_raw(recorded),
            recorded_at_iso=iso(recorded.recorded_at),
        )


def iso(moment: datetime) -> str:
    """UTC ISO 8601 with a ``Z``, as msgspec writes datetimes in event data."""
    return moment.astimezone(UTC).isoformat().replace("+00:00", "Z")


def fold_events(
    projection: Projection, document: Document | None, version: int | None, events: Iterable[EventView]
) -> tuple[Document | None, int | None, int]:
    """Fold ``events`` (of one document, in order) onto a document stored at
    ``version``, skipping every event at or below the version reached so far.

    Returns the new document, its version and how many events were applied. The
    same events folded twice change nothing the second time.
    """
    applied = 0
    for event in events:
        if version is not None and event.revision <= version:
            continue
        document = projection.fold(document, event)
        version = event.revision
        applied += 1
    return document, version, applied


@dataclass(slots=True)
class Write:
    op: WriteOp
    events: list[RecordedEvent]
    """The events this write carries: done once it is written."""
    applied: int


@dataclass(slots=True)
class Plan:
    """A batch folded in memory, not yet written."""

    writes: list[Write] = field(default_factory=list)
    done: list[RecordedEvent] = field(default_factory=list)
    """Nothing to write for these (already applied), or written already."""
    failed: list[tuple[RecordedEvent, str]] = field(default_factory=list)
    held: list[RecordedEvent] = field(default_factory=list)
    """Events after a failed one of their stream: not folded, handed back so that
    they come again after the failed event's retry (never before it)."""

    @property
    def applied(self) -> int:
        return sum(w.applied for w in self.writes)


@dataclass(slots=True)
class Decoded:
    """A batch grouped by document, in delivery order."""

    by_document: dict[str, list[tuple[RecordedEvent, EventView]]]
    failed: list[tuple[RecordedEvent, str]]


@dataclass(frozen=True, slots=True)
class Gap:
    """Revisions ``start`` up to (not including) ``end`` of ``stream`` that a document
    has not seen before the batch's event at ``end``."""

    stream: str
    start: int
    end: int


Missing = Mapping[Gap, Sequence[RecordedEvent]]


def decode(projection: Projection, registry: EventRegistry, events: Sequence[RecordedEvent]) -> Decoded:
    decoded = Decoded(by_document={}, failed=[])
    for recorded in events:
        try:
            view = EventView.from_recorded(recorded, registry)
            doc_id = projection.document_id(view)
        except Exception as exc:
            decoded.failed.append((recorded, f"cannot decode: {type(exc).__name__}: {exc}"))
            continue
        decoded.by_document.setdefault(doc_id, []).append((recorded, view))
    return decoded


def gaps(projection: Projection, decoded: Decoded, stored: Mapping[str, Stored]) -> list[Gap]:
    """The missed revisions to read before :func:`plan` (a contiguous projection only)."""
    if not projection.contiguous:
        return []
    found = []
    for doc_id, items in decoded.by_document.items():
        known = stored.get(doc_id)
        following = 0 if known is None else known.version + 1
        for _, view in items:
            if view.revision > following:
                found.append(Gap(view.stream, following, view.revision))
            following = max(following, view.revision + 1)
    return found


def plan(
    projection: Projection,
    registry: EventRegistry,
    decoded: Decoded,
    stored: Mapping[str, Stored],
    missing: Missing,
    *,
    hold: bool,
) -> Plan:
    """Fold a decoded batch onto the ``stored`` documents (see the module docstring)."""
    result = Plan(failed=list(decoded.failed))
    failed_at: dict[str, int] = {}
    """Stream -> position of its first failed event in this batch (with ``hold``)."""
    if hold:
        for recorded, _ in decoded.failed:
            failed_at.setdefault(recorded.stream, recorded.position)
    for doc_id, items in decoded.by_document.items():
        known = stored.get(doc_id)
        document = known.document if known else None
        version = known.version if known else None
        carried: list[RecordedEvent] = []
        applied = 0
        # The next stream revision this document has not dealt with (applied or failed).
        following = 0 if version is None else version + 1
        for recorded, view in items:
            if recorded.position > failed_at.get(recorded.stream, recorded.position):
                result.held.append(recorded)
                continue
            if version is not None and view.revision <= version:
                carried.append(recorded)  # seen before (redelivery, replay): nothing to do
                continue
            if projection.contiguous and view.revision > following:
                gap = Gap(view.stream, following, view.revision)
                document, version, count = _fill_gap(projection, registry, document, version, gap, missing)
                applied += count
            following = max(following, view.revision + 1)
            try:
                folded, version_after, count = fold_events(projection, document, version, [view])
                if count and folded is not None:
                    _encoder.encode(folded)  # a document that is not JSON fails its event here
            except Exception as exc:
                result.failed.append((recorded, f"fold failed: {type(exc).__name__}: {exc}"))
                if hold:
                    failed_at.setdefault(recorded.stream, recorded.position)
                continue
            document, version = folded, version_after
            applied += count
            carried.append(recorded)
        if applied and version is not None:
            op: WriteOp = (
                Delete(id=doc_id, version=version)
                if document is None
                else Upsert(id=doc_id, version=version, document=document)
            )
            result.writes.append(Write(op=op, events=carried, applied=applied))
        else:
            result.done.extend(carried)
    return result


def _fill_gap(
    projection: Projection,
    registry: EventRegistry,
    document: Document | None,
    version: int | None,
    gap: Gap,
    missing: Missing,
) -> tuple[Document | None, int | None, int]:
    """Fold the events read for ``gap`` onto ``document``. One that cannot be folded
    is passed over, as in a batch: it fails (and is parked) on its own delivery."""
    applied = 0
    read = missing.get(gap, ())
    for recorded in read:
        if recorded.revision >= gap.end:
            break
        if recorded.type not in projection.handles:
            continue
        try:
            view = EventView.from_recorded(recorded, registry)
            folded, version_after, count = fold_events(projection, document, version, [view])
            if count and folded is not None:
                _encoder.encode(folded)
        except Exception as exc:
            log.warning(
                "%s: %s@%d (%s) passed over while filling a gap: %s",
                projection.schema.name,
                recorded.stream,
                recorded.revision,
                recorded.type,
                exc,
            )
            continue
        document, version = folded, version_after
        applied += count
    if read:
        log.info(
            "%s: %s was at revision %s, folded %d missed event(s) before revision %d",
            projection.schema.name,
            gap.stream,
            gap.start - 1,
            applied,
            gap.end,
        )
    return document, version, applied
