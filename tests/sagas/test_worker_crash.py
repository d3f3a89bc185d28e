"""A worker that dies mid-saga: the saga resumes on another worker, and the
event streams show every step exactly once."""

from __future__ import annotations

import asyncio
from collections import Counter
from pathlib import Path

import pytest

from orderstream.sagas.fulfilment.inputs import payment_id_for
from tests.sagas.conftest import WAIT, SagaFactory, WorkerProcess

pytestmark = [pytest.mark.temporal, pytest.mark.asyncio(loop_scope="session")]

ORDER_ONCE = ["OrderPlaced", "OrderStockReserved", "OrderPaymentAuthorised", "OrderConfirmed", "OrderShipped"]
PAYMENT_ONCE = ["PaymentRequested", "PaymentAuthorised", "PaymentCaptured"]


async def test_worker_killed_while_waiting_for_payment_resumes_without_duplicates(
    make_saga: SagaFactory, tmp_path: Path
) -> None:
    saga = await make_saga(worker=False)
    await saga.product("MUG", 10)
    await saga.product("TEA", 10)
    first = await WorkerProcess.start(saga, tmp_path / "worker-1.log")
    second = None
    try:
        order_id = await saga.place("tok_pending", ("MUG", 2), ("TEA", 3))
        await saga.reach_step(order_id, "await-payment-result")

        await first.kill()  # SIGKILL while the saga waits for the webhook
        second = await WorkerProcess.start(saga, tmp_path / "worker-2.log")
        response = await saga.webhook(order_id, {"status": "authorised"})
        assert response.status_code == 200, response.text

        outcome = await saga.outcome(order_id, within=2 * WAIT)
    finally:
        await first.kill()
        if second is not None:
            await second.terminate()

    assert outcome.status == "shipped"
    assert await saga.counts(f"order-{order_id}") == Counter(ORDER_ONCE)
    assert await saga.counts(f"payment-{payment_id_for(order_id)}") == Counter(PAYMENT_ONCE)
    for sku, quantity in (("MUG", 2), ("TEA", 3)):
        counts = await saga.counts(f"product-{sku}")
        assert (counts["StockReserved"], counts["StockCommitted"], counts["StockReleased"]) == (1, 1, 0)
        product = await saga.stock(sku)
        assert (product.on_hand, product.reserved) == (10 - quantity, 0)


async def test_worker_stopped_and_restarted_mid_saga_completes(make_saga: SagaFactory) -> None:
    saga = await make_saga(worker=False)
    await saga.product("MUG", 10)
    stop_first = asyncio.Event()
    first = saga.start_worker(stop_first)
    order_id = await saga.place("tok_pending", ("MUG", 1))
    await saga.reach_step(order_id, "await-payment-result")

    stop_first.set()
    await asyncio.wait_for(first, WAIT)
    assert (await saga.webhook(order_id, {"status": "authorised"})).status_code == 200
    await asyncio.sleep(0.5)  # the signal lands while no worker polls
    saga.start_worker()

    assert (await saga.outcome(order_id)).status == "shipped"
    assert await saga.counts(f"order-{order_id}") == Counter(ORDER_ONCE)
    assert await saga.counts(f"payment-{payment_id_for(order_id)}") == Counter(PAYMENT_ONCE)
