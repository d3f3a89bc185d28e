"""The shortcuts of the POST path give exactly what the slower code they replace gave
(issue 7, docs/command-path.md)."""

from __future__ import annotations

import random
import uuid
from typing import Any

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st
from litestar import Litestar, Request, post
from litestar.datastructures import Cookie
from litestar.testing import TestClient

from orderstream.api import correlation
from orderstream.api.common import WrittenResponse, written
from orderstream.api.plumbing import _key_count
from orderstream.api.schemas import WriteResult
from orderstream.application.commands import CommandResult
from orderstream.application.ids import uuid5_text
from orderstream.application.use_cases import ORDER_ID_NAMESPACE


@given(st.text(max_size=300))
def test_uuid5_text_is_uuid5(name: str) -> None:
    assert uuid5_text(ORDER_ID_NAMESPACE, name) == str(uuid.uuid5(ORDER_ID_NAMESPACE, name))


def test_new_correlation_ids_are_the_version_4_uuids_of_the_random_bits() -> None:
    state = correlation._random.getstate()
    first = correlation.new_id()
    correlation._random.setstate(state)
    assert first == str(uuid.UUID(int=correlation._random.getrandbits(128), version=4))
    for _ in range(1000):
        parsed = uuid.UUID(correlation.new_id())
        assert (parsed.version, parsed.variant) == (4, uuid.RFC_4122)


def _count_recursively(value: Any) -> int:
    if isinstance(value, dict):
        return len(value) + sum(_count_recursively(v) for v in value.values())
    if isinstance(value, list):
        return sum(_count_recursively(v) for v in value)
    return 0


_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=5),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=4), inner, max_size=4),
    max_leaves=30,
)


@given(_JSON)
def test_key_count_counts_every_key_at_every_level(value: Any) -> None:
    decoded = msgspec.json.decode(msgspec.json.encode(value))
    assert _key_count(decoded) == _count_recursively(decoded)


def _result(*, replayed: bool = False) -> CommandResult[Any]:
    return CommandResult(
        stream="order-o-1", revision=3, position=42, appended=(), state=None, replayed=replayed
    )


def _app(make: Any) -> Litestar:
    @post("/w", status_code=201)
    async def handler(request: Request[Any, Any, Any]) -> Any:
        return make()

    return Litestar([handler], openapi_config=None)


@pytest.mark.parametrize("replayed", [False, True])
def test_written_response_is_what_litestar_sends_for_the_same_response(replayed: bool) -> None:
    def litestar_response() -> Any:
        fast = written("o-1", _result(replayed=replayed), location="/orders/o-1")
        assert isinstance(fast, WrittenResponse)
        from litestar import Response

        return Response(fast.content, status_code=fast.status_code, headers=fast.headers)

    with TestClient(_app(lambda: written("o-1", _result(replayed=replayed), location="/orders/o-1"))) as c:
        ours = c.post("/w")
    with TestClient(_app(litestar_response)) as c:
        theirs = c.post("/w")
    assert ours.status_code == theirs.status_code == 201
    assert ours.headers.multi_items() == theirs.headers.multi_items()
    assert ours.content == theirs.content
    expected = WriteResult(id="o-1", revision=3, position=42)
    assert msgspec.json.decode(ours.content, type=WriteResult) == expected
    assert ("idempotent-replayed" in ours.headers) is replayed


def test_written_response_takes_litestars_path_for_what_it_does_not_handle() -> None:
    def with_cookie() -> Any:
        response = written("o-1", _result())
        response.set_cookie(Cookie(key="k", value=str(random.randrange(10))))
        return response

    with TestClient(_app(with_cookie)) as c:
        answer = c.post("/w")
    assert answer.status_code == 200
    assert "set-cookie" in answer.headers
    assert answer.headers["etag"] == '"3"'
