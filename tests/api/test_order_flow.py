"""The DESIGN flow over HTTP: products, an order, read-your-writes, If-Match, cancel, history."""

from __future__ import annotations

import httpx

from orderstream.container import Container
from tests.api.helpers import ADDRESS, assert_problem, order_body, place_order, register_product
from tests.conftest import MakeClient


async def test_register_product_and_add_stock(client: httpx.AsyncClient) -> None:
    created = await client.post(
        "/products", json={"sku": "SKU-1", "name": "Red mug", "price": {"amount": 1250, "currency": "EUR"}}
    )
    assert created.status_code == 201
    assert created.headers["location"] == "/products/SKU-1"
    assert created.headers["etag"] == '"0"'
    assert created.json()["id"] == "SKU-1"

    added = await client.post("/products/SKU-1/stock", json={"quantity": 40})
    assert added.status_code == 200
    assert added.headers["etag"] == '"1"'
    body = added.json()
    assert body["revision"] == 1

    product = await client.get("/products/SKU-1", params={"min_position": body["position"]})
    assert product.status_code == 200
    assert product.json() == {
        "sku": "SKU-1",
        "name": "Red mug",
        "price": {"amount": 1250, "currency": "EUR"},
        "on_hand": 40,
        "reserved": 0,
        "available": 40,
        "revision": 1,
    }
    assert product.headers["etag"] == '"1"'


async def test_register_twice_is_409(client: httpx.AsyncClient) -> None:
    await register_product(client, stock=0)
    again = await client.post(
        "/products", json={"sku": "SKU-1", "name": "Other", "price": {"amount": 1, "currency": "EUR"}}
    )
    assert_problem(again, 409, "already-exists")


async def test_the_design_flow(client: httpx.AsyncClient, container: Container) -> None:
    await register_product(client, "SKU-1", price=1250)
    await register_product(client, "SKU-2", price=300)

    # place: 201, Location, ETag
    placed = await client.post("/orders", json=order_body(("SKU-1", 2), ("SKU-2", 1)))
    assert placed.status_code == 201, placed.text
    written = placed.json()
    order_id = written["id"]
    assert set(written) == {"id", "revision", "position"}
    assert placed.headers["location"] == f"/orders/{order_id}"
    assert placed.headers["etag"] == '"0"'
    assert written["revision"] == 0

    # read your write
    got = await client.get(f"/orders/{order_id}", params={"min_position": written["position"]})
    assert got.status_code == 200, got.text
    order = got.json()
    assert order["id"] == order_id
    assert order["status"] == "placed"
    assert order["customer_id"] == "cust-1"
    assert order["total"] == {"amount": 2 * 1250 + 300, "currency": "EUR"}
    assert [line["sku"] for line in order["lines"]] == ["SKU-1", "SKU-2"]
    assert order["shipping_address"] == ADDRESS
    assert order["revision"] == 0
    assert order["placed_at"]
    assert order["updated_at"]
    assert got.headers["etag"] == '"0"'

    # stale If-Match: 412 with the current revision, and nothing written
    head = await container.event_store.head_position()
    new_address = {**ADDRESS, "line1": "1 New Street"}
    stale = await client.patch(
        f"/orders/{order_id}", json={"shipping_address": new_address}, headers={"If-Match": '"7"'}
    )
    problem = assert_problem(stale, 412, "stale-revision")
    assert problem["current_revision"] == 0
    assert await container.event_store.head_position() == head

    # fresh If-Match: 200 and a new ETag
    fresh = await client.patch(
        f"/orders/{order_id}", json={"shipping_address": new_address}, headers={"If-Match": '"0"'}
    )
    assert fresh.status_code == 200, fresh.text
    assert fresh.headers["etag"] == '"1"'
    assert fresh.json()["revision"] == 1

    # bare revision accepted too
    lines = await client.patch(
        f"/orders/{order_id}", json={"lines": [{"sku": "SKU-1", "quantity": 3}]}, headers={"If-Match": "1"}
    )
    assert lines.status_code == 200, lines.text
    assert lines.headers["etag"] == '"2"'

    # cancel
    cancelled = await client.delete(f"/orders/{order_id}", params={"reason": "changed my mind"})
    assert cancelled.status_code == 200, cancelled.text
    assert cancelled.headers["etag"] == '"3"'
    after = await client.get(f"/orders/{order_id}", params={"min_position": cancelled.json()["position"]})
    assert after.json()["status"] == "cancelled"
    assert after.json()["cancel_reason"] == "changed my mind"
    assert after.json()["shipping_address"]["line1"] == "1 New Street"
    assert after.json()["total"]["amount"] == 3 * 1250

    # history from the event store
    events = await client.get(f"/orders/{order_id}/events")
    assert events.status_code == 200
    listed = events.json()["events"]
    assert [e["type"] for e in listed] == [
        "OrderPlaced",
        "OrderShippingAddressChanged",
        "OrderLinesChanged",
        "OrderCancelled",
    ]
    assert [e["revision"] for e in listed] == [0, 1, 2, 3]
    positions = [e["position"] for e in listed]
    assert positions == sorted(positions)
    for event in listed:
        assert {"type", "revision", "position", "recorded_at", "data", "metadata"} <= set(event)
        assert event["metadata"]["actor"] == "local-admin"  # the fixtures' admin token (tests/tokens.py)
        assert event["metadata"]["roles"] == "admin"
    assert listed[0]["data"]["order_id"] == order_id

    # state at a revision, from the event store
    at0 = await client.get(f"/orders/{order_id}/state", params={"revision": 0})
    assert at0.status_code == 200, at0.text
    assert at0.json()["revision"] == 0
    assert at0.json()["state"]["status"] == "placed"
    assert at0.json()["state"]["shipping_address"]["line1"] == ADDRESS["line1"]
    now = await client.get(f"/orders/{order_id}/state")
    assert now.json()["revision"] == 3
    assert now.json()["state"]["status"] == "cancelled"
    beyond = await client.get(f"/orders/{order_id}/state", params={"revision": 9})
    assert assert_problem(beyond, 404, "revision-not-found")["current_revision"] == 3


async def test_cancel_twice_is_409_and_writes_nothing(
    client: httpx.AsyncClient, container: Container
) -> None:
    await register_product(client)
    order_id = (await place_order(client))["id"]
    first = await client.delete(f"/orders/{order_id}")
    assert first.status_code == 200
    head = await container.event_store.head_position()
    second = await client.delete(f"/orders/{order_id}")
    assert_problem(second, 409, "illegal-transition")
    assert await container.event_store.head_position() == head
    changed = await client.patch(f"/orders/{order_id}", json={"shipping_address": ADDRESS})
    assert_problem(changed, 409, "illegal-transition")


async def test_unknown_order_is_404_everywhere(client: httpx.AsyncClient, container: Container) -> None:
    missing = "0b7c7f1e-0000-4000-8000-000000000000"
    for response in [
        await client.get(f"/orders/{missing}"),
        await client.get(f"/orders/{missing}/events"),
        await client.get(f"/orders/{missing}/state"),
        await client.patch(f"/orders/{missing}", json={"shipping_address": ADDRESS}),
        await client.delete(f"/orders/{missing}"),
        await client.get("/products/NOPE-1"),
        await client.post("/products/NOPE-1/stock", json={"quantity": 1}),
    ]:
        assert_problem(response, 404)
    assert await container.event_store.head_position() is None


async def test_order_with_unknown_product_is_422(client: httpx.AsyncClient) -> None:
    response = await client.post("/orders", json=order_body(("GHOST-1", 1)))
    assert_problem(response, 422, "unknown-product")


async def test_correlation_id_is_echoed_and_recorded(client: httpx.AsyncClient) -> None:
    await register_product(client)
    placed = await client.post("/orders", json=order_body(), headers={"X-Correlation-ID": "trace-42"})
    assert placed.headers["x-correlation-id"] == "trace-42"
    events = (await client.get(f"/orders/{placed.json()['id']}/events")).json()["events"]
    assert events[0]["metadata"]["correlation_id"] == "trace-42"

    generated = await client.get("/no/such/route")
    assert generated.headers["x-correlation-id"]
    assert assert_problem(generated, 404)["correlation_id"] == generated.headers["x-correlation-id"]


async def test_min_position_not_reached_is_503(make_client: MakeClient) -> None:
    async with make_client(projections=False, consistency_timeout=0.2) as (client, _container):
        await register_product(client)
        written = await place_order(client)
        # Nothing projects: without min_position the read model simply has no such order ...
        assert_problem(await client.get(f"/orders/{written['id']}"), 404)
        # ... with it, the client learns that it must wait, and for how long.
        response = await client.get(f"/orders/{written['id']}", params={"min_position": written["position"]})
        problem = assert_problem(response, 503, "not-yet-consistent")
        assert problem["min_position"] == written["position"]
        assert problem["reached_position"] is None
        assert response.headers["retry-after"] == "1"
        listed = await client.get("/orders", params={"min_position": written["position"]})
        assert_problem(listed, 503, "not-yet-consistent")


async def test_min_position_beyond_the_head_is_already_reached(client: httpx.AsyncClient) -> None:
    """A low-water mark: every event at or below the position is applied, and there are none above."""
    await register_product(client)
    written = await place_order(client)
    response = await client.get(
        f"/orders/{written['id']}", params={"min_position": written["position"] + 1000}
    )
    assert response.status_code == 200


async def test_the_card_token_is_exchanged_and_never_stored(
    client: httpx.AsyncClient, container: Container
) -> None:
    """Only the vault's reference is kept (issue 9): not in the event, not in the history."""
    await register_product(client)
    written = await place_order(client, order_body(token="tok_live_4242_secret"))
    history = await client.get(f"/orders/{written['id']}/events")
    assert history.status_code == 200
    assert "tok_live_4242_secret" not in history.text
    placed = history.json()["events"][0]
    assert placed["type"] == "OrderPlaced"
    assert placed["data"]["payment_method_id"].startswith("pm_")
    assert "payment_token" not in placed["data"]
    stored = await container.event_store.read_stream(f"order-{written['id']}")
    assert b"tok_" not in stored[0].data
    assert b"pm_" in stored[0].data
