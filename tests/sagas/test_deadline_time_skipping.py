"""The real default payment deadline (15 minutes), run in seconds.

On Temporal's time-skipping test server (the Java ``TestServer`` from Maven
Central, run by infra/temporal-test-server/launcher.sh): ``env.sleep(seconds)``
moves the server's clock on at once, firing the timers it passes. (The SDK's
automatic skipping while a result is awaited applies only to handles returned by
the environment's own ``start_workflow``; here the saga trigger starts the runs.)
The saga, its trigger, its worker and the event store are the real ones; only
Temporal's clock is skipped. The module's ``temporal_env`` replaces the dev
server of tests/sagas/conftest.py, so ``make_saga`` runs on this server.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import datetime, timedelta
from pathlib import Path

import pytest
import pytest_asyncio
from temporalio.testing import WorkflowEnvironment

from orderstream.sagas.fulfilment.inputs import DEFAULT_PAYMENT_DEADLINE_SECONDS
from tests.sagas.conftest import SagaFactory

pytestmark = [pytest.mark.temporal, pytest.mark.asyncio(loop_scope="session")]

LAUNCHER = Path(__file__).resolve().parents[2] / "infra" / "temporal-test-server" / "launcher.sh"
LIB = LAUNCHER.parent / ".build" / "target" / "lib"
DEADLINE = DEFAULT_PAYMENT_DEADLINE_SECONDS
DEADLINE_REASON = f"payment deadline passed: not authorised within {DEADLINE:g} s"


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def temporal_env() -> AsyncIterator[WorkflowEnvironment]:
    if not any(LIB.glob("temporal-test-server-*.jar")):
        pytest.skip(f"the time-skipping test server is not built: run {LAUNCHER} build (needs Maven Central)")
    env = await WorkflowEnvironment.start_time_skipping(
        test_server_existing_path=str(LAUNCHER),
        test_server_startup_timeout=timedelta(seconds=60),  # a JVM on a busy machine
    )
    try:
        yield env
    finally:
        await env.shutdown()


async def test_the_default_deadline_voids_the_payment_and_compensates(
    make_saga: SagaFactory, temporal_env: WorkflowEnvironment
) -> None:
    saga = await make_saga(payment_deadline=DEADLINE)
    await saga.product("MUG", 10)
    order_id = await saga.place("tok_pending", ("MUG", 2))
    await saga.reach_step(order_id, "await-payment-result")
    waiting_since = await temporal_env.get_current_time()
    deadline = datetime.fromisoformat((await saga.status(order_id))["payment_deadline"])
    assert deadline - waiting_since == pytest.approx(timedelta(seconds=DEADLINE), abs=timedelta(seconds=5))

    await temporal_env.sleep(DEADLINE)  # 15 minutes pass on Temporal's clock
    outcome = await saga.outcome(order_id)

    assert (outcome.status, outcome.reason, outcome.error_type) == ("compensated", DEADLINE_REASON, None)
    assert await temporal_env.get_current_time() >= deadline
    assert (await saga.payment(order_id)).status == "voided"
    assert (await saga.stock("MUG")).reserved == 0
    order = await saga.order(order_id)
    assert (order.status, order.cancel_reason) == ("cancelled", DEADLINE_REASON)


async def test_an_authorisation_a_minute_before_the_deadline_ships(
    make_saga: SagaFactory, temporal_env: WorkflowEnvironment
) -> None:
    saga = await make_saga(payment_deadline=DEADLINE)
    await saga.product("MUG", 10)
    order_id = await saga.place("tok_pending", ("MUG", 1))
    await saga.reach_step(order_id, "await-payment-result")

    await temporal_env.sleep(DEADLINE - 60)  # 14 minutes pass on Temporal's clock
    assert (await saga.status(order_id))["step"] == "await-payment-result"
    answer = await saga.webhook(order_id, {"status": "authorised", "authorisation_code": "AUTH-1"})
    assert answer.status_code == 200, answer.text
    outcome = await saga.outcome(order_id)

    assert outcome.status == "shipped"
    assert (await saga.payment(order_id)).status == "captured"
    assert (await saga.order(order_id)).status == "shipped"
