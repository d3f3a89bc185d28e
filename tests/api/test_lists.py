"""GET /orders and GET /products: filters, full text, sort, cursor pagination, facets."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import httpx
import pytest

from orderstream.api.app import create_app
from orderstream.bootstrap import build
from orderstream.config import Settings
from tests.api.helpers import assert_problem, order_body, place_order, register_product
from tests.conftest import MakeClient, client_for


async def _seed(client: httpx.AsyncClient) -> tuple[list[str], int]:
    await register_product(client, "SKU-1", price=100, name="Red mug")
    await register_product(client, "SKU-2", price=250, name="Blue teapot")
    ids = []
    position = 0
    for i in range(7):
        body = order_body(("SKU-1", i + 1), customer_id="alice" if i % 2 == 0 else "bob")
        if i == 3:
            body["shipping_address"]["city"] = "Rotterdam"
        written = await place_order(client, body)
        ids.append(written["id"])
        position = written["position"]
    for order_id in ids[:2]:
        cancelled = await client.delete(f"/orders/{order_id}")
        position = cancelled.json()["position"]
    return ids, position


async def _all_pages(client: httpx.AsyncClient, params: dict[str, Any]) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = []
    cursor = None
    for _ in range(20):
        page = await client.get("/orders", params={**params, **({"cursor": cursor} if cursor else {})})
        assert page.status_code == 200, page.text
        items.extend(page.json()["items"])
        cursor = page.json()["next_cursor"]
        if cursor is None:
            return items
    raise AssertionError("pagination did not end")


async def test_filter_facets_text_sort_and_cursor(client: httpx.AsyncClient) -> None:
    ids, position = await _seed(client)

    everything = await client.get(
        "/orders", params={"min_position": position, "limit": 100, "facets": "status"}
    )
    body = everything.json()
    assert len(body["items"]) == 7
    assert body["next_cursor"] is None
    assert body["facets"]["status"] == {"placed": 5, "cancelled": 2}
    not_asked = (await client.get("/orders", params={"limit": 100})).json()
    assert not_asked["facets"]["status"] == {}  # counting costs a pass over every match
    assert [o["id"] for o in not_asked["items"]] == [o["id"] for o in body["items"]]
    # default: newest first
    placed_at = [o["placed_at"] for o in body["items"]]
    assert placed_at == sorted(placed_at, reverse=True)

    cancelled = (await client.get("/orders", params={"status": "cancelled", "facets": "status"})).json()
    assert sorted(o["id"] for o in cancelled["items"]) == sorted(ids[:2])
    assert cancelled["facets"]["status"] == {"cancelled": 2}
    several = (await client.get("/orders", params=[("status", "cancelled"), ("status", "placed")])).json()
    assert len(several["items"]) == 7

    alice = (await client.get("/orders", params={"customer_id": "alice"})).json()
    assert {o["customer_id"] for o in alice["items"]} == {"alice"}
    assert len(alice["items"]) == 4

    rotterdam = (await client.get("/orders", params={"q": "rotterdam"})).json()
    assert [o["id"] for o in rotterdam["items"]] == [ids[3]]

    by_total = (await client.get("/orders", params={"sort": "total_amount", "limit": 100})).json()
    totals = [o["total"]["amount"] for o in by_total["items"]]
    assert totals == sorted(totals)
    by_total_desc = (await client.get("/orders", params={"sort": "-total_amount", "limit": 100})).json()
    assert [o["total"]["amount"] for o in by_total_desc["items"]] == sorted(totals, reverse=True)

    paged = await _all_pages(client, {"limit": 3, "sort": "-placed_at"})
    assert len(paged) == 7
    assert len({o["id"] for o in paged}) == 7
    assert [o["id"] for o in paged] == [o["id"] for o in body["items"]]


async def test_products_list_search_and_pages(client: httpx.AsyncClient) -> None:
    last = {}
    for i in range(5):
        last = await register_product(client, f"SKU-{i}", name="Blue teapot" if i == 3 else f"Mug {i}")
    first = await client.get("/products", params={"limit": 2, "min_position": last["position"]})
    assert first.status_code == 200
    assert [p["sku"] for p in first.json()["items"]] == ["SKU-0", "SKU-1"]
    cursor = first.json()["next_cursor"]
    assert cursor
    second = (await client.get("/products", params={"limit": 2, "cursor": cursor})).json()
    assert [p["sku"] for p in second["items"]] == ["SKU-2", "SKU-3"]
    found = (await client.get("/products", params={"q": "teapot"})).json()
    assert [p["sku"] for p in found["items"]] == ["SKU-3"]
    assert found["items"][0]["available"] == 100


async def test_a_facet_nobody_can_count_is_a_400(client: httpx.AsyncClient) -> None:
    assert_problem(await client.get("/orders", params={"facets": "customer_id"}), 400)


async def test_an_api_only_process_lists_and_searches_what_another_process_projected(
    make_client: MakeClient, read_store_url: str, tmp_path: Path
) -> None:
    """The compose topology: ``orderstream api`` (no projection runner) beside
    ``orderstream project``, each with its own stores on the same files / node.
    The API process has never ensured a collection; its queries still work, with
    and without ``min_position``, and before anything was projected."""
    shared: dict[str, Any] = {"data_dir": tmp_path / "shared"}
    if read_store_url:
        shared["read_store_url"] = f"{read_store_url}shared-"
    async with make_client(projections=False, **shared) as (api, _):
        empty = await api.get("/orders", params={"q": "rotterdam", "facets": "status"})
        assert empty.status_code == 200, empty.text
        assert empty.json() == {"items": [], "next_cursor": None, "facets": {"status": {}}}

        async with make_client(projections=True, **shared) as (_projector, _):
            _ids, position = await _seed(api)
            found = await api.get("/orders", params={"q": "rotterdam", "min_position": position})
            assert found.status_code == 200, found.text
            assert [o["shipping_address"]["city"] for o in found.json()["items"]] == ["Rotterdam"]

        listed = await api.get("/orders", params={"facets": "status", "limit": 3})
        assert listed.status_code == 200, listed.text
        assert listed.json()["facets"]["status"] == {"placed": 5, "cancelled": 2}
        rest = await _all_pages(api, {"limit": 3, "status": "placed"})
        assert len(rest) == 5
        products = await api.get("/products", params={"q": "teapot"})
        assert [p["sku"] for p in products.json()["items"]] == ["SKU-2"]


@pytest.mark.parametrize("path", ["/orders", "/orders?q=london", "/orders/o-1", "/products"])
async def test_an_unreachable_elasticsearch_gives_503_with_retry_after(tmp_path: Path, path: str) -> None:
    settings = Settings(data_dir=tmp_path / "data", read_store_url="http://127.0.0.1:9/?prefix=gone-")
    container = await build(settings)
    try:
        async with client_for(create_app(container, extra_route_handlers=())) as client:
            response = await client.get(path)
        problem = assert_problem(response, 503)
        assert response.headers["retry-after"]
        assert "read store" in problem["detail"]
    finally:
        await container.close()


@pytest.mark.parametrize(
    ("level", "expected"), [(logging.INFO, logging.WARNING), (logging.DEBUG, logging.NOTSET)]
)
async def test_elasticsearch_request_lines_are_logged_only_when_debugging(level: int, expected: int) -> None:
    from orderstream.readstore.elasticsearch import ElasticsearchReadStore

    transport, ours = logging.getLogger("elastic_transport"), logging.getLogger("orderstream")
    saved = transport.level, ours.level
    transport.setLevel(logging.NOTSET)
    ours.setLevel(level)
    try:
        store = await ElasticsearchReadStore.open("http://127.0.0.1:9")
        await store.close()
        assert transport.level == expected
    finally:
        transport.setLevel(saved[0])
        ours.setLevel(saved[1])
