"""The read store port: documents per projection, queried by one query description.

A *collection* is a projection's logical name (``"orders"``). Each backend keeps
it in a physical table / index named after the projection version and points
the logical name at it (an alias), so a rebuild can fill a new version while
queries keep reading the old one, then switch atomically.

Writes are idempotent and order-safe: every document carries the ``version``
it was written at (the stream revision of the last event applied), and a write
whose version is not greater than the stored one changes nothing.

``tests/contract/test_read_store.py`` is the executable form of this page.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence
from typing import Any, Generic, Literal, Protocol, TypeVar

import msgspec

from orderstream.application.errors import ServiceUnavailable, StorageFull

Document = dict[str, Any]
T = TypeVar("T")


class FieldKind(enum.Enum):
    KEYWORD = "keyword"
    """Exact value: filter, sort, facet."""
    TEXT = "text"
    """Full-text searched by ``Query.text``."""
    INTEGER = "integer"
    """Filter (exact or range), sort."""
    DATETIME = "datetime"
    """ISO 8601 string; sort and range filter."""


class FieldGroup(msgspec.Struct, frozen=True, kw_only=True):
    """An object field indexed for analysis, described field by field.

    ``nested``: the field holds a list of objects whose fields belong together
    (an order line's ``sku`` with its own ``quantity``); Elasticsearch then indexes
    each object as its own hidden document, so a query or aggregation never pairs
    one line's SKU with another line's quantity. A plain group (an address, an
    amount with its currency) is flattened into dotted fields (``total.currency``)."""

    fields: Mapping[str, FieldKind | FieldGroup]
    nested: bool = False


class CollectionSchema(msgspec.Struct, frozen=True, kw_only=True):
    """What a backend must know to store and query a projection's documents."""

    name: str
    version: int
    id_field: str
    fields: Mapping[str, FieldKind]
    """Top-level document fields that are queried. Other fields are stored as they are."""
    default_sort: tuple[SortField, ...]
    analysis: Mapping[str, FieldKind | FieldGroup] = msgspec.field(default_factory=dict)
    """Document fields indexed for analysts (Kibana, aggregations over the indices)
    but never queried through this port. A backend with a document mapping
    (Elasticsearch) indexes them; SQLite keeps them in the stored JSON as they are.
    A KEYWORD here may hold a list of values (a keyword array); a TEXT here is
    also indexed whole as a keyword (``.keyword``) so it can be counted."""

    def __post_init__(self) -> None:
        both = set(self.fields) & set(self.analysis)
        if both:
            raise ValueError(f"{self.name}: {sorted(both)} both queried and analysis-only")

    def physical_name(self, version: int | None = None, suffix: str | None = None) -> str:
        """``orders_v3``; with a suffix (a rebuild of the same version) ``orders_v3_<suffix>``."""
        base = f"{self.name}_v{version if version is not None else self.version}"
        return f"{base}_{suffix}" if suffix else base


class SortField(msgspec.Struct, frozen=True):
    field: str
    descending: bool = False


class Range(msgspec.Struct, frozen=True, kw_only=True):
    gte: int | str | None = None
    lte: int | str | None = None


FilterValue = str | int | Sequence[str] | Range


class Query(msgspec.Struct, frozen=True, kw_only=True):
    """One query, translated by each backend.

    ``filters``: field -> value (exact), list of values (any of), or :class:`Range`;
    all filters must hold. ``text``: full-text over the TEXT fields. ``sort``:
    fields in order; the id field is always the last tie-breaker (in the direction
    of the last sort field) so cursors are stable. ``cursor``: the opaque
    ``next_cursor`` of the previous page.

    Counting costs time proportional to the number of matches, paging does not
    (a page is read from an index in sort order), so nothing is counted unless
    asked: ``facets``: KEYWORD fields to count values of, over all matches (not just
    the page); ``count``: fill :attr:`Page.total`. Either one fills ``total``.
    """

    filters: Mapping[str, FilterValue] = msgspec.field(default_factory=dict)
    text: str | None = None
    sort: tuple[SortField, ...] = ()
    limit: int = 20
    cursor: str | None = None
    facets: tuple[str, ...] = ()
    count: bool = False


class Page(msgspec.Struct, Generic[T], frozen=True, kw_only=True):
    items: list[T]
    """The page's documents: dicts from :meth:`ReadStore.query`, the asked type from
    :meth:`ReadStore.query_as`."""
    next_cursor: str | None
    facets: dict[str, dict[str, int]] = msgspec.field(default_factory=dict)
    total: int | None = None
    """Number of matches, when the query asked for ``count`` or ``facets``; else ``None``."""


class InvalidQuery(Exception):
    """A filter or sort on a field the schema does not declare, a bad cursor, ..."""


class ReadStoreUnavailable(ServiceUnavailable):
    """The read store cannot be reached or read now (server down, database locked
    past the busy timeout): worth retrying, so the API answers 503 + ``Retry-After``."""


class ReadStoreFull(ReadStoreUnavailable, StorageFull):
    """The read store's disk is full: projections hold their events and retry
    (reads still work); see :class:`~orderstream.application.errors.StorageFull`."""


class CollectionNotFound(LookupError):
    """A write or alias switch names a collection / physical table that was never ensured
    (or was dropped)."""


class WriteOutcome(enum.Enum):
    WRITTEN = "written"
    STALE = "stale"
    """The stored document already has this version or a newer one: nothing changed."""


class Upsert(msgspec.Struct, frozen=True, kw_only=True):
    id: str
    version: int
    document: Document


class Delete(msgspec.Struct, frozen=True, kw_only=True):
    """Conditional like :class:`Upsert`. The version is kept (a tombstone) so an
    older event delivered after the delete stays STALE and cannot resurrect it."""

    id: str
    version: int


WriteOp = Upsert | Delete


class Stored(msgspec.Struct, frozen=True, kw_only=True):
    """A document as :meth:`ReadStore.get_many` finds it: its version, and the
    document itself (``None`` for a tombstone)."""

    version: int
    document: Document | None


class ReadCheckpoint(msgspec.Struct, frozen=True, kw_only=True):
    """How far a projection's group had applied into one physical collection, kept
    *with* the read model (same SQLite file; an Elasticsearch document), so that a read
    model that is lost (a deleted file or index) is noticed: its checkpoint is gone too."""

    group: str
    position: int | None
    """Every event of the projection at or below it is applied (``None``: nothing yet)."""
    refill_until: int | None = None
    """Set when the read model was found lost and is filled again from the beginning:
    the head position then. Cleared once ``position`` reaches it."""


class ReadStore(Protocol):
    async def ensure_collection(
        self, schema: CollectionSchema, *, version: int | None = None, suffix: str | None = None
    ) -> str:
        """Create the physical table/index ``schema.physical_name(version, suffix)``
        if it is missing; the first one created also becomes the alias target.
        Returns the physical name."""
        ...

    async def get(self, collection: str, doc_id: str, *, physical: str | None = None) -> Document | None:
        """Read through the alias (or from ``physical``, for a rebuild)."""
        ...

    async def get_version(self, collection: str, doc_id: str, *, physical: str | None = None) -> int | None:
        """The stored version of a document (``None`` if absent; a deleted
        document may still report its tombstone's version)."""
        ...

    async def get_many(
        self, collection: str, doc_ids: Sequence[str], *, physical: str | None = None
    ) -> dict[str, Stored]:
        """The stored version and document of each of ``doc_ids`` that is stored, in
        one round trip: what a projection folds a batch onto. It sees every write made
        so far (the writer's view, like :meth:`get_version`); absent ids are left out."""
        ...

    async def write(
        self, collection: str, ops: Sequence[WriteOp], *, physical: str | None = None
    ) -> list[WriteOutcome]:
        """Apply ops in order, each conditional on its version. ``physical``
        writes to a specific table/index (rebuild) instead of the alias target."""
        ...

    async def query(self, collection: str, query: Query) -> Page[Document]:
        """A page of documents as stored (dicts): ``query_as(collection, query, Document)``."""
        ...

    async def query_as(self, collection: str, query: Query, as_type: type[T]) -> Page[T]:
        """A page whose documents are decoded straight into ``as_type`` (a msgspec Struct,
        such as the API's view of an order), with no dict in between: what a store holds
        as JSON (SQLite's column, Elasticsearch's ``_source``) is decoded once, into the
        type the answer is made of. Decoded as ``msgspec.convert(doc, as_type,
        strict=False)`` would: stored fields the type does not declare are skipped, ISO
        strings become datetimes, a missing field takes the type's default; a document the
        type cannot hold raises ``msgspec.ValidationError``."""
        ...

    async def get_as(self, collection: str, doc_id: str, as_type: type[T]) -> T | None:
        """One document through the alias, decoded into ``as_type`` as :meth:`query_as`
        decodes; ``None`` if absent."""
        ...

    async def switch_alias(self, collection: str, physical: str) -> str | None:
        """Point the alias at ``physical`` atomically; returns the previous target."""
        ...

    async def alias_target(self, collection: str) -> str | None: ...

    async def drop_physical(self, physical: str) -> None:
        """Drop the table/index and its checkpoint."""
        ...

    async def read_checkpoint(self, physical: str) -> ReadCheckpoint | None:
        """The checkpoint stored with ``physical``; ``None`` if there is none (a new or
        lost collection, or one made before checkpoints were kept)."""
        ...

    async def write_checkpoint(self, physical: str, checkpoint: ReadCheckpoint) -> None: ...

    async def refresh(self, collection: str) -> None:
        """Make every write so far visible to queries (no-op where writes are
        visible at once)."""
        ...

    async def close(self) -> None: ...


SortOrder = Literal["asc", "desc"]
