"""The OpenAPI document is complete, and the docs page needs no internet."""

from __future__ import annotations

import re
from typing import Any

import httpx
import pytest

METHODS = {"get", "post", "put", "patch", "delete"}


@pytest.fixture
async def spec(client: httpx.AsyncClient) -> dict[str, Any]:
    response = await client.get("/schema/openapi.json")
    assert response.status_code == 200
    document: dict[str, Any] = response.json()
    return document


def operations(spec: dict[str, Any]) -> dict[str, dict[str, Any]]:
    out = {}
    for path, item in spec["paths"].items():
        for method, op in item.items():
            if method in METHODS:
                out[f"{method.upper()} {path}"] = op
    return out


async def test_every_route_of_the_contract_is_documented(spec: dict[str, Any]) -> None:
    ops = operations(spec)
    for route in [
        "POST /products",
        "POST /products/{sku}/stock",
        "GET /products/{sku}",
        "GET /products",
        "POST /orders",
        "GET /orders/{order_id}",
        "GET /orders",
        "PATCH /orders/{order_id}",
        "DELETE /orders/{order_id}",
        "GET /orders/{order_id}/events",
        "GET /orders/{order_id}/state",
        "GET /health",
        "GET /ready",
        "GET /metrics",
    ]:
        assert route in ops, sorted(ops)


async def test_every_operation_has_an_operation_id_and_tags(spec: dict[str, Any]) -> None:
    ids = []
    for name, op in operations(spec).items():
        assert op.get("operationId"), name
        assert op.get("tags"), name
        ids.append(op["operationId"])
    assert len(ids) == len(set(ids))


async def test_place_order_is_fully_described(spec: dict[str, Any]) -> None:
    op = operations(spec)["POST /orders"]
    assert op["operationId"] == "placeOrder"
    for status in ("201", "400", "409", "412", "422"):
        assert status in op["responses"], op["responses"].keys()
    for status in ("400", "409", "412", "422"):
        assert "application/problem+json" in op["responses"][status]["content"]
    assert {"ETag", "Location"} <= set(op["responses"]["201"]["headers"])
    params = {(p["in"], p["name"]) for p in op["parameters"]}
    assert ("header", "Idempotency-Key") in params
    body = op["requestBody"]["content"]["application/json"]["schema"]
    assert body["$ref"].endswith("/OrderPlacement")
    placement = spec["components"]["schemas"]["OrderPlacement"]
    assert placement["additionalProperties"] is False
    assert set(placement["required"]) == {"customer_id", "lines", "shipping_address", "payment_method"}
    assert placement["properties"]["lines"]["maxItems"] == 100
    line = spec["components"]["schemas"]["OrderLineRequest"]["properties"]
    assert line["quantity"]["minimum"] == 1
    assert line["quantity"]["maximum"] == 10_000
    assert "pattern" in line["sku"]


async def test_conditional_writes_document_if_match(spec: dict[str, Any]) -> None:
    ops = operations(spec)
    for name in ("PATCH /orders/{order_id}", "DELETE /orders/{order_id}", "POST /products/{sku}/stock"):
        params = {(p["in"], p["name"]) for p in ops[name]["parameters"]}
        assert ("header", "If-Match") in params, name
        assert "412" in ops[name]["responses"], name
        assert "ETag" in ops[name]["responses"]["200"]["headers"], name


async def test_problem_schema_is_rfc9457(spec: dict[str, Any]) -> None:
    problem = spec["components"]["schemas"]["Problem"]
    assert {"type", "title", "status", "detail"} <= set(problem["required"])
    assert {"current_revision", "min_position", "reached_position", "errors"} <= set(problem["properties"])


async def test_writes_declare_bearer_security(spec: dict[str, Any]) -> None:
    assert spec["components"]["securitySchemes"]["BearerToken"]["scheme"] == "bearer"
    assert operations(spec)["POST /orders"]["security"] == [{"BearerToken": []}]


async def test_docs_page_uses_only_local_assets(client: httpx.AsyncClient) -> None:
    page = await client.get("/schema")
    assert page.status_code == 200
    assert "text/html" in page.headers["content-type"]
    head = page.text.split("<body>")[0]
    urls = re.findall(r"""(?:src|href)=["']([^"']+)["']""", head)
    assert urls, head
    for url in urls:
        assert url.startswith("/"), f"external asset in the docs page: {url}"
        asset = await client.get(url)
        assert asset.status_code == 200, url
        assert len(asset.content) > 0
    assert "http://" not in head
    assert "https://" not in head
