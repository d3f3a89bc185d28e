"""Request plumbing shared by every controller: strict body decoding, headers,
auth, correlation ids and request metrics.

Strict bodies. Litestar converts a decoded body into the handler's ``data``
type with coercion turned on (``"5"`` would pass as ``5``). The API promises
that wrong types are refused, so :func:`strict_body` (a ``before_request``
hook) decodes the raw body with msgspec in strict mode against the same type
first: malformed JSON raises ``msgspec.DecodeError`` (400), anything else that
does not match the schema ``msgspec.ValidationError`` (422). Litestar then
converts the already valid body again (the OpenAPI document still comes from
the handler's ``data`` annotation).
"""

from __future__ import annotations

import hmac
import re
from typing import Any

import msgspec
from litestar import Request
from litestar.connection import ASGIConnection
from litestar.exceptions import NotAuthorizedException
from litestar.handlers.base import BaseRouteHandler
from litestar.types import Message, Scope

from orderstream.api.correlation import correlation_id
from orderstream.api.problems import FieldError, bad_request
from orderstream.application.commands import CommandContext, request_digest
from orderstream.metrics import Metrics

_IDEMPOTENCY_OK = re.compile(r"^[\x21-\x7e]{1,255}$")
_ETAG = re.compile(r'^"?(\d{1,18})"?$')
MAX_REVISION = 2**62

_decoders: dict[Any, msgspec.json.Decoder[Any]] = {}


def _decoder(annotation: Any) -> msgspec.json.Decoder[Any]:
    decoder = _decoders.get(annotation)
    if decoder is None:
        decoder = _decoders[annotation] = msgspec.json.Decoder(annotation, strict=True)
    return decoder


async def strict_body(request: Request[Any, Any, Any]) -> None:
    """``before_request``: validate the body strictly against the handler's ``data`` type."""
    param = request.route_handler.parsed_fn_signature.parameters.get("data")
    if param is None:
        return
    body = await request.body()  # 413 past request_max_body_size
    _decoder(param.annotation).decode(body)  # raises DecodeError (400) / ValidationError (422)


# -------------------------------------------------------------------------- headers


def parse_if_match(value: str | None) -> int | None:
    """``"3"`` (or bare ``3``) -> 3; ``*`` or absent -> None (no revision check).

    Anything else (a list, a weak tag, a non-number) is a 400: a client that
    meant to guard its write must not have it go through unguarded.
    """
    if value is None:
        return None
    value = value.strip()
    if value == "*":
        return None
    match = _ETAG.match(value)
    if match is None or int(match[1]) > MAX_REVISION:
        raise bad_request(
            "invalid-header",
            'If-Match must be one strong entity tag holding a revision, e.g. If-Match: "3".',
            errors=[
                FieldError(message=f"not a revision tag: {value[:40]!r}", path="If-Match", source="header")
            ],
        )
    return int(match[1])


def etag(revision: int) -> str:
    return f'"{revision}"'


def check_idempotency_key(value: str | None) -> str | None:
    if value is None:
        return None
    if not _IDEMPOTENCY_OK.match(value):
        raise bad_request(
            "invalid-header",
            "Idempotency-Key must be 1 to 255 visible ASCII characters.",
            errors=[FieldError(message="invalid key", path="Idempotency-Key", source="header")],
        )
    return value


# ----------------------------------------------------------------- correlation, auth


def _actor_for(token: str, tokens: dict[str, str]) -> str | None:
    """Constant-time comparison against every known token."""
    found = None
    given = token.encode()
    for known, actor in tokens.items():
        if hmac.compare_digest(given, known.encode()):
            found = actor
    return found if token else None


def require_writer(connection: ASGIConnection[Any, Any, Any, Any], _handler: BaseRouteHandler) -> None:
    """Guard of every write route.

    With tokens configured (``app.state.api_tokens``: token -> actor) a write
    needs ``Authorization: Bearer <token>`` and runs as that token's actor;
    without, every caller is ``anonymous`` (development mode). Reads stay open.
    """
    tokens: dict[str, str] = connection.app.state.get("api_tokens") or {}
    if not tokens:
        connection.state["actor"] = "anonymous"
        return
    header = connection.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    actor = _actor_for(token.strip(), tokens) if scheme.lower() == "bearer" else None
    if actor is None:
        raise NotAuthorizedException(
            detail="This write needs 'Authorization: Bearer <token>' with a known token."
            if not header
            else "The bearer token is not valid."
        )
    connection.state["actor"] = actor


def command_context(
    request: Request[Any, Any, Any], *, idempotency_key: str | None = None, request_body: object = None
) -> CommandContext:
    """Who asks (the guard's actor), the correlation id and the idempotency key."""
    actor = request.state.get("actor", "anonymous")
    key = check_idempotency_key(idempotency_key)
    return CommandContext(
        actor=actor,
        correlation_id=correlation_id(request.scope),
        idempotency_key=key,
        request_hash=request_digest(request_body) if key is not None else None,
    )


# --------------------------------------------------------------------------- send hook


def make_before_send(metrics: Metrics) -> Any:
    """Echo the correlation id on every answer (404s and errors too) and count it."""

    async def before_send(message: Message, scope: Scope) -> None:
        if message["type"] != "http.response.start":
            return
        cid = correlation_id(scope)
        headers = list(message.get("headers", []))
        headers.append((b"x-correlation-id", cid.encode("latin-1")))
        message["headers"] = headers
        route = scope.get("path_template") or "unmatched"
        metrics.http_requests.labels(
            method=scope.get("method", "?"), route=route, status=str(message["status"])
        ).inc()

    return before_send
