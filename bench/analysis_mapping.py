"""What indexing the analysis fields costs: ``python -m bench.analysis_mapping [--orders N] [--es-url URL]``.

The same order documents (the ``orders`` fold of N orders through their whole life:
placed with two named lines, reserved, paid, confirmed, shipped) are written with the
read store's ``write()`` in batches of 500 to a fresh collection under each mapping:

- figure: the current schema (version 2: queried fields + the analysis fields, on
  Elasticsearch two nested lists per order);
- reference, same run, same documents: the same schema without its analysis fields
  (what version 1 indexed).

SQLite stores the analysis fields in its JSON either way, so its two figures should be
close; Elasticsearch indexes each nested line and status change as a hidden document.
Rounds alternate the two mappings; the best round of each is printed. On Elasticsearch the
node's own indexing time of that round is printed too: the wall time of each bulk also
waits for a refresh (``refresh=wait_for``), the same under either mapping.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import tempfile
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import msgspec

from orderstream.application.projection_runner import EventView
from orderstream.domain import orders
from orderstream.domain.common import Money
from orderstream.events import registry
from orderstream.eventstore.base import RecordedEvent
from orderstream.readstore.base import CollectionSchema, Document, ReadStore, Upsert
from orderstream.readstore.elasticsearch import ElasticsearchReadStore
from orderstream.readstore.sqlite import SqliteReadStore
from projections import order_summary

T0 = datetime(2025, 1, 1, tzinfo=UTC)
BATCH = 500


def view(stream: str, revision: int, event: msgspec.Struct) -> EventView:
    new = registry.to_new_event(event, event_id=uuid.uuid4())
    return EventView.from_recorded(
        RecordedEvent(
            id=new.id,
            stream=stream,
            revision=revision,
            position=revision,
            type=new.type,
            schema_version=new.schema_version,
            data=new.data,
            metadata_json=b"{}",
            recorded_at=T0,
        )
    )


def documents(count: int) -> list[Document]:
    docs = []
    for n in range(count):
        order = f"o-{n}"
        at = T0 + timedelta(minutes=n)
        lines = (
            orders.OrderLine(
                sku=f"TEA-{n % 50}", quantity=1 + n % 3, unit_price=Money(450, "EUR"), name="Assam tea"
            ),
            orders.OrderLine(sku=f"MUG-{n % 20}", quantity=1, unit_price=Money(900, "EUR"), name="Blue mug"),
        )
        address = orders.Address(name=f"C {n}", line1="1 St", city="Paris", postal_code="75001", country="FR")
        events: list[msgspec.Struct] = [
            orders.OrderPlaced(
                order_id=order,
                customer_id=f"c-{n % 100}",
                lines=lines,
                total=orders.total_of(lines),
                shipping_address=address,
                payment_method_id="pm_t",
                placed_at=at,
            ),
            orders.OrderStockReserved(order_id=order, at=at + timedelta(minutes=2)),
            orders.OrderPaymentAuthorised(order_id=order, payment_id=f"p-{n}", at=at + timedelta(minutes=3)),
            orders.OrderConfirmed(order_id=order, at=at + timedelta(minutes=3)),
            orders.OrderShipped(order_id=order, tracking_number=f"T-{n}", at=at + timedelta(hours=20)),
        ]
        doc: Document | None = None
        for revision, event in enumerate(events):
            doc = order_summary.projection.fold(doc, view(orders.stream_name(order), revision, event))
        assert doc is not None
        docs.append(doc)
    return docs


async def write_rate(store: ReadStore, schema: CollectionSchema, docs: list[Document]) -> float:
    await store.ensure_collection(schema)
    started = time.perf_counter()
    for i in range(0, len(docs), BATCH):
        batch = docs[i : i + BATCH]
        await store.write(schema.name, [Upsert(id=d["id"], version=d["revision"], document=d) for d in batch])
    return len(docs) / (time.perf_counter() - started)


async def measure(
    backend: str, es_url: str | None, docs: list[Document], rounds: int
) -> dict[str, tuple[float, float | None]]:
    """Per mapping: the best write rate (docs/s) and, on Elasticsearch, the node's own
    indexing time for that round in ms (index stats: the bulk's wall time also holds the
    ``refresh=wait_for`` of every batch, which does not depend on the mapping)."""
    schemas = {
        "figure": order_summary.SCHEMA,
        "reference": msgspec.structs.replace(order_summary.SCHEMA, version=1, analysis={}),
    }
    best: dict[str, tuple[float, float | None]] = dict.fromkeys(schemas, (0.0, None))
    for _ in range(rounds):
        for label, schema in schemas.items():
            with tempfile.TemporaryDirectory() as tmp:
                prefix = f"bench-analysis-{uuid.uuid4().hex[:8]}-"
                store: ReadStore
                if backend == "sqlite":
                    store = await SqliteReadStore.open(Path(tmp) / "read.db")
                else:
                    assert es_url
                    store = await ElasticsearchReadStore.open(es_url, prefix=prefix)
                try:
                    rate = await write_rate(store, schema, docs)
                    index_ms = await indexing_ms(es_url, prefix) if es_url and backend != "sqlite" else None
                    if rate > best[label][0]:
                        best[label] = (rate, index_ms)
                finally:
                    await store.close()
                    if backend == "elasticsearch":
                        assert es_url
                        await drop(es_url, prefix)
        schemas = dict(reversed(list(schemas.items())))
    return best


async def indexing_ms(url: str, prefix: str) -> float:
    from elasticsearch import AsyncElasticsearch

    client = AsyncElasticsearch(url)
    try:
        stats = await client.indices.stats(index=f"{prefix}*", metric="indexing")
        return float(stats["_all"]["primaries"]["indexing"]["index_time_in_millis"])
    finally:
        await client.close()


async def drop(url: str, prefix: str) -> None:
    from elasticsearch import AsyncElasticsearch

    client = AsyncElasticsearch(url)
    try:
        for name in (await client.indices.get(index=f"{prefix}*")).body:
            await client.indices.delete(index=name)
        for template in (await client.indices.get_index_template(name=f"{prefix}*")).body["index_templates"]:
            await client.indices.delete_index_template(name=template["name"])
    finally:
        await client.close()


async def main_async(count: int, es_url: str | None, rounds: int) -> None:
    docs = documents(count)
    print(f"{count} shipped orders, documents written in batches of {BATCH}, best of {rounds} rounds")
    for backend in ["sqlite", *(["elasticsearch"] if es_url else [])]:
        figures = await measure(backend, es_url, docs, rounds)
        (figure, figure_ms), (reference, reference_ms) = figures["figure"], figures["reference"]
        print(
            f"  {backend:13s} v2 with analysis fields {figure:8.0f} docs/s   "
            f"reference v1 (queried fields only) {reference:8.0f} docs/s   ratio {figure / reference:.2f}"
        )
        if figure_ms is not None and reference_ms is not None:
            print(
                f"  {'':13s} node indexing time      {figure_ms:8.0f} ms       reference v1"
                f"                       {reference_ms:8.0f} ms       ratio {figure_ms / reference_ms:.2f}"
            )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--orders", type=int, default=5000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--es-url", default=os.environ.get("ORDERSTREAM_TEST_ES_URL"))
    args = parser.parse_args()
    asyncio.run(main_async(args.orders, args.es_url, args.rounds))


if __name__ == "__main__":
    main()
