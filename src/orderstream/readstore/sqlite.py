"""The embedded default read store: SQLite with FTS5.

Layout of the database file:

- ``physicals``: every physical table, the collection it belongs to and its schema (JSON).
- ``aliases``: collection -> physical table; switching is one ``UPDATE`` (atomic).
- one table per physical name (``orders_v2``): ``id``, ``version``, ``doc`` (JSON text,
  ``NULL`` for a tombstone left by a delete) and one column per declared KEYWORD /
  INTEGER / DATETIME field, filled from the document on write and indexed.
  DATETIME columns hold a normalised UTC form (``YYYY-MM-DDTHH:MM:SS.ffffffZ``)
  so that text order is time order whatever offset or precision the document used.
- ``<physical>__fts``: an FTS5 table over the TEXT fields, keyed by the rowid of
  the document row and kept in sync in the same transaction.

Every operation runs as one function on a single dedicated thread that owns the
connection, so an operation is one hop from the event loop and one transaction.
The database runs in WAL mode: other processes (the API, another runner) read
while one writes.
"""

from __future__ import annotations

import asyncio
import re
import sqlite3
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar, cast

import msgspec

from orderstream.application.errors import is_storage_full
from orderstream.readstore.base import (
    CollectionNotFound,
    CollectionSchema,
    Document,
    FieldKind,
    InvalidQuery,
    Page,
    Query,
    Range,
    ReadCheckpoint,
    ReadStoreFull,
    ReadStoreUnavailable,
    SortField,
    Stored,
    Upsert,
    WriteOp,
    WriteOutcome,
)
from orderstream.readstore.cursor import decode_cursor, encode_cursor, sort_signature

T = TypeVar("T")

MAX_LIMIT = 1000
_MAX_IDS = 500
"""Ids per ``IN (...)`` of :meth:`SqliteReadStore.get_many` (below SQLite's variable limit)."""
FACET_SIZE = 100
"""At most this many values per facet, the most frequent first."""
FEW_MATCHES = 2000
"""Below this many full-text matches a query sorts the matches; from it on, it walks
the rows in sort order instead (``_QueryPlan._walk``)."""
FEW_CACHE_SECONDS = 1.0
"""How long the answer "few or many matches?" is reused per search (``_QueryPlan._few_matches``)."""
WINDOW_ROWS_PER_RESULT = 16
MAX_WINDOW = 32_768
"""Rows per step of that walk: the first step takes 16 per row of the page (enough
for 1 match in 8), each next one 4x more, up to the most."""
MAX_PREFIX_WORDS = 32
"""A trailing prefix standing for at most this many words is searched as those words."""
PREFIX_CACHE_SECONDS = 1.0
"""How long the words a prefix stands for are reused (``_prefix_words``)."""
_PLAIN_WORD = re.compile(r"[a-z0-9]+")

_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,62}$")
_WORD = re.compile(r"[^\W_]", re.UNICODE)
_COLUMN_KINDS = (FieldKind.KEYWORD, FieldKind.INTEGER, FieldKind.DATETIME)
_SQL_TYPE = {FieldKind.KEYWORD: "TEXT", FieldKind.INTEGER: "INTEGER", FieldKind.DATETIME: "TEXT"}

_META = """
CREATE TABLE IF NOT EXISTS physicals (
    physical   TEXT PRIMARY KEY,
    collection TEXT NOT NULL,
    schema     TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS aliases (
    collection TEXT PRIMARY KEY,
    physical   TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS checkpoints (
    physical     TEXT PRIMARY KEY,
    grp          TEXT NOT NULL,
    position     INTEGER,
    refill_until INTEGER
);
"""

_schema_encoder = msgspec.json.Encoder()
_schema_decoder = msgspec.json.Decoder(CollectionSchema)
_doc_encoder = msgspec.json.Encoder()
_rows_decoder = msgspec.json.Decoder(list[list[Any]])
_rowids_decoder = msgspec.json.Decoder(list[int])
_decoders: dict[object, msgspec.json.Decoder[Any]] = {}


def _decoder(as_type: type[T]) -> msgspec.json.Decoder[T]:
    """The stored JSON -> ``as_type`` decoder, one per type. Lax (``strict=False``) like
    the ``msgspec.convert(doc, as_type, strict=False)`` it replaces (``ReadStore.query_as``)."""
    decoder = _decoders.get(as_type)
    if decoder is None:
        decoder = _decoders[as_type] = msgspec.json.Decoder(as_type, strict=False)
    return cast("msgspec.json.Decoder[T]", decoder)


def _q(name: str) -> str:
    """Quote an identifier that has already been checked against ``_NAME``."""
    return f'"{name}"'


def _col(field: str) -> str:
    return _q(f"f_{field}")


def _check_name(name: str, what: str) -> str:
    if not _NAME.match(name):
        raise ValueError(f"{what} {name!r} must match {_NAME.pattern}")
    return name


def normalise_datetime(value: object) -> str | None:
    """ISO 8601 -> ``YYYY-MM-DDTHH:MM:SS.ffffffZ`` in UTC (naive means UTC); ``None``
    if it is not a datetime."""
    if not isinstance(value, str):
        return None
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        return None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    return parsed.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def fts_match_expression(text: str) -> str | None:
    """User text -> a safe FTS5 expression: every whitespace-separated chunk becomes
    a quoted phrase (so operators, quotes and punctuation are plain text; ``SKU-12``
    stays one phrase), all phrases must match, and the last one is a prefix
    (typing ``blu`` finds ``blue``). ``None`` when nothing searchable is left. A NUL
    separates chunks too: FTS5 reads a quoted phrase only up to it."""
    chunks = [chunk for chunk in text.replace("\x00", " ").split() if _WORD.search(chunk)]
    if not chunks:
        return None
    phrases = ['"' + chunk.replace('"', '""') + '"' for chunk in chunks]
    phrases[-1] += "*"
    return " ".join(phrases)


@dataclass(frozen=True, slots=True)
class _Table:
    physical: str
    collection: str
    schema: CollectionSchema

    @property
    def columns(self) -> list[tuple[str, FieldKind]]:
        return [(f, k) for f, k in self.schema.fields.items() if k in _COLUMN_KINDS]

    @property
    def text_fields(self) -> list[str]:
        return [f for f, k in self.schema.fields.items() if k is FieldKind.TEXT]

    @property
    def fts(self) -> str:
        return f"{self.physical}__fts"

    @property
    def counts(self) -> str:
        return f"{self.physical}__counts"

    @property
    def keywords(self) -> list[str]:
        return [f for f, k in self.schema.fields.items() if k is FieldKind.KEYWORD]


PrefixCache = dict[tuple[str, str], tuple[float, list[str] | None]]
"""(FTS table, prefix) -> (when read, its words): one per store, as it is one per database."""
FewCache = dict[tuple[str, str], tuple[float, bool]]
"""(FTS table, match expression) -> (when counted, fewer than :data:`FEW_MATCHES`?): one per store."""


def _prefix_words(conn: sqlite3.Connection, cache: PrefixCache, fts: str, prefix: str) -> list[str] | None:
    """The indexed words starting with ``prefix`` (``None``: more than
    :data:`MAX_PREFIX_WORDS`), from FTS5's vocabulary.

    Reading the vocabulary costs about as much as the prefix search itself (it counts
    each word's documents), so the answer is kept :data:`PREFIX_CACHE_SECONDS`. The
    price: a word that first enters the index is found by its *prefix* up to that
    long after its document; the whole word is always searched too, so typing it
    in full finds it at once."""
    key = (fts, prefix)
    now = time.monotonic()
    cached = cache.get(key)
    if cached is not None and now - cached[0] < PREFIX_CACHE_SECONDS:
        return cached[1]
    vocab = _q(f"{fts}__vocab")
    conn.execute(f"CREATE VIRTUAL TABLE IF NOT EXISTS temp.{vocab} USING fts5vocab(main, {_q(fts)}, 'row')")
    terms = [
        str(row[0])
        for row in conn.execute(
            f"SELECT term FROM temp.{vocab} WHERE term >= ? AND term < ? LIMIT {MAX_PREFIX_WORDS + 1}",
            (prefix, prefix + "\U0010ffff"),
        )
    ]
    words = terms if len(terms) <= MAX_PREFIX_WORDS else None
    if len(cache) > 10_000:
        cache.clear()
    cache[key] = (now, words)
    return words


TOTAL = ""
"""The ``field`` (and ``value``) of the row of ``<physical>__counts`` counting every document."""


def _ensure_counts(conn: sqlite3.Connection, table: _Table) -> None:
    """Maintained counts per value of each KEYWORD field, and of all documents, in
    ``<physical>__counts`` (field, value, n), kept by triggers in the transaction of
    every write, so the facets of an unfiltered list are a read of a few rows
    instead of a pass over every document. Filled from the documents when a table
    made before the counts gets them."""
    counts, physical = _q(table.counts), _q(table.physical)
    exists = conn.execute("SELECT 1 FROM sqlite_master WHERE name = ?", (table.counts,)).fetchone()
    if exists is not None:
        return
    conn.execute(
        f"CREATE TABLE {counts} (field TEXT NOT NULL, value NOT NULL, n INTEGER NOT NULL, "
        "PRIMARY KEY (field, value)) WITHOUT ROWID"
    )

    def add(row: str, sign: str) -> str:
        pairs = [(f"'{TOTAL}'", f"'{TOTAL}'"), *((f"'{f}'", f"{row}.{_col(f)}") for f in table.keywords)]
        return "".join(
            f"INSERT INTO {counts} (field, value, n) SELECT {field}, {value}, {sign}1 "
            f"WHERE {row}.doc IS NOT NULL AND {value} IS NOT NULL "
            f"ON CONFLICT (field, value) DO UPDATE SET n = n {sign} 1;"
            for field, value in pairs
        )

    for event, body in (
        ("INSERT", add("new", "+")),
        ("UPDATE", add("old", "-") + add("new", "+")),
        ("DELETE", add("old", "-")),
    ):
        name = _q(f"{table.physical}__count_{event.lower()}")
        conn.execute(f"CREATE TRIGGER {name} AFTER {event} ON {physical} BEGIN {body} END")
    conn.execute(
        f"INSERT INTO {counts} SELECT '{TOTAL}', '{TOTAL}', count(*) FROM {physical} WHERE doc IS NOT NULL"
    )
    for field in table.keywords:
        conn.execute(
            f"INSERT INTO {counts} SELECT '{field}', {_col(field)}, count(*) FROM {physical} "
            f"WHERE doc IS NOT NULL AND {_col(field)} IS NOT NULL GROUP BY {_col(field)}"
        )


def _indexes(table: _Table) -> list[tuple[str, str]]:
    """(name, columns) of the indexes a physical table needs, created by
    ``ensure_collection`` (also on tables made before an index was added here).

    - ``(field, id)`` per column: filter on it, or sort by it, then page by keyset.
    - ``(keyword, default sort..., id)`` per KEYWORD field: an exact filter
      (``status = 'shipped'``, one customer) answered in the default order by one
      index walk that stops at the page's end, however many rows match.
    """
    indexes = [(f"{table.physical}__{field}", f"{_col(field)}, id") for field, _ in table.columns]
    default = [s.field for s in table.schema.default_sort if s.field in dict(table.columns)]
    if default:
        sort_columns = ", ".join(_col(f) for f in default)
        for field, kind in table.columns:
            if kind is FieldKind.KEYWORD and field not in default:
                indexes.append((f"{table.physical}__{field}__default", f"{_col(field)}, {sort_columns}, id"))
    return indexes


def _column_value(kind: FieldKind, value: Any) -> Any:
    if value is None:
        return None
    if kind is FieldKind.DATETIME:
        return normalise_datetime(value) or (value if isinstance(value, str) else None)
    if kind is FieldKind.INTEGER:
        return value if isinstance(value, int | float) and not isinstance(value, bool) else None
    if isinstance(value, str | int | float) and not isinstance(value, bool):
        return value
    return None


def _text_value(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, list | tuple):
        return " ".join(_text_value(v) for v in value)
    return str(value)


DEFAULT_READERS = 4
"""Read-only query connections per store: more than the cores, so a query waiting
on the disk does not idle a core; few, because each holds a page cache."""

_UNAVAILABLE = ("unable to open", "locked", "busy", "disk i/o")


def _unavailable(exc: sqlite3.OperationalError) -> Exception:
    """A database that cannot be opened, read or locked in time is an outage (503);
    any other OperationalError is a bug and stays one. A full disk is an outage too."""
    if is_storage_full(exc):
        return ReadStoreFull("the read store", exc)
    if any(marker in str(exc).lower() for marker in _UNAVAILABLE):
        return ReadStoreUnavailable("the read store", exc)
    return exc


class _ReaderPool:
    """Threads that each own one read-only connection to the database file."""

    def __init__(self, path: Path, size: int) -> None:
        self._uri = f"{path.resolve().as_uri()}?mode=ro"
        self._executor = ThreadPoolExecutor(max_workers=size, thread_name_prefix="readstore-reader")
        self._local = threading.local()
        self._connections: list[sqlite3.Connection] = []
        self._lock = threading.Lock()

    def _connection(self) -> sqlite3.Connection:
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            conn = sqlite3.connect(self._uri, uri=True, isolation_level=None, check_same_thread=False)
            conn.execute("PRAGMA busy_timeout = 10000")
            self._local.conn = conn
            with self._lock:
                self._connections.append(conn)
        return conn

    def _transaction(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        conn = self._connection()
        conn.execute("BEGIN")
        try:
            return fn(conn)
        finally:
            conn.execute("ROLLBACK")

    async def run(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._executor, self._transaction, fn)

    def close(self) -> None:
        self._executor.shutdown(wait=True)
        with self._lock:
            for conn in self._connections:
                conn.close()
            self._connections.clear()


class SqliteReadStore:
    """:class:`~orderstream.readstore.base.ReadStore` on one SQLite file.

    Two kinds of connection, each on its own threads:

    - one read-write connection on one thread for writes, collection changes and
      the reads a projection makes to fold (``get_version``, ``physical=`` reads);
    - a pool of read-only connections, one per reader thread, for queries and
      ``get``. In WAL mode a reader sees the last committed transaction and never
      waits for the writer, so queries are never queued behind projection writes,
      and SQLite releases the GIL while it works, so they run on every core.

    An in-memory database cannot be shared between connections: there queries
    use the writer's connection and thread.
    """

    def __init__(
        self,
        conn: sqlite3.Connection,
        executor: ThreadPoolExecutor,
        readers: _ReaderPool | None = None,
    ) -> None:
        self._conn = conn
        self._executor = executor
        self._readers = readers
        self._tables: dict[str, _Table] = {}
        self._prefixes: PrefixCache = {}
        self._few: FewCache = {}
        self._upgraded: set[str] = set()
        """Physical tables given their counts and indexes by this store (``_upgrade``)."""
        self._closed = False

    # ----------------------------------------------------------------- lifecycle

    @classmethod
    async def open(cls, path: str | Path, *, readers: int = DEFAULT_READERS) -> SqliteReadStore:
        """Open (creating if needed) the database at ``path`` with ``readers``
        read-only query connections (0: queries share the writer's connection)."""
        executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="readstore-sqlite")

        def connect() -> sqlite3.Connection:
            if str(path) != ":memory:":
                Path(path).parent.mkdir(parents=True, exist_ok=True)
            conn = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False)
            conn.execute("PRAGMA busy_timeout = 10000")
            conn.execute("PRAGMA journal_mode = WAL")
            conn.execute("PRAGMA synchronous = NORMAL")
            conn.executescript(_META)
            return conn

        loop = asyncio.get_running_loop()
        try:
            conn = await loop.run_in_executor(executor, connect)
        except sqlite3.OperationalError as exc:
            executor.shutdown(wait=False)
            raise ReadStoreUnavailable("the read store", exc) from exc
        except BaseException:
            executor.shutdown(wait=False)
            raise
        pool = _ReaderPool(Path(path), readers) if readers > 0 and str(path) != ":memory:" else None
        return cls(conn, executor, pool)

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            if self._readers is not None:
                self._readers.close()
            await asyncio.get_running_loop().run_in_executor(self._executor, self._conn.close)
        finally:
            self._executor.shutdown(wait=True)

    async def _run(self, fn: Callable[[], T]) -> T:
        if self._closed:
            raise RuntimeError("the read store is closed")
        try:
            return await asyncio.get_running_loop().run_in_executor(self._executor, fn)
        except sqlite3.OperationalError as exc:
            raise _unavailable(exc) from exc

    async def _read(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run ``fn`` in one read transaction on a reader connection (a consistent
        snapshot of the committed data)."""
        if self._readers is None:
            return await self._run(lambda: self._transaction(lambda: fn(self._conn), write=False))
        if self._closed:
            raise RuntimeError("the read store is closed")
        try:
            return await self._readers.run(fn)
        except sqlite3.OperationalError as exc:
            raise _unavailable(exc) from exc

    def _transaction(self, fn: Callable[[], T], *, write: bool) -> T:
        """Run ``fn`` in one transaction on the store thread."""
        self._conn.execute("BEGIN IMMEDIATE" if write else "BEGIN")
        try:
            result = fn()
            self._conn.execute("COMMIT")
        except BaseException:
            if self._conn.in_transaction:  # SQLite rolls back by itself on a full disk
                self._conn.execute("ROLLBACK")
            raise
        return result

    # ------------------------------------------------------------- table lookup

    def _table(self, physical: str, conn: sqlite3.Connection | None = None) -> _Table | None:
        row = (
            (conn or self._conn)
            .execute("SELECT collection, schema FROM physicals WHERE physical = ?", (physical,))
            .fetchone()
        )
        if row is None:
            self._tables.pop(physical, None)
            return None
        cached = self._tables.get(physical)
        if cached is None or cached.collection != row[0]:
            cached = _Table(physical, row[0], _schema_decoder.decode(row[1]))
            self._tables[physical] = cached
        return cached

    def _alias(self, collection: str, conn: sqlite3.Connection | None = None) -> str | None:
        row = (
            (conn or self._conn)
            .execute("SELECT physical FROM aliases WHERE collection = ?", (collection,))
            .fetchone()
        )
        return None if row is None else str(row[0])

    def _resolve(
        self, collection: str, physical: str | None, conn: sqlite3.Connection | None = None
    ) -> _Table | None:
        name = physical if physical is not None else self._alias(collection, conn)
        if name is None:
            return None
        table = self._table(name, conn)
        if table is not None and table.collection != collection:
            raise CollectionNotFound(f"{name} belongs to {table.collection}, not {collection}")
        return table

    # ------------------------------------------------------------- collections

    async def ensure_collection(
        self, schema: CollectionSchema, *, version: int | None = None, suffix: str | None = None
    ) -> str:
        physical = _check_name(schema.physical_name(version, suffix), "physical name")
        _check_name(schema.name, "collection name")
        for field in schema.fields:
            _check_name(field, "field name")
        stored = msgspec.structs.replace(schema, version=version if version is not None else schema.version)

        def create() -> str:
            existing = self._table(physical)
            if existing is not None:
                if (
                    existing.collection != schema.name
                    or dict(existing.schema.fields) != dict(schema.fields)
                    or existing.schema.id_field != schema.id_field
                ):
                    raise ValueError(
                        f"{physical} exists with other fields; "
                        "a changed schema needs a new version (a rebuild)"
                    )
                if existing.schema != stored:  # e.g. a new default sort: no storage change
                    self._conn.execute(
                        "UPDATE physicals SET schema = ? WHERE physical = ?",
                        (_schema_encoder.encode(stored).decode(), physical),
                    )
                    self._tables.pop(physical, None)
            else:
                table = _Table(physical, schema.name, stored)
                columns = "".join(f", {_col(f)} {_SQL_TYPE[k]}" for f, k in table.columns)
                self._conn.execute(
                    f"CREATE TABLE IF NOT EXISTS {_q(physical)} ("
                    f"id TEXT PRIMARY KEY, version INTEGER NOT NULL, doc TEXT{columns})"
                )
                if table.text_fields:
                    text_columns = ", ".join(_col(f) for f in table.text_fields)
                    self._conn.execute(
                        f"CREATE VIRTUAL TABLE IF NOT EXISTS {_q(table.fts)} USING fts5("
                        f"{text_columns}, tokenize = 'unicode61 remove_diacritics 2', prefix = '2 3')"
                    )
                self._conn.execute(
                    "INSERT INTO physicals (physical, collection, schema) VALUES (?, ?, ?)",
                    (physical, schema.name, _schema_encoder.encode(stored).decode()),
                )
                self._conn.execute("DELETE FROM checkpoints WHERE physical = ?", (physical,))
            self._upgraded.discard(physical)
            self._upgrade(_Table(physical, schema.name, stored))
            self._conn.execute(
                "INSERT INTO aliases (collection, physical) VALUES (?, ?) "
                "ON CONFLICT (collection) DO NOTHING",
                (schema.name, physical),
            )
            return physical

        return await self._run(lambda: self._transaction(create, write=True))

    async def switch_alias(self, collection: str, physical: str) -> str | None:
        def switch() -> str | None:
            table = self._table(physical)
            if table is None or table.collection != collection:
                raise CollectionNotFound(f"no physical table {physical} for {collection}")
            previous = self._alias(collection)
            self._conn.execute(
                "INSERT INTO aliases (collection, physical) VALUES (?, ?) "
                "ON CONFLICT (collection) DO UPDATE SET physical = excluded.physical",
                (collection, physical),
            )
            return previous

        return await self._run(lambda: self._transaction(switch, write=True))

    async def alias_target(self, collection: str) -> str | None:
        """On a reader connection: a runner asks before every batch, and on the writer's
        thread it would wait behind the other runners' writes (the switch is committed
        before ``switch_alias`` returns, so a reader sees it as the writer would)."""
        return await self._read(lambda conn: self._alias(collection, conn))

    async def drop_physical(self, physical: str) -> None:
        def drop() -> None:
            table = self._table(physical)
            if table is None:
                return
            if self._alias(table.collection) == physical:
                raise ValueError(f"{physical} is the alias target of {table.collection}; switch first")
            self._conn.execute(f"DROP TABLE IF EXISTS {_q(physical)}")
            self._conn.execute(f"DROP TABLE IF EXISTS {_q(table.fts)}")
            self._conn.execute(f"DROP TABLE IF EXISTS {_q(table.counts)}")
            self._conn.execute("DELETE FROM physicals WHERE physical = ?", (physical,))
            self._conn.execute("DELETE FROM checkpoints WHERE physical = ?", (physical,))
            self._tables.pop(physical, None)

        await self._run(lambda: self._transaction(drop, write=True))

    async def read_checkpoint(self, physical: str) -> ReadCheckpoint | None:
        def read(conn: sqlite3.Connection) -> ReadCheckpoint | None:
            row = conn.execute(
                "SELECT grp, position, refill_until FROM checkpoints WHERE physical = ?", (physical,)
            ).fetchone()
            return None if row is None else ReadCheckpoint(group=row[0], position=row[1], refill_until=row[2])

        return await self._read(read)

    async def write_checkpoint(self, physical: str, checkpoint: ReadCheckpoint) -> None:
        def write() -> None:
            self._conn.execute(
                "INSERT INTO checkpoints (physical, grp, position, refill_until) VALUES (?, ?, ?, ?)"
                " ON CONFLICT (physical) DO UPDATE SET grp = excluded.grp, position = excluded.position,"
                " refill_until = excluded.refill_until",
                (physical, checkpoint.group, checkpoint.position, checkpoint.refill_until),
            )

        await self._run(lambda: self._transaction(write, write=True))

    async def refresh(self, collection: str) -> None:
        """Writes are visible once committed."""

    # ------------------------------------------------------------------- reads

    def _get(
        self, conn: sqlite3.Connection, collection: str, doc_id: str, physical: str | None, as_type: type[T]
    ) -> T | None:
        table = self._resolve(collection, physical, conn)
        if table is None:
            return None
        row = conn.execute(f"SELECT doc FROM {_q(table.physical)} WHERE id = ?", (doc_id,)).fetchone()
        return None if row is None or row[0] is None else _decoder(as_type).decode(row[0])

    async def get(self, collection: str, doc_id: str, *, physical: str | None = None) -> Document | None:
        if physical is not None:  # a rebuild folding into its own table: the writer's view
            return await self._run(lambda: self._get(self._conn, collection, doc_id, physical, Document))
        return await self.get_as(collection, doc_id, Document)

    async def get_as(self, collection: str, doc_id: str, as_type: type[T]) -> T | None:
        return await self._read(lambda conn: self._get(conn, collection, doc_id, None, as_type))

    async def get_version(self, collection: str, doc_id: str, *, physical: str | None = None) -> int | None:
        def read() -> int | None:
            table = self._resolve(collection, physical)
            if table is None:
                return None
            row = self._conn.execute(
                f"SELECT version FROM {_q(table.physical)} WHERE id = ?", (doc_id,)
            ).fetchone()
            return None if row is None else int(row[0])

        return await self._run(read)

    async def get_many(
        self, collection: str, doc_ids: Sequence[str], *, physical: str | None = None
    ) -> dict[str, Stored]:
        """On a reader connection, so that it does not queue behind other runners' writes:
        every write this store made is committed before ``write`` returns, so a reader
        sees it as the writer's connection would."""

        def read(conn: sqlite3.Connection) -> dict[str, Stored]:
            table = self._resolve(collection, physical, conn)
            if table is None:
                return {}
            found: dict[str, Stored] = {}
            unique = list(dict.fromkeys(doc_ids))
            for start in range(0, len(unique), _MAX_IDS):
                chunk = unique[start : start + _MAX_IDS]
                rows = conn.execute(
                    f"SELECT id, version, doc FROM {_q(table.physical)}"
                    f" WHERE id IN ({', '.join('?' * len(chunk))})",
                    chunk,
                )
                for doc_id, version, doc in rows:
                    document = None if doc is None else _decoder(Document).decode(doc)
                    found[doc_id] = Stored(version=int(version), document=document)
            return found

        if not doc_ids:
            return {}
        return await self._read(read)

    # ------------------------------------------------------------------ writes

    async def write(
        self, collection: str, ops: Sequence[WriteOp], *, physical: str | None = None
    ) -> list[WriteOutcome]:
        if not ops:
            return []
        encoded = [
            (op, _doc_encoder.encode(op.document).decode() if isinstance(op, Upsert) else None) for op in ops
        ]

        def apply() -> list[WriteOutcome]:
            table = self._resolve(collection, physical)
            if table is None:
                raise CollectionNotFound(f"{physical or collection} does not exist; ensure_collection first")
            self._upgrade(table)
            return [self._apply(table, op, doc) for op, doc in encoded]

        return await self._run(lambda: self._transaction(apply, write=True))

    def _upgrade(self, table: _Table) -> None:
        """Give a physical table the counts and indexes this code queries with, once
        per store: at ``ensure_collection``, or at the first write to a table that a
        projection runner found already in place (made by an older version; the
        counts are then filled from its documents, once, in that transaction)."""
        if table.physical in self._upgraded:
            return
        _ensure_counts(self._conn, table)
        for name, columns in _indexes(table):
            self._conn.execute(
                f"CREATE INDEX IF NOT EXISTS {_q(name)} ON {_q(table.physical)} ({columns}) "
                "WHERE doc IS NOT NULL"
            )
        self._upgraded.add(table.physical)

    def _apply(self, table: _Table, op: WriteOp, doc: str | None) -> WriteOutcome:
        columns = table.columns
        names = ", ".join(["id", "version", "doc", *(_col(f) for f, _ in columns)])
        marks = ", ".join("?" for _ in range(3 + len(columns)))
        updates = ", ".join(
            [
                "version = excluded.version",
                "doc = excluded.doc",
                *(f"{_col(f)} = excluded.{_col(f)}" for f, _ in columns),
            ]
        )
        document: Mapping[str, Any] = op.document if isinstance(op, Upsert) else {}
        values = [op.id, op.version, doc, *(_column_value(k, document.get(f)) for f, k in columns)]
        row = self._conn.execute(
            f"INSERT INTO {_q(table.physical)} ({names}) VALUES ({marks}) "
            f"ON CONFLICT (id) DO UPDATE SET {updates} "
            f"WHERE excluded.version > {_q(table.physical)}.version RETURNING rowid",
            values,
        ).fetchone()
        if row is None:
            return WriteOutcome.STALE
        text_fields = table.text_fields
        if text_fields:
            rowid = row[0]
            self._conn.execute(f"DELETE FROM {_q(table.fts)} WHERE rowid = ?", (rowid,))
            if isinstance(op, Upsert):
                self._conn.execute(
                    f"INSERT INTO {_q(table.fts)} (rowid, {', '.join(_col(f) for f in text_fields)}) "
                    f"VALUES (?{', ?' * len(text_fields)})",
                    (rowid, *(_text_value(document.get(f)) for f in text_fields)),
                )
        return WriteOutcome.WRITTEN

    # ----------------------------------------------------------------- queries

    async def query(self, collection: str, query: Query) -> Page[Document]:
        return await self.query_as(collection, query, Document)

    async def query_as(self, collection: str, query: Query, as_type: type[T]) -> Page[T]:
        if not 1 <= query.limit <= MAX_LIMIT:
            raise InvalidQuery(f"limit must be between 1 and {MAX_LIMIT}")

        def read(conn: sqlite3.Connection) -> Page[T]:
            table = self._resolve(collection, None, conn)
            if table is None:  # never ensured: nothing to find yet
                total = 0 if query.count or query.facets else None
                return Page(items=[], next_cursor=None, facets={f: {} for f in query.facets}, total=total)
            return _QueryPlan(table, query, self._prefixes, self._few).run(conn, as_type)

        return await self._read(read)


class _QueryPlan:
    """One :class:`Query` translated to SQL against one physical table."""

    def __init__(
        self, table: _Table, query: Query, prefixes: PrefixCache | None = None, few: FewCache | None = None
    ) -> None:
        self.table = table
        self.query = query
        self.prefixes: PrefixCache = {} if prefixes is None else prefixes
        self.few: FewCache = {} if few is None else few
        self.where: list[str] = ["doc IS NOT NULL"]
        self.params: list[Any] = []
        self.match: str | None = None
        """The FTS5 expression of ``query.text``, if any: applied in :meth:`run`."""
        self.fields = table.schema.fields
        self.id_field = table.schema.id_field
        for field, value in query.filters.items():
            self._filter(field, value)
        if query.text is not None:
            self._text(query.text)
        self.sort = self._sort(query.sort or table.schema.default_sort)
        for facet in query.facets:
            if self.fields.get(facet) is not FieldKind.KEYWORD:
                raise InvalidQuery(f"facet on {facet!r}: only KEYWORD fields can be faceted")

    # ------------------------------------------------------------- translation

    def _expr(self, field: str) -> tuple[str, FieldKind]:
        if field == self.id_field and field not in self.fields:
            return "id", FieldKind.KEYWORD
        kind = self.fields.get(field)
        if kind is None:
            raise InvalidQuery(f"unknown field {field!r}")
        if kind is FieldKind.TEXT:
            raise InvalidQuery(f"{field!r} is a full-text field: search it with text, not filters or sort")
        return _col(field), kind

    @staticmethod
    def _value(field: str, kind: FieldKind, value: object) -> object:
        if kind is FieldKind.INTEGER:
            if isinstance(value, bool) or not isinstance(value, int):
                raise InvalidQuery(f"{field!r} takes integers, not {value!r}")
            return value
        if kind is FieldKind.DATETIME:
            normalised = normalise_datetime(value)
            if normalised is None:
                raise InvalidQuery(f"{field!r} takes ISO 8601 datetimes, not {value!r}")
            return normalised
        if isinstance(value, bool) or not isinstance(value, str | int):
            raise InvalidQuery(f"{field!r} takes strings, not {value!r}")
        return value

    def _filter(self, field: str, value: object) -> None:
        expr, kind = self._expr(field)
        if isinstance(value, Range):
            for bound, op in ((value.gte, ">="), (value.lte, "<=")):
                if bound is not None:
                    self.where.append(f"{expr} {op} ?")
                    self.params.append(self._value(field, kind, bound))
        elif isinstance(value, str | int) and not isinstance(value, bool):
            self.where.append(f"{expr} = ?")
            self.params.append(self._value(field, kind, value))
        elif isinstance(value, Sequence) and not isinstance(value, str):
            if not value:
                self.where.append("0")
                return
            self.where.append(f"{expr} IN ({', '.join('?' for _ in value)})")
            self.params.extend(self._value(field, kind, v) for v in value)
        else:
            raise InvalidQuery(f"unsupported filter value for {field!r}: {value!r}")

    def _text(self, text: str) -> None:
        if len(text) > 1000:
            raise InvalidQuery("search text is longer than 1000 characters")
        expression = fts_match_expression(text)
        if expression is None:
            return  # nothing searchable (blank or only punctuation): no constraint
        if not self.table.text_fields:
            raise InvalidQuery(f"{self.table.collection} has no full-text fields")
        self.match = expression

    def _sort(self, sort: Sequence[SortField]) -> list[tuple[str, bool]]:
        """The sort keys plus the id, in the last key's direction: ``placed_at DESC,
        id DESC`` is one backward walk of the ``(placed_at, id)`` index, where
        ``id ASC`` would need a sort of every tie."""
        keys = [(self._expr(s.field)[0], s.descending) for s in sort]
        return [*keys, ("id", keys[-1][1] if keys else False)]

    @property
    def signature(self) -> str:
        return sort_signature(self.sort)

    def _after(self, cursor: str) -> tuple[str, list[Any]]:
        """Keyset predicate: rows strictly after the cursor's row in sort order
        (missing values sort last in either direction)."""
        return self._after_row(decode_cursor(cursor, self.signature, len(self.sort)))

    def _after_row(self, values: Sequence[Any]) -> tuple[str, list[Any]]:
        """Keyset predicate: rows strictly after the row with these sort values (the
        id last) in sort order."""
        alternatives: list[str] = []
        params: list[Any] = []
        for i, (expr, descending) in enumerate(self.sort):
            value = values[i]
            if value is None:
                continue  # nothing sorts after a missing value except equal (missing) ones
            parts = [f"{e} IS ?" for e, _ in self.sort[:i]]
            part_params: list[Any] = list(values[:i])
            parts.append(f"({expr} {'<' if descending else '>'} ? OR {expr} IS NULL)")
            part_params.append(value)
            alternatives.append("(" + " AND ".join(parts) + ")")
            params.extend(part_params)
        return ("(" + " OR ".join(alternatives) + ")" if alternatives else "0"), params

    # --------------------------------------------------------------- execution

    def _matches(self) -> tuple[str, list[Any]]:
        """The full-text condition, for SQLite to start from: it looks up each
        match by rowid (then sorts them, when there are few)."""
        assert self.match is not None
        fts = _q(self.table.fts)
        return f"rowid IN (SELECT rowid FROM {fts} WHERE {fts} MATCH ?)", [self.match]

    def _few_matches(self, conn: sqlite3.Connection) -> bool:
        """Does the text match fewer than :data:`FEW_MATCHES` documents? Counting
        stops at the bound, so this costs at most that many FTS rowids: for a word that
        matches many, about a quarter of the whole query. The answer is kept
        :data:`FEW_CACHE_SECONDS` per search: it changes only when a word crosses the
        bound, and a stale one picks the slower of two plans that find the same page."""
        assert self.match is not None
        key = (self.table.fts, self.match)
        now = time.monotonic()
        cached = self.few.get(key)
        if cached is not None and now - cached[0] < FEW_CACHE_SECONDS:
            return cached[1]
        fts = _q(self.table.fts)
        row = conn.execute(
            f"SELECT count(*) FROM (SELECT rowid FROM {fts} WHERE {fts} MATCH ? LIMIT {FEW_MATCHES})",
            (self.match,),
        ).fetchone()
        few = int(row[0]) < FEW_MATCHES
        if len(self.few) > 10_000:
            self.few.clear()
        self.few[key] = (now, few)
        return few

    def _expand_prefix(self, conn: sqlite3.Connection) -> None:
        """Replace the trailing prefix (``"lon"*``) by the words it stands for
        (``("lon" OR "london" OR "londoner")``) when they are few. FTS5 answers a
        prefix by merging the whole posting list of every such word before it can
        skip to a rowid range (milliseconds for a common word); exact words it
        seeks, which :meth:`_walk` relies on. The words come from :func:`_prefix_words`."""
        assert self.match is not None
        head, _, last = self.match.rpartition(" ")
        word = last[1:-2].lower()
        if not _PLAIN_WORD.fullmatch(word):
            return  # the tokenizer would split it: keep FTS5's own prefix handling
        terms = _prefix_words(conn, self.prefixes, self.table.fts, word)
        if terms is None:
            return
        words = "(" + " OR ".join(f'"{term}"' for term in dict.fromkeys([word, *terms])) + ")"
        self.match = f"{head} AND {words}" if head else words

    def _walk(self, conn: sqlite3.Connection, where: str, params: list[Any]) -> list[Any]:
        """Many text matches: walk the rows in sort order, a window at a time, and
        keep those the FTS index reports among the window's rowid range, until the
        page is full. Nothing is sorted, and the cost follows the page, not the
        number of matches (when rowids follow the sort order, as they do for
        documents inserted in the order they were made, the range is narrow).

        Each statement answers in ONE row (``json_group_array``): Python's sqlite3
        lets go of the GIL around every row it steps, and under 32 connections the
        four reader threads fought for it on each of a window's ~340 rows (sys time
        525 us of a ``q=london`` request's 1,460 us of CPU at 1M orders, against 138
        for a plain list; docs/read-models.md)."""
        assert self.match is not None
        physical, fts = _q(self.table.physical), _q(self.table.fts)
        order = ", ".join(f"{expr} {'DESC' if desc else 'ASC'} NULLS LAST" for expr, desc in self.sort)
        select = ", ".join(expr for expr, _ in self.sort)
        wanted = self.query.limit + 1
        found: list[Any] = []
        after: tuple[str, list[Any]] | None = None
        window = min(WINDOW_ROWS_PER_RESULT * wanted, MAX_WINDOW)
        while len(found) < wanted:
            clause = f"{where} AND {after[0]}" if after else where
            rows: list[list[Any]] = _rows_decoder.decode(
                conn.execute(
                    f"SELECT json_group_array(json_array(rowid, {select})) FROM "
                    f"(SELECT rowid, {select} FROM {physical} WHERE {clause} ORDER BY {order} LIMIT ?)",
                    [*params, *(after[1] if after else []), window],
                ).fetchone()[0]
            )
            if not rows:
                break
            rowids = [row[0] for row in rows]
            hits = set(
                _rowids_decoder.decode(
                    conn.execute(
                        f"SELECT json_group_array(rowid) FROM {fts} "
                        f"WHERE {fts} MATCH ? AND rowid BETWEEN ? AND ?",
                        (self.match, min(rowids), max(rowids)),
                    ).fetchone()[0]
                )
            )
            found.extend(row for row in rows if row[0] in hits)
            if len(rows) < window:
                break
            after = self._after_row(list(rows[-1][1:]))
            window = min(window * 4, MAX_WINDOW)
        return found[:wanted]

    def _has_counts(self, conn: sqlite3.Connection) -> bool:
        """False for a table made before counts were kept, until a projection
        process (the writer) ensures the collection and fills them."""
        row = conn.execute("SELECT 1 FROM sqlite_master WHERE name = ?", (self.table.counts,)).fetchone()
        return row is not None

    def _maintained_scope(self) -> tuple[str, list[Any]] | None:
        """Can the counts table answer this query's total and facets? Yes with no
        filter and no text (``(TOTAL, [])``), and with only an exact filter on the
        one faceted KEYWORD field (``status IN (...)``, facets on status): the
        counts of those values are the answer (``(field, values)``)."""
        filters = self.query.filters
        if self.match is not None or len(filters) > 1:
            return None
        if not filters:
            return TOTAL, []
        ((field, value),) = filters.items()
        values = [value] if isinstance(value, str | int) else value
        if (
            self.fields.get(field) is not FieldKind.KEYWORD
            or set(self.query.facets) - {field}
            or not isinstance(values, Sequence)
            or not all(isinstance(v, str | int) and not isinstance(v, bool) for v in values)
        ):
            return None
        return field, list(values)

    def _maintained_counts(
        self, conn: sqlite3.Connection, field: str, values: list[Any]
    ) -> tuple[int, dict[str, dict[str, int]]]:
        counts = _q(self.table.counts)
        if field == TOTAL:
            row = conn.execute(
                f"SELECT n FROM {counts} WHERE field = ? AND value = ?", (TOTAL, TOTAL)
            ).fetchone()
            total = 0 if row is None else int(row[0])
            scope, scope_params = "", []
        else:
            scope = f" AND value IN ({', '.join('?' for _ in values)})"
            scope_params = list(values)
            row = conn.execute(
                f"SELECT sum(n) FROM {counts} WHERE field = ?{scope}", [field, *values]
            ).fetchone()
            total = int(row[0] or 0)
        facets = {}
        for facet in self.query.facets:
            rows = conn.execute(
                f"SELECT value, n FROM {counts} WHERE field = ?{scope} AND n > 0 ORDER BY n DESC, value "
                f"LIMIT {FACET_SIZE}",
                [facet, *scope_params],
            ).fetchall()
            facets[facet] = {str(value): int(n) for value, n in rows}
        return total, facets

    def run(self, conn: sqlite3.Connection, as_type: type[T]) -> Page[T]:
        """The page, its documents decoded from the stored JSON straight into ``as_type``."""
        physical = _q(self.table.physical)
        where, params = list(self.where), list(self.params)
        walk = False
        if self.match is not None:
            self._expand_prefix(conn)
            walk = not self._few_matches(conn)

        total: int | None = None
        facets: dict[str, dict[str, int]] = {}
        scope = self._maintained_scope()
        if (self.query.count or self.query.facets) and scope is not None and self._has_counts(conn):
            total, facets = self._maintained_counts(conn, *scope)
        elif self.query.count or self.query.facets:
            counting = " AND ".join(self.where + ([self._matches()[0]] if self.match else []))
            counting_params = [*self.params, *([self.match] if self.match else [])]
            total = int(
                conn.execute(f"SELECT count(*) FROM {physical} WHERE {counting}", counting_params).fetchone()[
                    0
                ]
            )
            for facet in self.query.facets:
                col = _col(facet)
                rows = conn.execute(
                    f"SELECT {col}, count(*) AS n FROM {physical} WHERE {counting} AND {col} IS NOT NULL "
                    f"GROUP BY {col} ORDER BY n DESC, {col} LIMIT {FACET_SIZE}",
                    counting_params,
                ).fetchall()
                facets[facet] = {str(value): int(n) for value, n in rows}

        if self.query.cursor is not None:
            after, after_params = self._after(self.query.cursor)
            where.append(after)
            params.extend(after_params)
        # The page's keys first (from the indexes, no document read), then only the
        # page's documents: a sort, where one is needed, never carries documents.
        if walk:
            keys = self._walk(conn, " AND ".join(where), params)
        else:
            if self.match is not None:
                condition, condition_params = self._matches()
                where.append(condition)
                params.extend(condition_params)
            order = ", ".join(f"{expr} {'DESC' if desc else 'ASC'} NULLS LAST" for expr, desc in self.sort)
            select = ", ".join(expr for expr, _ in self.sort)
            clause = " AND ".join(where)
            keys = conn.execute(
                f"SELECT rowid, {select} FROM {physical} WHERE {clause} ORDER BY {order} LIMIT ?",
                [*params, self.query.limit + 1],
            ).fetchall()
        has_more = len(keys) > self.query.limit
        keys = keys[: self.query.limit]
        docs = dict(
            conn.execute(
                f"SELECT rowid, doc FROM {physical} WHERE rowid IN ({', '.join('?' for _ in keys)})",
                [key[0] for key in keys],
            ).fetchall()
        )
        next_cursor = None
        if has_more and keys:
            last = keys[-1]
            next_cursor = encode_cursor(self.signature, [*last[1:-1], str(last[-1])])
        decoder = _decoder(as_type)
        return Page(
            items=[decoder.decode(docs[key[0]]) for key in keys],
            next_cursor=next_cursor,
            facets=facets,
            total=total,
        )
