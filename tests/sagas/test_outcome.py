"""A business outcome completes the workflow; only what needs a human fails it.

Against the real dev server: the run's Temporal status, its result, the
``OrderOutcome`` search attribute as the Web UI filters on it (a visibility
query), ``GET /orders/{id}/fulfilment``, and the replay of runs recorded before
(tests/sagas/histories/*-failed.json, recorded by the code of ``integration``
where those runs failed).
"""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest
from temporalio import activity
from temporalio.client import WorkflowExecutionStatus, WorkflowHistory
from temporalio.exceptions import ApplicationError
from temporalio.worker import Replayer

from orderstream.sagas.fulfilment.activities import FulfilmentActivities
from orderstream.sagas.fulfilment.inputs import COMPENSATION_FAILED, ORDER_OUTCOME_ATTRIBUTE, StockArgs
from orderstream.sagas.fulfilment.outcome_metrics import SagaOutcomeMetrics
from orderstream.sagas.fulfilment.worker import WORKFLOW_RUNNER
from orderstream.sagas.fulfilment.workflow import OrderFulfilment
from tests.sagas.conftest import SagaFactory, SagaHarness, eventually

pytestmark = [pytest.mark.temporal, pytest.mark.asyncio(loop_scope="session")]

HISTORIES = Path(__file__).parent / "histories"


def _counted(saga: SagaHarness, name: str, **labels: str) -> float:
    """A sample of the harness's own metrics registry (0 when absent)."""
    found = saga.container.metrics.registry.get_sample_value(name, {"saga": "fulfilment", **labels})
    return found or 0.0


async def _listed(saga: SagaHarness, query: str) -> list[str]:
    """Workflow ids the visibility store lists for ``query`` on this harness's task queue."""
    full = f"TaskQueue = '{saga.task_queue}' AND {query}"
    return [wf.id async for wf in saga.env.client.list_workflows(full)]


async def _assert_listed(saga: SagaHarness, order_id: str, query: str) -> None:
    workflow_id = saga.handle(order_id).id

    async def listed() -> bool:
        return workflow_id in await _listed(saga, query)

    await eventually(listed, what=f"{workflow_id} listed by {query}")


@pytest.mark.parametrize(
    ("token", "lines", "status"),
    [
        ("tok_approve", [("TEA", 3)], "rejected"),
        ("tok_decline", [("MUG", 1)], "compensated"),
        ("tok_pending", [("MUG", 2)], "cancelled"),
    ],
)
async def test_a_business_outcome_completes_with_it_as_result_and_search_attribute(
    make_saga: SagaFactory, token: str, lines: list[tuple[str, int]], status: str
) -> None:
    saga = await make_saga(search_attributes=True)
    await saga.product("MUG", 10)
    await saga.product("TEA", 1)
    order_id = await saga.place(token, *lines)
    if status == "cancelled":
        await saga.reach_step(order_id, "await-payment-result")
        await saga.container.use_cases.cancel_order(order_id, "changed my mind", saga.ctx)

    outcome = await saga.outcome(order_id)

    assert (outcome.status, outcome.error_type) == (status, None)  # a result, not a failure
    description = await saga.handle(order_id).describe()
    assert description.status == WorkflowExecutionStatus.COMPLETED
    assert description.typed_search_attributes.get(ORDER_OUTCOME_ATTRIBUTE) == status
    # What the Web UI's filter runs: the run is listed Completed under its outcome ...
    await _assert_listed(saga, order_id, f"OrderOutcome = '{status}' AND ExecutionStatus = 'Completed'")
    # ... and the Failures filter does not count it.
    assert saga.handle(order_id).id not in await _listed(saga, "ExecutionStatus = 'Failed'")

    answer = await saga.http.get(f"/orders/{order_id}/fulfilment")
    assert answer.status_code == 200, answer.text
    report = answer.json()
    assert (report["status"], report["step"], report["outcome"]["status"]) == ("completed", status, status)
    assert report["outcome"]["compensation_failures"] == []
    assert _counted(saga, "orderstream_saga_starts_total") == 1
    assert _counted(saga, "orderstream_saga_outcomes_total", outcome=status) == 1
    # The query above replayed the closed run in the worker: not counted again.
    assert _counted(saga, "orderstream_saga_outcomes_total", outcome="failed") == 0


async def test_shipped_sets_the_outcome_attribute_too(make_saga: SagaFactory) -> None:
    saga = await make_saga(search_attributes=True)
    await saga.product("MUG", 10)
    order_id = await saga.place("tok_approve", ("MUG", 1))

    assert (await saga.outcome(order_id)).status == "shipped"
    await _assert_listed(saga, order_id, "OrderOutcome = 'shipped' AND ExecutionStatus = 'Completed'")
    assert _counted(saga, "orderstream_saga_outcomes_total", outcome="shipped") == 1


async def test_without_search_attributes_the_run_completes_and_sets_none(make_saga: SagaFactory) -> None:
    """A cluster that refused to register them: the trigger starts runs without
    any, and the run must not upsert one (an unregistered attribute would fail
    each of its workflow tasks)."""
    saga = await make_saga(search_attributes=False)
    await saga.product("MUG", 10)
    order_id = await saga.place("tok_decline", ("MUG", 1))

    assert (await saga.outcome(order_id)).status == "compensated"
    description = await saga.handle(order_id).describe()
    assert description.status == WorkflowExecutionStatus.COMPLETED
    assert description.typed_search_attributes.get(ORDER_OUTCOME_ATTRIBUTE) is None


class ReleaseRefused(FulfilmentActivities):
    """Releasing stock fails for good: the compensation cannot finish on its own."""

    @activity.defn(name="release_stock")
    async def release_stock(self, args: StockArgs) -> str:
        refused = "the warehouse refused the release"
        raise ApplicationError(refused, {}, type="DomainError", non_retryable=True)


async def test_a_failed_compensation_fails_the_run_for_a_human(make_saga: SagaFactory) -> None:
    saga = await make_saga(worker=False, search_attributes=True)
    await saga.product("MUG", 10)
    order_id = await saga.place("tok_decline", ("MUG", 1))
    acts = ReleaseRefused(saga.container.use_cases, saga.gateway)
    worker = saga.worker_with(acts, interceptors=[SagaOutcomeMetrics(saga.container.metrics)])
    async with worker:
        outcome = await saga.outcome(order_id)

    assert (outcome.status, outcome.error_type) == ("compensated", COMPENSATION_FAILED)
    assert outcome.raw["compensation_failures"] == ["release-stock/MUG: the warehouse refused the release"]
    description = await saga.handle(order_id).describe()
    assert description.status == WorkflowExecutionStatus.FAILED
    await _assert_listed(saga, order_id, "OrderOutcome = 'failed' AND ExecutionStatus = 'Failed'")
    report = (await saga.http.get(f"/orders/{order_id}/fulfilment")).json()
    assert (report["status"], report["outcome"]["status"]) == ("failed", "compensated")
    assert report["outcome"]["compensation_failures"] == outcome.raw["compensation_failures"]
    assert _counted(saga, "orderstream_saga_outcomes_total", outcome="failed") == 1
    assert _counted(saga, "orderstream_saga_outcomes_total", outcome="compensated") == 0


@pytest.mark.parametrize("name", ["rejected", "declined", "deadline", "cancelled"])
async def test_runs_that_failed_before_replay_as_they_ran(name: str) -> None:
    """Recorded by the code before ``outcome-completes``: each compensated run
    ended FAILED; this code replays it to the same end, sets no attribute."""
    raw = (HISTORIES / f"{name}-failed.json").read_text()
    history = WorkflowHistory.from_json(f"recorded-{name}-{uuid.uuid4().hex[:6]}", raw)
    replayer = Replayer(workflows=[OrderFulfilment], workflow_runner=WORKFLOW_RUNNER)

    result = await replayer.replay_workflow(history, raise_on_replay_failure=False)

    assert result.replay_failure is None, result.replay_failure
    assert history.events[-1].HasField("workflow_execution_failed_event_attributes")


async def test_a_new_compensated_run_replays(make_saga: SagaFactory) -> None:
    saga = await make_saga(search_attributes=True)
    await saga.product("MUG", 10)
    order_id = await saga.place("tok_decline", ("MUG", 1))
    assert (await saga.outcome(order_id)).status == "compensated"

    history = await saga.handle(order_id).fetch_history()
    result = await Replayer(workflows=[OrderFulfilment], workflow_runner=WORKFLOW_RUNNER).replay_workflow(
        history, raise_on_replay_failure=False
    )

    assert result.replay_failure is None, result.replay_failure
    assert history.events[-1].HasField("workflow_execution_completed_event_attributes")


async def test_cancelled_through_temporal_ends_canceled_with_the_outcome(make_saga: SagaFactory) -> None:
    """An operator's cancellation (Web UI, CLI) is not a failure either: after the
    compensations the run ends *Canceled*, its ``OrderOutcome`` ``compensated``."""
    saga = await make_saga(search_attributes=True)
    await saga.product("MUG", 10)
    order_id = await saga.place("tok_pending", ("MUG", 2))
    await saga.reach_step(order_id, "await-payment-result")

    handle = saga.handle(order_id)
    await handle.cancel()

    async def canceled() -> bool:
        return (await handle.describe()).status == WorkflowExecutionStatus.CANCELED

    await eventually(canceled, what="the run to end Canceled")
    description = await handle.describe()
    assert description.typed_search_attributes.get(ORDER_OUTCOME_ATTRIBUTE) == "compensated"
    assert (await saga.payment(order_id)).status == "voided"
    assert _counted(saga, "orderstream_saga_outcomes_total", outcome="compensated") == 1
    report = (await saga.http.get(f"/orders/{order_id}/fulfilment")).json()
    assert (report["status"], report["outcome"]["status"]) == ("cancelled", "compensated")
