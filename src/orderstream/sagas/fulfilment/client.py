"""The client side of the saga: where an order's fulfilment stands.

Used by ``GET /orders/{id}/fulfilment``. The running (or closed) workflow
answers the ``status`` query; when it cannot (no worker polls the task queue,
or the query times out) the report falls back to Temporal's description of
the execution and, for a closed one, its result (every business outcome) or
failure (a failed compensation; runs recorded before ``outcome-completes`` also
failed with their outcome as the failure's first detail).

When Temporal cannot be reached (connection refused, server unavailable or
overloaded, no answer within :data:`QUERY_TIMEOUT`) the report raises
:class:`FulfilmentUnavailable`, which the API answers with 503 problem details
and ``Retry-After``.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

from temporalio.client import Client, WorkflowExecutionStatus, WorkflowFailureError, WorkflowHandle
from temporalio.converter import value_to_type
from temporalio.exceptions import ApplicationError
from temporalio.service import RPCError, RPCStatusCode

from orderstream.application.errors import ServiceUnavailable
from orderstream.domain.common import NotFound
from orderstream.sagas.fulfilment.inputs import (
    QUERY_STATUS,
    WORKFLOW_TYPE,
    FulfilmentOutcome,
    FulfilmentStatus,
    payment_id_for,
    workflow_id_for,
)

log = logging.getLogger("orderstream.saga")

QUERY_TIMEOUT = timedelta(seconds=5)

UNAVAILABLE_RPC_STATUSES = frozenset(
    {RPCStatusCode.UNAVAILABLE, RPCStatusCode.DEADLINE_EXCEEDED, RPCStatusCode.RESOURCE_EXHAUSTED}
)
"""Temporal is down, unreachable, too slow or overloaded: worth retrying later."""


class FulfilmentUnavailable(ServiceUnavailable):
    """Temporal cannot answer now (the API answers 503 with ``Retry-After``)."""

    def __init__(self, order_id: str, cause: BaseException) -> None:
        super().__init__("The saga service (Temporal)", cause)
        self.order_id = order_id
        self.reason = f"{type(cause).__name__}: {cause}" if str(cause) else type(cause).__name__


def _unreachable(exc: BaseException) -> bool:
    """Whether ``exc`` means Temporal cannot be reached now (not a bug or a refusal)."""
    if isinstance(exc, RPCError):
        return exc.status in UNAVAILABLE_RPC_STATUSES
    if isinstance(exc, TimeoutError):
        return True
    # A lazily connected client that cannot connect raises a plain RuntimeError.
    return isinstance(exc, RuntimeError) and str(exc).startswith("Failed client connect")


_STATUS_NAMES = {
    WorkflowExecutionStatus.RUNNING: "running",
    WorkflowExecutionStatus.COMPLETED: "completed",
    WorkflowExecutionStatus.FAILED: "failed",
    WorkflowExecutionStatus.CANCELED: "cancelled",
    WorkflowExecutionStatus.TERMINATED: "terminated",
    WorkflowExecutionStatus.CONTINUED_AS_NEW: "continued_as_new",
    WorkflowExecutionStatus.TIMED_OUT: "timed_out",
}


@dataclass
class FulfilmentReport:
    order_id: str
    workflow_id: str
    run_id: str
    status: str
    """Temporal's view: running, completed (any business outcome), failed (a human
    is needed), cancelled (through Temporal), terminated, timed_out, ..."""
    step: str
    payment_id: str
    web_ui_url: str | None
    outcome: FulfilmentOutcome | None = None
    completed_steps: list[str] = field(default_factory=list)
    compensations: list[str] = field(default_factory=list)
    payment_deadline: str | None = None


class FulfilmentClient:
    def __init__(
        self,
        client: Client,
        *,
        web_ui_url: str | None = None,
        namespace: str = "default",
        task_queue: str | None = None,
    ) -> None:
        """``web_ui_url``: the Temporal Web UI's base URL (``http://localhost:8233``
        for the dev server), or ``None`` when there is none to link to.
        ``task_queue``: the sagas' task queue, to count only this service's
        running sagas (:meth:`running_workflows`); all of the namespace's when ``None``."""
        self.client = client
        self.task_queue = task_queue
        self.web_ui_url = web_ui_url.rstrip("/") if web_ui_url else None
        self.namespace = namespace

    async def running_workflows(self) -> int:
        """Sagas still running, from Temporal's visibility store (one count
        query; visibility may trail the workflows by a moment)."""
        query = f"WorkflowType = '{WORKFLOW_TYPE}' AND ExecutionStatus = 'Running'"
        if self.task_queue:
            query += f" AND TaskQueue = '{self.task_queue}'"
        counted = await self.client.count_workflows(query, rpc_timeout=QUERY_TIMEOUT)
        return counted.count

    def link(self, workflow_id: str) -> str | None:
        if not self.web_ui_url:
            return None
        return f"{self.web_ui_url}/namespaces/{self.namespace}/workflows/{workflow_id}"

    async def report(self, order_id: str) -> FulfilmentReport:
        """Raises :class:`NotFound` when no saga was started for the order, and
        :class:`FulfilmentUnavailable` when Temporal cannot be reached."""
        workflow_id = workflow_id_for(order_id)
        handle: WorkflowHandle[Any, Any] = self.client.get_workflow_handle(workflow_id)
        try:
            # The client retries an unavailable server on its own; bound the whole call.
            async with asyncio.timeout(QUERY_TIMEOUT.total_seconds()):
                description = await handle.describe(rpc_timeout=QUERY_TIMEOUT)
        except (RPCError, TimeoutError, RuntimeError) as exc:
            if isinstance(exc, RPCError) and exc.status == RPCStatusCode.NOT_FOUND:
                raise NotFound("order fulfilment", order_id) from None
            if _unreachable(exc):
                unavailable = FulfilmentUnavailable(order_id, exc)
                log.warning("fulfilment of %s: Temporal unavailable (%s)", order_id, unavailable.reason)
                raise unavailable from exc
            raise
        status = _STATUS_NAMES.get(description.status, "unknown") if description.status else "unknown"
        report = FulfilmentReport(
            order_id=order_id,
            workflow_id=workflow_id,
            run_id=description.run_id,
            status=status,
            step=status,
            payment_id=payment_id_for(order_id),
            web_ui_url=self.link(workflow_id),
        )
        queried = await self._query(handle)
        if queried is not None:
            report.step = queried.step
            report.outcome = queried.outcome
            report.completed_steps = queried.completed_steps
            report.compensations = queried.compensations
            report.payment_deadline = queried.payment_deadline
            report.payment_id = queried.payment_id or report.payment_id
        elif description.status != WorkflowExecutionStatus.RUNNING:
            report.outcome = await self._closed_outcome(handle)
            if report.outcome is not None:
                report.step = report.outcome.status
                report.compensations = list(report.outcome.compensations)
        return report

    async def _query(self, handle: WorkflowHandle[Any, Any]) -> FulfilmentStatus | None:
        try:
            async with asyncio.timeout(QUERY_TIMEOUT.total_seconds()):
                status: FulfilmentStatus = await handle.query(
                    QUERY_STATUS, result_type=FulfilmentStatus, rpc_timeout=QUERY_TIMEOUT
                )
        except Exception as exc:  # no worker, timeout, query failed: fall back to describe
            log.info("status query of %s failed: %s", handle.id, exc)
            return None
        return status

    async def _closed_outcome(self, handle: WorkflowHandle[Any, Any]) -> FulfilmentOutcome | None:
        try:
            async with asyncio.timeout(QUERY_TIMEOUT.total_seconds()):
                result = await handle.result(rpc_timeout=QUERY_TIMEOUT)
        except WorkflowFailureError as exc:
            cause = exc.cause
            if isinstance(cause, ApplicationError) and cause.details:
                return _outcome(cause.details[0])
            return None
        except Exception as exc:
            log.info("result of %s unavailable: %s", handle.id, exc)
            return None
        return _outcome(result)


def _outcome(value: object) -> FulfilmentOutcome | None:
    try:
        outcome: FulfilmentOutcome = value_to_type(FulfilmentOutcome, value)
    except Exception:
        return None
    return outcome
