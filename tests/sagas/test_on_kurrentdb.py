"""The saga's happy path on the KurrentDB event store: the trigger follows ``$all`` with a
catch-up subscription and the command handler appends, both through the adapter, on
a fresh KurrentDB protocol STAND-IN (``tests/kurrentdb_standin``; marked
``kurrentdb_standin``: not proof against a real server)."""

from __future__ import annotations

import functools
from collections.abc import Iterator

import pytest

from tests.kurrentdb_standin import StandIn
from tests.sagas.conftest import SagaFactory
from tests.sagas.test_order_fulfilment import test_happy_path_ships_commits_stock_and_captures_payment

pytestmark = [pytest.mark.temporal, pytest.mark.asyncio(loop_scope="session"), pytest.mark.kurrentdb_standin]

__all__ = ["test_happy_path_ships_commits_stock_and_captures_payment"]


@pytest.fixture
def standin_url() -> Iterator[str]:
    standin = StandIn().start()
    try:
        yield standin.uri
    finally:
        standin.stop()


@pytest.fixture
def make_saga(standin_url: str, make_saga: SagaFactory) -> SagaFactory:
    # standin_url first: set up before the harness, so torn down after it (the server
    # outlives its clients: the trigger's subscription and the store are closed by then).
    return functools.partial(make_saga, event_store_url=standin_url)
