"""Idempotency-Key replays, and optimistic concurrency under a burst of writers."""

from __future__ import annotations

import asyncio

import httpx

from orderstream.container import Container
from orderstream.domain import inventory, orders
from tests.api.helpers import ADDRESS, assert_problem, order_body, place_order, register_product
from tests.conftest import MakeClient
from tests.tokens import bearer, token_for


async def test_same_key_twice_returns_the_same_answer_and_appends_once(
    client: httpx.AsyncClient, container: Container
) -> None:
    await register_product(client)
    body = order_body(("SKU-1", 3))
    first = await client.post("/orders", json=body, headers={"Idempotency-Key": "order-attempt-1"})
    assert first.status_code == 201, first.text
    head = await container.event_store.head_position()
    second = await client.post("/orders", json=body, headers={"Idempotency-Key": "order-attempt-1"})
    assert second.status_code == 201, second.text
    assert second.json() == first.json()
    assert second.headers["location"] == first.headers["location"]
    assert second.headers["etag"] == first.headers["etag"]
    assert second.headers["idempotent-replayed"] == "true"
    assert await container.event_store.head_position() == head
    stream = await container.event_store.read_stream(orders.stream_name(first.json()["id"]))
    assert [e.type for e in stream] == ["OrderPlaced"]


async def test_same_key_with_another_body_is_422(client: httpx.AsyncClient, container: Container) -> None:
    await register_product(client)
    await client.post("/orders", json=order_body(("SKU-1", 1)), headers={"Idempotency-Key": "k-2"})
    head = await container.event_store.head_position()
    other = await client.post("/orders", json=order_body(("SKU-1", 2)), headers={"Idempotency-Key": "k-2"})
    assert_problem(other, 422, "idempotency-key-reused")
    assert await container.event_store.head_position() == head


async def test_concurrent_retries_with_one_key_append_once(
    client: httpx.AsyncClient, container: Container
) -> None:
    await register_product(client)
    body = order_body()
    answers = await asyncio.gather(
        *(client.post("/orders", json=body, headers={"Idempotency-Key": "burst"}) for _ in range(20))
    )
    assert {a.status_code for a in answers} == {201}
    assert len({a.json()["id"] for a in answers}) == 1
    assert len({(a.json()["revision"], a.json()["position"]) for a in answers}) == 1
    events = await container.event_store.read_stream(orders.stream_name(answers[0].json()["id"]))
    assert len(events) == 1


async def test_concurrent_requests_with_one_key_and_different_bodies(
    client: httpx.AsyncClient, container: Container
) -> None:
    """Racing requests that share a key but not a body: one is the request, the
    others are refused with 422; never two answers of 201 for one stored order."""
    await register_product(client)
    bodies = [order_body(("SKU-1", n)) for n in range(1, 9)]
    answers = await asyncio.gather(
        *(client.post("/orders", json=b, headers={"Idempotency-Key": "contested"}) for b in bodies)
    )
    codes = sorted(a.status_code for a in answers)
    assert codes == [201] + [422] * 7, [a.text for a in answers]
    winner = next(a for a in answers if a.status_code == 201)
    events = await container.event_store.read_stream(orders.stream_name(winner.json()["id"]))
    assert [e.type for e in events] == ["OrderPlaced"]
    quantity = next(b for b, a in zip(bodies, answers, strict=True) if a.status_code == 201)["lines"][0][
        "quantity"
    ]
    order = await client.get(
        f"/orders/{winner.json()['id']}", params={"min_position": winner.json()["position"]}
    )
    assert order.json()["lines"][0]["quantity"] == quantity


async def test_stock_key_of_one_actor_is_not_another_actors_replay(make_client: MakeClient) -> None:
    """Keys are scoped by actor (the token's subject): the same key from two callers is two requests."""
    async with make_client() as (client, container):
        settings = container.settings
        await register_product(client, stock=0)
        for who in ("alice", "bob"):
            answer = await client.post(
                "/products/SKU-1/stock",
                json={"quantity": 5},
                headers={
                    "Idempotency-Key": "shared",
                    **bearer(token_for(settings, "inventory", subject=who)),
                },
            )
            assert answer.status_code == 200, answer.text
            assert "idempotent-replayed" not in answer.headers
        stream = await container.event_store.read_stream(inventory.stream_name("SKU-1"))
        added = [e for e in stream if e.type == "StockAdded"]
        assert [e.metadata.actor for e in added] == ["alice", "bob"]


async def test_stock_idempotency_key(client: httpx.AsyncClient, container: Container) -> None:
    await register_product(client, stock=0)
    first = await client.post(
        "/products/SKU-1/stock", json={"quantity": 5}, headers={"Idempotency-Key": "s-1"}
    )
    again = await client.post(
        "/products/SKU-1/stock", json={"quantity": 5}, headers={"Idempotency-Key": "s-1"}
    )
    assert first.json() == again.json()
    other = await client.post(
        "/products/SKU-1/stock", json={"quantity": 6}, headers={"Idempotency-Key": "s-1"}
    )
    assert_problem(other, 422, "idempotency-key-reused")
    events = await container.event_store.read_stream(inventory.stream_name("SKU-1"))
    assert [e.type for e in events] == ["ProductRegistered", "StockAdded"]


async def test_100_concurrent_patches_with_one_if_match(
    client: httpx.AsyncClient, container: Container
) -> None:
    await register_product(client)
    order_id = (await place_order(client))["id"]
    stream = orders.stream_name(order_id)
    before = await container.event_store.read_stream(stream)

    async def change(i: int) -> httpx.Response:
        address = {**ADDRESS, "line1": f"{i} Concurrency Lane"}
        return await client.patch(
            f"/orders/{order_id}", json={"shipping_address": address}, headers={"If-Match": '"0"'}
        )

    answers = await asyncio.gather(*(change(i) for i in range(100)))
    statuses = sorted(a.status_code for a in answers)
    assert statuses.count(200) == 1, statuses
    assert statuses.count(412) == 99, statuses
    for answer in answers:
        if answer.status_code == 412:
            assert assert_problem(answer, 412)["current_revision"] == 1
        else:
            assert answer.headers["etag"] == '"1"'
    after = await container.event_store.read_stream(stream)
    assert len(after) == len(before) + 1


async def test_concurrent_writers_without_if_match(client: httpx.AsyncClient, container: Container) -> None:
    """Without If-Match the server retries lost races itself (with jittered back-off);
    a writer that still loses after every attempt gets a 409 with Retry-After, and
    exactly the acknowledged writes are in the store."""
    await register_product(client, stock=0)
    answers = await asyncio.gather(
        *(client.post("/products/SKU-1/stock", json={"quantity": 1}) for _ in range(20))
    )
    ok = [a for a in answers if a.status_code == 200]
    for answer in answers:
        if answer.status_code != 200:
            assert_problem(answer, 409, "concurrency-conflict")
            assert answer.headers["retry-after"]
    assert len(ok) >= 8  # a writer that lost 8 races saw 8 other writes succeed
    assert sorted(a.json()["revision"] for a in ok) == list(range(1, len(ok) + 1))
    events = await container.event_store.read_stream(inventory.stream_name("SKU-1"))
    assert len(events) == 1 + len(ok)
    last = max(a.json()["position"] for a in ok)
    product = await client.get("/products/SKU-1", params={"min_position": last})
    assert product.json()["on_hand"] == len(ok)
