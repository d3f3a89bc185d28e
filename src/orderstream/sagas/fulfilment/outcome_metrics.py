"""Counting how sagas end: ``orderstream_saga_outcomes_total{outcome}``.

A worker interceptor, because the end of a run is seen only where the workflow
code runs, and that code must not touch the world (it is replayed). The
interceptor counts after the run returned or raised, and only when the worker
is not replaying: a run replayed to answer a query on a closed workflow, or
rebuilt after a worker restart, is not counted again.

The outcome is the run's ``FulfilmentOutcome.status`` (shipped, rejected,
cancelled, compensated); a run that fails is ``failed`` (a human is needed); a
run cancelled through Temporal compensated before it ended *Canceled*:
``compensated``. Starts are counted by the saga trigger, where they happen.
"""

from __future__ import annotations

import asyncio
from typing import Any

from temporalio import workflow
from temporalio.exceptions import FailureError
from temporalio.worker import (
    ExecuteWorkflowInput,
    Interceptor,
    WorkflowInboundInterceptor,
    WorkflowInterceptorClassInput,
)

from orderstream.metrics import Metrics
from orderstream.sagas.fulfilment.inputs import WORKFLOW_TYPE, FulfilmentOutcome

FAILED = "failed"
CANCELLED_THROUGH_TEMPORAL = "compensated"


def outcome_of(result: object) -> str:
    """The outcome label of a run that returned ``result``."""
    return result.status if isinstance(result, FulfilmentOutcome) else FAILED


class SagaOutcomeMetrics(Interceptor):
    """``Worker(interceptors=[SagaOutcomeMetrics(container.metrics)])``."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def workflow_interceptor_class(
        self, input: WorkflowInterceptorClassInput
    ) -> type[WorkflowInboundInterceptor] | None:
        metrics = self.metrics

        class CountOutcome(WorkflowInboundInterceptor):
            async def execute_workflow(self, input: ExecuteWorkflowInput) -> Any:
                if workflow.info().workflow_type != WORKFLOW_TYPE:
                    return await super().execute_workflow(input)
                try:
                    result = await super().execute_workflow(input)
                except asyncio.CancelledError:
                    _count(metrics, CANCELLED_THROUGH_TEMPORAL)
                    raise
                except FailureError:  # fails the run; other errors fail the task, retried
                    _count(metrics, FAILED)
                    raise
                _count(metrics, outcome_of(result))
                return result

        return CountOutcome


def _count(metrics: Metrics, outcome: str) -> None:
    if not workflow.unsafe.is_replaying():
        metrics.saga_ended(outcome)
