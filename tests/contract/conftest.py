"""Backends for the contract suites.

Every contract test takes the ``event_store`` or ``read_store`` fixture and runs
once per backend. A backend whose server is absent is skipped with a message
saying how to run it; it is never replaced by a fake.

- SQLite (both stores): always, in a temporary directory.
- KurrentDB / EventStoreDB: ``ORDERSTREAM_TEST_KURRENTDB_URL=kurrentdb://localhost:2113?tls=false``,
  or a reachable Docker engine (testcontainers starts ``docker.kurrent.io/kurrent-latest/kurrentdb``).
  Neither: the protocol-level STAND-IN (``tests/kurrentdb_standin``), and the tests are marked
  ``kurrentdb_standin`` so a pass is never read as proof against a real server.
- Elasticsearch: ``ORDERSTREAM_TEST_ES_URL=http://127.0.0.1:9200``
  (``infra/elasticsearch/dev-node.sh start`` prints it; ``.ci/run`` does this).
"""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Iterator
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
def kurrentdb_url() -> Iterator[str]:
    """A real server when one is given or Docker answers, else the stand-in."""
    url = os.environ.get("ORDERSTREAM_TEST_KURRENTDB_URL")
    if url:
        yield url
    elif _docker_available():
        from orderstream.eventstore.kurrentdb import start_test_container

        yield start_test_container()
    else:
        from tests.kurrentdb_standin import StandIn

        standin = StandIn().start()
        try:
            yield standin.uri
        finally:
            standin.stop()


def kurrentdb_is_standin() -> bool:
    return not os.environ.get("ORDERSTREAM_TEST_KURRENTDB_URL") and not _docker_available()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark every test that runs on KurrentDB ``kurrentdb_standin`` when it will run on the
    stand-in, so reports (``-m kurrentdb_standin``, ``-rA``) never pass it off as a real server."""
    if not kurrentdb_is_standin():
        return
    for item in items:
        callspec = getattr(item, "callspec", None)
        on_kurrentdb = callspec is not None and callspec.params.get("event_store") == "kurrentdb"
        if on_kurrentdb or "kurrentdb_url" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.kurrentdb_standin)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """Say it at the end of every run: the KurrentDB results came from the stand-in."""
    ran = [
        report
        for reports in terminalreporter.stats.values()
        for report in reports
        if isinstance(report, pytest.TestReport)
        and report.when == "call"
        and "kurrentdb_standin" in report.keywords
    ]
    if ran:
        terminalreporter.write_line(
            f"NOTE: {len(ran)} KurrentDB tests ran on the protocol STAND-IN (tests/kurrentdb_standin), "
            "not on a KurrentDB server; set ORDERSTREAM_TEST_KURRENTDB_URL to run them on one.",
            yellow=True,
        )


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
