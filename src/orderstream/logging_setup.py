"""Logging of every orderstream process, configured here and nowhere else.

The code logs through the standard library (``logging.getLogger(...)``), as do
the libraries under it (uvicorn, temporalio, elastic_transport, kurrentdbclient).
:func:`configure` routes all of them through one structlog
``ProcessorFormatter`` on stderr, so every line has the same shape:

- ``json``: one JSON object per line (``timestamp``, ``level``, ``logger``,
  ``message``, ``process`` (the pid), ``exception`` when there is one, and the
  context below), for a log shipper;
- ``console``: aligned, coloured text for a person at a terminal.

``ORDERSTREAM_LOG_FORMAT=json|console`` chooses; unset, it is ``console`` when
stderr is a terminal and ``json`` otherwise (a container, a service manager, a
pipe).

Context. The fields an on-call engineer correlates by ride along without being
passed to every call: :func:`bound` puts them in a context variable (structlog's
``contextvars``), and every record logged inside it, by any logger, carries them.
The request path binds ``correlation_id`` (``orderstream.api.correlation``),
the command handler ``stream`` and ``causation_id`` (``orderstream.metrics``),
a consumer handling an event binds the event's fields with
:func:`event_context` (``stream``, ``position``, ``event_type``,
``correlation_id``, ``causation_id``). A single call can add its own with
``extra={"stream": ...}``: the keys of :data:`CONTEXT_KEYS` are picked up.

Temporal's Rust core. What the SDK's core (its gRPC client, its worker machinery)
logs is forwarded into the ``temporalio.sdk_core`` logger by the runtime that
``orderstream.sagas.runtime.temporal_runtime`` makes, so it comes out here like any
record; :func:`_temporal_core_fields` adds the core's ``core_target`` (the Rust
module, ``temporalio_client::retry``) and ``core_fields`` (``error`` and the like).

Secrets. Nothing here logs a request's headers or an event's data; the only
values added are the ids above. Keep it so: never log a header, a body, or a
token (see tests/unit/test_logging.py, which runs a whole order flow and looks
for them in the output).
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import os
import sys
from typing import Any, Literal, TextIO

import structlog
from structlog.tracebacks import ExceptionDictTransformer

from orderstream.eventstore.base import RecordedEvent

ENV_FORMAT = "ORDERSTREAM_LOG_FORMAT"
LogFormat = Literal["json", "console"]
FORMATS: tuple[LogFormat, ...] = ("json", "console")

CONTEXT_KEYS = ("correlation_id", "causation_id", "stream", "position", "event_type", "projection")
"""Fields a single call may pass with ``extra=`` (they land beside the bound ones)."""

THIRD_PARTY_LEVELS: dict[str, int] = {
    # One line per HTTP request to Elasticsearch at INFO: noise; its warnings matter.
    "elastic_transport": logging.WARNING,
    "elasticsearch": logging.WARNING,
    # The SDK's own chatter (worker start, poller details) at INFO is noise; what
    # workflows and activities log through workflow.logger / activity.logger is not.
    "temporalio": logging.WARNING,
    "temporalio.workflow": logging.INFO,
    "temporalio.activity": logging.INFO,
    "kurrentdbclient": logging.WARNING,
    "grpc": logging.WARNING,
    "httpx": logging.WARNING,
    "httpcore": logging.WARNING,
    "asyncio": logging.WARNING,
    # uvicorn writes its access log only when asked (``--access-log``), at INFO;
    # ``uvicorn.error`` is the server's life cycle (startup, shutdown).
    "uvicorn.access": logging.INFO,
    "uvicorn.error": logging.INFO,
}


def default_format(stream: TextIO | None = None) -> LogFormat:
    """``ORDERSTREAM_LOG_FORMAT`` if set, else ``console`` on a terminal, ``json`` otherwise."""
    chosen = os.environ.get(ENV_FORMAT, "").strip().lower()
    if chosen:
        if chosen not in FORMATS:
            raise ValueError(f"{ENV_FORMAT} must be one of {', '.join(FORMATS)}, not {chosen!r}")
        return chosen
    out = sys.stderr if stream is None else stream
    return "console" if out.isatty() else "json"


def configure(
    level: int | str = logging.INFO,
    *,
    fmt: LogFormat | None = None,
    stream: TextIO | None = None,
) -> None:
    """Send every logger's records to ``stream`` (stderr) in ``fmt``; the root at ``level``.

    Idempotent: a second call replaces the handler of the first (the CLI calls it
    once per process; tests call it with their own stream)."""
    out = sys.stderr if stream is None else stream
    chosen = fmt or default_format(out)
    handler = logging.StreamHandler(out)
    handler.setFormatter(_formatter(chosen, colors=out.isatty()))
    handler.addFilter(_business_refusal_without_traceback)
    root = logging.getLogger()
    for old in list(root.handlers):
        if getattr(old, "_orderstream", False):
            root.removeHandler(old)
    handler._orderstream = True  # type: ignore[attr-defined]  # marks the handler a later call replaces
    root.addHandler(handler)
    root.setLevel(level)
    for name, floor in THIRD_PARTY_LEVELS.items():
        # At DEBUG a developer wants to see everything, the libraries' chatter too.
        logging.getLogger(name).setLevel(min(floor, root.level) if root.level < logging.INFO else floor)
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.stdlib.filter_by_level,
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True,
    )


def _business_refusal_without_traceback(record: logging.LogRecord) -> bool:
    """Temporal's SDK logs every failed activity at WARNING with its traceback. A
    non-retryable ``ApplicationError`` is a saga step's business answer (out of stock,
    the order already cancelled): one line says it; its traceback (about 30 KB in JSON
    with the frames' locals, 2,000 of them in a hostile run of 5,000 orders) does not.
    Retryable failures keep theirs. (Duck-typed: no Temporal import for the API.)"""
    if record.name == "temporalio.activity" and record.exc_info:
        exc = record.exc_info[1]
        if type(exc).__name__ == "ApplicationError" and getattr(exc, "non_retryable", False):
            record.msg = f"{record.msg}: ApplicationError: {str(exc).replace('%', '%%')}"
            record.exc_info = record.exc_text = None
    return True


def _formatter(fmt: LogFormat, *, colors: bool) -> structlog.stdlib.ProcessorFormatter:
    pre_chain: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.ExtraAdder(allow=CONTEXT_KEYS),
        _temporal_core_fields,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.CallsiteParameterAdder([structlog.processors.CallsiteParameter.PROCESS]),
    ]
    tail: list[Any]
    # Tracebacks without the frames' local variables (structlog's and rich's default is
    # to show them): a request's locals hold its bearer token, headers and body.
    if fmt == "json":
        tail = [
            structlog.processors.ExceptionRenderer(ExceptionDictTransformer(show_locals=False)),
            # "message", not structlog's "event": in this code base an event is a domain event.
            structlog.processors.EventRenamer("message"),
            structlog.processors.JSONRenderer(),
        ]
    else:
        tail = [structlog.dev.ConsoleRenderer(colors=colors, exception_formatter=_console_traceback())]
    return structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=pre_chain,
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, *tail],
    )


def _temporal_core_fields(
    _logger: Any, _method: str, event_dict: structlog.typing.EventDict
) -> structlog.typing.EventDict:
    """A record forwarded from Temporal's core carries the core's entry (``temporal_log``,
    the SDK's ``LogForwardingConfig``): its target and fields become ``core_target`` and
    ``core_fields``. (Duck-typed: no Temporal import for the API.)"""
    entry = getattr(event_dict.get("_record"), "temporal_log", None)
    if entry is not None:
        event_dict["core_target"] = entry.target
        try:
            fields = entry.fields
        except Exception:  # the SDK guards its conversion the same way; the record matters more
            fields = None
        if fields:
            event_dict["core_fields"] = dict(fields)
    return event_dict


def _console_traceback() -> structlog.typing.ExceptionRenderer:
    """rich's traceback when rich is there (Litestar brings it), without locals."""
    try:
        import rich  # noqa: F401
    except ImportError:  # pragma: no cover - rich comes with Litestar
        return structlog.dev.plain_traceback
    return structlog.dev.RichTracebackFormatter(show_locals=False)


# --------------------------------------------------------------------------------- context


class Bound:
    """The context manager :func:`bound` returns.

    Binds and resets through structlog's context variables themselves (each key's
    ``ContextVar``, found once and kept: :func:`_context_var`), which restores
    exactly what was bound before. A key already bound to the same value is left
    as it is (the command handler binds the request's correlation id again inside
    the request that bound it). structlog's ``bound_contextvars`` copies the whole
    context first, and ``bind_contextvars`` formats each key's name on every call:
    both measurable on the command path (bench.observability, issue 7). A plain
    class rather than a ``@contextmanager`` generator: every API request enters
    one, and the generator's set-up showed as 4% of ``POST /orders`` in the
    profile (issue 7)."""

    __slots__ = ("_fields", "_tokens")

    def __init__(self, fields: dict[str, object]) -> None:
        self._fields = fields
        self._tokens: list[contextvars.Token[Any]] = []

    def __enter__(self) -> None:
        tokens = self._tokens = []
        for key, value in self._fields.items():
            if value is not None:
                var = _CONTEXT_VARS.get(key) or _context_var(key)
                if var.get() != value:
                    tokens.append(var.set(value))

    def __exit__(self, *_exc: object) -> None:
        for token in reversed(self._tokens):
            token.var.reset(token)


_CONTEXT_VARS: dict[str, contextvars.ContextVar[Any]] = {}
"""Key -> the ``ContextVar`` structlog's ``merge_contextvars`` reads it from."""


def _context_var(key: str) -> contextvars.ContextVar[Any]:
    """structlog's variable for ``key`` (structlog creates it on the first bind; its
    token names it), kept for the next :class:`Bound`."""
    token = next(iter(structlog.contextvars.bind_contextvars(**{key: ...}).values()))
    token.var.reset(token)
    _CONTEXT_VARS[key] = token.var
    return token.var


def bound(**fields: object) -> Bound:
    """Every record logged inside ``with bound(...)`` carries ``fields`` (``None``
    values are left out)."""
    return Bound(fields)


def event_context(event: RecordedEvent) -> contextlib.AbstractContextManager[None]:
    """The context of a consumer handling ``event``: its stream, position and type,
    and the correlation and causation ids of its metadata."""
    return bound(
        stream=event.stream,
        position=event.position,
        event_type=event.type,
        correlation_id=event.metadata.correlation_id,
        causation_id=event.metadata.causation_id,
    )
