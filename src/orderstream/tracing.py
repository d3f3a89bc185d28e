"""OpenTelemetry tracing: one trace from the HTTP request to the saga's last command.

Where the spans come from:

- the HTTP server span: Litestar's OpenTelemetry plugin (:func:`http_plugins`), which
  honours an incoming W3C ``traceparent``;
- ``command`` and ``append``: :class:`~orderstream.application.commands.CommandHandler`;
  the command span's ids go into every event it appends (:class:`EventMetadata`'s
  ``trace_id`` / ``span_id``), so whoever reads the event later continues the trace;
- the consumers: a projection batch is one span *linked* to every event's stored span
  (:func:`batch_span`: a batch mixes many traces), the saga trigger's start or signal is
  a *child* of its event's stored span (:func:`span_after`);
- Temporal: the SDK's ``TracingInterceptor`` on the client and worker
  (``src/orderstream/sagas/runtime.py``) carries the context through the workflow into each
  activity, whose commands are then children of the activity span.

Configuration is the standard ``OTEL_*`` environment (:func:`configure`, called once by
the composition root: the CLI and the standalone saga worker): ``OTEL_TRACES_EXPORTER``
``otlp`` (HTTP/protobuf to ``OTEL_EXPORTER_OTLP_ENDPOINT``, default
``http://localhost:4318``), ``console`` (spans printed to stdout) or ``none``;
``OTEL_SERVICE_NAME`` (default ``orderstream``). Off by default: no SDK tracer provider is
installed, every span is the API's no-op span, and nothing here adds middleware or
interceptors (``enabled()`` is false).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Mapping, Sequence

from litestar.plugins import PluginProtocol
from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    ConsoleSpanExporter,
    SimpleSpanProcessor,
    SpanExporter,
)
from opentelemetry.trace import Link, NonRecordingSpan, Span, SpanContext, SpanKind
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from orderstream.eventstore.base import EventMetadata, RecordedEvent

EXPORTERS = ("otlp", "console", "none")
DEFAULT_SERVICE_NAME = "orderstream"
MAX_LINKS = 128
"""A batch span links at most this many events (the SDK's default link limit)."""

_provider: TracerProvider | None = None
_tracer: trace.Tracer = trace.NoOpTracer()
"""The API's no-op tracer until :func:`configure` installs a provider."""


class TracingConfigError(ValueError):
    """``OTEL_TRACES_EXPORTER`` names an exporter this service does not ship."""


def configure(
    env: Mapping[str, str] | None = None, *, exporter: SpanExporter | None = None
) -> TracerProvider | None:
    """Install the process's tracer provider from the ``OTEL_*`` environment; ``None``
    (tracing stays off) unless ``OTEL_TRACES_EXPORTER`` is ``otlp`` or ``console``.

    ``exporter`` replaces the one the environment names and turns tracing on (tests
    pass the SDK's in-memory exporter; spans are then exported as they end, and the
    OpenTelemetry global provider is left alone, so :func:`shutdown` turns it off).
    Every span of ours comes from this module's provider, not the global one."""
    global _provider, _tracer
    env = os.environ if env is None else env
    if _provider is not None:
        return _provider
    exporter_from_env = exporter is None
    if exporter is None:
        exporter = exporter_from(env)
        if exporter is None:
            return None
        processor: SimpleSpanProcessor | BatchSpanProcessor = BatchSpanProcessor(exporter)
    else:
        processor = SimpleSpanProcessor(exporter)
    # Resource.create adds OTEL_RESOURCE_ATTRIBUTES; the name is ours to default
    # ("orderstream", not the SDK's "unknown_service").
    name = env.get("OTEL_SERVICE_NAME") or DEFAULT_SERVICE_NAME
    provider = TracerProvider(resource=Resource.create({"service.name": name}))
    provider.add_span_processor(processor)
    if exporter_from_env:  # for third-party instrumentation too (it can be set once per process)
        trace.set_tracer_provider(provider)
    _provider, _tracer = provider, provider.get_tracer("orderstream")
    return provider


def exporter_from(env: Mapping[str, str]) -> SpanExporter | None:
    """The exporter ``OTEL_TRACES_EXPORTER`` names (``None`` for ``none`` or unset)."""
    chosen = (env.get("OTEL_TRACES_EXPORTER") or "none").strip().lower()
    if chosen == "none":
        return None
    if chosen == "console":
        return ConsoleSpanExporter()
    if chosen == "otlp":
        # Imported only when chosen: the exporter pulls in protobuf and requests.
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        return OTLPSpanExporter()  # reads OTEL_EXPORTER_OTLP_(TRACES_)ENDPOINT / _HEADERS
    raise TracingConfigError(f"OTEL_TRACES_EXPORTER={chosen!r}: expected one of {', '.join(EXPORTERS)}")


def enabled() -> bool:
    """Whether :func:`configure` installed a provider in this process."""
    return _provider is not None


def tracer() -> trace.Tracer:
    """The tracer of this process's spans: the API's no-op tracer while tracing is off."""
    return _tracer


def shutdown() -> None:
    """Export what is left and turn tracing off again (the provider also flushes at
    interpreter exit by itself)."""
    global _provider, _tracer
    if _provider is not None:
        _provider.shutdown()
    _provider, _tracer = None, trace.NoOpTracer()


# ----------------------------------------------------------------------- the HTTP span


def http_plugins() -> list[PluginProtocol]:
    """Litestar plugins for the app: the OpenTelemetry server span when tracing is on,
    none when off (the middleware would cost every request for nothing)."""
    if not enabled():
        return []
    from litestar.plugins.opentelemetry import OpenTelemetryConfig, OpenTelemetryPlugin

    # No spans for the ASGI receive/send messages (two per request, nothing to read in
    # them), nor for the scrapes and probes that poll every few seconds.
    config = OpenTelemetryConfig(
        tracer_provider=_provider,
        exclude_spans=["receive", "send"],
        exclude=["^/metrics$", "^/health$", "^/ready$"],
    )
    return [OpenTelemetryPlugin(config)]


# ---------------------------------------------------------------- the command path


_OFF: contextlib.nullcontext[Span] = contextlib.nullcontext(trace.INVALID_SPAN)
"""What a span is while tracing is off: the API's invalid (non-recording) span, and no
context switch at all (the no-op tracer's span would still attach a context)."""


def command_span(name: str, stream: str) -> contextlib.AbstractContextManager[Span]:
    """A span of the command handler (``command``, ``command batch``, ``append``) for
    ``stream``; nothing while tracing is off (every command pays only this call)."""
    if _provider is None:
        return _OFF
    return _tracer.start_as_current_span(name, attributes={"orderstream.stream": stream})


# ------------------------------------------------------------- ids in event metadata


_W3C = TraceContextTextMapPropagator()


def traceparent_of(span: Span) -> str | None:
    """A span as a W3C ``traceparent``, for event metadata; ``None`` while tracing is off.
    A span that a sampler left out is written too (its flags say so): the consumers'
    spans then follow the same decision instead of starting traces of their own."""
    if not span.get_span_context().is_valid:
        return None
    carrier: dict[str, str] = {}
    _W3C.inject(carrier, context=trace.set_span_in_context(span))
    return carrier.get("traceparent")


def stored_span(metadata: EventMetadata) -> SpanContext | None:
    """The span an event was appended under, from its metadata (``None`` for events
    written untraced, or before the field existed, or with a damaged value)."""
    if not metadata.traceparent:
        return None
    extracted = trace.get_current_span(_W3C.extract({"traceparent": metadata.traceparent}))
    context = extracted.get_span_context()
    return context if context.is_valid else None


@contextlib.contextmanager
def span_after(name: str, event: RecordedEvent, **attributes: str | int) -> Iterator[Span | None]:
    """A span continuing the trace of the request that appended ``event`` (a child of
    its stored span); a new trace for an event stored without one. Nothing when off."""
    if not enabled():
        yield None
        return
    parent = stored_span(event.metadata)
    context = Context() if parent is None else trace.set_span_in_context(NonRecordingSpan(parent))
    with _tracer.start_as_current_span(
        name, context=context, kind=SpanKind.CONSUMER, attributes=_event_attributes(event, attributes)
    ) as span:
        yield span


@contextlib.contextmanager
def batch_span(name: str, events: Sequence[RecordedEvent]) -> Iterator[Span | None]:
    """One span for a batch of events from many requests: a new trace *linked* to each
    event's stored span (a span has one parent; the links lead to every request)."""
    if not enabled():
        yield None
        return
    links = []
    for event in events:
        stored = stored_span(event.metadata)
        if stored is not None:
            links.append(Link(stored, {"orderstream.position": event.position}))
            if len(links) == MAX_LINKS:
                break
    attributes: dict[str, str | int] = {"orderstream.events": len(events)}
    if events:
        attributes["orderstream.first_position"] = events[0].position
        attributes["orderstream.last_position"] = events[-1].position
    with _tracer.start_as_current_span(
        name, context=Context(), kind=SpanKind.CONSUMER, links=links, attributes=attributes
    ) as span:
        yield span


def _event_attributes(event: RecordedEvent, extra: Mapping[str, str | int]) -> dict[str, str | int]:
    return {
        "orderstream.stream": event.stream,
        "orderstream.event_type": event.type,
        "orderstream.position": event.position,
        **extra,
    }
