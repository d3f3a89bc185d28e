"""Tracing (``orderstream.tracing``): off unless configured, and when on, the command
handler's spans and the trace it leaves in event metadata for the consumers.

The end-to-end trace of an order (HTTP -> Temporal -> shipped) is
``tests/sagas/test_tracing.py``.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.trace.export import ConsoleSpanExporter
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from orderstream import tracing
from orderstream.application.commands import CommandContext, CommandHandler
from orderstream.domain import inventory
from orderstream.domain.common import DomainError, Money
from orderstream.events import registry
from orderstream.eventstore.base import EventMetadata, RecordedEvent
from orderstream.eventstore.sqlite import SqliteEventStore

NOW = datetime(2026, 1, 1, tzinfo=UTC)
STREAM = inventory.stream_name("MUG")


@pytest.fixture
def exported() -> Iterator[InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    tracing.configure(exporter=exporter)
    try:
        yield exporter
    finally:
        tracing.shutdown()


@pytest.fixture
async def handler(tmp_path: Path) -> AsyncIterator[CommandHandler]:
    store = await SqliteEventStore.open(tmp_path / "events.db")
    try:
        yield CommandHandler(store, registry)
    finally:
        await store.close()


async def register(handler: CommandHandler) -> None:
    command = inventory.RegisterProduct(sku="MUG", name="Mug", price=Money(1250, "EUR"), now=NOW)
    await handler.handle(inventory.decider, STREAM, command, context=CommandContext(actor="t"))


def event(metadata: EventMetadata) -> RecordedEvent:
    return RecordedEvent(
        id=uuid.uuid4(),
        stream=STREAM,
        revision=0,
        position=7,
        type="StockAdded",
        schema_version=1,
        data=b"{}",
        metadata_json=metadata.to_json(),
        recorded_at=NOW,
    )


def test_off_unless_the_environment_names_an_exporter() -> None:
    assert tracing.configure({}) is None
    assert tracing.configure({"OTEL_TRACES_EXPORTER": "none"}) is None
    assert not tracing.enabled()
    assert tracing.http_plugins() == []
    assert isinstance(tracing.exporter_from({"OTEL_TRACES_EXPORTER": "console"}), ConsoleSpanExporter)
    assert isinstance(tracing.exporter_from({"OTEL_TRACES_EXPORTER": "otlp"}), OTLPSpanExporter)
    with pytest.raises(tracing.TracingConfigError, match="zipkin"):
        tracing.exporter_from({"OTEL_TRACES_EXPORTER": "zipkin"})


async def test_off_the_events_carry_no_trace(handler: CommandHandler) -> None:
    await register(handler)
    (stored,) = await handler.event_store.read_stream(STREAM)
    assert stored.metadata.traceparent is None
    assert b"traceparent" not in stored.metadata_json


async def test_on_the_command_span_holds_the_append_and_names_the_events(
    exported: InMemorySpanExporter, handler: CommandHandler
) -> None:
    assert tracing.http_plugins()  # the HTTP server span
    await register(handler)
    add = inventory.AddStock(sku="MUG", quantity=3, now=NOW)
    await handler.handle(inventory.decider, STREAM, add, context=CommandContext(actor="t"))

    spans = exported.get_finished_spans()
    commands = [s for s in spans if s.name == "command"]
    assert [s.attributes["orderstream.appended"] for s in commands] == [
        ("ProductRegistered",),
        ("StockAdded",),
    ]
    stored = await handler.event_store.read_stream(STREAM)
    for command, recorded in zip(commands, stored, strict=True):
        (append,) = [s for s in spans if s.name == "append" and s.parent == command.context]
        assert append.context.trace_id == command.context.trace_id
        stored_span = tracing.stored_span(recorded.metadata)
        assert stored_span is not None
        assert (stored_span.trace_id, stored_span.span_id) == (
            command.context.trace_id,
            command.context.span_id,
        )


async def test_a_refused_command_span_says_why(
    exported: InMemorySpanExporter, handler: CommandHandler
) -> None:
    await register(handler)
    with pytest.raises(DomainError):
        await register(handler)  # registered already
    refused = exported.get_finished_spans()[-1]
    assert refused.name == "command"
    assert refused.attributes is not None
    assert refused.attributes["orderstream.refused"] == "already-exists"
    assert not [s for s in exported.get_finished_spans() if s.parent == refused.context]  # nothing appended


def test_a_consumer_continues_the_stored_trace(exported: InMemorySpanExporter) -> None:
    parent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    with tracing.span_after("saga trigger StockAdded", event(EventMetadata(traceparent=parent))):
        pass
    with tracing.span_after("saga trigger StockAdded", event(EventMetadata(traceparent="00-damaged"))):
        pass
    child, orphan = exported.get_finished_spans()
    assert child.kind == SpanKind.CONSUMER
    assert child.parent is not None
    assert (f"{child.context.trace_id:032x}", f"{child.parent.span_id:016x}") == (
        "4bf92f3577b34da6a3ce929d0e0e4736",
        "00f067aa0ba902b7",
    )
    assert orphan.parent is None  # a damaged traceparent starts a new trace, it does not fail


def test_a_batch_links_every_traced_event(exported: InMemorySpanExporter) -> None:
    traced = [f"00-{uuid.uuid4().hex}-{uuid.uuid4().hex[:16]}-01" for _ in range(3)]
    events = [event(EventMetadata(traceparent=t)) for t in traced] + [event(EventMetadata())]
    with tracing.batch_span("consume orders", events):
        pass
    (batch,) = exported.get_finished_spans()
    assert batch.parent is None
    assert [
        f"00-{link.context.trace_id:032x}-{link.context.span_id:016x}-01" for link in batch.links
    ] == traced
    assert batch.attributes is not None
    assert batch.attributes["orderstream.events"] == 4


async def test_a_sampled_out_command_still_writes_its_decision(
    monkeypatch: pytest.MonkeyPatch, handler: CommandHandler
) -> None:
    """With a sampler that leaves the request out, the event still carries the trace,
    flagged unsampled, so the consumer's span follows the decision (no stray traces)."""
    monkeypatch.setenv("OTEL_TRACES_SAMPLER", "always_off")
    exporter = InMemorySpanExporter()
    tracing.configure(exporter=exporter)
    try:
        await register(handler)
        (stored,) = await handler.event_store.read_stream(STREAM)
        assert stored.metadata.traceparent is not None
        flags = int(stored.metadata.traceparent.rsplit("-", 1)[1], 16)
        assert flags & 0x01 == 0  # W3C "sampled" unset
        with tracing.span_after("saga trigger ProductRegistered", stored) as span:
            assert span is not None
            assert not span.is_recording()
    finally:
        tracing.shutdown()
    assert exporter.get_finished_spans() == ()
