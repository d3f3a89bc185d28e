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
import base64
import binascii
import re
import sqlite3
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any, TypeVar

import msgspec

from orderstream.readstore.base import (
    CollectionNotFound,
    CollectionSchema,
    Document,
    FieldKind,
    InvalidQuery,
    Page,
    Query,
    Range,
    SortField,
    Upsert,
    WriteOp,
    WriteOutcome,
)

T = TypeVar("T")

MAX_LIMIT = 1000
FACET_SIZE = 100
"""At most this many values per facet, the most frequent first."""

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
"""

_schema_encoder = msgspec.json.Encoder()
_schema_decoder = msgspec.json.Decoder(CollectionSchema)
_doc_encoder = msgspec.json.Encoder()
_doc_decoder = msgspec.json.Decoder(dict[str, Any])


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
    (typing ``blu`` finds ``blue``). ``None`` when nothing searchable is left."""
    chunks = [chunk for chunk in text.split() if _WORD.search(chunk)]
    if not chunks:
        return None
    phrases = ['"' + chunk.replace('"', '""') + '"' for chunk in chunks]
    phrases[-1] += "*"
    return " ".join(phrases)


SqliteInt = Annotated[int, msgspec.Meta(ge=-(2**63), le=2**63 - 1)]
"""A cursor is client input: an integer SQLite cannot bind is an invalid cursor, not a 500."""


class _Cursor(msgspec.Struct, array_like=True, frozen=True):
    sort: str
    values: list[SqliteInt | float | str | None]
    id: str


_cursor_encoder = msgspec.msgpack.Encoder()
_cursor_decoder = msgspec.msgpack.Decoder(_Cursor)


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


class SqliteReadStore:
    """:class:`~orderstream.readstore.base.ReadStore` on one SQLite file."""

    def __init__(self, conn: sqlite3.Connection, executor: ThreadPoolExecutor) -> None:
        self._conn = conn
        self._executor = executor
        self._tables: dict[str, _Table] = {}
        self._closed = False

    # ----------------------------------------------------------------- lifecycle

    @classmethod
    async def open(cls, path: str | Path) -> SqliteReadStore:
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
        except BaseException:
            executor.shutdown(wait=False)
            raise
        return cls(conn, executor)

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            await asyncio.get_running_loop().run_in_executor(self._executor, self._conn.close)
        finally:
            self._executor.shutdown(wait=True)

    async def _run(self, fn: Callable[[], T]) -> T:
        if self._closed:
            raise RuntimeError("the read store is closed")
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn)

    def _transaction(self, fn: Callable[[], T], *, write: bool) -> T:
        """Run ``fn`` in one transaction on the store thread."""
        self._conn.execute("BEGIN IMMEDIATE" if write else "BEGIN")
        try:
            result = fn()
        except BaseException:
            self._conn.execute("ROLLBACK")
            raise
        self._conn.execute("COMMIT")
        return result

    # ------------------------------------------------------------- table lookup

    def _table(self, physical: str) -> _Table | None:
        row = self._conn.execute(
            "SELECT collection, schema FROM physicals WHERE physical = ?", (physical,)
        ).fetchone()
        if row is None:
            self._tables.pop(physical, None)
            return None
        cached = self._tables.get(physical)
        if cached is None or cached.collection != row[0]:
            cached = _Table(physical, row[0], _schema_decoder.decode(row[1]))
            self._tables[physical] = cached
        return cached

    def _alias(self, collection: str) -> str | None:
        row = self._conn.execute(
            "SELECT physical FROM aliases WHERE collection = ?", (collection,)
        ).fetchone()
        return None if row is None else str(row[0])

    def _resolve(self, collection: str, physical: str | None) -> _Table | None:
        name = physical if physical is not None else self._alias(collection)
        if name is None:
            return None
        table = self._table(name)
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
                for field, _kind in table.columns:
                    self._conn.execute(
                        f"CREATE INDEX IF NOT EXISTS {_q(f'{physical}__{field}')} "
                        f"ON {_q(physical)} ({_col(field)}, id) WHERE doc IS NOT NULL"
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
        return await self._run(lambda: self._alias(collection))

    async def drop_physical(self, physical: str) -> None:
        def drop() -> None:
            table = self._table(physical)
            if table is None:
                return
            if self._alias(table.collection) == physical:
                raise ValueError(f"{physical} is the alias target of {table.collection}; switch first")
            self._conn.execute(f"DROP TABLE IF EXISTS {_q(physical)}")
            self._conn.execute(f"DROP TABLE IF EXISTS {_q(table.fts)}")
            self._conn.execute("DELETE FROM physicals WHERE physical = ?", (physical,))
            self._tables.pop(physical, None)

        await self._run(lambda: self._transaction(drop, write=True))

    async def refresh(self, collection: str) -> None:
        """Writes are visible once committed."""

    # ------------------------------------------------------------------- reads

    async def get(self, collection: str, doc_id: str, *, physical: str | None = None) -> Document | None:
        def read() -> Document | None:
            table = self._resolve(collection, physical)
            if table is None:
                return None
            row = self._conn.execute(
                f"SELECT doc FROM {_q(table.physical)} WHERE id = ?", (doc_id,)
            ).fetchone()
            return None if row is None or row[0] is None else _doc_decoder.decode(row[0])

        return await self._run(read)

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
            return [self._apply(table, op, doc) for op, doc in encoded]

        return await self._run(lambda: self._transaction(apply, write=True))

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

    async def query(self, collection: str, query: Query) -> Page:
        if not 1 <= query.limit <= MAX_LIMIT:
            raise InvalidQuery(f"limit must be between 1 and {MAX_LIMIT}")

        def read() -> Page:
            table = self._resolve(collection, None)
            if table is None:  # never ensured: nothing to find yet
                return Page(items=[], next_cursor=None, facets={f: {} for f in query.facets}, total=0)
            return _QueryPlan(table, query).run(self._conn)

        return await self._run(lambda: self._transaction(read, write=False))


class _QueryPlan:
    """One :class:`Query` translated to SQL against one physical table."""

    def __init__(self, table: _Table, query: Query) -> None:
        self.table = table
        self.query = query
        self.where: list[str] = ["doc IS NOT NULL"]
        self.params: list[Any] = []
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
        self.where.append(
            f"rowid IN (SELECT rowid FROM {_q(self.table.fts)} WHERE {_q(self.table.fts)} MATCH ?)"
        )
        self.params.append(expression)

    def _sort(self, sort: Sequence[SortField]) -> list[tuple[str, bool]]:
        keys = [(self._expr(s.field)[0], s.descending) for s in sort]
        return [*keys, ("id", False)]

    @property
    def signature(self) -> str:
        return ",".join(f"{expr}:{'d' if desc else 'a'}" for expr, desc in self.sort)

    def _after(self, cursor: str) -> tuple[str, list[Any]]:
        """Keyset predicate: rows strictly after the cursor's row in sort order
        (missing values sort last in either direction)."""
        try:
            raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
            decoded = _cursor_decoder.decode(raw)
        except (binascii.Error, ValueError, msgspec.DecodeError) as exc:
            raise InvalidQuery("invalid cursor") from exc
        if decoded.sort != self.signature or len(decoded.values) != len(self.sort) - 1:
            raise InvalidQuery("the cursor belongs to another sort order")
        values = [*decoded.values, decoded.id]
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

    def run(self, conn: sqlite3.Connection) -> Page:
        physical = _q(self.table.physical)
        where = " AND ".join(self.where)
        total = int(conn.execute(f"SELECT count(*) FROM {physical} WHERE {where}", self.params).fetchone()[0])

        facets: dict[str, dict[str, int]] = {}
        for facet in self.query.facets:
            col = _col(facet)
            rows = conn.execute(
                f"SELECT {col}, count(*) AS n FROM {physical} WHERE {where} AND {col} IS NOT NULL "
                f"GROUP BY {col} ORDER BY n DESC, {col} LIMIT {FACET_SIZE}",
                self.params,
            ).fetchall()
            facets[facet] = {str(value): int(n) for value, n in rows}

        page_where, page_params = where, list(self.params)
        if self.query.cursor is not None:
            after, after_params = self._after(self.query.cursor)
            page_where = f"{where} AND {after}"
            page_params.extend(after_params)
        order = ", ".join(f"{expr} {'DESC' if desc else 'ASC'} NULLS LAST" for expr, desc in self.sort)
        select = ", ".join(expr for expr, _ in self.sort)
        rows = conn.execute(
            f"SELECT doc, {select} FROM {physical} WHERE {page_where} ORDER BY {order} LIMIT ?",
            [*page_params, self.query.limit + 1],
        ).fetchall()

        has_more = len(rows) > self.query.limit
        rows = rows[: self.query.limit]
        next_cursor = None
        if has_more and rows:
            last = rows[-1]
            token = _Cursor(self.signature, list(last[1:-1]), str(last[-1]))
            next_cursor = base64.urlsafe_b64encode(_cursor_encoder.encode(token)).rstrip(b"=").decode()
        return Page(
            items=[_doc_decoder.decode(row[0]) for row in rows],
            next_cursor=next_cursor,
            facets=facets,
            total=total,
        )
