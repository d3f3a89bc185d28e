"""SQLite read store specifics the shared contract cannot express: its cursor encoding,
its query plans (sort-order walk, prefix words, maintained counts), its reader connections."""

from __future__ import annotations

import asyncio
import base64
import sqlite3
import threading
from collections.abc import AsyncIterator
from pathlib import Path

import msgspec
import pytest

from orderstream.readstore import sqlite as sqlite_module
from orderstream.readstore.base import Delete, InvalidQuery, Query, Range, SortField, Upsert
from orderstream.readstore.sqlite import SqliteReadStore
from tests.contract.test_read_store import SCHEMA, C, ids, pages, thing


@pytest.mark.parametrize("value", [2**63, 2**64 - 1], ids=["2^63", "2^64-1"])
async def test_a_cursor_with_an_integer_sqlite_cannot_bind_is_invalid(tmp_path: Path, value: int) -> None:
    store = await SqliteReadStore.open(tmp_path / "read.db")
    try:
        await store.ensure_collection(SCHEMA)
        await store.write(
            C, [Upsert(id=f"t{n}", version=1, document=thing(f"t{n}", size=n)) for n in range(3)]
        )
        query = Query(sort=(SortField("size"),), limit=1)
        cursor = (await store.query(C, query)).next_cursor
        assert cursor is not None
        token = msgspec.msgpack.decode(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))
        token[1][0] = value  # the sort value of the last row seen
        forged = base64.urlsafe_b64encode(msgspec.msgpack.encode(token)).rstrip(b"=").decode()
        with pytest.raises(InvalidQuery):
            await store.query(C, Query(sort=query.sort, limit=1, cursor=forged))
    finally:
        await store.close()


# ----------------------------------------------------- query plans that stay fast


@pytest.fixture
async def sqlite_store(tmp_path: Path) -> AsyncIterator[SqliteReadStore]:
    store = await SqliteReadStore.open(tmp_path / "read.db")
    await store.ensure_collection(SCHEMA)
    try:
        yield store
    finally:
        await store.close()


async def _fill(store: SqliteReadStore, n: int = 60) -> None:
    """``n`` things; every title has "item" and one of four words."""
    words = ["alpha", "alphabet", "alpine", "beta"]
    docs = [
        thing(
            f"t{i:02d}",
            colour=["red", "green", "blue"][i % 3],
            size=i % 7,
            made_at=f"2024-01-{1 + i % 28:02d}T00:00:00Z",
            title=f"{words[i % 4]} item",
        )
        for i in range(n)
    ]
    await store.write(C, [Upsert(id=d["id"], version=1, document=d) for d in docs])


QUERIES = [
    Query(text="alp", limit=4),
    Query(text="alpha", limit=3, sort=(SortField("size"),)),
    Query(text="item", limit=7, filters={"colour": "red"}),
    Query(text="alpine item", limit=2, sort=(SortField("size", descending=True), SortField("made_at"))),
]


@pytest.mark.parametrize("query", QUERIES, ids=[q.text or "" for q in QUERIES])
async def test_the_sort_order_walk_finds_what_sorting_every_match_finds(
    sqlite_store: SqliteReadStore, monkeypatch: pytest.MonkeyPatch, query: Query
) -> None:
    """Many matches walk the rows in sort order a window at a time; few matches
    are sorted. Force each path on the same data: same pages, same cursors."""
    await _fill(sqlite_store)
    sorted_pages = await pages(sqlite_store, query)
    monkeypatch.setattr(sqlite_module, "FEW_MATCHES", 1)
    monkeypatch.setattr(sqlite_module, "WINDOW_ROWS_PER_RESULT", 1)
    sqlite_store._few.clear()  # forget "few" for these searches
    walked_pages = await pages(sqlite_store, query)
    assert walked_pages == sorted_pages
    assert sum(len(p) for p in sorted_pages) > query.limit  # more than one page was compared


async def test_a_word_that_crosses_the_bound_while_its_answer_is_kept_still_finds_every_match(
    sqlite_store: SqliteReadStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """ "Few or many matches?" is kept a second per search: a kept "few" for a word that
    now matches many sorts them all, the walk does once it expires; both find the same."""
    monkeypatch.setattr(sqlite_module, "FEW_MATCHES", 25)
    await _fill(sqlite_store, n=40)  # "alpha*" (alpha, alphabet): 20 matches, few
    query = Query(text="alpha", limit=5)
    assert len(await ids(sqlite_store, query)) == 5
    assert list(sqlite_store._few.values())[-1][1] is True

    more = [thing(f"u{i:02d}", made_at=f"2024-02-{1 + i:02d}T00:00:00Z", title="alpha") for i in range(20)]
    await sqlite_store.write(C, [Upsert(id=d["id"], version=1, document=d) for d in more])
    kept = await pages(sqlite_store, query)  # 40 matches, still planned as few
    monkeypatch.setattr(sqlite_module, "FEW_CACHE_SECONDS", 0.0)
    walked = await pages(sqlite_store, query)
    assert list(sqlite_store._few.values())[-1][1] is False
    assert walked == kept
    assert sum(len(p) for p in kept) == 40
    assert kept[0][:2] == ["u19", "u18"]  # the newest first: the new ones are found


async def test_a_prefix_with_too_many_words_is_still_searched_as_a_prefix(
    sqlite_store: SqliteReadStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    await _fill(sqlite_store)
    expanded = sorted(await ids(sqlite_store, Query(text="alp", limit=100)))
    monkeypatch.setattr(sqlite_module, "MAX_PREFIX_WORDS", 1)
    sqlite_store._prefixes.clear()
    assert sorted(await ids(sqlite_store, Query(text="alp", limit=100))) == expanded
    assert len(expanded) == 45  # alpha, alphabet, alpine: 3 in 4 of 60


async def test_a_new_word_is_found_at_once_when_typed_in_full(sqlite_store: SqliteReadStore) -> None:
    await _fill(sqlite_store)
    assert await ids(sqlite_store, Query(text="zebra")) == []  # its prefix words are now cached
    await sqlite_store.write(C, [Upsert(id="z", version=1, document=thing("z", title="zebra"))])
    assert await ids(sqlite_store, Query(text="zebra")) == ["z"]


async def test_a_nul_in_the_search_text_separates_words(sqlite_store: SqliteReadStore) -> None:
    """FTS5 reads a quoted phrase only up to a NUL: ``"z\x00ebra"`` was an unterminated
    string, a 500 at the API (found by a hostile caller)."""
    await sqlite_store.write(C, [Upsert(id="z", version=1, document=thing("z", title="zebra crossing"))])
    assert await ids(sqlite_store, Query(text="zebra\x00cross")) == ["z"]
    assert await ids(sqlite_store, Query(text="\x00zebra")) == ["z"]


async def test_maintained_counts_follow_updates_deletes_and_stale_writes(
    sqlite_store: SqliteReadStore,
) -> None:
    """The unfiltered facets come from counts kept by triggers; a filter that
    matches everything counts the documents themselves: both must agree."""
    await _fill(sqlite_store, 30)
    await sqlite_store.write(
        C,
        [
            Upsert(id="t00", version=2, document=thing("t00", colour="green")),
            Upsert(id="t01", version=1, document=thing("t01", colour="red")),  # stale: unchanged
            Delete(id="t02", version=2),
            Delete(id="t02", version=3),  # already deleted: no double count
            Upsert(id="new", version=1, document=thing("new", colour="purple")),
        ],
    )
    maintained = await sqlite_store.query(C, Query(facets=("colour",), limit=1))
    counted = await sqlite_store.query(C, Query(filters={"size": Range(gte=-1)}, facets=("colour",), limit=1))
    assert maintained.facets == counted.facets
    assert maintained.total == counted.total == 30
    assert maintained.facets["colour"] == {"green": 11, "red": 9, "blue": 9, "purple": 1}
    some = Query(filters={"colour": ["red", "purple", "none"]}, facets=("colour",), limit=1)
    maintained = await sqlite_store.query(C, some)
    every_size = {**some.filters, "size": Range(gte=-1)}  # a second filter: counted, not maintained
    counted = await sqlite_store.query(C, msgspec.structs.replace(some, filters=every_size))
    assert maintained.facets == counted.facets == {"colour": {"red": 9, "purple": 1}}
    assert maintained.total == counted.total == 10


@pytest.mark.parametrize("upgrade_by", ["ensure_collection", "the first write"])
async def test_counts_are_filled_for_a_table_made_before_them(tmp_path: Path, upgrade_by: str) -> None:
    """A runner finding its table in place writes without ensuring it: the store
    upgrades the table at its first write."""
    store = await SqliteReadStore.open(tmp_path / "read.db")
    physical = await store.ensure_collection(SCHEMA)
    await _fill(store, 9)
    await store.close()
    conn = sqlite3.connect(tmp_path / "read.db", isolation_level=None)
    conn.execute(f'DROP TABLE "{physical}__counts"')
    for event in ("insert", "update", "delete"):
        conn.execute(f'DROP TRIGGER "{physical}__count_{event}"')
    conn.close()
    store = await SqliteReadStore.open(tmp_path / "read.db")
    try:
        old = await store.query(C, Query(facets=("colour",), limit=1))  # no counts table: counted
        assert old.facets["colour"] == {"red": 3, "green": 3, "blue": 3}
        if upgrade_by == "ensure_collection":
            await store.ensure_collection(SCHEMA)
        else:
            await store.write(C, [Upsert(id="t00", version=2, document=thing("t00", colour="blue"))])
        page = await store.query(C, Query(facets=("colour",), limit=1))
        expected = (
            {"red": 3, "green": 3, "blue": 3}
            if upgrade_by == "ensure_collection"
            else {"blue": 4, "green": 3, "red": 2}
        )
        assert page.facets["colour"] == expected
        assert page.total == 9
        conn = sqlite3.connect(tmp_path / "read.db")
        assert conn.execute("SELECT 1 FROM sqlite_master WHERE name = ?", (f"{physical}__counts",)).fetchone()
        conn.close()
    finally:
        await store.close()


async def test_queries_are_not_queued_behind_the_writer(sqlite_store: SqliteReadStore) -> None:
    """Block the writer's thread (as a long projection batch does): queries and
    ``get`` run on their own read-only connections and still answer."""
    await _fill(sqlite_store, 5)
    release = threading.Event()
    blocked = asyncio.get_running_loop().run_in_executor(sqlite_store._executor, release.wait, 30)
    try:
        page = await asyncio.wait_for(sqlite_store.query(C, Query(limit=10)), 5)
        assert len(page.items) == 5
        assert await asyncio.wait_for(sqlite_store.get(C, "t01"), 5) is not None
    finally:
        release.set()
        await blocked


async def test_two_databases_do_not_share_the_words_of_a_prefix(tmp_path: Path) -> None:
    stores = [await SqliteReadStore.open(tmp_path / f"{name}.db") for name in ("a", "b")]
    try:
        for store, word in zip(stores, ["alpha", "alpine"], strict=True):
            await store.ensure_collection(SCHEMA)
            await store.write(C, [Upsert(id=word, version=1, document=thing(word, title=word))])
        assert [await ids(store, Query(text="alp")) for store in stores] == [["alpha"], ["alpine"]]
    finally:
        for store in stores:
            await store.close()
