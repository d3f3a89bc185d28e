"""What crosses the Temporal boundary for the order-fulfilment saga.

Plain, frozen dataclasses of ``str``/``int``/``float``/``list`` only, so the
SDK's default JSON converter carries them and the Web UI shows them readably.
Fields may be added later with defaults; never rename or remove one while
workflows that use it are running.

This module imports nothing but the standard library and ``temporalio.common``
(for the search attribute keys): the saga trigger, the API and the workflow
sandbox all import it.

No ``from __future__ import annotations``: with string annotations every
decode of a payload into these dataclasses (the SDK's converter calls
``typing.get_type_hints`` per dataclass, per payload) compiled each hint again,
2.5-3x the cost of a decode; and inside the workflow sandbox a string hint is
resolved in the sandbox's ``sys.modules`` (docs/sagas.md, "The workflow sandbox").
"""

import uuid
from dataclasses import dataclass, field
from typing import Literal

from temporalio.common import SearchAttributeKey

WORKFLOW_TYPE = "OrderFulfilment"
WORKFLOW_ID_PREFIX = "order-fulfilment-"
DEFAULT_TASK_QUEUE = "orderstream-order-fulfilment"
SAGA_ACTOR = "saga:order-fulfilment"
"""The ``actor`` in the metadata of every event the saga appends; the trigger
ignores payment and cancellation events whose actor is the saga itself."""

DEFAULT_PAYMENT_DEADLINE_SECONDS = 15 * 60.0
MAX_RESERVE_ROUNDS = 3
"""How often the saga reserves stock for an order whose lines keep changing
before it gives up and compensates."""

# Signal and query names (the public surface of a running saga).
SIGNAL_PAYMENT_RESULT = "payment_result"
SIGNAL_CANCEL = "cancel"
QUERY_STATUS = "status"

# ApplicationError types raised by the activities for final domain errors.
ERR_INSUFFICIENT_STOCK = "InsufficientStock"
ERR_ILLEGAL_TRANSITION = "IllegalTransition"
ERR_NOT_FOUND = "NotFound"
ERR_LINES_CHANGED = "LinesChanged"
"""``mark_stock_reserved``: the customer changed the order's lines while the saga
reserved stock; the saga reserves the current lines and marks again."""
ERR_DOMAIN = "DomainError"
"""Any other broken business rule; final like the ones above."""

# Keys an activity that runs several steps adds to the details of its failure
# (``activities.at_step``), beside the error's own facts.
FAILED_STEP = "step"
"""The step (``StepRef.step``) that failed; the ones before it in the activity
succeeded."""
SHIPPED = "shipped"
"""``ship_and_settle_order``: whether ``ship-order`` had succeeded (the order is
shipped) when the activity failed."""
CHECK_SHIPPED = "check-shipped"
"""The step that asks the order whether it was shipped by cancelling it unless it is
(``cancel_unless_shipped``)."""
CANCELLED_BY = "cancelled_by"
"""``ship_order`` refused because the order is cancelled: :data:`CHECK_SHIPPED` when
this saga's own check cancelled it (the workflow then compensates as for a failed
``ship-order``), absent when someone else did (the customer)."""

ORDER_ID_ATTRIBUTE = SearchAttributeKey.for_keyword("OrderId")
CORRELATION_ID_ATTRIBUTE = SearchAttributeKey.for_keyword("CorrelationId")
"""Set by the saga trigger at the start, when the cluster has them registered."""
ORDER_OUTCOME_ATTRIBUTE = SearchAttributeKey.for_keyword("OrderOutcome")
SEARCH_ATTRIBUTES = (ORDER_ID_ATTRIBUTE, CORRELATION_ID_ATTRIBUTE, ORDER_OUTCOME_ATTRIBUTE)
"""The saga's custom search attributes: the trigger sets the first two when its
``use_search_attributes`` (and the workflow sets ``OrderOutcome`` as it ends, in
runs started with them); the dev server registers them at start
(:func:`orderstream.sagas.fulfilment.saga.dev_server_config`), the saga's services
on a cluster that lacks them (``ensure_search_attributes``), or an operator with
``temporal operator search-attribute create``."""
"""Set by the workflow as it ends: ``shipped``, ``rejected``, ``cancelled``,
``compensated`` (the run completed) or ``failed`` (it failed: a human is needed).
The Web UI filters on it (``OrderOutcome="cancelled"``)."""

# ApplicationError types a compensated run failed with before it completed with
# its outcome (patch ``outcome-completes``): runs recorded before replay them.
FAILURE_TYPES: dict[str, str] = {
    "rejected": "FulfilmentRejected",
    "cancelled": "FulfilmentCancelled",
    "compensated": "FulfilmentCompensated",
}
COMPENSATION_FAILED = "CompensationFailed"
"""The one failure of a compensated run: a compensation failed, a human must finish it."""

_PAYMENT_ID_NAMESPACE = uuid.UUID("0d8f6c3e-6a43-4b8e-9f0c-5e2b7a91c4d2")
_TRACKING_NAMESPACE = uuid.UUID("6b2e9d14-2f7a-4c55-8e31-9a0f4c7d8b63")

OutcomeStatus = Literal["shipped", "rejected", "cancelled", "compensated"]
PaymentResult = Literal["authorised", "declined"]


def workflow_id_for(order_id: str) -> str:
    """One saga per order: the id a redelivered ``OrderPlaced`` collides with."""
    return f"{WORKFLOW_ID_PREFIX}{order_id}"


def payment_id_for(order_id: str) -> str:
    """The order's payment id (stream ``payment-{payment_id}``), derived so that
    anyone holding the order id can find the payment."""
    return str(uuid.uuid5(_PAYMENT_ID_NAMESPACE, order_id))


def tracking_number_for(workflow_id: str) -> str:
    """Deterministic, so a replayed or retried ship step ships the same parcel."""
    return "TRK-" + uuid.uuid5(_TRACKING_NAMESPACE, workflow_id).hex[:12].upper()


@dataclass(frozen=True)
class Line:
    sku: str
    quantity: int


@dataclass(frozen=True)
class Amount:
    """Money in integer minor units."""

    amount: int
    currency: str


@dataclass(frozen=True)
class FulfilmentInput:
    order_id: str
    payment_id: str
    lines: list[Line]
    amount: Amount
    correlation_id: str
    """From the ``OrderPlaced`` event's metadata; every event the saga appends carries it."""
    causation_id: str
    """The ``OrderPlaced`` event's id."""
    payment_method_id: str = ""
    """The vault's reference (``pm_...``), never the card token: the input is shown in
    the Web UI. Inputs recorded before it existed held ``payment_token`` instead, which
    now decodes to nothing (unknown keys are dropped): those runs are declined."""
    payment_deadline_seconds: float = DEFAULT_PAYMENT_DEADLINE_SECONDS
    """How long a pending authorisation may wait for the webhook's result."""
    local_steps: bool = False
    """Run every step as a local activity (see ``workflow.OrderFulfilment._call``).
    The saga trigger sets it; inputs recorded before it existed decode as
    ``False``, so those runs replay their remote activities unchanged."""


@dataclass(frozen=True)
class StepRef:
    """Identifies one saga step to an activity: the command's idempotency key is
    ``f"{workflow_id}/{step}"``, so a retried activity appends nothing twice."""

    workflow_id: str
    step: str
    correlation_id: str
    causation_id: str

    @property
    def idempotency_key(self) -> str:
        return f"{self.workflow_id}/{self.step}"


# ------------------------------------------------------------------ activity arguments


@dataclass(frozen=True)
class StockArgs:
    ref: StepRef
    order_id: str
    sku: str
    quantity: int = 0
    """Used by ``reserve_stock`` only."""
    reason: str = ""
    """Used by ``release_stock`` only."""


@dataclass(frozen=True)
class OrderArgs:
    ref: StepRef
    order_id: str
    lines: list[Line] = field(default_factory=list)
    """``mark_stock_reserved``: the lines the saga holds stock for."""
    payment_id: str = ""
    """``mark_payment_authorised``."""
    tracking_number: str = ""
    """``ship_order``."""
    reason: str = ""
    """``reject_order`` / ``cancel_order``."""


@dataclass(frozen=True)
class PaymentArgs:
    ref: StepRef
    payment_id: str
    order_id: str
    amount: Amount
    payment_method_id: str = ""
    reason: str = ""


# Steps that run as one local activity (one activation instead of two or more;
# each command keeps its own step name and idempotency key).


@dataclass(frozen=True)
class ReserveSteps:
    """``reserve_and_mark_stock``: ``reserve-stock/{sku}`` per line, then
    ``mark-stock-reserved`` (round 1 of the reservation)."""

    reserves: list[StockArgs]
    mark: OrderArgs


@dataclass(frozen=True)
class PaymentSteps:
    """``request_and_authorise_payment``: ``request-payment``, then ``authorise-payment``."""

    request: PaymentArgs
    authorise: PaymentArgs


@dataclass(frozen=True)
class ConfirmSteps:
    """``confirm_paid_order``: ``mark-payment-authorised``, then ``confirm-order``."""

    mark_authorised: OrderArgs
    confirm: OrderArgs


@dataclass(frozen=True)
class SettleSteps:
    """``settle_shipped_order``: ``capture-payment``, then ``commit-stock/{sku}`` per line."""

    capture: PaymentArgs
    commits: list[StockArgs] = field(default_factory=list)


@dataclass(frozen=True)
class ShipSteps:
    """``ship_and_settle_order``: ``ship-order``, then the steps of ``settle``."""

    ship: OrderArgs
    settle: SettleSteps


@dataclass(frozen=True)
class OrderLines:
    """``load_order_lines``: what a placed order holds now."""

    lines: list[Line]
    amount: Amount


@dataclass(frozen=True)
class AuthorisationResult:
    status: Literal["approved", "declined", "pending"]
    reason: str | None = None


# ------------------------------------------------------------------------- outcome


@dataclass
class FulfilmentOutcome:
    """How the saga ended: the run's result, whatever the status. When a
    compensation failed (``compensation_failures``) the run fails instead, with
    an ApplicationError of type ``CompensationFailed`` whose first detail is this."""

    status: OutcomeStatus
    reason: str | None = None
    tracking_number: str | None = None
    compensations: list[str] = field(default_factory=list)
    compensation_failures: list[str] = field(default_factory=list)


@dataclass
class FulfilmentStatus:
    """The answer of the ``status`` query."""

    order_id: str
    payment_id: str
    step: str
    completed_steps: list[str] = field(default_factory=list)
    compensations: list[str] = field(default_factory=list)
    outcome: FulfilmentOutcome | None = None
    payment_deadline: str | None = None
    """ISO 8601 UTC, while waiting for a pending authorisation."""
