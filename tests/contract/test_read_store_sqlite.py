"""SQLite read store specifics the shared contract cannot express (its cursor encoding)."""

from __future__ import annotations

import base64
from pathlib import Path

import msgspec
import pytest

from orderstream.readstore.base import InvalidQuery, Query, SortField, Upsert
from orderstream.readstore.sqlite import SqliteReadStore
from tests.contract.test_read_store import SCHEMA, C, thing


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
