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

from orderstream.api import correlation, plumbing
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


def _body_app() -> Litestar:
    """``/ours`` reads the body as ``strict_body`` does, ``/litestars`` with
    ``request.body()``; both answer what they read (and what Litestar reads after)."""

    @post("/ours", request_max_body_size=10, status_code=200)
    async def ours(request: Request[Any, Any, Any]) -> dict[str, str]:
        _media_type, length, _encoding = plumbing._body_headers(request.scope["headers"])
        body = await plumbing._receive_body(request, length)
        return {"body": body.decode(), "again": (await request.body()).decode()}

    @post("/litestars", request_max_body_size=10, status_code=200)
    async def litestars(request: Request[Any, Any, Any]) -> dict[str, str]:
        body = await request.body()
        return {"body": body.decode(), "again": (await request.body()).decode()}

    return Litestar([ours, litestars], openapi_config=None)


async def _post_chunks(
    app: Litestar, path: str, chunks: list[bytes], length: str | None, *, leaves: bool
) -> tuple[int, bytes]:
    """POST ``chunks`` as ASGI messages (``leaves``: the client disconnects after them)."""
    messages = [
        {"type": "http.request", "body": c, "more_body": leaves or i < len(chunks) - 1}
        for i, c in enumerate(chunks)
    ]
    received: list[bytes] = []
    answer: dict[str, Any] = {}

    async def receive() -> dict[str, Any]:
        received.append(b"")
        return messages.pop(0) if messages else {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            answer["status"] = message["status"]
        else:
            answer["body"] = answer.get("body", b"") + message.get("body", b"")

    headers = [(b"content-type", b"application/json")]
    if length is not None:
        headers.append((b"content-length", length.encode()))
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "root_path": "",
        "query_string": b"",
        "headers": headers,
        "client": ("127.0.0.1", 1),
        "server": ("127.0.0.1", 2),
        "state": {},
    }
    await app(scope, receive, send)
    if length is not None and length.isdigit() and int(length) > 10:
        assert not received  # refused on the announced length, before reading
    return answer["status"], answer["body"]


@pytest.mark.parametrize(
    ("chunks", "length", "leaves", "status"),
    [
        ([b"[1, 2]"], "6", False, 200),
        ([b"[1,", b" 2", b"]"], None, False, 200),  # streamed in parts, no length announced
        ([b""], "0", False, 200),
        ([b"[1, 2, 3, 4]"], "12", False, 413),  # announced over the limit
        ([b"[1, 2, ", b"3, 4]"], None, False, 413),  # streams past the limit
        ([b"[1]"], "three", False, 400),  # not a length
        ([b"[1,"], None, True, 500),  # the client left before the end
    ],
)
async def test_the_body_reader_answers_as_litestars_request_body(
    chunks: list[bytes], length: str | None, leaves: bool, status: int
) -> None:
    app = _body_app()
    ours = await _post_chunks(app, "/ours", chunks, length, leaves=leaves)
    theirs = await _post_chunks(app, "/litestars", chunks, length, leaves=leaves)
    assert ours == theirs
    assert ours[0] == status
    if status == 200:
        body = b"".join(chunks).decode()
        assert msgspec.json.decode(ours[1]) == {"body": body, "again": body}
