"""The read store contract: every backend (SQLite, Elasticsearch) passes this suite.

Written against the port only. Queries follow ``await store.refresh(collection)``
so backends with near-real-time search (Elasticsearch) see every write.
"""

from __future__ import annotations

import base64
from datetime import UTC, datetime

import msgspec
import pytest

from orderstream.readstore.base import (
    CollectionSchema,
    Delete,
    Document,
    FieldKind,
    InvalidQuery,
    Query,
    Range,
    ReadStore,
    SortField,
    Stored,
    Upsert,
    WriteOutcome,
)

WRITTEN, STALE = WriteOutcome.WRITTEN, WriteOutcome.STALE

SCHEMA = CollectionSchema(
    name="things",
    version=1,
    id_field="id",
    fields={
        "colour": FieldKind.KEYWORD,
        "size": FieldKind.INTEGER,
        "made_at": FieldKind.DATETIME,
        "title": FieldKind.TEXT,
        "body": FieldKind.TEXT,
    },
    default_sort=(SortField("made_at", descending=True),),
)
C = SCHEMA.name


def thing(
    ident: str,
    *,
    colour: str = "red",
    size: int = 1,
    made_at: str = "2024-05-01T12:00:00Z",
    title: str = "",
    body: str = "",
    **extra: object,
) -> Document:
    return {
        "id": ident,
        "colour": colour,
        "size": size,
        "made_at": made_at,
        "title": title,
        "body": body,
        "nested": {"kept": [1, 2, 3]},
        **extra,
    }


async def put(store: ReadStore, *docs: Document, version: int = 1) -> None:
    outcomes = await store.write(C, [Upsert(id=d["id"], version=version, document=d) for d in docs])
    assert outcomes == [WRITTEN] * len(docs)
    await store.refresh(C)


async def ids(store: ReadStore, query: Query) -> list[str]:
    page = await store.query(C, query)
    return [item["id"] for item in page.items]


@pytest.fixture
async def store(read_store: ReadStore) -> ReadStore:
    await read_store.ensure_collection(SCHEMA)
    return read_store


# ------------------------------------------------------------------------ collections


async def test_ensure_collection_is_idempotent_and_sets_the_alias(read_store: ReadStore) -> None:
    first = await read_store.ensure_collection(SCHEMA)
    second = await read_store.ensure_collection(SCHEMA)
    assert first == second
    assert await read_store.alias_target(C) == first


async def test_ensure_keeps_the_documents(store: ReadStore) -> None:
    await put(store, thing("a"))
    await store.ensure_collection(SCHEMA)
    assert await store.get(C, "a") is not None


# ----------------------------------------------------------------------------- get


async def test_get_returns_the_document_as_written(store: ReadStore) -> None:
    doc = thing("a", title="Blue shirt", extra_field={"x": None, "y": [1, "two"]})
    await put(store, doc, version=3)
    assert await store.get(C, "a") == doc
    assert await store.get_version(C, "a") == 3


async def test_get_missing(store: ReadStore) -> None:
    assert await store.get(C, "nope") is None
    assert await store.get_version(C, "nope") is None


async def test_get_many_reads_what_a_batch_touches_at_once(store: ReadStore) -> None:
    await put(store, thing("a", size=1), version=3)
    await put(store, thing("b", size=2), version=0)
    await store.write(C, [Delete(id="b", version=1)])

    found = await store.get_many(C, ["a", "nope", "a", "b"])

    assert found["a"] == Stored(version=3, document=thing("a", size=1))
    assert "nope" not in found
    if "b" in found:  # a tombstone: no document, its version kept (where the backend keeps it)
        assert found["b"] == Stored(version=1, document=None)
    assert await store.get_many(C, []) == {}


# ----------------------------------------------------------------- typed reads (views)


class Nested(msgspec.Struct, frozen=True):
    kept: list[int]


class ThingView(msgspec.Struct, frozen=True, kw_only=True):
    """What an API view is to a stored document: some of its fields, typed."""

    id: str
    colour: str
    size: int
    made_at: datetime
    nested: Nested
    note: str = "none"
    gone: str | None = None


async def test_query_as_decodes_each_document_into_the_type_as_convert_would(store: ReadStore) -> None:
    lax = {**thing("c", made_at="2024-05-03T12:00:00+02:00"), "size": "7", "note": "lax"}
    await put(store, thing("a", made_at="2024-05-01T12:00:00Z", extra={"x": 1}), thing("b"), lax)
    query = Query(limit=2, count=True, facets=("colour",))

    plain = await store.query(C, query)
    typed = await store.query_as(C, query, ThingView)

    assert typed.items == [msgspec.convert(d, ThingView, strict=False) for d in plain.items]
    assert typed.items[0] == ThingView(
        id="c",
        colour="red",
        size=7,  # a number stored as a string, accepted as convert(strict=False) accepts it
        made_at=datetime(2024, 5, 3, 10, 0, tzinfo=UTC),
        nested=Nested(kept=[1, 2, 3]),
        note="lax",
    )
    assert typed.items[1].gone is None  # absent: the default; "title", "body", "extra": skipped
    assert (typed.next_cursor, typed.total, typed.facets) == (plain.next_cursor, plain.total, plain.facets)
    rest = await store.query_as(C, msgspec.structs.replace(query, cursor=typed.next_cursor), ThingView)
    assert [t.id for t in rest.items] == ["a"]
    assert (await store.query_as(C, query, Document)).items == plain.items


async def test_get_as_decodes_the_document_into_the_type(store: ReadStore) -> None:
    await put(store, thing("a", note="hello"))
    await store.write(C, [Delete(id="a", version=2)])
    await put(store, thing("b", note="hello"))

    assert await store.get_as(C, "b", ThingView) == msgspec.convert(await store.get(C, "b"), ThingView)
    assert await store.get_as(C, "a", ThingView) is None  # deleted
    assert await store.get_as(C, "nope", ThingView) is None
    assert await store.get_as(C, "b", Document) == await store.get(C, "b")


async def test_a_document_the_type_cannot_hold_is_a_validation_error(store: ReadStore) -> None:
    await put(store, {**thing("a"), "nested": "not an object"})
    with pytest.raises(msgspec.ValidationError):
        await store.query_as(C, Query(), ThingView)
    with pytest.raises(msgspec.ValidationError):
        await store.get_as(C, "a", ThingView)


async def test_typed_reads_of_a_collection_never_ensured_find_nothing(read_store: ReadStore) -> None:
    page = await read_store.query_as("never", Query(count=True), ThingView)
    assert (page.items, page.total) == ([], 0)
    assert await read_store.get_as("never", "a", ThingView) is None


# ---------------------------------------------------------------------------- writes


async def test_upsert_is_conditional_on_the_version(store: ReadStore) -> None:
    assert await store.write(C, [Upsert(id="a", version=2, document=thing("a", size=2))]) == [WRITTEN]
    assert await store.write(C, [Upsert(id="a", version=1, document=thing("a", size=1))]) == [STALE]
    assert await store.write(C, [Upsert(id="a", version=2, document=thing("a", size=99))]) == [STALE]
    doc = await store.get(C, "a")
    assert doc is not None
    assert doc["size"] == 2
    assert await store.get_version(C, "a") == 2
    assert await store.write(C, [Upsert(id="a", version=3, document=thing("a", size=3))]) == [WRITTEN]
    doc = await store.get(C, "a")
    assert doc is not None
    assert doc["size"] == 3


async def test_version_zero_is_a_valid_first_version(store: ReadStore) -> None:
    assert await store.write(C, [Upsert(id="a", version=0, document=thing("a"))]) == [WRITTEN]
    assert await store.write(C, [Upsert(id="a", version=0, document=thing("a", size=5))]) == [STALE]
    assert await store.get_version(C, "a") == 0


async def test_a_batch_reports_each_op_in_order(store: ReadStore) -> None:
    outcomes = await store.write(
        C,
        [
            Upsert(id="a", version=1, document=thing("a", size=1)),
            Upsert(id="b", version=5, document=thing("b")),
            Upsert(id="a", version=1, document=thing("a", size=2)),
            Upsert(id="a", version=2, document=thing("a", size=3)),
        ],
    )
    assert outcomes == [WRITTEN, WRITTEN, STALE, WRITTEN]
    doc = await store.get(C, "a")
    assert doc is not None
    assert doc["size"] == 3


async def test_delete_is_conditional_and_an_older_upsert_cannot_resurrect(store: ReadStore) -> None:
    await put(store, thing("a"), version=2)
    assert await store.write(C, [Delete(id="a", version=1)]) == [STALE]
    assert await store.write(C, [Delete(id="a", version=2)]) == [STALE]
    assert await store.get(C, "a") is not None
    assert await store.write(C, [Delete(id="a", version=3)]) == [WRITTEN]
    assert await store.get(C, "a") is None
    # A late, older event arriving after the delete changes nothing.
    assert await store.write(C, [Upsert(id="a", version=2, document=thing("a"))]) == [STALE]
    assert await store.get(C, "a") is None
    assert await store.write(C, [Upsert(id="a", version=4, document=thing("a", size=4))]) == [WRITTEN]
    doc = await store.get(C, "a")
    assert doc is not None
    assert doc["size"] == 4


async def test_deleted_documents_are_not_found_by_queries(store: ReadStore) -> None:
    await put(store, thing("a", title="alpha"), thing("b", title="alpha"))
    await store.write(C, [Delete(id="a", version=2)])
    await store.refresh(C)
    page = await store.query(C, Query(text="alpha", facets=("colour",)))
    assert [d["id"] for d in page.items] == ["b"]
    assert page.total == 1
    assert page.facets["colour"] == {"red": 1}


# --------------------------------------------------------------------------- filters


@pytest.fixture
async def catalogue(store: ReadStore) -> ReadStore:
    await put(
        store,
        thing("a", colour="red", size=1, made_at="2024-01-01T00:00:00Z"),
        thing("b", colour="blue", size=5, made_at="2024-02-01T00:00:00Z"),
        thing("c", colour="green", size=10, made_at="2024-03-01T00:00:00.500000Z"),
        thing("d", colour="blue", size=20, made_at="2024-04-01T10:00:00+02:00"),
    )
    return store


async def test_filter_exact(catalogue: ReadStore) -> None:
    assert sorted(await ids(catalogue, Query(filters={"colour": "blue"}))) == ["b", "d"]
    assert await ids(catalogue, Query(filters={"size": 10})) == ["c"]
    assert await ids(catalogue, Query(filters={"colour": "purple"})) == []


async def test_filter_any_of(catalogue: ReadStore) -> None:
    assert sorted(await ids(catalogue, Query(filters={"colour": ["red", "green"]}))) == ["a", "c"]
    assert await ids(catalogue, Query(filters={"colour": []})) == []


async def test_filter_integer_range(catalogue: ReadStore) -> None:
    assert sorted(await ids(catalogue, Query(filters={"size": Range(gte=5, lte=10)}))) == ["b", "c"]
    assert sorted(await ids(catalogue, Query(filters={"size": Range(gte=10)}))) == ["c", "d"]
    assert sorted(await ids(catalogue, Query(filters={"size": Range(lte=1)}))) == ["a"]


async def test_filter_datetime_range_compares_instants(catalogue: ReadStore) -> None:
    got = await ids(
        catalogue, Query(filters={"made_at": Range(gte="2024-02-01T00:00:00Z", lte="2024-03-01T00:00:01Z")})
    )
    assert sorted(got) == ["b", "c"]
    # d is 08:00 UTC: an offset is an instant, not a wall clock.
    assert await ids(catalogue, Query(filters={"made_at": Range(gte="2024-04-01T08:00:00Z")})) == ["d"]
    assert await ids(catalogue, Query(filters={"made_at": Range(gte="2024-04-01T08:00:00.001Z")})) == []


async def test_filters_combine(catalogue: ReadStore) -> None:
    query = Query(filters={"colour": ["blue", "green"], "size": Range(gte=10)})
    assert sorted(await ids(catalogue, query)) == ["c", "d"]


@pytest.mark.parametrize(
    "query",
    [
        Query(filters={"unknown": "x"}),
        Query(filters={"nested": "x"}),
        Query(sort=(SortField("unknown"),)),
        Query(facets=("unknown",)),
        Query(facets=("size",)),
        Query(filters={"size": "not a number"}),
        Query(filters={"made_at": Range(gte="yesterday-ish")}),
    ],
    ids=["filter", "undeclared-stored-field", "sort", "facet", "facet-on-integer", "type", "bad-datetime"],
)
async def test_invalid_queries_are_rejected(catalogue: ReadStore, query: Query) -> None:
    with pytest.raises(InvalidQuery):
        await catalogue.query(C, query)


# ------------------------------------------------------------------------- full text


@pytest.fixture
async def texts(store: ReadStore) -> ReadStore:
    await put(
        store,
        thing("1", title="Blue cotton shirt", body="Soft and light"),
        thing("2", title="Bluetooth speaker", body="Loud"),
        thing("3", title="Red wool jumper", body="Warm for winter, blue trim"),
        thing("4", title="Green café mug", body="SKU-123 ceramic"),
    )
    return store


async def test_text_matches_words_in_any_text_field(texts: ReadStore) -> None:
    assert sorted(await ids(texts, Query(text="shirt"))) == ["1"]
    assert sorted(await ids(texts, Query(text="winter"))) == ["3"]
    assert sorted(await ids(texts, Query(text="WOOL"))) == ["3"]


async def test_text_requires_every_word(texts: ReadStore) -> None:
    assert sorted(await ids(texts, Query(text="blue shirt"))) == ["1"]
    assert sorted(await ids(texts, Query(text="blue trim"))) == ["3"]
    assert await ids(texts, Query(text="blue mug")) == []


async def test_text_last_word_is_a_prefix(texts: ReadStore) -> None:
    assert sorted(await ids(texts, Query(text="blu"))) == ["1", "2", "3"]
    assert sorted(await ids(texts, Query(text="cotton sh"))) == ["1"]
    assert sorted(await ids(texts, Query(text="sku-12"))) == ["4"]


async def test_text_combines_with_filters(texts: ReadStore) -> None:
    await put(texts, thing("5", colour="blue", title="Blue hat"))
    assert await ids(texts, Query(text="blue", filters={"colour": "blue"})) == ["5"]


@pytest.mark.parametrize(
    "text",
    [
        '"',
        'blue"',
        '"blue',
        "'",
        "AND",
        "blue AND",
        "OR NOT",
        "NEAR(blue shirt)",
        "*",
        "blu*",
        "title:blue",
        "(blue",
        "-blue",
        "+blue",
        "^blue",
        "blue\\",
        "{blue}",
        "a:b:c",
        "!!!",
        "   ",
        "",
        "%_",
        "\x00",
        "ﾃｽﾄ ✓ 🙂",
    ],
)
async def test_user_text_never_breaks_the_query(texts: ReadStore, text: str) -> None:
    page = await texts.query(C, Query(text=text))
    assert page.total is None or page.total >= 0


async def test_text_with_operators_is_searched_as_words(texts: ReadStore) -> None:
    assert sorted(await ids(texts, Query(text='"blue" shirt'))) == ["1"]
    assert sorted(await ids(texts, Query(text="shirt*"))) == ["1"]


# ------------------------------------------------------------------------------ sort


async def test_default_sort_is_the_schema_s(catalogue: ReadStore) -> None:
    assert await ids(catalogue, Query()) == ["d", "c", "b", "a"]


async def test_sort_ascending_and_descending(catalogue: ReadStore) -> None:
    assert await ids(catalogue, Query(sort=(SortField("size"),))) == ["a", "b", "c", "d"]
    assert await ids(catalogue, Query(sort=(SortField("size", descending=True),))) == ["d", "c", "b", "a"]
    assert await ids(catalogue, Query(sort=(SortField("made_at"),))) == ["a", "b", "c", "d"]


async def test_sort_ties_are_broken_by_id_in_the_last_sort_direction(store: ReadStore) -> None:
    """The id runs the way the last sort field does, so a descending sort is one
    backward walk of a ``(field, id)`` index rather than a sort of every tie."""
    await put(
        store,
        *(
            thing(i, colour=c, size=s)
            for i, c, s in [("e", "b", 1), ("c", "a", 2), ("a", "b", 2), ("d", "a", 1), ("b", "b", 1)]
        ),
    )
    assert await ids(store, Query(sort=(SortField("colour"),))) == ["c", "d", "a", "b", "e"]
    assert await ids(store, Query(sort=(SortField("colour", descending=True),))) == ["e", "b", "a", "d", "c"]
    query = Query(sort=(SortField("colour"), SortField("size", descending=True)))
    assert await ids(store, query) == ["c", "d", "a", "e", "b"]


async def test_datetimes_sort_to_the_microsecond(store: ReadStore) -> None:
    """Two orders placed within one millisecond keep their order: "newest first" must
    not fall back to the id (Elasticsearch's ``date`` keeps only milliseconds)."""
    await put(
        store,
        thing("a", made_at="2024-01-01T00:00:00.000900Z"),
        thing("b", made_at="2024-01-01T00:00:00.000100Z"),
        thing("c", made_at="2024-01-01T00:00:00.000500Z"),
    )
    newest_first = Query(sort=(SortField("made_at", descending=True),), limit=1)
    assert await ids(store, msgspec.structs.replace(newest_first, limit=10)) == ["a", "c", "b"]
    seen: list[str] = []
    cursor = None
    for _ in range(4):
        page = await store.query(C, msgspec.structs.replace(newest_first, cursor=cursor))
        seen += [d["id"] for d in page.items]
        if (cursor := page.next_cursor) is None:
            break
    assert seen == ["a", "c", "b"]


# ------------------------------------------------------------------------ pagination


@pytest.fixture
async def fifty(store: ReadStore) -> ReadStore:
    colours = ["red", "green", "blue"]
    await put(
        store,
        *(
            thing(
                f"t{n:02d}",
                colour=colours[n % 3],
                size=n % 5,
                made_at=f"2024-01-{1 + n % 7:02d}T00:00:00Z",
                title=f"thing number {n}",
            )
            for n in range(50)
        ),
    )
    return store


async def pages(store: ReadStore, query: Query) -> list[list[str]]:
    seen: list[list[str]] = []
    cursor: str | None = None
    while True:
        page = await store.query(C, msgspec.structs.replace(query, cursor=cursor))
        seen.append([item["id"] for item in page.items])
        assert len(seen) < 100, "pagination does not end"
        if page.next_cursor is None:
            return seen
        cursor = page.next_cursor


@pytest.mark.parametrize(
    "sort",
    [
        (),
        (SortField("size"),),
        (SortField("size", descending=True),),
        (SortField("colour"), SortField("made_at", descending=True)),
    ],
    ids=["default", "size-asc", "size-desc", "colour-made_at"],
)
async def test_cursor_pagination_visits_every_document_once(
    fifty: ReadStore, sort: tuple[SortField, ...]
) -> None:
    query = Query(sort=sort, limit=7)
    got = await pages(fifty, query)
    flat = [i for page in got for i in page]
    assert len(got) == 8
    assert all(len(page) == 7 for page in got[:-1])
    assert len(flat) == 50
    assert len(set(flat)) == 50
    # The pages, together, are the same order as one big page.
    assert flat == await ids(fifty, Query(sort=sort, limit=50))


async def test_pagination_with_filters_and_text(fifty: ReadStore) -> None:
    query = Query(filters={"colour": "red"}, text="thing", limit=3)
    flat = [i for page in await pages(fifty, query) for i in page]
    assert sorted(flat) == sorted(f"t{n:02d}" for n in range(50) if n % 3 == 0)


async def test_last_page_has_no_cursor(fifty: ReadStore) -> None:
    page = await fifty.query(C, Query(limit=50))
    assert len(page.items) == 50
    assert page.next_cursor is None
    assert page.total is None  # not asked for: counting costs a pass over every match


async def test_total_counts_every_match_when_asked(fifty: ReadStore) -> None:
    page = await fifty.query(C, Query(filters={"colour": "red"}, limit=2, count=True))
    assert len(page.items) == 2
    assert page.total == 17


@pytest.mark.parametrize(
    "cursor",
    ["garbage", "!!!", base64.urlsafe_b64encode(b"\x93\x01\x02\x03").decode(), "eyJhIjoxfQ"],
)
async def test_bad_cursor_is_an_invalid_query(fifty: ReadStore, cursor: str) -> None:
    with pytest.raises(InvalidQuery):
        await fifty.query(C, Query(cursor=cursor))


@pytest.mark.parametrize(
    "other",
    [
        (SortField("colour"), SortField("made_at")),
        (SortField("made_at"),),  # as many values, another field
        (SortField("size", descending=True),),  # the same field, the other way
    ],
)
async def test_cursor_of_another_sort_is_rejected(fifty: ReadStore, other: tuple[SortField, ...]) -> None:
    """One cursor codec for both stores: a cursor names its sort order."""
    page = await fifty.query(C, Query(sort=(SortField("size"),), limit=5))
    assert page.next_cursor is not None
    with pytest.raises(InvalidQuery):
        await fifty.query(C, Query(sort=other, cursor=page.next_cursor))


async def test_a_cursor_is_url_safe_and_continues_where_the_page_ended(fifty: ReadStore) -> None:
    first = await fifty.query(C, Query(sort=(SortField("made_at", descending=True),), limit=7))
    assert first.next_cursor is not None
    assert set(first.next_cursor) <= set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")
    both = await fifty.query(C, Query(sort=(SortField("made_at", descending=True),), limit=14))
    second = await fifty.query(
        C, Query(sort=(SortField("made_at", descending=True),), limit=7, cursor=first.next_cursor)
    )
    assert [d["id"] for d in first.items + second.items] == [d["id"] for d in both.items]


# ---------------------------------------------------------------------------- facets


async def test_facets_count_every_match_not_just_the_page(fifty: ReadStore) -> None:
    page = await fifty.query(C, Query(limit=2, facets=("colour",)))
    assert len(page.items) == 2
    assert page.facets["colour"] == {"red": 17, "green": 17, "blue": 16}
    assert page.total == 50


async def test_facets_follow_the_filters(fifty: ReadStore) -> None:
    page = await fifty.query(C, Query(filters={"size": Range(lte=1)}, limit=1, facets=("colour",)))
    expected: dict[str, int] = {}
    for n in range(50):
        if n % 5 <= 1:
            colour = ["red", "green", "blue"][n % 3]
            expected[colour] = expected.get(colour, 0) + 1
    assert page.facets["colour"] == expected
    assert page.total == sum(expected.values())


# ---------------------------------------------------------------------- alias, rebuild


async def test_alias_switch(store: ReadStore) -> None:
    v1 = await store.alias_target(C)
    assert v1 is not None
    await put(store, thing("a", title="old"))

    v2 = await store.ensure_collection(SCHEMA, version=2)
    assert v2 != v1
    assert await store.alias_target(C) == v1, "a new version is not served until the switch"
    await store.write(C, [Upsert(id="a", version=1, document=thing("a", title="new"))], physical=v2)
    await store.write(C, [Upsert(id="b", version=1, document=thing("b", title="new"))], physical=v2)
    assert await store.get_version(C, "b", physical=v2) == 1
    assert (await store.get(C, "b", physical=v2) or {}).get("title") == "new"
    await store.refresh(C)

    doc = await store.get(C, "a")
    assert doc is not None
    assert doc["title"] == "old"
    assert await store.get(C, "b") is None
    assert await ids(store, Query(text="new")) == []

    assert await store.switch_alias(C, v2) == v1
    assert await store.alias_target(C) == v2
    await store.refresh(C)
    doc = await store.get(C, "a")
    assert doc is not None
    assert doc["title"] == "new"
    assert sorted(await ids(store, Query(text="new"))) == ["a", "b"]
    # Writes without ``physical`` go through the alias.
    await store.write(C, [Upsert(id="c", version=1, document=thing("c"))])
    assert await store.get_version(C, "c", physical=v2) == 1
    assert await store.get_version(C, "c", physical=v1) is None


async def test_same_version_rebuild_with_a_suffix(store: ReadStore) -> None:
    v1 = await store.alias_target(C)
    rebuilt = await store.ensure_collection(SCHEMA, suffix="r1")
    assert rebuilt not in (v1, None)
    assert await store.alias_target(C) == v1
    await store.write(C, [Upsert(id="x", version=1, document=thing("x"))], physical=rebuilt)
    assert await store.switch_alias(C, rebuilt) == v1
    assert await store.get(C, "x") is not None


async def test_drop_physical(store: ReadStore) -> None:
    v1 = await store.alias_target(C)
    assert v1 is not None
    await put(store, thing("a"))
    v2 = await store.ensure_collection(SCHEMA, version=2)
    await store.switch_alias(C, v2)
    await store.drop_physical(v1)
    await store.drop_physical(v1)  # dropping again is harmless
    assert await store.alias_target(C) == v2
    # Ensuring that version again starts from an empty table/index.
    again = await store.ensure_collection(SCHEMA, version=1)
    assert await store.get_version(C, "a", physical=again) is None
    assert await store.alias_target(C) == v2


async def test_collections_are_independent(store: ReadStore) -> None:
    other = CollectionSchema(
        name="others",
        version=1,
        id_field="key",
        fields={"colour": FieldKind.KEYWORD},
        default_sort=(SortField("key"),),
    )
    await store.ensure_collection(other)
    await store.write("others", [Upsert(id="a", version=7, document={"key": "a", "colour": "red"})])
    await put(store, thing("a"))
    assert await store.get_version("others", "a") == 7
    assert await store.get_version(C, "a") == 1
    await store.refresh("others")
    assert [d["key"] for d in (await store.query("others", Query())).items] == ["a"]
