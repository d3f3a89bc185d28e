"""What the saga reads from the failure of an activity that runs several steps
(patch ``joined-reserve-and-ship``), without Temporal: the failure as the
workflow sees it, an ``ActivityError`` around the activity's ``ApplicationError``
(``activities.at_step``)."""

from __future__ import annotations

from typing import Any

import pytest
from temporalio.exceptions import ActivityError, ApplicationError, TimeoutError, TimeoutType

from orderstream.domain.inventory import InsufficientStock
from orderstream.sagas.fulfilment.activities import at_step, final_error
from orderstream.sagas.fulfilment.payment_gateway import PaymentGatewayUnavailable
from orderstream.sagas.fulfilment.workflow import failed_for_good_at, said_shipped

TIMEOUT = TimeoutError("timed out", type=TimeoutType.START_TO_CLOSE, last_heartbeat_details=[])
STEPS = ["reserve-stock/MUG", "reserve-stock/TEA", "reserve-stock/CUP", "mark-stock-reserved"]


def _seen_by_the_workflow(cause: BaseException) -> ActivityError:
    err = ActivityError(
        "activity failed",
        scheduled_event_id=0,
        started_event_id=0,
        identity="",
        activity_type="joined",
        activity_id="",
        retry_state=None,
    )
    err.__cause__ = cause
    return err


def _failed(exc: Exception, step: str, **facts: Any) -> ActivityError:
    return _seen_by_the_workflow(at_step(exc, step, **facts))


def test_at_step_keeps_the_error_and_names_the_step() -> None:
    final = at_step(final_error(InsufficientStock("TEA", 3, 1)), "reserve-stock/TEA")
    assert (final.type, final.non_retryable) == ("InsufficientStock", True)
    assert final.message == str(InsufficientStock("TEA", 3, 1))
    assert final.details[0] == {
        "code": "insufficient-stock",
        "sku": "TEA",
        "requested": 3,
        "available": 1,
        "step": "reserve-stock/TEA",
    }
    transient = at_step(PaymentGatewayUnavailable("capture timed out"), "capture-payment", shipped=True)
    assert (transient.type, transient.non_retryable) == ("PaymentGatewayUnavailable", False)
    assert transient.message == "capture timed out"
    assert transient.details[0] == {"step": "capture-payment", "shipped": True}


def test_a_final_error_tells_how_far_every_attempt_got() -> None:
    short = _failed(final_error(InsufficientStock("TEA", 3, 1)), "reserve-stock/TEA")
    assert failed_for_good_at(short, STEPS) == 1
    refused_mark = _failed(
        ApplicationError("lines changed", {}, type="LinesChanged", non_retryable=True), STEPS[3]
    )
    assert failed_for_good_at(refused_mark, STEPS) == 3


@pytest.mark.parametrize(
    "err",
    [
        _failed(PaymentGatewayUnavailable("event store down"), "reserve-stock/TEA"),  # transient
        _seen_by_the_workflow(
            TimeoutError("timed out", type=TimeoutType.START_TO_CLOSE, last_heartbeat_details=[])
        ),
        _seen_by_the_workflow(ApplicationError("no step named", type="DomainError", non_retryable=True)),
        _failed(ApplicationError("x", type="DomainError", non_retryable=True), "some-other-step"),
    ],
    ids=["transient", "timeout", "unnamed", "not-this-activity's"],
)
def test_any_other_failure_does_not(err: ActivityError) -> None:
    assert failed_for_good_at(err, STEPS) is None


def test_what_a_failure_of_ship_and_settle_says_of_the_shipment() -> None:
    refused = ApplicationError("the carrier refused the parcel", type="DomainError", non_retryable=True)
    assert said_shipped(_failed(refused, "ship-order", shipped=False)) is False
    after = _failed(PaymentGatewayUnavailable("capture timed out"), "capture-payment", shipped=True)
    assert said_shipped(after) is True
    final_after = _failed(refused, "commit-stock/MUG", shipped=True)
    assert said_shipped(final_after) is True
    # Cannot tell: ship-order failed transiently (an earlier attempt may have shipped) ...
    assert said_shipped(_failed(PaymentGatewayUnavailable("store down"), "ship-order", shipped=False)) is None
    # ... or no word at all (a timeout).
    assert said_shipped(_seen_by_the_workflow(TIMEOUT)) is None
