"""/health, /ready, /metrics."""

from __future__ import annotations

import httpx

from orderstream.container import Container
from orderstream.readstore.elasticsearch import ElasticsearchReadStore
from tests.api.helpers import place_order, register_product


async def test_health(client: httpx.AsyncClient) -> None:
    response = await client.get("/health")
    assert response.status_code == 200
    assert response.json() == {"status": "ok"}


async def test_ready_shows_projection_positions(client: httpx.AsyncClient) -> None:
    await register_product(client)
    written = await place_order(client)
    # A list with min_position waits until the projection as a whole has applied the
    # position (a document read may answer as soon as that document is fresh).
    listed = await client.get("/orders", params={"min_position": written["position"]})
    assert listed.status_code == 200, listed.text
    response = await client.get("/ready")
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["status"] == "ready"
    assert body["head_position"] == written["position"]
    assert set(body["projections"]) == {"orders", "products"}
    assert body["projections"]["orders"]["checkpoint"] == written["position"]
    assert body["projections"]["orders"]["lag_events"] == 0


async def test_ready_is_503_when_a_store_is_down(client: httpx.AsyncClient, container: Container) -> None:
    if isinstance(container.read_store, ElasticsearchReadStore):
        # A closed Elasticsearch client reconnects on the next call; a node that does
        # not answer is what "down" means there: nothing listens on port 9.
        working = container.read_store
        container.read_store = await ElasticsearchReadStore.open("http://127.0.0.1:9", read_timeout=2)
        await working.close()
    else:
        await container.read_store.close()
    response = await client.get("/ready")
    assert response.status_code == 503
    assert response.json()["read_store"] == "unavailable"


async def test_metrics(client: httpx.AsyncClient) -> None:
    await register_product(client)
    await place_order(client)
    await client.get("/orders/missing-order")
    response = await client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    text = response.text
    assert 'orderstream_command_duration_seconds_count{command="PlaceOrder",outcome="ok"} 1.0' in text
    assert 'orderstream_events_appended_total{category="order"} 1.0' in text
    assert 'orderstream_http_requests_total{method="POST",route="/orders",status="201"} 1.0' in text
    assert 'route="/orders/{order_id}",status="404"' in text
    assert 'orderstream_projection_checkpoint{projection="orders"}' in text
    assert 'orderstream_projection_lag_events{projection="products"}' in text
    assert "orderstream_concurrency_conflicts_total" in text
