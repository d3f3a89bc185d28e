"""``GET /orders/{id}/fulfilment`` while Temporal cannot be reached: 503 problem
details with ``Retry-After``, not a 500."""

from __future__ import annotations

import socket
import time
from typing import Any

import pytest
from temporalio.client import Client

from orderstream.sagas.fulfilment.client import QUERY_TIMEOUT, FulfilmentClient
from orderstream.sagas.fulfilment.inputs import SEARCH_ATTRIBUTES
from orderstream.sagas.runtime import start_dev_server
from tests.sagas.conftest import SagaFactory, SagaHarness

pytestmark = [pytest.mark.temporal, pytest.mark.asyncio(loop_scope="session")]


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


async def _assert_503(saga: SagaHarness, order_id: str) -> dict[str, Any]:
    started = time.monotonic()
    response = await saga.http.get(f"/orders/{order_id}/fulfilment")
    elapsed = time.monotonic() - started
    assert response.status_code == 503, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    assert response.headers["retry-after"] == "1"
    problem: dict[str, Any] = response.json()
    assert problem["type"] == "urn:orderstream:problem:unavailable"
    assert problem["status"] == 503
    assert "Temporal" in problem["detail"]
    assert problem["instance"] == f"/orders/{order_id}/fulfilment"
    assert elapsed < QUERY_TIMEOUT.total_seconds() + 3
    return problem


async def test_temporal_not_listening_is_503(make_saga: SagaFactory) -> None:
    saga = await make_saga(worker=False)
    client = await Client.connect(f"127.0.0.1:{_closed_port()}", lazy=True)
    saga.fulfilment.client = FulfilmentClient(client)

    await _assert_503(saga, "some-order")


async def test_temporal_stopped_is_503_and_unknown_order_was_404(make_saga: SagaFactory) -> None:
    saga = await make_saga(worker=False)
    _address, env = await start_dev_server(None, port=None, ui=False, search_attributes=SEARCH_ATTRIBUTES)
    try:
        saga.fulfilment.client = FulfilmentClient(env.client)
        assert (await saga.http.get("/orders/some-order/fulfilment")).status_code == 404
    finally:
        await env.shutdown()

    await _assert_503(saga, "some-order")
