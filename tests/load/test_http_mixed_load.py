"""A bounded burst of mixed traffic through the real app: no 5xx, nothing acknowledged
is lost, and the read model converges on what the event store says.

Correctness under load only: throughput and latency are measured by
``bench/load.py`` (wrk), never by a timed test.
"""

from __future__ import annotations

import asyncio
import random

import httpx

from orderstream.container import Container
from orderstream.domain import orders
from tests.api.helpers import ADDRESS, order_body, register_product

ORDERS = 300
CONCURRENCY = 32
SKUS = [f"LOAD-{i}" for i in range(10)]


async def test_mixed_burst(client: httpx.AsyncClient, container: Container) -> None:
    for sku in SKUS:
        await register_product(client, sku, stock=1_000_000)
    rng = random.Random(7)
    gate = asyncio.Semaphore(CONCURRENCY)
    placed: dict[str, int] = {}
    statuses: list[int] = []

    async def one(i: int) -> None:
        async with gate:
            body = order_body((rng.choice(SKUS), rng.randint(1, 5)), customer_id=f"c-{i % 17}")
            headers = {"Idempotency-Key": f"load-{i // 2}"} if i % 10 == 0 else {}
            r = await client.post(
                "/orders", json=body if not headers else order_body(customer_id="same"), headers=headers
            )
            statuses.append(r.status_code)
            if r.status_code != 201:
                return
            order_id = r.json()["id"]
            placed[order_id] = r.json()["position"]
            action = i % 3
            if action == 0:
                r = await client.delete(f"/orders/{order_id}")
            elif action == 1:
                r = await client.patch(
                    f"/orders/{order_id}",
                    json={"shipping_address": {**ADDRESS, "line1": f"{i} Load St"}},
                    headers={"If-Match": '"0"'},
                )
            else:
                r = await client.get(f"/orders/{order_id}")
            statuses.append(r.status_code)

    await asyncio.gather(*(one(i) for i in range(ORDERS)))
    assert all(s < 500 for s in statuses), sorted(set(statuses))
    assert {s for s in statuses} <= {200, 201, 404, 409, 412, 422}

    # Every acknowledged order is in the store, and the read model agrees with it.
    head = await container.event_store.head_position()
    page = await client.get("/orders", params={"min_position": head, "limit": 100, "facets": "status"})
    assert page.status_code == 200
    total = sum(page.json()["facets"]["status"].values())
    assert total == len(placed)
    for order_id in placed:
        events = await container.event_store.read_stream(orders.stream_name(order_id))
        assert events
        assert events[0].type == "OrderPlaced"
        state = (await client.get(f"/orders/{order_id}/state")).json()["state"]["status"]
        doc = (await client.get(f"/orders/{order_id}")).json()
        assert doc["status"] == state
        assert doc["revision"] == events[-1].revision
