"""The Elasticsearch read store (production backend), on the official async client.

Layout: one index per projection version, ``{prefix}{name}_v{version}``, and an
alias ``{prefix}{name}`` that queries read through. A rebuild fills a new
index and moves the alias in one ``_aliases`` call.

Order safety: documents are indexed with ``version_type=external`` and the
stream revision as the version, so a redelivered or older event is rejected
by Elasticsearch itself (409, reported as ``STALE``), also when two projector
processes race.

Refresh strategy (read-your-writes): every bulk write asks for
``refresh=wait_for`` and the indices refresh every 100 ms, so once a write
returns, and the projector acknowledges the event, the document is visible
to searches; ``GET`` by id is real-time in Elasticsearch anyway. The price is
up to ~100 ms of latency per projector batch, not per event.

Schemas across processes: each index carries its projection's
:class:`CollectionSchema` in its mapping's ``_meta``, so a process that never
ensured a collection (``orderstream api``: the projectors run elsewhere) reads
the schema from the index the alias points at. A collection whose alias does
not exist yet has nothing to find: its queries answer an empty page.

Outages: a node that cannot be reached, or answers 429/5xx, raises
:class:`ReadStoreUnavailable` (the API's 503 + ``Retry-After``). The client's
per-request transport log lines are kept at WARNING unless the process logs at
DEBUG.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from datetime import datetime
from typing import Any

import msgspec
from elasticsearch import ApiError, AsyncElasticsearch, BadRequestError, NotFoundError, TransportError
from elasticsearch.serializer import JsonSerializer

from orderstream.readstore.base import (
    CollectionSchema,
    Delete,
    Document,
    FieldGroup,
    FieldKind,
    FilterValue,
    InvalidQuery,
    Page,
    Query,
    Range,
    ReadCheckpoint,
    ReadStoreUnavailable,
    SortField,
    Stored,
    T,
    Upsert,
    WriteOp,
    WriteOutcome,
)
from orderstream.readstore.cursor import decode_cursor, encode_cursor, sort_signature

MAX_LIMIT = 1000
REFRESH_INTERVAL = "100ms"
SCHEMA_META = "orderstream_schema"
"""Key of the projection schema (JSON) in an index mapping's ``_meta``."""
DISCOVERED_SCHEMA_TTL = 10.0
"""Seconds a schema read from an index is trusted before it is read again (an alias
switched by a rebuild in another process may point at a new version)."""

_schema_encoder = msgspec.json.Encoder()
_schema_decoder = msgspec.json.Decoder(CollectionSchema)
_checkpoint_decoder = msgspec.json.Decoder(ReadCheckpoint)


@asynccontextmanager
async def _reachable() -> AsyncIterator[None]:
    """Turn "the node is down, overloaded or failing" into :class:`ReadStoreUnavailable`;
    a 4xx stays what it is (a bad request or a missing document is no outage)."""
    try:
        yield
    except ApiError as exc:
        if exc.meta.status == 429 or exc.meta.status >= 500:
            raise ReadStoreUnavailable("the read store (Elasticsearch)", exc) from exc
        raise
    except TransportError as exc:  # connection refused, timeout, TLS
        raise ReadStoreUnavailable("the read store (Elasticsearch)", exc) from exc


_ES_TYPES = {
    FieldKind.KEYWORD: {"type": "keyword"},
    FieldKind.TEXT: {"type": "text", "analyzer": "standard"},
    FieldKind.INTEGER: {"type": "long"},
    FieldKind.DATETIME: {"type": "date_nanos"},  # µs timestamps sort apart (`date` keeps ms)
}


def _analysis_mapping(field: FieldKind | FieldGroup) -> dict[str, Any]:
    """An analysis field's mapping: a TEXT is also kept whole as ``.keyword`` (so a
    reason can be searched and counted), a group maps its own fields."""
    if isinstance(field, FieldGroup):
        properties = {name: _analysis_mapping(sub) for name, sub in field.fields.items()}
        return {"type": "nested" if field.nested else "object", "properties": properties}
    if field is FieldKind.TEXT:
        return {**_ES_TYPES[field], "fields": {"keyword": {"type": "keyword", "ignore_above": 256}}}
    return dict(_ES_TYPES[field])


def index_mappings(schema: CollectionSchema) -> dict[str, Any]:
    """Only the declared fields (queried and analysis) are indexed; the rest is kept in ``_source``."""
    properties = {name: _analysis_mapping(field) for name, field in schema.analysis.items()}
    properties.update({name: dict(_ES_TYPES[kind]) for name, kind in schema.fields.items()})
    properties.setdefault(schema.id_field, {"type": "keyword"})
    return {"dynamic": False, "properties": properties}


def index_template(schema: CollectionSchema, prefix: str) -> dict[str, Any]:
    """The composable index template for a projection's indices (also written
    to ``infra/elasticsearch/templates/`` by ``orderstream projections templates``)."""
    return {
        "index_patterns": [f"{prefix}{schema.name}_v*"],
        "priority": 200,
        "template": {
            "settings": {
                "number_of_shards": 1,
                "number_of_replicas": 0,
                "refresh_interval": REFRESH_INTERVAL,
            },
            "mappings": index_mappings(schema),
        },
        "_meta": {"projection": schema.name, "managed_by": "orderstream"},
    }


def _check_scalar(field: str, kind: FieldKind, value: object) -> None:
    if kind is FieldKind.INTEGER and (not isinstance(value, int) or isinstance(value, bool)):
        raise InvalidQuery(f"{field} takes integers, not {value!r}")
    if kind is FieldKind.DATETIME:
        try:
            datetime.fromisoformat(str(value))
        except ValueError:
            raise InvalidQuery(f"{field} takes ISO 8601 date-times, not {value!r}") from None
    if kind is FieldKind.KEYWORD and not isinstance(value, (str, int)):
        raise InvalidQuery(f"{field} takes strings, not {value!r}")


def check_filter_value(field: str, kind: FieldKind, value: FilterValue) -> None:
    """Refuse a filter value the field's kind cannot hold, before the server sees it."""
    if isinstance(value, Range):
        for bound in (value.gte, value.lte):
            if bound is not None:
                _check_scalar(field, kind, bound)
    elif isinstance(value, (str, int)):
        _check_scalar(field, kind, value)
    else:
        for item in value:
            _check_scalar(field, kind, item)


class MsgspecJsonSerializer(JsonSerializer):
    """The node's JSON answers (searches, ``get``, the projections' ``mget`` and bulk
    results) parsed by msgspec rather than the standard library's ``json``, which is
    slower (docs/read-models.md: on a list the HTTP round trip is the larger cost)."""

    def json_loads(self, data: bytes) -> Any:
        return msgspec.json.decode(data)


DEFAULT_READ_TIMEOUT = 5.0
"""Seconds a read (a search, a ``get``, an ``mget``, an alias look-up) may take."""
WRITE_TIMEOUT = 30.0
"""Seconds a write (a bulk, an index's creation, a refresh) may take."""


class ElasticsearchReadStore:
    def __init__(
        self, client: AsyncElasticsearch, prefix: str, *, read_timeout: float = DEFAULT_READ_TIMEOUT
    ) -> None:
        """``read_timeout``: what a read may take before it is an outage (a 503 at the
        API). A node that hangs rather than refuses (stopped, swapping, in a long GC)
        made every read wait the client's 30 s for its 503; writes keep the 30 s, as
        a bulk that waits for a refresh may take long on a busy node."""
        self._es = client
        self._reads = client.options(request_timeout=read_timeout)
        self._prefix = prefix.lower()
        self._schemas: dict[str, CollectionSchema] = {}
        """Schemas ensured by this process: authoritative."""
        self._discovered: dict[str, tuple[float, CollectionSchema]] = {}
        self._checkpoints_ready = False
        """Schemas read from the alias target's mapping, with when they were read."""

    @classmethod
    async def open(
        cls, url: str, *, prefix: str = "orderstream-", read_timeout: float = DEFAULT_READ_TIMEOUT
    ) -> ElasticsearchReadStore:
        if not logging.getLogger("orderstream").isEnabledFor(logging.DEBUG):
            logging.getLogger("elastic_transport").setLevel(logging.WARNING)
        client = AsyncElasticsearch(
            url, request_timeout=WRITE_TIMEOUT, serializers={"application/json": MsgspecJsonSerializer()}
        )
        return cls(client, prefix, read_timeout=read_timeout)

    # ------------------------------------------------------------------ naming

    def alias(self, collection: str) -> str:
        return f"{self._prefix}{collection}"

    def _physical(self, schema: CollectionSchema, version: int | None, suffix: str | None) -> str:
        return f"{self._prefix}{schema.physical_name(version, suffix)}".lower()

    async def _schema(self, collection: str) -> CollectionSchema | None:
        """The collection's schema: ensured here, or read from the index its alias
        points at; ``None`` if there is no such alias (nothing projected yet)."""
        if collection in self._schemas:
            return self._schemas[collection]
        cached = self._discovered.get(collection)
        if cached is not None and time.monotonic() - cached[0] < DISCOVERED_SCHEMA_TTL:
            return cached[1]
        try:
            async with _reachable():
                answer = await self._reads.indices.get_mapping(index=self.alias(collection))
        except NotFoundError:
            return None
        for mapping in answer.body.values():
            raw = mapping.get("mappings", {}).get("_meta", {}).get(SCHEMA_META)
            if raw is not None:
                schema = _schema_decoder.decode(raw)
                self._discovered[collection] = (time.monotonic(), schema)
                return schema
        raise InvalidQuery(
            f"the {collection!r} index has no schema in its mapping (made before schemas were "
            f"recorded): rebuild it once with `orderstream projections rebuild {collection}`"
        )

    # -------------------------------------------------------------- collections

    async def ensure_collection(
        self, schema: CollectionSchema, *, version: int | None = None, suffix: str | None = None
    ) -> str:
        self._schemas[schema.name] = schema
        await self._es.indices.put_index_template(
            name=f"{self._prefix}{schema.name}", **index_template(schema, self._prefix)
        )
        physical = self._physical(schema, version, suffix)
        stored = msgspec.structs.replace(schema, version=version if version is not None else schema.version)
        meta = {SCHEMA_META: _schema_encoder.encode(stored).decode()}
        if not await self._es.indices.exists(index=physical):
            template = index_template(schema, self._prefix)["template"]
            try:
                await self._es.indices.create(
                    index=physical,
                    settings=template["settings"],
                    mappings={**template["mappings"], "_meta": meta},
                )
            except Exception as exc:  # created by a concurrent process in the meantime
                if "resource_already_exists_exception" not in str(exc):
                    raise
            else:  # a checkpoint left by a deleted index of this name is not this one's
                with contextlib.suppress(NotFoundError):
                    await self._es.delete(index=self._checkpoints, id=physical)
        else:  # made before schemas were recorded, or by another code version: record ours
            await self._es.indices.put_mapping(index=physical, meta=meta)
        await self._ensure_checkpoints()
        if await self.alias_target(schema.name) is None:
            await self._es.indices.update_aliases(
                actions=[{"add": {"index": physical, "alias": self.alias(schema.name)}}]
            )
        return physical

    async def alias_target(self, collection: str) -> str | None:
        try:
            async with _reachable():
                answer = await self._reads.indices.get_alias(name=self.alias(collection))
        except NotFoundError:
            return None
        targets = sorted(answer.body)
        return targets[0] if targets else None

    async def switch_alias(self, collection: str, physical: str) -> str | None:
        previous = await self.alias_target(collection)
        alias = self.alias(collection)
        actions: list[dict[str, Any]] = [{"add": {"index": physical, "alias": alias}}]
        if previous and previous != physical:
            actions.insert(0, {"remove": {"index": previous, "alias": alias}})
        await self._es.indices.update_aliases(actions=actions)
        return previous

    async def drop_physical(self, physical: str) -> None:
        await self._es.indices.delete(index=physical, ignore_unavailable=True)
        with contextlib.suppress(NotFoundError):
            await self._es.delete(index=self._checkpoints, id=physical)

    @property
    def _checkpoints(self) -> str:
        """The meta index of the projections' checkpoints: one document per physical
        index (created on first write). A deleted projection index loses its alias, so
        its runner notices (at its start or its next batch) even if this document
        outlived it."""
        return f"{self._prefix}checkpoints"

    async def _ensure_checkpoints(self) -> None:
        """Create the checkpoints index (its shard started) before any alias is made:
        a reader that finds an alias then finds this index ready, never recovering."""
        if self._checkpoints_ready:
            return
        try:
            await self._es.indices.create(
                index=self._checkpoints,
                settings={"number_of_shards": 1, "number_of_replicas": 0},
                mappings={"dynamic": False, "properties": {}},
            )
        except Exception as exc:  # made by another process or an earlier run
            if "resource_already_exists_exception" not in str(exc):
                raise
        self._checkpoints_ready = True

    async def read_checkpoint(self, physical: str) -> ReadCheckpoint | None:
        try:
            async with _reachable():
                answer = await self._reads.get(index=self._checkpoints, id=physical)
        except NotFoundError:
            return None
        return _checkpoint_decoder.decode(msgspec.json.encode(answer["_source"]))

    async def write_checkpoint(self, physical: str, checkpoint: ReadCheckpoint) -> None:
        async with _reachable():
            await self._es.index(
                index=self._checkpoints, id=physical, document=msgspec.to_builtins(checkpoint)
            )

    async def refresh(self, collection: str) -> None:
        await self._es.indices.refresh(index=self.alias(collection))

    # ------------------------------------------------------------------ writes

    async def get(self, collection: str, doc_id: str, *, physical: str | None = None) -> Document | None:
        try:
            async with _reachable():
                answer = await self._reads.get(index=physical or self.alias(collection), id=doc_id)
        except NotFoundError:
            return None
        source: Document = answer["_source"]
        return source

    async def get_as(self, collection: str, doc_id: str, as_type: type[T]) -> T | None:
        """The client has already parsed ``_source``: converted like ``msgspec.convert``."""
        doc = await self.get(collection, doc_id)
        return None if doc is None else msgspec.convert(doc, as_type, strict=False)

    async def get_version(self, collection: str, doc_id: str, *, physical: str | None = None) -> int | None:
        try:
            async with _reachable():
                answer = await self._reads.get(
                    index=physical or self.alias(collection), id=doc_id, source=False
                )
        except NotFoundError:
            return None
        version: int = answer["_version"]
        return version

    async def get_many(
        self, collection: str, doc_ids: Sequence[str], *, physical: str | None = None
    ) -> dict[str, Stored]:
        """One ``mget``; real-time, so it sees every write so far, refreshed or not."""
        if not doc_ids:
            return {}
        try:
            async with _reachable():
                answer = await self._reads.mget(
                    index=physical or self.alias(collection), ids=list(dict.fromkeys(doc_ids))
                )
        except NotFoundError:  # no such index yet, as get() answers
            return {}
        return {
            doc["_id"]: Stored(version=doc["_version"], document=doc["_source"])
            for doc in answer["docs"]
            if doc.get("found")
        }

    async def write(
        self, collection: str, ops: Sequence[WriteOp], *, physical: str | None = None
    ) -> list[WriteOutcome]:
        if not ops:
            return []
        index = physical or await self.alias_target(collection) or self.alias(collection)
        body: list[dict[str, Any]] = []
        for op in ops:
            meta = {"_index": index, "_id": op.id, "version": op.version, "version_type": "external"}
            if isinstance(op, Upsert):
                body.append({"index": meta})
                body.append(op.document)
            else:
                body.append({"delete": meta})
        async with _reachable():
            answer = await self._es.bulk(operations=body, refresh="wait_for")
        outcomes = []
        for op, item in zip(ops, answer["items"], strict=True):
            result = item["index"] if isinstance(op, Upsert) else item["delete"]
            status = result.get("status", 500)
            if status in (200, 201):
                outcomes.append(WriteOutcome.WRITTEN)
            elif status == 409 or (isinstance(op, Delete) and status == 404):
                outcomes.append(WriteOutcome.STALE if status == 409 else WriteOutcome.WRITTEN)
            else:
                raise RuntimeError(f"bulk {op.id}: {result.get('error')}")
        return outcomes

    # ------------------------------------------------------------------- query

    def _check_field(self, schema: CollectionSchema, field: str, *kinds: FieldKind) -> FieldKind:
        kind = FieldKind.KEYWORD if field == schema.id_field else schema.fields.get(field)
        if kind is None or (kinds and kind not in kinds):
            raise InvalidQuery(f"{schema.name}: cannot use field {field!r} here")
        return kind

    def _filters(self, schema: CollectionSchema, query: Query) -> list[dict[str, Any]]:
        clauses: list[dict[str, Any]] = []
        for field, value in query.filters.items():
            kind = self._check_field(schema, field, FieldKind.KEYWORD, FieldKind.INTEGER, FieldKind.DATETIME)
            check_filter_value(field, kind, value)
            if isinstance(value, Range):
                bounds = {k: v for k, v in (("gte", value.gte), ("lte", value.lte)) if v is not None}
                clauses.append({"range": {field: bounds}})
            elif isinstance(value, (str, int)):
                clauses.append({"term": {field: value}})
            else:
                clauses.append({"terms": {field: list(value)}})
        return clauses

    def _sort(self, schema: CollectionSchema, query: Query) -> list[SortField]:
        sort = list(query.sort or schema.default_sort)
        for s in sort:
            self._check_field(schema, s.field, FieldKind.KEYWORD, FieldKind.INTEGER, FieldKind.DATETIME)
        if not any(s.field == schema.id_field for s in sort):  # as on SQLite: in the last field's direction
            sort.append(SortField(schema.id_field, descending=sort[-1].descending if sort else False))
        return sort

    async def query(self, collection: str, query: Query) -> Page[Document]:
        return await self._query(collection, query, lambda source: source)

    async def query_as(self, collection: str, query: Query, as_type: type[T]) -> Page[T]:
        """The client has already parsed each ``_source``: converted like ``msgspec.convert``."""
        return await self._query(
            collection, query, lambda source: msgspec.convert(source, as_type, strict=False)
        )

    async def _query(self, collection: str, query: Query, convert: Callable[[Document], T]) -> Page[T]:
        if not 1 <= query.limit <= MAX_LIMIT:
            raise InvalidQuery(f"limit must be between 1 and {MAX_LIMIT}")
        schema = await self._schema(collection)
        if schema is None:  # no alias yet: nothing has been projected
            total = 0 if query.count or query.facets else None
            return Page(items=[], next_cursor=None, facets={f: {} for f in query.facets}, total=total)
        must: list[dict[str, Any]] = []
        if query.text and query.text.strip():
            text_fields = [name for name, kind in schema.fields.items() if kind is FieldKind.TEXT]
            must.append(
                {
                    "multi_match": {
                        "query": query.text,
                        "fields": text_fields,
                        "type": "bool_prefix",
                        "operator": "and",
                    }
                }
            )
        bool_query = {"bool": {"filter": self._filters(schema, query), "must": must}}
        sort = self._sort(schema, query)
        es_sort = [{s.field: {"order": "desc" if s.descending else "asc", "missing": "_last"}} for s in sort]
        aggs = {}
        for facet in query.facets:
            self._check_field(schema, facet, FieldKind.KEYWORD)
            aggs[facet] = {"terms": {"field": facet, "size": 100}}
        params: dict[str, Any] = {
            "index": self.alias(collection),
            "query": bool_query,
            "sort": es_sort,
            "size": query.limit + 1,
            "track_total_hits": query.count or bool(query.facets),
        }
        if aggs:
            params["aggs"] = aggs
        signature = sort_signature([(s.field, s.descending) for s in sort])
        if query.cursor:
            params["search_after"] = decode_cursor(query.cursor, signature, len(sort))
        try:
            async with _reachable():
                answer = await self._reads.search(**params)
        except BadRequestError as exc:  # a query the checks above let through
            raise InvalidQuery(str(exc.message)) from exc
        hits = answer["hits"]["hits"]
        more = len(hits) > query.limit
        hits = hits[: query.limit]
        next_cursor = encode_cursor(signature, hits[-1]["sort"]) if more and hits else None
        facets = {
            name: {str(b["key"]): int(b["doc_count"]) for b in answer["aggregations"][name]["buckets"]}
            for name in aggs
        }
        return Page(
            items=[convert(h["_source"]) for h in hits],
            next_cursor=next_cursor,
            facets=facets,
            total=int(answer["hits"]["total"]["value"]) if query.count or query.facets else None,
        )

    async def close(self) -> None:
        await self._es.close()
