"""What /metrics says about commands, the writer, snapshots and sagas, through the
real app on real SQLite stores (tests/conftest.py's ``client`` and ``container``)."""

from __future__ import annotations

import httpx
from prometheus_client.parser import text_string_to_metric_families

from orderstream.container import Container
from orderstream.metrics import SAGA_OUTCOMES, Metrics
from tests.api.helpers import ADDRESS, order_body, place_order, register_product


def samples(metrics: Metrics) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    body, _ = metrics.render()
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(body.decode())
        for sample in family.samples
    }


def value(metrics: Metrics, name: str, **labels: str) -> float:
    return samples(metrics).get((name, frozenset(labels.items())), 0.0)


async def test_command_results_are_counted_by_kind(client: httpx.AsyncClient, container: Container) -> None:
    await register_product(client, "SKU-1")
    order = await place_order(client, order_body(("SKU-1", 1)))
    again = await client.post(
        "/products", json={"sku": "SKU-1", "name": "Mug", "price": {"amount": 1, "currency": "EUR"}}
    )
    assert again.status_code == 409
    unknown = await client.post("/orders", json=order_body(("NO-SUCH-SKU", 1)))
    assert unknown.status_code == 422
    stale = await client.patch(
        f"/orders/{order['id']}", json={"shipping_address": ADDRESS}, headers={"If-Match": '"7"'}
    )
    assert stale.status_code == 412

    metrics = container.metrics
    assert value(metrics, "orderstream_commands_total", command="PlaceOrder", result="accepted") == 1
    assert value(metrics, "orderstream_commands_total", command="RegisterProduct", result="accepted") == 1
    assert value(metrics, "orderstream_commands_total", command="RegisterProduct", result="refused") == 1
    assert value(metrics, "orderstream_commands_total", command="ChangeOrder", result="conflict") == 1
    assert value(metrics, "orderstream_concurrency_conflicts_total", outcome="rejected") == 1
    # The SQLite writer and the snapshot store counted too (every command looked for a snapshot).
    assert value(metrics, "orderstream_writer_appends_total") >= 3
    assert value(metrics, "orderstream_writer_batch_jobs_count") == value(
        metrics, "orderstream_writer_transactions_total"
    )
    assert value(metrics, "orderstream_snapshot_reads_total", outcome="miss") >= 1


async def test_every_saga_outcome_is_a_series_from_the_start() -> None:
    metrics = Metrics()
    for outcome in SAGA_OUTCOMES:
        assert (
            "orderstream_saga_outcomes_total",
            frozenset({("saga", "fulfilment"), ("outcome", outcome)}),
        ) in (samples(metrics))
    metrics.saga_started()
    metrics.saga_ended("cancelled")
    assert value(metrics, "orderstream_saga_starts_total", saga="fulfilment") == 1
    assert value(metrics, "orderstream_saga_outcomes_total", saga="fulfilment", outcome="cancelled") == 1
    assert value(metrics, "orderstream_saga_outcomes_total", saga="fulfilment", outcome="failed") == 0


async def test_read_routes_are_timed_by_route_template(
    client: httpx.AsyncClient, container: Container
) -> None:
    await register_product(client, "SKU-1")
    for sku in ("SKU-1", "SKU-1", "NOPE"):
        await client.get(f"/products/{sku}")

    count = value(
        container.metrics,
        "orderstream_http_request_duration_seconds_count",
        method="GET",
        route="/products/{sku}",
    )
    assert count == 3
