"""Request builders and assertions shared by the API tests."""

from __future__ import annotations

import copy
from typing import Any

import httpx

PROBLEM_JSON = "application/problem+json"

ADDRESS: dict[str, Any] = {
    "name": "Ada Lovelace",
    "line1": "12 Analytical Row",
    "city": "London",
    "postal_code": "N1 9GU",
    "country": "GB",
}


def order_body(
    *lines: tuple[str, int], customer_id: str = "cust-1", token: str = "tok_approve"
) -> dict[str, Any]:
    return {
        "customer_id": customer_id,
        "lines": [{"sku": sku, "quantity": quantity} for sku, quantity in lines or (("SKU-1", 2),)],
        "shipping_address": copy.deepcopy(ADDRESS),
        "payment_method": {"token": token},
    }


async def register_product(
    client: httpx.AsyncClient,
    sku: str = "SKU-1",
    *,
    price: int = 1250,
    stock: int = 100,
    name: str = "Red mug",
) -> dict[str, Any]:
    created = await client.post(
        "/products", json={"sku": sku, "name": name, "price": {"amount": price, "currency": "EUR"}}
    )
    assert created.status_code == 201, created.text
    if stock:
        added = await client.post(f"/products/{sku}/stock", json={"quantity": stock})
        assert added.status_code == 200, added.text
        return dict(added.json())
    return dict(created.json())


async def place_order(
    client: httpx.AsyncClient, body: dict[str, Any] | None = None, **headers: str
) -> dict[str, Any]:
    response = await client.post("/orders", json=body or order_body(), headers=headers)
    assert response.status_code == 201, response.text
    return dict(response.json())


def assert_problem(response: httpx.Response, status: int, type_suffix: str | None = None) -> dict[str, Any]:
    """A well-formed RFC 9457 problem with the given status (and type)."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith(PROBLEM_JSON), response.headers
    problem = dict(response.json())
    for key in ("type", "title", "status", "detail"):
        assert key in problem, problem
    assert problem["status"] == status
    assert isinstance(problem["detail"], str)
    assert problem["detail"]
    if type_suffix is not None:
        assert problem["type"].endswith(type_suffix), problem
    assert "Traceback" not in response.text
    return problem
