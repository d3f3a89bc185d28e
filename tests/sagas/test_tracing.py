"""One trace shows a whole order: from the HTTP request that places it, through the
command and its append, the saga trigger, Temporal (the SDK's tracing interceptor on
a client made by ``orderstream.sagas.runtime.connect``), to the activity whose command ships it.

Tracing is turned on for this test only, with the SDK's in-memory exporter
(:func:`orderstream.tracing.configure`), against the real Temporal dev server.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, format_span_id, format_trace_id
from temporalio.testing import WorkflowEnvironment

from orderstream import tracing
from orderstream.domain import orders
from orderstream.sagas.runtime import connect
from tests.api.helpers import order_body
from tests.sagas.conftest import SagaFactory

pytestmark = [pytest.mark.temporal, pytest.mark.asyncio(loop_scope="session")]

CALLER_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
CALLER_SPAN = "00f067aa0ba902b7"
"""The caller's span, sent as a W3C ``traceparent``: the whole order joins its trace."""


@pytest.fixture
def exported() -> Iterator[InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    assert not tracing.enabled()
    tracing.configure(exporter=exporter)
    try:
        yield exporter
    finally:
        tracing.shutdown()


def ancestry(span: ReadableSpan, by_id: dict[int, ReadableSpan]) -> list[ReadableSpan]:
    """``span`` and its parents up to the first whose parent is not among the spans."""
    chain = [span]
    while chain[-1].parent is not None and chain[-1].parent.span_id in by_id:
        chain.append(by_id[chain[-1].parent.span_id])
    return chain


def appended(span: ReadableSpan) -> tuple[str, ...]:
    return tuple(span.attributes.get("orderstream.appended", ()) or ())  # type: ignore[arg-type]


async def test_one_trace_from_post_to_shipped(
    exported: InMemorySpanExporter, make_saga: SagaFactory, temporal_env: WorkflowEnvironment
) -> None:
    client = await connect(temporal_env.client.service_client.config.target_host)
    saga = await make_saga(client=client)
    await saga.product("SKU-1", 10)

    response = await saga.http.post(
        "/orders",
        json=order_body(("SKU-1", 2)),
        headers={"traceparent": f"00-{CALLER_TRACE}-{CALLER_SPAN}-01"},
    )
    assert response.status_code == 201, response.text
    order_id = response.json()["id"]
    assert (await saga.outcome(order_id)).status == "shipped"

    spans = [s for s in exported.get_finished_spans() if format_trace_id(s.context.trace_id) == CALLER_TRACE]
    by_id = {s.context.span_id: s for s in spans}
    shipping = [s for s in spans if s.name == "command" and "OrderShipped" in appended(s)]
    assert len(shipping) == 1, sorted(s.name for s in spans)

    chain = ancestry(shipping[0], by_id)
    names = [s.name for s in chain]
    root = chain[-1]
    # The HTTP server span is the trace's root here, a child of the caller's span.
    assert root.kind == SpanKind.SERVER, names
    assert root.name.startswith("POST /orders"), names
    assert root.parent is not None
    assert format_span_id(root.parent.span_id) == CALLER_SPAN
    # Top-down: the request, the command placing the order, the trigger starting the
    # saga, the workflow's shipping activity (ship-order joined with capture and
    # commit; the classic interceptor parents activity starts on the workflow's
    # start), the command shipping the order.
    assert names[::-1] == [
        "POST /orders",
        "command",
        "saga trigger OrderPlaced",
        "StartWorkflow:OrderFulfilment",
        "StartActivity:ship_and_settle_order",
        "RunActivity:ship_and_settle_order",
        "command",
    ]
    placing, start = chain[-2], chain[-4]
    assert "OrderPlaced" in appended(placing), names
    run = [s for s in spans if s.name == "RunWorkflow:OrderFulfilment"]
    assert run, "the workflow's run is in the trace"
    assert all(s.parent is not None and s.parent.span_id == start.context.span_id for s in run)

    # The place command's append is its child, and the stored event names that command.
    assert any(s.name == "append" and s.parent and s.parent.span_id == placing.context.span_id for s in spans)
    (placed,) = [e for e in await saga.stream(orders.stream_name(order_id)) if e.type == "OrderPlaced"]
    stored = tracing.stored_span(placed.metadata)
    assert stored is not None
    assert (stored.trace_id, stored.span_id) == (placing.context.trace_id, placing.context.span_id)

    # The trigger's consumer batch that carried OrderPlaced is linked to the placing command.
    batches = [s for s in exported.get_finished_spans() if s.name.startswith("consume ")]
    assert any(link.context.span_id == placing.context.span_id for s in batches for link in s.links)
