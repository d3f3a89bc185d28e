"""Pieces the controllers share: parameter types, write responses, documented headers."""

from __future__ import annotations

from typing import Annotated, Any

import msgspec
from litestar import Response
from litestar.datastructures import ResponseHeader
from litestar.params import HeaderParameter, PathParameter, QueryParameter
from litestar.types import ASGIApp, Receive, Scope, Send

from orderstream.api.plumbing import IDEMPOTENCY_KEY_PATTERN, IF_MATCH_PATTERN, etag
from orderstream.api.schemas import ORDER_ID_PATTERN, SKU_PATTERN, WriteResult
from orderstream.application.commands import CommandResult

CURSOR_PATTERN = r"^[A-Za-z0-9_-]+={0,2}$(?![\s\S])"
"""Cursors are URL-safe base64 (the SQLite store drops the padding, Elasticsearch's keeps it)."""

IfMatch = Annotated[
    str | None,
    HeaderParameter(
        name="If-Match",
        required=False,
        max_length=64,
        # Documented only: the handler parses it, so a bad one is a 400 `invalid-header`.
        schema_extra={"pattern": IF_MATCH_PATTERN},
        description=(
            'The revision you last read, as an entity tag: `"3"` (a bare `3` is accepted too). '
            "The write happens only if the resource is still at that revision, else 412 with "
            "`current_revision`. Absent or `*`: no check (the server retries a lost race itself)."
        ),
    ),
]
IdempotencyKey = Annotated[
    str | None,
    HeaderParameter(
        name="Idempotency-Key",
        required=False,
        max_length=255,
        schema_extra={"pattern": IDEMPOTENCY_KEY_PATTERN},
        description=(
            "Any unique string (a UUID) per intended operation. Repeating the request with the same "
            "key returns the first answer and appends nothing; the same key with a different body is "
            "refused with 422."
        ),
    ),
]
MinPosition = Annotated[
    int | None,
    QueryParameter(
        required=False,
        ge=0,
        description=(
            "Read your own write: the `position` a write answered with. The query waits (bounded) "
            "until the read model has applied every event up to it, else answers 503 with Retry-After."
        ),
    ),
]
Limit = Annotated[int, QueryParameter(ge=1, le=100, description="Page size, 1 to 100.")]
Cursor = Annotated[
    str | None,
    QueryParameter(
        required=False,
        max_length=2000,
        pattern=CURSOR_PATTERN,
        description="`next_cursor` of the previous page (opaque; one from another query is a 400).",
    ),
]
SearchText = Annotated[
    str | None,
    QueryParameter(
        required=False,
        max_length=200,
        pattern=r"^[^\x00-\x08\x0b-\x1f\x7f]*$(?![\s\S])",
        description="Full-text search (no control characters but tab and newline).",
    ),
]
SkuPath = Annotated[str, PathParameter(pattern=SKU_PATTERN, max_length=64, description="The product's SKU.")]
OrderIdPath = Annotated[
    str, PathParameter(pattern=ORDER_ID_PATTERN, max_length=100, description="The order's id.")
]

ETAG_HEADER = ResponseHeader(
    name="ETag",
    documentation_only=True,
    description='The stream revision after the write, as an entity tag (`"3"`); send it back as If-Match.',
)
READ_ETAG_HEADER = ResponseHeader(
    name="ETag",
    documentation_only=True,
    description='The revision of the document, as an entity tag (`"3"`); usable as If-Match.',
)
LOCATION_HEADER = ResponseHeader(
    name="Location", documentation_only=True, description="Where the created resource can be read."
)
REPLAYED_HEADER = ResponseHeader(
    name="Idempotent-Replayed",
    documentation_only=True,
    description="`true` when the answer is the replay of an earlier request with the same Idempotency-Key.",
)
CORRELATION_HEADER = ResponseHeader(
    name="X-Correlation-ID",
    documentation_only=True,
    description="The request's X-Correlation-ID, or a new one; it is in the metadata of every event written.",
)

WRITE_SECURITY: list[dict[str, list[str]]] = [{"BearerToken": []}]


def written(ident: str, result: CommandResult[Any], *, location: str | None = None) -> Response[WriteResult]:
    """The answer to a command: body ``{"id", "revision", "position"}``, ``ETag``, and
    for a creation 201 with ``Location``."""
    headers = {"ETag": etag(result.revision)}
    if location is not None:
        headers["Location"] = location
    if result.replayed:
        headers["Idempotent-Replayed"] = "true"
    return WrittenResponse(
        WriteResult(id=ident, revision=result.revision, position=result.position),
        status_code=201 if location is not None else 200,
        headers=headers,
    )


_ENCODE = msgspec.json.Encoder().encode
_JSON_HEADER = (b"content-type", b"application/json")


class WrittenResponse(Response[WriteResult]):
    """A command's answer, sent as it is: the body encoded once with a kept encoder
    and the headers as the ASGI byte pairs, in the order and spelling Litestar
    would send them.

    Litestar's generic path renders the body through a serializer it looks up per
    response and builds an ``ASGIResponse`` whose headers are a ``MutableScopeHeaders``
    filled one by one: about 18 us of a bare POST route's 60 us of CPU
    (issue 7, docs/command-path.md). The declared type stays ``Response[WriteResult]``,
    so the OpenAPI document does not change. Anything this shortcut does not handle
    (cookies, background tasks, headers or media type set on a layer, HEAD) takes
    Litestar's path."""

    def to_asgi_response(  # type: ignore[override]  # the same parameters, fewer spelled out
        self, app: Any, request: Any, **kwargs: Any
    ) -> ASGIApp:
        if self.cookies or self.background or self.media_type or any(kwargs.get(k) for k in _LAYERED):
            return super().to_asgi_response(app, request, **kwargs)
        body = _ENCODE(self.content)
        headers = [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in self.headers.items()]
        headers += (_JSON_HEADER, (b"content-length", str(len(body)).encode()))
        return _Encoded(self.status_code or 200, headers, body)


_LAYERED = ("background", "cookies", "encoded_headers", "headers", "is_head_response", "type_encoders")
"""``to_asgi_response`` arguments that, when given, take Litestar's own path."""


class _Encoded:
    __slots__ = ("body", "headers", "status")

    def __init__(self, status: int, headers: list[tuple[bytes, bytes]], body: bytes) -> None:
        self.status = status
        self.headers = headers
        self.body = body

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": self.status, "headers": self.headers})
        await send({"type": "http.response.body", "body": self.body, "more_body": False})


def id_of(stream: str) -> str:
    """``order-7f3c`` -> ``7f3c``."""
    return stream.split("-", 1)[1]
