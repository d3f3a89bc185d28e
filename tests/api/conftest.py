"""The API suite runs once per read store: SQLite always, Elasticsearch when a node
is given (``ORDERSTREAM_TEST_ES_URL``; ``make test`` starts one), else skipped
with the message that says how. And once more on the KurrentDB event store, on a
fresh protocol STAND-IN per test (``tests/kurrentdb_standin``: not a real server;
marked ``kurrentdb_standin``), with the SQLite read store.

Each Elasticsearch run gets its own index prefix, so tests on one node stay apart.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from orderstream.api.app import create_app
from orderstream.bootstrap import build
from orderstream.config import Settings
from orderstream.container import Container
from tests.conftest import ADMIN, MakeClient, client_for
from tests.contract.conftest import ES_HOW, drop_es_prefix
from tests.kurrentdb_standin import StandIn


@pytest.fixture(params=["sqlite", "elasticsearch"])
async def read_store_url(request: pytest.FixtureRequest) -> AsyncIterator[str]:
    if request.param == "sqlite":
        yield ""  # Settings' default: sqlite:///{data_dir}/read.db
        return
    url = os.environ.get("ORDERSTREAM_TEST_ES_URL")
    if not url:
        pytest.skip(ES_HOW)
    prefix = f"api-{uuid.uuid4().hex[:10]}-"
    yield f"{url.rstrip('/')}?prefix={prefix}"
    await drop_es_prefix(url, prefix)  # make_client's stores add suffixes to it: all go


@pytest.fixture(params=["sqlite", pytest.param("kurrentdb", marks=pytest.mark.kurrentdb_standin)])
def event_store_url(request: pytest.FixtureRequest) -> Iterator[str]:
    """``""``: Settings' default (SQLite in the data dir); else a fresh stand-in's URL."""
    if request.param == "sqlite":
        yield ""
        return
    standin = StandIn().start()
    try:
        yield standin.uri
    finally:
        standin.stop()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """KurrentDB runs with the SQLite read store only (the read side is the same code)."""
    keep, drop = [], []
    for item in items:
        params = getattr(getattr(item, "callspec", None), "params", {})
        both = (
            params.get("event_store_url") == "kurrentdb" and params.get("read_store_url") == "elasticsearch"
        )
        (drop if both else keep).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep


@pytest.fixture
def settings(tmp_path: Path, read_store_url: str, event_store_url: str) -> Settings:
    return Settings(
        data_dir=tmp_path / "data", read_store_url=read_store_url, event_store_url=event_store_url
    )


@pytest.fixture
def make_client(tmp_path: Path, read_store_url: str, event_store_url: str) -> MakeClient:
    """As in tests/conftest.py, on this run's read store."""
    counter = itertools.count()

    @contextlib.asynccontextmanager
    async def make(
        *, projections: bool = True, token: str | None = ADMIN, **overrides: Any
    ) -> AsyncIterator[tuple[httpx.AsyncClient, Container]]:
        overrides.setdefault("data_dir", tmp_path / f"data-{next(counter)}")
        if read_store_url:
            overrides.setdefault("read_store_url", f"{read_store_url}{next(counter)}-")
        if event_store_url:
            overrides.setdefault("event_store_url", event_store_url)
        built = await build(Settings(**overrides))
        try:
            background = built.projection_services if projections else []
            application = create_app(built, extra_route_handlers=(), background=background)
            async with client_for(application, token=token) as http:
                yield http, built
        finally:
            await built.close()

    return make
