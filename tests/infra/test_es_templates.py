"""The index templates under infra/elasticsearch/templates are what the code creates."""

from __future__ import annotations

import importlib.util
import json
import os
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import msgspec
import pytest
from elasticsearch import AsyncElasticsearch

from orderstream.application.projection_runner import EventView
from orderstream.domain import orders
from orderstream.domain.common import Money
from orderstream.readstore.base import Document, Query, ReadStore, Upsert, WriteOutcome
from orderstream.readstore.elasticsearch import ElasticsearchReadStore
from orderstream.readstore.sqlite import SqliteReadStore
from projections import order_summary
from tests.contract.conftest import drop_es_prefix
from tests.unit.test_projections import at, recorded

ROOT = Path(__file__).resolve().parents[2]


def test_template_files_match_the_projection_schemas() -> None:
    spec = importlib.util.spec_from_file_location(
        "write_templates", ROOT / "infra" / "elasticsearch" / "write_templates.py"
    )
    assert spec
    assert spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    rendered: dict[str, str] = module.render("orderstream-")
    assert rendered, "no projection has a template"
    for name, text in rendered.items():
        path = ROOT / "infra" / "elasticsearch" / "templates" / name
        assert path.exists(), f"{path} is missing: run python infra/elasticsearch/write_templates.py"
        assert path.read_text() == text, f"{path} is stale: run python infra/elasticsearch/write_templates.py"


# ------------------------------------------------------------- what analysts can ask

ANALYST_FIELDS = {
    "orders": {
        "total.amount": "long",
        "total.currency": "keyword",
        "total_currency": "keyword",
        "skus": "keyword",
        "lines.sku": "keyword",
        "lines.quantity": "long",
        "lines.unit_price.amount": "long",
        "lines.unit_price.currency": "keyword",
        "shipping_address.country": "keyword",
        "shipping_address.city": "keyword",
        "status_history.status": "keyword",
        "status_history.at": "date_nanos",
        "placed_to_reserved_seconds": "long",
        "placed_to_shipped_seconds": "long",
        "cancel_reason": "text",
        "cancel_reason.keyword": "keyword",
        "reject_reason.keyword": "keyword",
    },
    "products": {
        "price.amount": "long",
        "price.currency": "keyword",
        "reserved": "long",
        "available": "long",
        "updated_at": "date_nanos",
    },
}


def mapped_type(properties: dict[str, Any], path: str) -> tuple[str | None, list[str]]:
    """The Elasticsearch type at a dotted path (through objects, nested fields and
    multi-fields), and the nested paths it sits under."""
    node: dict[str, Any] = {"properties": properties}
    nested: list[str] = []
    walked: list[str] = []
    for part in path.split("."):
        children = node.get("properties") or node.get("fields") or {}
        if part not in children:
            return None, nested
        node = children[part]
        walked.append(part)
        if node.get("type") == "nested":
            nested.append(".".join(walked))
    return node.get("type", "object"), nested


def template_properties(name: str) -> dict[str, Any]:
    text = (ROOT / "infra" / "elasticsearch" / "templates" / f"{name}.json").read_text()
    properties: dict[str, Any] = json.loads(text)["template"]["mappings"]["properties"]
    return properties


@pytest.mark.parametrize("index", sorted(ANALYST_FIELDS))
def test_the_templates_index_what_analysts_ask_for(index: str) -> None:
    properties = template_properties(index)
    for path, wanted in ANALYST_FIELDS[index].items():
        assert mapped_type(properties, path)[0] == wanted, f"{index}: {path}"


def test_lines_and_status_history_are_nested_and_the_rest_is_not() -> None:
    properties = template_properties("orders")
    assert mapped_type(properties, "lines.sku")[1] == ["lines"]
    assert mapped_type(properties, "status_history.at")[1] == ["status_history"]
    assert mapped_type(properties, "total.currency")[1] == []
    assert mapped_type(properties, "shipping_address.country")[1] == []


# ------------------------------------------------- real documents in the real stores


def order_events(
    order: str, *, currency: str, city: str, country: str, lines: list[tuple[str, str, int, int]], fate: str
) -> list[EventView]:
    """An order's events: placed with ``lines`` (sku, name, quantity, unit price), then
    shipped after an hour, or cancelled."""
    stream = orders.stream_name(order)
    order_lines = tuple(
        orders.OrderLine(sku=sku, name=name, quantity=quantity, unit_price=Money(price, currency))
        for sku, name, quantity, price in lines
    )
    address = orders.Address(
        name="A Customer", line1="1 Street", city=city, postal_code="1000", country=country
    )
    placed = orders.OrderPlaced(
        order_id=order,
        customer_id=f"cust-{order}",
        lines=order_lines,
        total=orders.total_of(order_lines),
        shipping_address=address,
        payment_method_id="pm_test",
        placed_at=at(0),
    )
    later: list[msgspec.Struct] = [orders.OrderStockReserved(order_id=order, at=at(2))]
    if fate == "shipped":
        later.append(orders.OrderShipped(order_id=order, tracking_number=f"T-{order}", at=at(60)))
    else:
        later.append(
            orders.OrderCancelled(order_id=order, reason=fate, previous_status="stock_reserved", at=at(5))
        )
    return [recorded(stream, revision, event) for revision, event in enumerate([placed, *later])]


def sample_orders() -> list[Document]:
    histories = [
        order_events(
            "o-1",
            currency="EUR",
            city="London",
            country="GB",
            lines=[("TEA-1", "Assam tea", 2, 450), ("MUG-1", "Blue mug", 1, 900)],
            fate="shipped",
        ),
        order_events(
            "o-2",
            currency="USD",
            city="Boston",
            country="US",
            lines=[("TEA-1", "Assam tea", 5, 500)],
            fate="shipped",
        ),
        order_events(
            "o-3",
            currency="EUR",
            city="Paris",
            country="FR",
            lines=[("MUG-1", "Blue mug", 3, 900)],
            fate="found it cheaper elsewhere",
        ),
    ]
    docs = []
    for events in histories:
        doc: Document | None = None
        for event in events:
            doc = order_summary.projection.fold(doc, event)
        assert doc is not None
        docs.append(doc)
    return docs


@asynccontextmanager
async def filled(backend: str, tmp_path: Path) -> AsyncIterator[ReadStore]:
    """The orders read model of ``sample_orders()`` on ``backend``, dropped afterwards."""
    store: ReadStore
    prefix = f"test-analysis-{uuid.uuid4().hex[:8]}-"
    url = os.environ.get("ORDERSTREAM_TEST_ES_URL", "")
    if backend == "sqlite":
        store = await SqliteReadStore.open(tmp_path / "read.db")
    elif not url:
        pytest.skip("set ORDERSTREAM_TEST_ES_URL to run against Elasticsearch")
    else:
        store = await ElasticsearchReadStore.open(url, prefix=prefix)
    try:
        await store.ensure_collection(order_summary.SCHEMA)
        docs = sample_orders()
        ops = [Upsert(id=d["id"], version=d["revision"], document=d) for d in docs]
        assert await store.write("orders", ops) == [WriteOutcome.WRITTEN] * len(docs)
        await store.refresh("orders")
        yield store
    finally:
        await store.close()
        if backend == "elasticsearch":
            await drop_es_prefix(url, prefix)


@pytest.fixture(params=["sqlite", pytest.param("elasticsearch", marks=pytest.mark.elasticsearch)])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[ReadStore]:
    async with filled(request.param, tmp_path) as store:
        yield store


@pytest.fixture
async def es_store(tmp_path: Path) -> AsyncIterator[ElasticsearchReadStore]:
    async with filled("elasticsearch", tmp_path) as store:
        assert isinstance(store, ElasticsearchReadStore)
        yield store


async def test_product_names_are_searched(store: ReadStore) -> None:
    page = await store.query("orders", Query(text="assam"))
    assert sorted(d["id"] for d in page.items) == ["o-1", "o-2"]
    page = await store.query("orders", Query(text="blue mug", filters={"status": "cancelled"}))
    assert [d["id"] for d in page.items] == ["o-3"]


async def test_documents_read_back_whole(store: ReadStore) -> None:
    for doc in sample_orders():
        assert await store.get("orders", doc["id"]) == doc


def _buckets(answer: Any, name: str) -> dict[str, Any]:
    return {str(b["key"]): b for b in answer["aggregations"][name]["buckets"]}


@pytest.mark.elasticsearch
async def test_the_analyst_questions_have_answers(es_store: ElasticsearchReadStore) -> None:
    """Revenue per currency, units per SKU (nested), orders per country, time to ship,
    cancel reasons: asked of the index as Kibana would, checked against the documents."""
    docs = sample_orders()
    es = AsyncElasticsearch(os.environ["ORDERSTREAM_TEST_ES_URL"])
    try:
        answer = await es.search(
            index=es_store.alias("orders"),
            size=0,
            aggs={
                "currency": {
                    "terms": {"field": "total.currency"},
                    "aggs": {"revenue": {"sum": {"field": "total.amount"}}},
                },
                "lines": {
                    "nested": {"path": "lines"},
                    "aggs": {
                        "sku": {
                            "terms": {"field": "lines.sku"},
                            "aggs": {"units": {"sum": {"field": "lines.quantity"}}},
                        }
                    },
                },
                "country": {"terms": {"field": "shipping_address.country"}},
                "to_ship": {"percentiles": {"field": "placed_to_shipped_seconds", "percents": [50, 100]}},
                "reasons": {"terms": {"field": "cancel_reason.keyword"}},
            },
        )
    finally:
        await es.close()
    revenue = {k: b["revenue"]["value"] for k, b in _buckets(answer, "currency").items()}
    expected_revenue: dict[str, int] = {}
    for doc in docs:
        currency = doc["total"]["currency"]
        expected_revenue[currency] = expected_revenue.get(currency, 0) + doc["total"]["amount"]
    assert revenue == expected_revenue
    units = {str(b["key"]): b["units"]["value"] for b in answer["aggregations"]["lines"]["sku"]["buckets"]}
    expected_units: dict[str, int] = {}
    for doc in docs:
        for line in doc["lines"]:
            expected_units[line["sku"]] = expected_units.get(line["sku"], 0) + line["quantity"]
    assert units == expected_units
    countries = {k: b["doc_count"] for k, b in _buckets(answer, "country").items()}
    assert countries == {d["shipping_address"]["country"]: 1 for d in docs}
    shipped = sorted(d["placed_to_shipped_seconds"] for d in docs if "placed_to_shipped_seconds" in d)
    assert answer["aggregations"]["to_ship"]["values"]["100.0"] == shipped[-1]
    reasons = {k: b["doc_count"] for k, b in _buckets(answer, "reasons").items()}
    assert reasons == {d["cancel_reason"]: 1 for d in docs if "cancel_reason" in d}


async def test_the_sample_for_analysts_goes_through_the_write_path(tmp_path: Path) -> None:
    """infra/elasticsearch/fill_sample.py (the README's examples) builds both read models
    from events of the real use cases: names on the lines, durations, reasons, stock."""
    spec = importlib.util.spec_from_file_location(
        "fill_sample", ROOT / "infra" / "elasticsearch" / "fill_sample.py"
    )
    assert spec
    assert spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    await module.fill(f"sqlite:///{tmp_path / 'read.db'}", 30, 7)
    store = await SqliteReadStore.open(tmp_path / "read.db")
    try:
        page = await store.query("orders", Query(limit=100, facets=("status",)))
        assert page.total == 30
        assert {"shipped", "cancelled"} <= set(page.facets["status"])
        assert all(line.get("name") for doc in page.items for line in doc["lines"])
        for doc in page.items:
            if doc["status"] == "shipped":
                assert doc["placed_to_shipped_seconds"] > doc["placed_to_reserved_seconds"] > 0
        products = {p["sku"]: p for p in (await store.query("products", Query(limit=100))).items}
        assert {sku for doc in page.items for sku in doc["skus"]} <= set(products)
        assert any(p["on_hand"] < 500 for p in products.values()), "shipped orders took stock"
        assert all(p["available"] == p["on_hand"] - p["reserved"] for p in products.values())
    finally:
        await store.close()


@pytest.mark.elasticsearch
async def test_a_process_that_never_ensured_the_collection_reads_its_schema(
    es_store: ElasticsearchReadStore,
) -> None:
    """``orderstream api`` reads the schema (with its analysis fields) from the index."""
    prefix = es_store.alias("orders").removesuffix("orders")
    other = await ElasticsearchReadStore.open(os.environ["ORDERSTREAM_TEST_ES_URL"], prefix=prefix)
    try:
        page = await other.query("orders", Query(text="assam", filters={"status": "shipped"}))
        assert sorted(d["id"] for d in page.items) == ["o-1", "o-2"]
    finally:
        await other.close()
