"""Smoke check of a running dev node with the official async Python client.

    python infra/elasticsearch/smoke.py [URL]      (default: $ES_URL or http://127.0.0.1:9200)

Exercises what the read store needs: index template, index with mappings,
version_type=external (a lower version is rejected with 409), bulk, refresh,
match / multi_match (standard analyzer), terms aggregation, search_after
paging and an atomic alias switch. Exits non-zero on the first failure.
"""

from __future__ import annotations

import asyncio
import os
import sys
import uuid

from elasticsearch import AsyncElasticsearch, ConflictError
from elasticsearch.helpers import async_bulk


async def main(url: str) -> None:
    es = AsyncElasticsearch(url, request_timeout=30)
    p = f"smoke-{uuid.uuid4().hex[:8]}"
    try:
        assert await es.ping(), "ping failed"
        info = await es.info()
        print(f"server {info['version']['number']} at {url}")

        await es.indices.put_index_template(
            name=f"{p}-template",
            index_patterns=[f"{p}-*"],
            template={
                "settings": {"number_of_shards": 1, "number_of_replicas": 0},
                "mappings": {
                    "properties": {
                        "status": {"type": "keyword"},
                        "title": {"type": "text"},
                        "notes": {"type": "text", "analyzer": "standard"},
                        "total": {"type": "double"},
                        "seq": {"type": "long"},
                        "order_id": {"type": "keyword"},
                        "created": {"type": "date"},
                    }
                },
            },
        )
        v1, v2 = f"{p}-v1", f"{p}-v2"
        await es.indices.create(index=v1, mappings={"properties": {"customer": {"type": "keyword"}}})
        mapping = await es.indices.get_mapping(index=v1)
        props = mapping[v1]["mappings"]["properties"]
        assert props["status"]["type"] == "keyword" and props["customer"]["type"] == "keyword", props

        # external versioning: a lower version must be rejected with 409
        await es.index(
            index=v1,
            id="o-1",
            version=5,
            version_type="external",
            document={"status": "placed", "title": "Red Shoes", "seq": 0},
        )
        try:
            await es.index(
                index=v1, id="o-1", version=3, version_type="external", document={"status": "stale", "seq": 0}
            )
        except ConflictError as e:
            assert e.meta.status == 409
        else:
            raise AssertionError("lower external version was accepted")
        doc = await es.get(index=v1, id="o-1")
        assert doc["_version"] == 5 and doc["_source"]["status"] == "placed", doc

        statuses = ["placed", "paid", "shipped"]
        actions = [
            {
                "_op_type": "index",
                "_index": v1,
                "_id": f"o-{i}",
                "version": 10,
                "version_type": "external",
                "_source": {
                    "status": statuses[i % 3],
                    "title": f"Order {i} blue widget",
                    "notes": "Quick brown fox" if i % 2 else "lazy dog",
                    "seq": i,
                    "order_id": f"o-{i}",
                    "total": i * 1.5,
                    "created": "2026-01-01T00:00:00Z",
                    "customer": f"c{i % 4}",
                },
            }
            for i in range(1, 51)
        ]
        ok, errors = await async_bulk(es, actions, raise_on_error=False)
        assert ok == 50 and not errors, (ok, errors)
        await es.indices.refresh(index=v1)

        r = await es.search(
            index=v1, query={"match": {"notes": "QUICK foxes fox"}}, size=0, track_total_hits=True
        )
        assert r["hits"]["total"]["value"] == 25, r["hits"]["total"]
        r = await es.search(
            index=v1, query={"multi_match": {"query": "blue", "fields": ["title", "notes"]}}, size=0
        )
        assert r["hits"]["total"]["value"] == 50, r["hits"]["total"]

        r = await es.search(index=v1, size=0, aggs={"by_status": {"terms": {"field": "status"}}})
        buckets = {b["key"]: b["doc_count"] for b in r["aggregations"]["by_status"]["buckets"]}
        assert buckets == {"paid": 17, "shipped": 17, "placed": 16}, buckets

        seen: list[int] = []
        after = None
        while True:
            kw = {"search_after": after} if after else {}
            r = await es.search(
                index=v1,
                size=7,
                sort=[{"seq": "asc"}, {"order_id": "asc"}],
                query={"range": {"seq": {"gte": 1}}},
                **kw,
            )
            hits = r["hits"]["hits"]
            if not hits:
                break
            seen += [h["_source"]["seq"] for h in hits]
            after = hits[-1]["sort"]
        assert seen == list(range(1, 51)), seen

        # atomic alias switch v1 -> v2
        alias = f"{p}-read"
        await es.indices.put_alias(index=v1, name=alias)
        await es.indices.create(index=v2)
        await es.index(index=v2, id="x", document={"status": "paid"}, refresh=True)
        await es.indices.update_aliases(
            actions=[
                {"remove": {"index": v1, "alias": alias}},
                {"add": {"index": v2, "alias": alias}},
            ]
        )
        got = await es.indices.get_alias(name=alias)
        assert list(got) == [v2], got
        r = await es.count(index=alias)
        assert r["count"] == 1, r
        print(
            "smoke OK: template, mappings, external version 409, bulk, refresh, match/multi_match, "
            "terms agg, search_after, alias switch"
        )
    finally:
        try:
            await es.options(ignore_status=404).indices.delete(index=f"{p}-v1,{p}-v2")
            await es.options(ignore_status=404).indices.delete_index_template(name=f"{p}-template")
        finally:
            await es.close()


if __name__ == "__main__":
    target = sys.argv[1] if len(sys.argv) > 1 else os.environ.get("ES_URL", "http://127.0.0.1:9200")
    asyncio.run(main(target))
