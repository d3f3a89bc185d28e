"""Backends for the contract suites.

Every contract test takes the ``event_store`` or ``read_store`` fixture and runs
once per backend. A backend whose server is absent is skipped with a message
saying how to run it; it is never replaced by a fake.

- SQLite (both stores): always, in a temporary directory.
- KurrentDB / EventStoreDB: ``ORDERSTREAM_TEST_KURRENTDB_URL=kurrentdb://localhost:2113?tls=false``,
  or a reachable Docker engine (testcontainers starts ``docker.kurrent.io/kurrent-latest/kurrentdb``).
- Elasticsearch: ``ORDERSTREAM_TEST_ES_URL=http://127.0.0.1:9200``
  (``infra/elasticsearch/dev-node.sh start`` prints it; ``.ci/run`` does this).
"""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from orderstream.eventstore.base import EventStore
from orderstream.readstore.base import ReadStore

KURRENTDB_HOW = (
    "KurrentDB contract tests need a server: set ORDERSTREAM_TEST_KURRENTDB_URL="
    "'kurrentdb://localhost:2113?tls=false' (e.g. `docker compose up kurrentdb`), "
    "or run where a Docker engine is reachable so testcontainers can start one."
)
ES_HOW = (
    "Elasticsearch tests need a node: run `infra/elasticsearch/dev-node.sh start` and set "
    "ORDERSTREAM_TEST_ES_URL to the URL it prints (.ci/run does both)."
)


def _docker_available() -> bool:
    try:
        import docker  # type: ignore[import-untyped]

        docker.from_env().ping()
    except Exception:
        return False
    return True


async def drop_es_prefix(url: str, prefix: str) -> None:
    """Delete the indices and index templates a test created under ``prefix``, so
    repeated runs on one node stay far below its shard limit (1,000 by default).
    Names are resolved first: wildcard deletes are refused by default in 8.x."""
    from elasticsearch import AsyncElasticsearch, NotFoundError

    client = AsyncElasticsearch(url)
    try:
        indices = await client.indices.get(index=f"{prefix}*", expand_wildcards="all")
        for name in indices.body:
            await client.indices.delete(index=name, ignore_unavailable=True)
        try:
            templates = await client.indices.get_index_template(name=f"{prefix}*")
        except NotFoundError:
            return
        for template in templates.body.get("index_templates", []):
            await client.indices.delete_index_template(name=template["name"])
    finally:
        await client.close()


@pytest.fixture(scope="session")
def kurrentdb_url() -> str:
    url = os.environ.get("ORDERSTREAM_TEST_KURRENTDB_URL")
    if url:
        return url
    if not _docker_available():
        pytest.skip(KURRENTDB_HOW)
    from orderstream.eventstore.kurrentdb import start_test_container

    return start_test_container()


@pytest.fixture(scope="session")
def es_url() -> str:
    url = os.environ.get("ORDERSTREAM_TEST_ES_URL")
    if not url:
        pytest.skip(ES_HOW)
    return url


@pytest.fixture(params=["sqlite", "kurrentdb"])
async def event_store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[EventStore]:
    store: EventStore
    if request.param == "sqlite":
        from orderstream.eventstore.sqlite import SqliteEventStore

        store = await SqliteEventStore.open(tmp_path / "events.db")
    else:
        from orderstream.eventstore.kurrentdb import KurrentDBEventStore

        store = await KurrentDBEventStore.open(request.getfixturevalue("kurrentdb_url"))
    try:
        yield store
    finally:
        await store.close()


@pytest.fixture(params=["sqlite", "elasticsearch"])
async def read_store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[ReadStore]:
    store: ReadStore
    if request.param == "sqlite":
        from orderstream.readstore.sqlite import SqliteReadStore

        store = await SqliteReadStore.open(tmp_path / "read.db")
    else:
        from orderstream.readstore.elasticsearch import ElasticsearchReadStore

        # A fresh index prefix per test keeps tests independent on one node.
        prefix = f"test-{uuid.uuid4().hex[:8]}-"
        store = await ElasticsearchReadStore.open(request.getfixturevalue("es_url"), prefix=prefix)
    try:
        yield store
    finally:
        await store.close()
        if request.param == "elasticsearch":
            await drop_es_prefix(request.getfixturevalue("es_url"), prefix)


@pytest.fixture
def unique() -> str:
    """A suffix that keeps stream and group names apart on a shared server."""
    return uuid.uuid4().hex[:12]
