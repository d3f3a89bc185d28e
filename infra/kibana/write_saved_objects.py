"""Write infra/kibana/saved_objects.ndjson: the data views, the Lens panels and the
"orderstream orders" dashboard, from the short descriptions below.

Kibana's saved-object format is verbose (each Lens column is a dict keyed by an id,
nested JSON strings inside JSON); writing it from one description per panel keeps
the panels readable and the same shape. tests/infra/test_kibana.py checks that the
file is what this script writes and that every field a panel uses is indexed, and
aggregatable, in infra/elasticsearch/templates.

Kibana cannot run on the development machines, so the objects are checked against the
index templates, not imported; ``import.sh`` imports them into a running Kibana.

    python infra/kibana/write_saved_objects.py
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
OUT = HERE / "saved_objects.ndjson"
PREFIX = "orderstream-"
"""The default index prefix: the data views read the aliases ``orderstream-orders`` and
``orderstream-products`` (set ORDERSTREAM_ES_PREFIX differently and edit the titles)."""

ORDERS_VIEW = f"{PREFIX}orders"
PRODUCTS_VIEW = f"{PREFIX}products"
RECORDS = "___records___"
"""Lens's pseudo-field for a document count."""


@dataclass(frozen=True)
class Column:
    """One Lens column: a bucket (``date_histogram``, ``terms``) or a metric
    (``count``, ``sum``, ``percentile``, ``median``)."""

    id: str
    label: str
    operation: str
    field: str = RECORDS
    params: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def bucketed(self) -> bool:
        return self.operation in ("date_histogram", "terms")

    def state(self, metrics: list[Column]) -> dict[str, Any]:
        params = dict(self.params)
        data_type = "number"
        if self.operation == "date_histogram":
            data_type = "date"
            params = {"interval": "auto", "includeEmptyRows": True, "dropPartials": False, **params}
        elif self.operation == "terms":
            data_type = "string"
            params = {
                "size": 10,
                "orderBy": {"type": "column", "columnId": metrics[0].id},
                "orderDirection": "desc",
                "otherBucket": True,
                "missingBucket": False,
                "parentFormat": {"id": "terms"},
                **params,
            }
        elif self.operation == "count":
            params = {"emptyAsNull": True, **params}
        return {
            "label": self.label,
            "customLabel": True,
            "dataType": data_type,
            "operationType": self.operation,
            "sourceField": self.field,
            "isBucketed": self.bucketed,
            "scale": "interval"
            if self.operation == "date_histogram"
            else "ordinal"
            if self.bucketed
            else "ratio",
            "params": params,
        }


@dataclass(frozen=True)
class Panel:
    """A Lens visualisation: ``x`` (first bucket), optional ``split`` (second bucket,
    one series per value), and its metrics; ``chart`` is a Lens XY series type or
    ``"pie"``."""

    id: str
    title: str
    description: str
    view: str
    chart: str
    x: Column
    metrics: list[Column]
    split: Column | None = None
    width: int = 24

    @property
    def layer(self) -> str:
        return f"{self.id}-layer"

    def columns(self) -> list[Column]:
        return [self.x, *([self.split] if self.split else []), *self.metrics]

    def visualization(self) -> dict[str, Any]:
        if self.chart == "pie":
            return {
                "shape": "pie",
                "layers": [
                    {
                        "layerId": self.layer,
                        "layerType": "data",
                        "primaryGroups": [self.x.id],
                        "metrics": [m.id for m in self.metrics],
                        "numberDisplay": "percent",
                        "categoryDisplay": "default",
                        "legendDisplay": "default",
                    }
                ],
            }
        layer: dict[str, Any] = {
            "layerId": self.layer,
            "layerType": "data",
            "seriesType": self.chart,
            "xAccessor": self.x.id,
            "accessors": [m.id for m in self.metrics],
        }
        if self.split:
            layer["splitAccessor"] = self.split.id
        return {
            "legend": {"isVisible": True, "position": "right"},
            "valueLabels": "hide",
            "fittingFunction": "None",
            "preferredSeriesType": self.chart,
            "layers": [layer],
        }

    def saved_object(self) -> dict[str, Any]:
        columns = self.columns()
        return {
            "type": "lens",
            "id": self.id,
            "attributes": {
                "title": self.title,
                "description": self.description,
                "visualizationType": "lnsPie" if self.chart == "pie" else "lnsXY",
                "state": {
                    "datasourceStates": {
                        "formBased": {
                            "layers": {
                                self.layer: {
                                    "columns": {c.id: c.state(self.metrics) for c in columns},
                                    "columnOrder": [c.id for c in columns],
                                    "incompleteColumns": {},
                                }
                            }
                        }
                    },
                    "visualization": self.visualization(),
                    "query": {"query": "", "language": "kuery"},
                    "filters": [],
                    "internalReferences": [],
                    "adHocDataViews": {},
                },
            },
            "references": [
                {
                    "type": "index-pattern",
                    "id": self.view,
                    "name": f"indexpattern-datasource-layer-{self.layer}",
                }
            ],
            "typeMigrationVersion": "8.9.0",
            "coreMigrationVersion": "8.8.0",
            "managed": False,
        }


def _day(field_name: str = "placed_at") -> Column:
    return Column("day", "Day placed", "date_histogram", field_name, {"interval": "1d"})


def _count(label: str = "Orders") -> Column:
    return Column("count", label, "count")


PANELS = [
    Panel(
        id="orderstream-orders-per-status-over-time",
        title="Orders per status over time",
        description="Orders placed each day, split by the status each one is in now.",
        view=ORDERS_VIEW,
        chart="bar_stacked",
        x=_day(),
        split=Column("status", "Status", "terms", "status"),
        metrics=[_count()],
    ),
    Panel(
        id="orderstream-revenue-per-currency-per-day",
        title="Revenue per currency per day",
        description="Sum of order totals (minor units: cents) per day, one series per currency: "
        "amounts in different currencies are never added together.",
        view=ORDERS_VIEW,
        chart="bar",
        x=_day(),
        split=Column("currency", "Currency", "terms", "total.currency"),
        metrics=[Column("revenue", "Revenue (minor units)", "sum", "total.amount")],
    ),
    Panel(
        id="orderstream-top-skus",
        title="Top SKUs",
        description="The ten SKUs on the most orders (Lens cannot aggregate the nested lines; "
        "units per SKU: the next panel).",
        view=ORDERS_VIEW,
        chart="bar_horizontal",
        x=Column("sku", "SKU", "terms", "skus"),
        metrics=[_count()],
    ),
    Panel(
        id="orderstream-orders-per-country",
        title="Orders per country",
        description="Orders by the country they ship to (ISO 3166-1 alpha-2).",
        view=ORDERS_VIEW,
        chart="pie",
        x=Column("country", "Country", "terms", "shipping_address.country"),
        metrics=[_count()],
    ),
    Panel(
        id="orderstream-time-to-ship",
        title="Time to ship (percentiles)",
        description="Seconds from placed to shipped, 50th / 90th / 99th percentile, by day placed.",
        view=ORDERS_VIEW,
        chart="line",
        x=_day(),
        metrics=[
            Column(f"p{p}", f"p{p} seconds", "percentile", "placed_to_shipped_seconds", {"percentile": p})
            for p in (50, 90, 99)
        ],
    ),
    Panel(
        id="orderstream-cancel-reasons",
        title="Cancel reasons",
        description="Why orders were cancelled, most frequent first (the reason as written).",
        view=ORDERS_VIEW,
        chart="bar_horizontal",
        x=Column("reason", "Reason", "terms", "cancel_reason.keyword"),
        metrics=[_count("Cancelled orders")],
    ),
    Panel(
        id="orderstream-stock-per-product",
        title="Stock per product",
        description="Units available and reserved, for the products with the most reserved.",
        view=PRODUCTS_VIEW,
        chart="bar_horizontal_stacked",
        x=Column("sku", "SKU", "terms", "sku"),
        metrics=[
            Column("reserved", "Reserved", "sum", "reserved"),
            Column("available", "Available", "sum", "available"),
        ],
    ),
]

UNITS_PER_SKU: dict[str, Any] = {
    "$schema": "https://vega.github.io/schema/vega-lite/v5.json",
    "title": "Units ordered per SKU",
    "data": {
        "url": {
            "index": ORDERS_VIEW,
            "%context%": True,
            "%timefield%": "placed_at",
            "body": {
                "size": 0,
                "aggs": {
                    "lines": {
                        "nested": {"path": "lines"},
                        "aggs": {
                            "sku": {
                                "terms": {"field": "lines.sku", "size": 10, "order": {"units": "desc"}},
                                "aggs": {"units": {"sum": {"field": "lines.quantity"}}},
                            }
                        },
                    }
                },
            },
        },
        "format": {"property": "aggregations.lines.sku.buckets"},
    },
    "mark": "bar",
    "encoding": {
        "y": {"field": "key", "type": "nominal", "sort": "-x", "title": "SKU"},
        "x": {"field": "units.value", "type": "quantitative", "title": "Units"},
    },
}
"""Lens cannot aggregate nested fields; a Vega panel sends its own query, so units per
SKU (a sum over each order's lines) is asked with a nested aggregation."""


def data_view(view: str, name: str, time_field: str | None) -> dict[str, Any]:
    attributes: dict[str, Any] = {"title": view, "name": name}
    if time_field:
        attributes["timeFieldName"] = time_field
    attributes |= {
        "fields": "[]",
        "fieldAttrs": "{}",
        "fieldFormatMap": "{}",
        "runtimeFieldMap": "{}",
        "sourceFilters": "[]",
        "typeMeta": "{}",
    }
    return {
        "type": "index-pattern",
        "id": view,
        "attributes": attributes,
        "references": [],
        "typeMigrationVersion": "7.11.0",
        "coreMigrationVersion": "8.8.0",
        "managed": False,
    }


def orders_search() -> dict[str, Any]:
    source = {
        "query": {"query": "", "language": "kuery"},
        "filter": [],
        "highlightAll": True,
        "version": True,
        "indexRefName": "kibanaSavedObjectMeta.searchSourceJSON.index",
    }
    return {
        "type": "search",
        "id": "orderstream-orders-by-status",
        "attributes": {
            "title": "Orders by status",
            "description": "All orders, grouped for reading by status, newest first within a status.",
            "columns": [
                "status",
                "customer_id",
                "total.amount",
                "total.currency",
                "shipping_address.country",
            ],
            "sort": [["status", "asc"], ["placed_at", "desc"]],
            "hits": 0,
            "version": 1,
            "kibanaSavedObjectMeta": {"searchSourceJSON": json.dumps(source)},
        },
        "references": [
            {
                "type": "index-pattern",
                "id": ORDERS_VIEW,
                "name": "kibanaSavedObjectMeta.searchSourceJSON.index",
            }
        ],
        "typeMigrationVersion": "7.9.3",
        "coreMigrationVersion": "8.8.0",
        "managed": False,
    }


def vega_units_per_sku() -> dict[str, Any]:
    vis_state = {
        "title": UNITS_PER_SKU["title"],
        "type": "vega",
        "aggs": [],
        "params": {"spec": json.dumps(UNITS_PER_SKU, indent=2)},
    }
    return {
        "type": "visualization",
        "id": "orderstream-units-per-sku",
        "attributes": {
            "title": UNITS_PER_SKU["title"],
            "description": "Units of each SKU over the orders' lines (nested aggregation).",
            "visState": json.dumps(vis_state),
            "uiStateJSON": "{}",
            "version": 1,
            "kibanaSavedObjectMeta": {
                "searchSourceJSON": json.dumps({"query": {"query": "", "language": "kuery"}})
            },
        },
        "references": [],
        "typeMigrationVersion": "8.5.0",
        "coreMigrationVersion": "8.8.0",
        "managed": False,
    }


def dashboard(panels: list[tuple[str, str, int]]) -> dict[str, Any]:
    """``panels``: (saved object type, id, width) in reading order, laid out two by two."""
    grid, references, x, y = [], [], 0, 0
    for number, (kind, ident, width) in enumerate(panels, start=1):
        if x + width > 48:
            x, y = 0, y + 15
        key = f"p{number}"
        grid.append(
            {
                "type": kind,
                "gridData": {"x": x, "y": y, "w": width, "h": 15, "i": key},
                "panelIndex": key,
                "embeddableConfig": {},
                "panelRefName": f"panel_{key}",
            }
        )
        references.append({"type": kind, "id": ident, "name": f"{key}:panel_{key}"})
        x += width
    return {
        "type": "dashboard",
        "id": "orderstream-orders-dashboard",
        "attributes": {
            "title": "orderstream: orders",
            "description": "Orders per status, revenue per currency, top SKUs, countries, time to ship, "
            "cancel reasons, stock. Amounts are in minor units (cents).",
            "panelsJSON": json.dumps(grid),
            "optionsJSON": json.dumps({"useMargins": True, "syncColors": False, "hidePanelTitles": False}),
            "timeRestore": True,
            "timeFrom": "now-30d",
            "timeTo": "now",
            "refreshInterval": {"pause": True, "value": 0},
            "kibanaSavedObjectMeta": {
                "searchSourceJSON": json.dumps({"query": {"query": "", "language": "kuery"}, "filter": []})
            },
        },
        "references": references,
        "typeMigrationVersion": "8.7.0",
        "coreMigrationVersion": "8.8.0",
        "managed": False,
    }


def saved_objects() -> list[dict[str, Any]]:
    """Referenced objects before the objects referring to them, as Kibana imports them."""
    lens = [p.saved_object() for p in PANELS]
    vega = vega_units_per_sku()
    layout = [("lens", p.id, p.width) for p in PANELS[:3]]
    layout += [("visualization", vega["id"], 24)]
    layout += [("lens", p.id, p.width) for p in PANELS[3:]]
    return [
        data_view(ORDERS_VIEW, "orders", "placed_at"),
        data_view(PRODUCTS_VIEW, "products", None),
        orders_search(),
        *lens,
        vega,
        dashboard(layout),
    ]


def render() -> str:
    return "".join(json.dumps(o, separators=(",", ":")) + "\n" for o in saved_objects())


def main() -> None:
    OUT.write_text(render())
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
