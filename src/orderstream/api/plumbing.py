"""Request plumbing shared by every controller: strict body decoding, headers,
correlation ids, who asks, and request metrics (authentication and roles: ``orderstream.auth``).

Strict bodies. Litestar converts a decoded body into the handler's ``data``
type with coercion turned on (``"5"`` would pass as ``5``). The API promises
that wrong types are refused, so :func:`strict_body` (run by the
``before_request`` hook :func:`strict_request`) decodes the raw body with
msgspec in strict mode against the same type: malformed JSON raises
``msgspec.DecodeError`` (400), anything else that does not match the schema
``msgspec.ValidationError`` (422). The decoded Struct is then handed to
Litestar as the request's parsed JSON (``ScopeState.json``), so the body is
decoded once, straight into the Struct, and Litestar's own conversion of
``data`` finds the Struct already built and passes it through. The OpenAPI
document still comes from the handler's ``data`` annotation. A body that is
not sent as ``application/json`` (or sent without a ``Content-Type``) is a 415;
an object that names a key twice is a 422 (:func:`refuse_duplicate_keys`).

One exception to "no coercion": JSON Schema, in which the OpenAPI document is
written, counts a number with a zero fractional part (``2.0``, ``1e3``) as an
``integer``, so such a number is accepted where an integer is expected; ``2.5``
and ``"2"`` are still refused.

Strict query strings: :func:`strict_query` refuses what Litestar's parameter
parsing lets through (a repeated scalar parameter, ``null`` for a number).
"""

from __future__ import annotations

import asyncio
import functools
import json
import math
import re
from typing import TYPE_CHECKING, Any, get_args

import msgspec
from litestar import Request
from litestar.enums import ParamType
from litestar.exceptions import ClientException, InternalServerException
from litestar.exceptions.http_exceptions import RequestEntityTooLarge
from litestar.handlers.base import BaseRouteHandler
from litestar.params import ParameterKwarg
from litestar.types import Empty
from litestar.utils.scope.state import ScopeState

from orderstream.api.correlation import correlation_id
from orderstream.api.problems import ApiError, FieldError, bad_request
from orderstream.application.commands import CommandContext, request_digest
from orderstream.auth.policy import principal_of

if TYPE_CHECKING:
    from orderstream.application.use_cases import UseCases

IF_MATCH_PATTERN = r'^(\*|"(0|[1-9][0-9]{0,17})"|(0|[1-9][0-9]{0,17}))$(?![\s\S])'
"""What ``If-Match`` accepts (also written into the OpenAPI document); 18 digits keep
every revision below the event stores' limits. No leading zero: entity tags compare
as strings (RFC 9110), so ``"01"`` is not the ``"1"`` we sent."""
IDEMPOTENCY_KEY_PATTERN = r"^[!-~]{1,255}$(?![\s\S])"
"""1 to 255 visible ASCII characters (also written into the OpenAPI document)."""
_IDEMPOTENCY_OK = re.compile(IDEMPOTENCY_KEY_PATTERN)
_IF_MATCH = re.compile(IF_MATCH_PATTERN)

_decoders: dict[Any, msgspec.json.Decoder[Any]] = {}


def _decoder(annotation: Any) -> msgspec.json.Decoder[Any]:
    decoder = _decoders.get(annotation)
    if decoder is None:
        decoder = _decoders[annotation] = msgspec.json.Decoder(annotation, strict=True)
    return decoder


async def strict_request(request: Request[Any, Any, Any]) -> None:
    """``before_request``: :func:`strict_query`, then :func:`strict_body`."""
    strict_query(request)
    await strict_body(request)


def strict_query(request: Request[Any, Any, Any]) -> None:
    """Refuse what Litestar's lenient query parsing would let through: a scalar
    parameter given more than once (Litestar keeps one value and ignores the
    others, unchecked), and the text ``null`` for an optional non-text parameter
    (Litestar reads ``?min_position=null`` as absent). Both are 400s."""
    checks = _query_checks(request.route_handler)
    if not checks or not request.scope["query_string"]:
        return
    errors: list[FieldError] = []
    for key, repeatable, text in checks:
        values = request.query_params.getall(key, [])
        if len(values) > 1 and not repeatable:
            errors.append(FieldError(message="given more than once", path=key, source="query"))
        elif values and values[0] == "null" and not text:
            errors.append(FieldError(message="'null' is not a value; leave it out", path=key, source="query"))
    if errors:
        raise bad_request("invalid-parameter", "A parameter is missing or invalid.", errors=errors)


@functools.cache
def _query_checks(handler: BaseRouteHandler) -> tuple[tuple[str, bool, bool], ...]:
    """A handler's query parameters as ``(name, may repeat, may be the text "null")``,
    worked out once per handler instead of on every request."""
    checks = []
    for name, field in handler.parsed_fn_signature.parameters.items():
        kwarg = field.kwarg_definition
        if isinstance(kwarg, ParameterKwarg) and kwarg.param_type is ParamType.QUERY:
            text = str in (get_args(field.annotation) or (field.annotation,))
            checks.append((kwarg.name or name, field.is_non_string_sequence, text))
    return tuple(checks)


async def strict_body(request: Request[Any, Any, Any]) -> None:
    """Validate the body strictly against the handler's ``data`` type.

    A body sent with a ``Content-Type`` other than JSON (a form, ``text/plain``) is
    a 415: only ``application/json`` is documented, and a browser may send the
    others cross-site without asking first."""
    param = request.route_handler.parsed_fn_signature.parameters.get("data")
    if param is None:
        return
    media_type, content_length, encoding = _body_headers(request.scope["headers"])
    if media_type != "application/json":
        sent = f"not {media_type[:80]!r}" if media_type else "but no Content-Type was sent"
        raise ApiError(
            415,
            "unsupported-media-type",
            f"The request body must be JSON (Content-Type: application/json), {sent}.",
        )
    if encoding not in ("", "identity"):  # RFC 9110 15.5.16: an encoding we do not decode is a 415
        raise ApiError(
            415,
            "unsupported-media-type",
            f"The request body must be sent uncompressed, not with Content-Encoding {encoding[:40]!r}.",
            headers={"Accept-Encoding": "identity"},
        )
    body = await read_body(request, content_length)
    try:
        data = _decoder(param.annotation).decode(body)  # raises DecodeError (400) / ValidationError (422)
    except RecursionError:
        raise msgspec.DecodeError("JSON nested too deeply") from None
    except msgspec.ValidationError as invalid:
        # Valid JSON: retry with integral floats as integers (JSON Schema's ``integer``),
        # unless it nests deeper than any body of ours: then the first answer stands.
        try:
            raw = msgspec.json.decode(body)
            ints = _integral_floats_as_ints(raw, MAX_BODY_DEPTH)
        except (RecursionError, _TooDeep):
            raise invalid from None
        data = msgspec.convert(ints, param.annotation, strict=True)
    refuse_duplicate_keys(body)
    # Litestar's body extractor reads the parsed JSON from here: it gets the Struct, not builtins.
    ScopeState.from_scope(request.scope).json = data


def _body_headers(headers: Any) -> tuple[str, str | None, str]:
    """The ``Content-Type``'s media type, lower case (``""`` when none was sent), the
    ``Content-Length`` as sent and the ``Content-Encoding`` (``""``: none), read
    straight from the ASGI headers: Litestar's ``request.content_type`` and
    ``request.content_length`` build a ``Headers`` (every header decoded into a
    multidict, a JWT among them) for two look-ups: about 5 us of a ``POST /orders``
    (py-spy, issue 7)."""
    media_type, length, encoding = "", None, ""
    for name, value in headers:
        name = name.lower()
        if name == b"content-type":
            media_type = value.decode("latin-1").split(";", 1)[0].strip().lower()
        elif name == b"content-length":
            length = value.decode("latin-1")
        elif name == b"content-encoding":
            encoding = value.decode("latin-1").strip().lower()
    return media_type, length, encoding


async def read_body(request: Request[Any, Any, Any], content_length: str | None) -> bytes:
    """The whole body within the body timeout (``app.state.body_timeout``), else 408
    and the connection closed: a client that announces more than it sends, or
    trickles it, holds a connection and a task only that long."""
    timeout: float | None = request.app.state.get("body_timeout")
    try:
        async with asyncio.timeout(timeout):
            return await _receive_body(request, content_length)
    except TimeoutError:
        raise ApiError(
            408,
            "body-timeout",
            f"The request body did not arrive within {timeout:g} s.",
            headers={"Connection": "close"},
        ) from None


async def _receive_body(request: Request[Any, Any, Any], content_length: str | None) -> bytes:
    """What Litestar's ``request.body()`` does, without its per-request extras (the
    ``Headers`` it builds for the length, an async generator and a list of chunks):
    a ``Content-Length`` over the route's ``request_max_body_size`` is a 413 before
    anything is read, as is a body that streams past it; a client gone before the
    end is Litestar's 500 (nobody is left to read it). The body is kept where
    Litestar's own reads find it (the connection state)."""
    state = ScopeState.from_scope(request.scope)
    if state.body is not Empty:
        return state.body
    limit = request.route_handler.resolve_request_max_body_size() or math.inf
    try:
        if content_length is not None and int(content_length) > limit:
            raise RequestEntityTooLarge
    except ValueError:
        raise ClientException(f"Invalid content-length: {content_length!r}") from None
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            raise InternalServerException("client disconnected prematurely")
        chunk: bytes = message.get("body", b"")  # type: ignore[assignment]  # http.request's body
        size += len(chunk)
        if size > limit:
            raise RequestEntityTooLarge
        chunks.append(chunk)
        if not message.get("more_body", False):
            break
    request.is_connected = False
    state.body = body = chunks[0] if len(chunks) == 1 else b"".join(chunks)
    return body


def refuse_duplicate_keys(body: bytes) -> None:
    """A JSON object that names a key twice is refused (422): msgspec, like most
    parsers, keeps the last value silently, so ``{"quantity": 1, "quantity": 900}``
    would mean whatever the reader's parser picks.

    Cheap first: outside strings every ``:`` ends a key, so when the body has no
    more colons than the decoded objects have keys, no key repeats (about 4 µs
    for an order, ``python -m bench.input_checks``). Only otherwise (a colon inside
    a string, or a repeat) is the body parsed again with the standard library,
    which sees every pair."""
    if body.count(b":") == _key_count(msgspec.json.decode(body)):
        return
    json.loads(body, object_pairs_hook=_unique_pairs)


def _key_count(value: Any) -> int:
    """How many keys the objects in ``value`` (decoded JSON) hold, all levels: a loop
    over a stack, not recursion through generators (1.0 against 2.3 us for an order)."""
    count = 0
    stack = [value]
    while stack:
        item = stack.pop()
        if type(item) is dict:
            count += len(item)
            stack.extend(item.values())
        elif type(item) is list:
            stack.extend(item)
    return count


def _unique_pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    found: dict[str, Any] = {}
    for key, value in pairs:
        if key in found:
            raise msgspec.ValidationError(f"Object key {key[:80]!r} is given more than once")
        found[key] = value
    return found


MAX_BODY_DEPTH = 32
"""Deeper than any request body of ours nests: such a body is refused as it is."""


class _TooDeep(Exception):
    pass


def _integral_floats_as_ints(value: Any, depth_left: int) -> Any:
    if depth_left < 0:
        raise _TooDeep
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, list):
        return [_integral_floats_as_ints(v, depth_left - 1) for v in value]
    if isinstance(value, dict):
        return {k: _integral_floats_as_ints(v, depth_left - 1) for k, v in value.items()}
    return value


# -------------------------------------------------------------------------- headers


SINGLE_HEADERS = frozenset(
    {b"authorization", b"content-encoding", b"content-type", b"idempotency-key", b"if-match"}
)
"""Headers a request may send once. Sent twice, a framework reads one of them (the
first for some, the last for others), so ``If-Match: *`` followed by a stale tag went
through unguarded, and the body's media type depended on the order of the lines."""


def refuse_repeated_headers(headers: Any) -> None:
    """400 when a header of :data:`SINGLE_HEADERS` comes more than once (the raw ASGI
    headers: names are lower case there)."""
    seen: set[bytes] = set()
    for name, _ in headers:
        if name in SINGLE_HEADERS:
            if name in seen:
                shown = name.decode("latin-1").title()
                raise bad_request(
                    "invalid-header",
                    f"{shown} must be sent once.",
                    errors=[FieldError(message="sent more than once", path=shown, source="header")],
                )
            seen.add(name)


def parse_if_match(value: str | None) -> int | None:
    """``"3"`` (or bare ``3``) -> 3; ``*`` or absent -> None (no revision check).

    Anything else (a list, a weak tag, a non-number) is a 400: a client that
    meant to guard its write must not have it go through unguarded.
    """
    if value is None:
        return None
    value = value.strip()
    if _IF_MATCH.match(value) is None:
        raise bad_request(
            "invalid-header",
            'If-Match must be one strong entity tag holding a revision, e.g. If-Match: "3".',
            errors=[
                FieldError(message=f"not a revision tag: {value[:40]!r}", path="If-Match", source="header")
            ],
        )
    return None if value == "*" else int(value.strip('"'))


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


# ------------------------------------------------------------ command context


def use_cases_of(request: Request[Any, Any, Any]) -> UseCases:
    """The write side's use cases, from the app's state.

    The command routes take them from here, not as a ``NamedDependency``: Litestar
    resolves a dependency on every request (a cleanup group, a batch, the provider
    call), about 6 us of CPU per command, for an object that never changes
    (issue 7, docs/command-path.md). The queries keep the dependency."""
    use_cases: UseCases = request.app.state["container"].use_cases
    return use_cases


def command_context(
    request: Request[Any, Any, Any], *, idempotency_key: str | None = None, request_body: object = None
) -> CommandContext:
    """Who asks (the principal the access check let in: subject and roles), the correlation id
    and the idempotency key.

    ``request_body`` (the decoded Structs, as sent) is digested only when a key is
    given; it is turned into builtins first so the digest stays the one that the
    events of earlier keyed requests were derived from."""
    principal = principal_of(request)
    key = check_idempotency_key(idempotency_key)
    return CommandContext(
        actor=principal.subject,
        roles=principal.roles_text or None,
        correlation_id=correlation_id(request.scope),
        idempotency_key=key,
        request_hash=request_digest(msgspec.to_builtins(request_body)) if key is not None else None,
    )
