"""One mapping from every error to an RFC 9457 problem (``application/problem+json``).

Every error answer has ``type`` (a stable URN naming the kind of problem),
``title`` (short, the same for every instance of the type), ``status``,
``detail`` (this occurrence, for people) and ``correlation_id``; some carry
extras (``errors``, ``current_revision``, ``min_position``...). Nothing about the
server's internals ever reaches a body: an unexpected exception is logged
with its traceback and answered with a plain 500.

- 400: malformed JSON; a bad header (``If-Match``, ``Idempotency-Key``); a bad query or
  path parameter; :class:`InvalidQuery`.
- 401: no valid bearer token; 403: the token's roles do not allow it; 429: too many writes.
- 404: :class:`NotFound`; an unknown route; an order revision beyond the stream's end.
- 405: the method is not allowed on the route.
- 409: :class:`IllegalTransition`, :class:`AlreadyExists`, a race lost too often.
- 412: a stale ``If-Match`` (:class:`WrongExpectedVersion`), with ``current_revision``.
- 413: the body is over the limit; 431: the request head is (answered by the server,
  :mod:`orderstream.api.connections`).
- 415: a body whose ``Content-Type`` is not JSON.
- 422: wrong types, unknown fields, limits; :class:`InvalidCommand` and other business
  rules; an ``Idempotency-Key`` reused with another body.
- 503: :class:`NotYetConsistent` (with ``Retry-After``); the event store is unavailable.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Mapping
from http import HTTPStatus
from typing import Any

import msgspec
from litestar import Request, Response
from litestar.exceptions import (
    HTTPException,
    MethodNotAllowedException,
    NotAuthorizedException,
    NotFoundException,
    ValidationException,
)
from litestar.openapi.datastructures import ResponseSpec
from litestar.status_codes import HTTP_500_INTERNAL_SERVER_ERROR
from msgspec import UNSET, UnsetType

from orderstream.api.correlation import correlation_id
from orderstream.application.commands import ConcurrencyRetriesExhausted, IdempotencyKeyReused
from orderstream.application.errors import ServiceUnavailable, StorageFull
from orderstream.application.projection_progress import ParkedEventBlocks
from orderstream.application.queries import NotYetConsistent, RevisionNotFound
from orderstream.domain.common import AlreadyExists, DomainError, IllegalTransition, NotFound
from orderstream.eventstore.base import EventStoreUnavailable, WrongExpectedVersion
from orderstream.readstore.base import InvalidQuery

log = logging.getLogger("orderstream.api")

PROBLEM_JSON = "application/problem+json"
TYPE_PREFIX = "urn:orderstream:problem:"
RETRY_AFTER_SECONDS = 1
STORAGE_FULL_RETRY_AFTER_SECONDS = 30
"""A full disk is freed by an operator, not in a second."""


class FieldError(msgspec.Struct, frozen=True, omit_defaults=True):
    """One reason a request was refused. ``path`` is a JSON path into the body
    (``$.lines[3].quantity``) or the name of a parameter."""

    message: str
    path: str | None = None
    source: str | None = None
    """``body``, ``query``, ``path`` or ``header``."""


class Problem(msgspec.Struct, frozen=True, omit_defaults=True, kw_only=True):
    """RFC 9457 problem details. Extras appear only on the problems that have them
    (and there they appear always, ``null`` when unknown)."""

    type: str
    title: str
    status: int
    detail: str
    instance: str | UnsetType = UNSET
    correlation_id: str | UnsetType = UNSET
    errors: list[FieldError] | UnsetType = UNSET
    """400/422: each field or parameter that was refused."""
    current_revision: int | UnsetType | None = UNSET
    """412: the stream's revision now; re-read, then retry with ``If-Match: "<current_revision>"``."""
    expected_revision: int | UnsetType | None = UNSET
    min_position: int | UnsetType = UNSET
    """503 not-yet-consistent: the position asked for."""
    reached_position: int | UnsetType | None = UNSET
    """503 not-yet-consistent: the projection's low-water mark when the wait ended
    (``null``: it has applied nothing yet)."""
    projection: str | UnsetType = UNSET
    group: str | UnsetType = UNSET
    """503 parked-event-blocks: the subscription group holding the parked event."""
    parked_stream: str | UnsetType = UNSET
    parked_revision: int | UnsetType = UNSET
    parked_position: int | UnsetType = UNSET
    """503 parked-event-blocks: the parked event that keeps the read model from ``min_position``."""


class ApiError(Exception):
    """An error raised by the HTTP layer itself (bad header, nothing to change, ...)."""

    def __init__(
        self,
        status: int,
        code: str,
        detail: str,
        *,
        errors: list[FieldError] | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(detail)
        self.status = status
        self.code = code
        self.detail = detail
        self.errors = errors
        self.headers = dict(headers or {})


def bad_request(code: str, detail: str, **kw: Any) -> ApiError:
    return ApiError(400, code, detail, **kw)


def unprocessable(code: str, detail: str, **kw: Any) -> ApiError:
    return ApiError(422, code, detail, **kw)


# ------------------------------------------------------------------------ rendering

_TITLES: dict[str, str] = {
    "malformed-json": "Malformed JSON",
    "invalid-body": "Request body failed validation",
    "invalid-parameter": "Invalid parameter",
    "invalid-header": "Invalid header",
    "invalid-query": "Invalid query",
    "unauthorized": "Authentication required",
    "not-found": "Not found",
    "no-such-route": "No such route",
    "revision-not-found": "No such revision",
    "method-not-allowed": "Method not allowed",
    "illegal-transition": "Illegal state transition",
    "already-exists": "Already exists",
    "concurrency-conflict": "Concurrent modification",
    "stale-revision": "Stale If-Match revision",
    "body-too-large": "Request body too large",
    "head-too-large": "Request head too large",
    "body-timeout": "Request body too slow",
    "unsupported-media-type": "Unsupported media type",
    "idempotency-key-reused": "Idempotency-Key reused with a different request",
    "not-yet-consistent": "Read model not yet consistent",
    "parked-event-blocks": "A parked event keeps the read model from that position",
    "unavailable": "Service unavailable",
    "insufficient-storage": "Insufficient storage",
    "internal-error": "Internal server error",
}


def problem_type(code: str) -> str:
    return f"{TYPE_PREFIX}{code}"


def _title(code: str, status: int) -> str:
    if code in _TITLES:
        return _TITLES[code]
    return code.replace("-", " ").capitalize() if code else HTTPStatus(status).phrase


def problem_response(
    request: Request[Any, Any, Any],
    status: int,
    code: str,
    detail: str,
    *,
    headers: Mapping[str, str] | None = None,
    **extras: Any,
) -> Response[Problem]:
    problem = Problem(
        type=problem_type(code),
        title=_title(code, status),
        status=status,
        detail=detail,
        instance=request.url.path,
        correlation_id=correlation_id(request.scope),
        **{k: v for k, v in extras.items() if not (k == "errors" and v is None)},
    )
    return Response(problem, status_code=status, media_type=PROBLEM_JSON, headers=dict(headers or {}))


def bare_problem(status: int, code: str, detail: str) -> bytes:
    """A problem body for an answer the server gives before there is a request to hand
    the app (:mod:`orderstream.api.connections`)."""
    problem = Problem(type=problem_type(code), title=_title(code, status), status=status, detail=detail)
    return msgspec.json.encode(problem)


_MSGSPEC_PATH = re.compile(r"^(?P<msg>.*?)(?: - at `(?P<path>[^`]*)`)?$", re.DOTALL)


def msgspec_field_error(exc: msgspec.ValidationError) -> FieldError:
    """``Expected `int`, got `str` - at `$.lines[0].quantity``` -> message + path."""
    match = _MSGSPEC_PATH.match(str(exc))
    if match is None:  # pragma: no cover - the pattern matches any text
        return FieldError(message=str(exc), source="body")
    return FieldError(message=match["msg"], path=match["path"] or "$", source="body")


def _litestar_validation_errors(exc: ValidationException) -> list[FieldError]:
    errors: list[FieldError] = []
    extra = exc.extra if isinstance(exc.extra, list) else []
    for item in extra:
        if isinstance(item, Mapping):
            errors.append(
                FieldError(
                    message=str(item.get("message", "invalid value")),
                    path=str(item["key"]) if item.get("key") is not None else None,
                    source=_source(item.get("source")),
                )
            )
    return errors


def _source(value: object) -> str | None:
    if value is None:
        return None
    return str(getattr(value, "value", value))


def _sent_if_match(request: Request[Any, Any, Any]) -> bool:
    return "if-match" in request.headers


# ---------------------------------------------------------------------- the mapping


def handle_exception(request: Request[Any, Any, Any], exc: Exception) -> Response[Problem]:
    match exc:
        case ApiError():
            return problem_response(
                request, exc.status, exc.code, exc.detail, errors=exc.errors, headers=exc.headers
            )
        case msgspec.ValidationError():
            return problem_response(
                request,
                422,
                "invalid-body",
                f"The request body does not match the schema: {exc}",
                errors=[msgspec_field_error(exc)],
            )
        case msgspec.DecodeError():
            return problem_response(
                request, 400, "malformed-json", f"The request body is not valid JSON: {exc}"
            )
        case WrongExpectedVersion():
            current = exc.actual
            expected = exc.expected if isinstance(exc.expected, int) else None
            if _sent_if_match(request):
                detail = (
                    f"If-Match names revision {expected}, but the resource does not exist."
                    if current is None
                    else f"If-Match names revision {expected}, but the resource is at revision {current}; "
                    "re-read it and retry with the current ETag."
                )
                return problem_response(
                    request,
                    412,
                    "stale-revision",
                    detail,
                    current_revision=current,
                    expected_revision=expected,
                    headers={"ETag": f'"{current}"'} if current is not None else None,
                )
            return problem_response(
                request,
                409,
                "concurrency-conflict",
                "The resource was changed concurrently; retry.",
                current_revision=current,
            )
        case ConcurrencyRetriesExhausted():
            return problem_response(
                request,
                409,
                "concurrency-conflict",
                "The resource is being changed by many writers at once; retry later.",
                headers={"Retry-After": str(RETRY_AFTER_SECONDS)},
            )
        case NotYetConsistent():
            return problem_response(
                request,
                503,
                "not-yet-consistent",
                f"The {exc.projection} read model has reached position {exc.reached}, not yet "
                f"{exc.position}; retry after the Retry-After delay.",
                headers={"Retry-After": str(RETRY_AFTER_SECONDS)},
                min_position=exc.position,
                reached_position=exc.reached,
                projection=exc.projection,
            )
        case ParkedEventBlocks():
            # No Retry-After: waiting does not help until an operator replays or skips it.
            parked = exc.parked.event
            return problem_response(
                request,
                503,
                "parked-event-blocks",
                str(exc),
                min_position=exc.position,
                projection=exc.projection,
                group=exc.group,
                parked_stream=parked.stream,
                parked_revision=parked.revision,
                parked_position=parked.position,
            )
        case RevisionNotFound():
            return problem_response(
                request, 404, "revision-not-found", str(exc), current_revision=exc.current_revision
            )
        case NotFound():
            return problem_response(request, 404, "not-found", str(exc))
        case IllegalTransition():
            return problem_response(request, 409, "illegal-transition", str(exc))
        case AlreadyExists():
            return problem_response(request, 409, "already-exists", str(exc))
        case IdempotencyKeyReused():
            return problem_response(request, 422, "idempotency-key-reused", str(exc))
        case DomainError():
            # InvalidCommand, UnknownProduct, InsufficientStock, StockLimitExceeded, ...:
            # the request was well formed, a business rule refused it.
            return problem_response(request, 422, exc.code, str(exc))
        case InvalidQuery():
            return problem_response(request, 400, "invalid-query", str(exc))
        case StorageFull():
            # Before the outages below: an EventStoreFull is also an EventStoreUnavailable.
            log.warning("%s", exc)
            return problem_response(
                request,
                507,
                "insufficient-storage",
                f"{exc.service.capitalize()} has no space left; nothing was written. Reads still work; "
                "retry the write later.",
                headers={"Retry-After": str(STORAGE_FULL_RETRY_AFTER_SECONDS)},
            )
        case ServiceUnavailable():
            log.warning("%s", exc)
            return problem_response(
                request,
                503,
                "unavailable",
                f"{exc.service} is not answering now (down, unreachable or too slow); retry later.",
                headers={"Retry-After": str(RETRY_AFTER_SECONDS)},
            )
        case EventStoreUnavailable():
            log.warning("event store unavailable: %s", exc)
            return problem_response(
                request,
                503,
                "unavailable",
                "The event store cannot be reached; retry later.",
                headers={"Retry-After": str(RETRY_AFTER_SECONDS)},
            )
        case HTTPException():
            return _http_exception(request, exc)
    log.exception(
        "unhandled error on %s %s",
        request.method,
        request.url.path,
        exc_info=exc,
        extra={"path": request.url.path},
    )
    return problem_response(
        request,
        HTTP_500_INTERNAL_SERVER_ERROR,
        "internal-error",
        "An unexpected error occurred; it was logged.",
    )


def _http_exception(request: Request[Any, Any, Any], exc: HTTPException) -> Response[Problem]:
    headers = dict(exc.headers or {})
    status = exc.status_code
    match exc:
        case ValidationException():
            # Litestar's own validation: query, path and header parameters (bodies are
            # validated strictly before it, see api.body).
            return problem_response(
                request,
                400,
                "invalid-parameter",
                "A parameter is missing or invalid.",
                errors=_litestar_validation_errors(exc),
            )
        case NotFoundException():
            return problem_response(
                request, 404, "no-such-route", f"No route for {request.method} {request.url.path}."
            )
        case MethodNotAllowedException():
            return problem_response(
                request,
                405,
                "method-not-allowed",
                f"{request.method} is not allowed on {request.url.path}.",
                headers=headers,
            )
        case NotAuthorizedException():
            headers.setdefault("WWW-Authenticate", 'Bearer realm="orderstream"')
            return problem_response(request, 401, "unauthorized", exc.detail, headers=headers)
    if status == 413:
        # Closed after the answer: the rest of an oversized body is not worth reading.
        return problem_response(
            request,
            413,
            "body-too-large",
            "The request body exceeds the size limit.",
            headers={"Connection": "close"},
        )
    if status >= 500:
        log.error("HTTP %s on %s %s: %s", status, request.method, request.url.path, exc.detail)
        return problem_response(request, status, "internal-error", HTTPStatus(status).phrase)
    return problem_response(request, status, _code_for(status), exc.detail or HTTPStatus(status).phrase)


def _code_for(status: int) -> str:
    try:
        return HTTPStatus(status).phrase.lower().replace(" ", "-")
    except ValueError:
        return "error"


exception_handlers: dict[type[Exception] | int, Callable[..., Response[Any]]] = {Exception: handle_exception}


# -------------------------------------------------------------------- OpenAPI helper

_DESCRIPTIONS = {
    400: "Malformed JSON, or an invalid parameter or header (problem details).",
    401: "No bearer token, or one that is not valid (problem details, `WWW-Authenticate: Bearer`).",
    403: "The token's roles do not allow this operation (problem details).",
    404: "No such resource (problem details).",
    409: "Illegal state transition, already exists, or a concurrent change (problem details).",
    408: "The request body did not arrive within the body timeout; the connection closes (problem details).",
    412: "Stale If-Match: the problem carries `current_revision`.",
    413: "The request body is larger than the limit (problem details).",
    415: "The request body is not sent as `application/json` (problem details).",
    422: "The body does not match the schema, or a business rule refused it (problem details).",
    429: "Too many writes by this identity; retry after `Retry-After` seconds (problem details).",
    507: "The disk is full: nothing was written; retry after `Retry-After` seconds (problem details).",
    503: (
        "Not available now; retry after `Retry-After` seconds (problem details). When the read model "
        "has not reached `min_position` within the consistency timeout, the problem carries "
        "`min_position` and `reached_position`; when a parked event stands in the way, at once "
        "(`parked-event-blocks`, no `Retry-After`) with the event and its group."
    ),
}


def problem_description(status: int) -> str:
    """The OpenAPI description of a problem answer with this status."""
    return _DESCRIPTIONS[status]


def problem_responses(*statuses: int) -> dict[int, ResponseSpec]:
    """``responses=`` entries for the given problem statuses."""
    return {
        status: ResponseSpec(
            data_container=Problem,
            description=_DESCRIPTIONS[status],
            media_type=PROBLEM_JSON,
            generate_examples=False,
        )
        for status in statuses
    }
