"""The Kibana saved objects use only fields the index templates index, in a way Kibana can
aggregate them. Kibana cannot run on these machines, so this is checked against the
generated templates (infra/elasticsearch/templates, themselves checked against the
code by test_es_templates.py) instead of by importing the objects."""

from __future__ import annotations

import importlib.util
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from tests.infra.test_es_templates import mapped_type, template_properties

ROOT = Path(__file__).resolve().parents[2]
NDJSON = ROOT / "infra" / "kibana" / "saved_objects.ndjson"
PREFIX = "orderstream-"

NUMERIC = {"long", "integer", "short", "byte", "double", "float", "scaled_float"}
DATES = {"date", "date_nanos"}
AGGREGATABLE = {"keyword", *DATES, *NUMERIC}
NEEDS = {
    "date_histogram": DATES,
    "terms": {"keyword", *NUMERIC},
    "sum": NUMERIC,
    "average": NUMERIC,
    "median": NUMERIC,
    "percentile": NUMERIC,
    "max": NUMERIC | DATES,
    "min": NUMERIC | DATES,
    "unique_count": AGGREGATABLE,
}
"""Lens operation -> the mapping types it can aggregate."""


def load_writer() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "write_saved_objects", ROOT / "infra" / "kibana" / "write_saved_objects.py"
    )
    assert spec
    assert spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def saved_objects() -> list[dict[str, Any]]:
    return [json.loads(line) for line in NDJSON.read_text().splitlines() if line.strip()]


def by_id() -> dict[tuple[str, str], dict[str, Any]]:
    return {(o["type"], o["id"]): o for o in saved_objects()}


def index_of(view_id: str) -> str:
    """The template (projection) a data view reads: its title is the alias ``{prefix}{name}``."""
    view = by_id()[("index-pattern", view_id)]
    title: str = view["attributes"]["title"]
    assert title.startswith(PREFIX), title
    return title.removeprefix(PREFIX)


def lens_columns(lens: dict[str, Any]) -> Iterator[tuple[str, str, str]]:
    """(data view id, operation, source field) of every column of a Lens object."""
    views = {
        ref["name"].removeprefix("indexpattern-datasource-layer-"): ref["id"]
        for ref in lens["references"]
        if ref["type"] == "index-pattern"
    }
    layers = lens["attributes"]["state"]["datasourceStates"]["formBased"]["layers"]
    for layer_id, layer in layers.items():
        for column in layer["columns"].values():
            yield views[layer_id], column["operationType"], column["sourceField"]


def lens_problem(index: str, operation: str, field: str) -> str | None:
    """Why Lens could not run ``operation`` on ``field`` of ``index``, or ``None``."""
    if operation == "count":
        return None if field == "___records___" else f"count of {field}: Lens counts records"
    kind, nested = mapped_type(template_properties(index), field)
    if kind is None:
        return f"{index}.{field} is not indexed"
    if nested:
        return f"{index}.{field} is under nested {nested}: Lens cannot aggregate it"
    if kind not in NEEDS.get(operation, set()):
        return f"{operation} cannot aggregate {index}.{field} ({kind})"
    return None


def vega_specs() -> Iterator[tuple[str, dict[str, Any]]]:
    for o in saved_objects():
        if o["type"] == "visualization":
            state = json.loads(o["attributes"]["visState"])
            if state["type"] == "vega":
                yield o["id"], json.loads(state["params"]["spec"])


def aggregation_fields(
    aggs: dict[str, Any], nested: str | None = None
) -> Iterator[tuple[str, str, str | None]]:
    """(aggregation type, field, enclosing nested path) of every aggregation under ``aggs``."""
    for agg in aggs.values():
        inner_nested = nested
        for kind, body in agg.items():
            if kind == "aggs":
                continue
            if kind == "nested":
                inner_nested = body["path"]
                yield kind, body["path"], nested
            elif isinstance(body, dict) and "field" in body:
                yield kind, body["field"], nested
        yield from aggregation_fields(agg.get("aggs", {}), inner_nested)


# ------------------------------------------------------------------------------ tests


def test_the_file_is_what_the_writer_writes() -> None:
    assert NDJSON.read_text() == load_writer().render(), (
        "stale: run python infra/kibana/write_saved_objects.py"
    )


def test_every_reference_is_to_an_object_in_the_file() -> None:
    objects = by_id()
    for o in objects.values():
        for ref in o["references"]:
            assert (ref["type"], ref["id"]) in objects, f"{o['id']} refers to a missing {ref}"


def test_data_views_read_the_projection_aliases_and_their_time_field_is_a_date() -> None:
    views = [o for o in saved_objects() if o["type"] == "index-pattern"]
    assert {index_of(v["id"]) for v in views} == {"orders", "products"}
    for view in views:
        time_field = view["attributes"].get("timeFieldName")
        if time_field:
            kind, nested = mapped_type(template_properties(index_of(view["id"])), time_field)
            assert kind in DATES
            assert nested == []


@pytest.mark.parametrize(
    "lens", [o for o in saved_objects() if o["type"] == "lens"], ids=lambda o: str(o["id"])
)
def test_every_lens_field_exists_and_is_aggregatable(lens: dict[str, Any]) -> None:
    for view, operation, field in lens_columns(lens):
        assert lens_problem(index_of(view), operation, field) is None


def test_the_check_refuses_what_kibana_would_refuse() -> None:
    """The check above can fail: a text field, a nested field, a missing field, a sum of a keyword."""
    assert "Lens cannot aggregate" in (lens_problem("orders", "terms", "lines.sku") or "")
    assert "cannot aggregate" in (lens_problem("orders", "terms", "cancel_reason") or "")
    assert "not indexed" in (lens_problem("orders", "terms", "shipping_address.line1") or "")
    assert "cannot aggregate" in (lens_problem("orders", "sum", "total.currency") or "")
    assert lens_problem("orders", "terms", "cancel_reason.keyword") is None


def test_the_saved_search_shows_indexed_fields() -> None:
    search = by_id()[("search", "orderstream-orders-by-status")]
    view = next(r["id"] for r in search["references"] if r["type"] == "index-pattern")
    properties = template_properties(index_of(view))
    for column in search["attributes"]["columns"]:
        assert mapped_type(properties, column)[0] is not None, column
    for field, _ in search["attributes"]["sort"]:
        assert mapped_type(properties, field)[0] in AGGREGATABLE, field


def test_vega_aggregations_go_through_nested_where_the_mapping_is_nested() -> None:
    specs = list(vega_specs())
    assert specs
    for ident, spec in specs:
        url = spec["data"]["url"]
        properties = template_properties(url["index"].removeprefix(PREFIX))
        for kind, field, nested in aggregation_fields(url["body"]["aggs"]):
            found, nested_paths = mapped_type(properties, field)
            if kind == "nested":
                assert found == "nested", f"{ident}: {field} is not a nested field"
                continue
            assert found in AGGREGATABLE, f"{ident}: {kind} on {field} ({found})"
            assert (nested_paths[-1] if nested_paths else None) == nested, (
                f"{ident}: {field} sits under nested {nested_paths}, aggregated under {nested}"
            )


def test_the_dashboard_answers_the_analyst_questions() -> None:
    """Orders per status over time, revenue per currency per day, top SKUs, orders per
    country, time-to-ship percentiles, cancel reasons: each is a panel of the dashboard."""
    objects = by_id()
    board = objects[("dashboard", "orderstream-orders-dashboard")]
    panels = json.loads(board["attributes"]["panelsJSON"])
    refs = {ref["name"]: (ref["type"], ref["id"]) for ref in board["references"]}
    used: list[set[tuple[str, str]]] = []
    for panel in panels:
        kind, ident = refs[f"{panel['panelIndex']}:{panel['panelRefName']}"]
        obj = objects[(kind, ident)]
        if kind == "lens":
            used.append({(op, field) for _, op, field in lens_columns(obj)})
        else:
            spec = json.loads(json.loads(obj["attributes"]["visState"])["params"]["spec"])
            used.append({(k, f) for k, f, _ in aggregation_fields(spec["data"]["url"]["body"]["aggs"])})
    questions = {
        "orders per status over time": {("date_histogram", "placed_at"), ("terms", "status")},
        "revenue per currency per day": {
            ("date_histogram", "placed_at"),
            ("terms", "total.currency"),
            ("sum", "total.amount"),
        },
        "top SKUs": {("terms", "skus")},
        "units per SKU": {("nested", "lines"), ("terms", "lines.sku"), ("sum", "lines.quantity")},
        "orders per country": {("terms", "shipping_address.country")},
        "time to ship percentiles": {("percentile", "placed_to_shipped_seconds")},
        "cancel reasons": {("terms", "cancel_reason.keyword")},
    }
    for question, needs in questions.items():
        assert any(needs <= fields for fields in used), f"no panel answers {question}"
    widths = [p["gridData"]["x"] + p["gridData"]["w"] for p in panels]
    assert max(widths) <= 48, "Kibana's grid is 48 columns wide"
