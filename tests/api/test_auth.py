"""Bearer tokens: writes need one when tokens are configured; reads stay open."""

from __future__ import annotations

from tests.api.helpers import assert_problem, order_body
from tests.conftest import MakeClient

PRODUCT = {"sku": "SKU-1", "name": "Mug", "price": {"amount": 100, "currency": "EUR"}}


async def test_writes_need_a_token_and_record_the_actor(make_client: MakeClient) -> None:
    async with make_client(api_tokens={"s3cret": "alice", "other": "bob"}) as (client, container):
        missing = await client.post("/products", json=PRODUCT)
        problem = assert_problem(missing, 401, "unauthorized")
        assert "Bearer" in missing.headers["www-authenticate"]
        assert "s3cret" not in missing.text
        wrong = await client.post("/products", json=PRODUCT, headers={"Authorization": "Bearer nope"})
        assert_problem(wrong, 401)
        basic = await client.post("/products", json=PRODUCT, headers={"Authorization": "Basic czNjcmV0"})
        assert_problem(basic, 401)
        assert problem["detail"]
        assert await container.event_store.head_position() is None

        alice = {"Authorization": "Bearer s3cret"}
        assert (await client.post("/products", json=PRODUCT, headers=alice)).status_code == 201
        assert (
            await client.post("/products/SKU-1/stock", json={"quantity": 5}, headers=alice)
        ).status_code == 200
        placed = await client.post("/orders", json=order_body(), headers={"Authorization": "Bearer other"})
        assert placed.status_code == 201, placed.text
        order_id = placed.json()["id"]
        assert_problem(await client.delete(f"/orders/{order_id}"), 401)

        # reads are open, and the history shows who did it
        events = await client.get(f"/orders/{order_id}/events")
        assert events.status_code == 200
        assert events.json()["events"][0]["metadata"]["actor"] == "bob"
        stored = await container.event_store.read_stream("product-SKU-1")
        assert {e.metadata.actor for e in stored} == {"alice"}


async def test_auth_is_checked_before_the_body(make_client: MakeClient) -> None:
    async with make_client(api_tokens={"t": "alice"}) as (client, _container):
        response = await client.post(
            "/orders", content=b"{not json", headers={"content-type": "application/json"}
        )
        assert_problem(response, 401)


async def test_dev_mode_is_anonymous(make_client: MakeClient) -> None:
    async with make_client() as (client, container):
        assert (await client.post("/products", json=PRODUCT)).status_code == 201
        stored = await container.event_store.read_stream("product-SKU-1")
        assert stored[0].metadata.actor == "anonymous"
