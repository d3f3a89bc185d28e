"""The shape every projection module fills in."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol

from orderstream.readstore.base import CollectionSchema, Document


class ProjectionError(ValueError):
    """An event a projection cannot fold (bad data, a change to a document it never
    saw created, an event type it does not handle). The runner nacks it for retry;
    after the retry limit the event store parks it."""


def stream_id(event: ProjectedEvent, category: str) -> str:
    """The aggregate id of ``{category}-{id}``; any other stream is a :class:`ProjectionError`."""
    found, _, ident = event.stream.partition("-")
    if found != category or not ident:
        raise ProjectionError(f"{event.stream} is not a stream of category {category!r}")
    return ident


class ProjectedEvent(Protocol):
    """What a projection sees of an event: its type, its data as a dict at the
    current schema version, and where it sits."""

    @property
    def type(self) -> str: ...

    @property
    def stream(self) -> str: ...

    @property
    def revision(self) -> int: ...

    @property
    def position(self) -> int: ...

    @property
    def data(self) -> Mapping[str, Any]: ...

    @property
    def recorded_at_iso(self) -> str: ...


class Projection(Protocol):
    @property
    def schema(self) -> CollectionSchema: ...

    @property
    def handles(self) -> frozenset[str]:
        """Event type names this projection folds."""
        ...

    @property
    def categories(self) -> tuple[str, ...]:
        """Stream categories it subscribes to."""
        ...

    @property
    def contiguous(self) -> bool:
        """True when each document is fed by exactly one stream and its version is
        that stream's revision, so a document at version ``v`` has folded every
        event of its stream (of a handled type) up to ``v``. The runner then never
        folds an event onto a document that missed earlier events of its stream: it
        reads the missing ones from the event store and folds them first (a live
        runner and a rebuild writing the same table cannot leave holes)."""
        ...

    def document_id(self, event: ProjectedEvent) -> str: ...

    def fold(self, document: Document | None, event: ProjectedEvent) -> Document | None:
        """The new document, or ``None`` to delete it. Must be pure and must not
        mutate ``document``."""
        ...
