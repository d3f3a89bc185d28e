"""The ``OrderFulfilment`` saga.

Forward steps (each an activity that sends one command through the command
handler)::

    reserve-stock/{sku} (every line)  ->  mark-stock-reserved  ->  request-payment
    ->  authorise-payment  [-> wait for the payment_result signal, with a deadline]
    ->  mark-payment-authorised  ->  confirm-order  ->  ship-order      (pivot)
    ->  capture-payment  ->  commit-stock/{sku}

Steps with nothing to decide between them run as one activity (a local one by
default), each command still under its own step name and idempotency key, so a
retried activity replays the commands already done. A shipped order runs four::

    reserve_and_mark_stock          reserve-stock/{sku} (every line), mark-stock-reserved
    request_and_authorise_payment   request-payment, authorise-payment
                                    [wait for the payment_result signal]
    confirm_paid_order              mark-payment-authorised, confirm-order
    ship_and_settle_order           ship-order (pivot), capture-payment, commit-stock/{sku}

(patches ``joined-steps``, then ``joined-reserve-and-ship`` for the first and
the last; runs recorded before either replay their steps as they ran). A
failure inside one names the step that failed, so the saga decides as if the
steps had run one by one: see :meth:`OrderFulfilment._reserve_first_round` and
:meth:`OrderFulfilment._ship_and_settle_joined`.

The customer may change the lines while the order is ``placed``, i.e. while the
saga reserves the lines of ``OrderPlaced``. ``mark-stock-reserved`` names the
lines reserved and the order decider refuses it (``LinesChanged``) unless they
are the order's lines; the saga then reads the current lines
(``load-order-lines/{n}``), reserves them (``reserve-stock/{n}/{sku}``: a new
quantity resizes the reservation, a held one is skipped) and marks again
(``mark-stock-reserved/{n}``), at most ``MAX_RESERVE_ROUNDS`` times. SKUs no
longer on the order are released (``release-stock/{sku}``) only once the order
accepted the mark, so a SKU dropped and added back is never lost to the
inventory's "released: do not reserve again" rule. A stock shortage is final
only for the order's current lines. Payment, capture and commit use the lines
and total the order accepted, not those of ``OrderPlaced``.

Each compensation is registered before its step runs; on a failure, a decline,
a missed deadline or the customer's cancellation they run in reverse:
``void-payment``, ``release-stock/{sku}``..., then the order is closed
(``reject-order`` when stock was short, ``cancel-order`` otherwise, nothing when
the customer already cancelled it). One exception: when ``ship-order`` failed
without saying whether it shipped, ``check-shipped`` cancels the order first
(unless it is shipped) and the close then finds it cancelled.

``ship-order`` is the pivot: once the parcel is on its way nothing is undone,
a late ``cancel`` signal is ignored (the order decider refuses it anyway) and
the remaining steps are retried until they succeed. From ``ship-order`` on, a
cancellation through Temporal (Web UI, CLI) is held off too: those steps run
shielded to their end and the saga completes ``shipped`` (the outcome's
``reason`` says the cancellation was ignored); only if ``ship-order`` itself
fails is the cancellation honoured (compensate, end *Canceled*).

Outcome: a business end is not a breakage. ``shipped``, ``rejected``,
``cancelled`` and ``compensated`` (every compensation ran) all *complete* the
workflow with the :class:`FulfilmentOutcome` as its result, and set the
``OrderOutcome`` search attribute to the status, so the Web UI lists them
Completed and filters them (``OrderOutcome="cancelled"``). The workflow *fails*
only when a human is needed: a compensation itself failed (``CompensationFailed``,
the outcome as its first detail) or a step past the pivot failed for good;
``OrderOutcome`` is then ``failed``. A cancellation through Temporal still ends
*Canceled* (an operator asked for it), after the compensations. The ``status``
query returns the step, the completed steps, the compensations run and the
outcome at any time.

Runs recorded before that (patch ``outcome-completes``) replay as they ran:
a compensated end failed them with ``FAILURE_TYPES[status]``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeVar

from temporalio import workflow
from temporalio.common import RetryPolicy
from temporalio.exceptions import ActivityError, ApplicationError, FailureError

with workflow.unsafe.imports_passed_through():
    from orderstream.sagas.fulfilment.activities import FulfilmentActivities
    from orderstream.sagas.fulfilment.inputs import (
        CANCELLED_BY,
        CHECK_SHIPPED,
        COMPENSATION_FAILED,
        ERR_ILLEGAL_TRANSITION,
        ERR_INSUFFICIENT_STOCK,
        ERR_LINES_CHANGED,
        ERR_NOT_FOUND,
        FAILED_STEP,
        FAILURE_TYPES,
        MAX_RESERVE_ROUNDS,
        ORDER_ID_ATTRIBUTE,
        ORDER_OUTCOME_ATTRIBUTE,
        QUERY_STATUS,
        SHIPPED,
        SIGNAL_CANCEL,
        SIGNAL_PAYMENT_RESULT,
        WORKFLOW_TYPE,
        Amount,
        AuthorisationResult,
        ConfirmSteps,
        FulfilmentInput,
        FulfilmentOutcome,
        FulfilmentStatus,
        Line,
        OrderArgs,
        OrderLines,
        OutcomeStatus,
        PaymentArgs,
        PaymentSteps,
        ReserveSteps,
        SettleSteps,
        ShipSteps,
        StepRef,
        StockArgs,
        tracking_number_for,
    )

A = TypeVar("A")
T = TypeVar("T")
Acts = FulfilmentActivities

TEMPORAL_CANCEL_REASON = "saga cancelled through Temporal"
PAYMENT_DEADLINE_CHECK = "payment-deadline-checks-the-payment"
"""``workflow.patched`` id of the ``payment-deadline`` step (see
:meth:`OrderFulfilment._payment_deadline_passed`)."""
JOINED_STEPS = "joined-steps"
"""``workflow.patched`` id of running adjacent steps as one local activity
(:meth:`OrderFulfilment._forward`); runs recorded before replay them one by one."""
JOINED_STEPS_2 = "joined-reserve-and-ship"
"""``workflow.patched`` id of two more joins: round 1 of the reservation
(:meth:`OrderFulfilment._reserve_first_round`) and ``ship-order`` with the steps
after it (:meth:`OrderFulfilment._ship_and_settle_joined`); runs recorded before
replay those steps as they ran."""
FENCED_SHIP_CHECK = "fenced-ship-check"
"""``workflow.patched`` id of ``check-shipped`` as a write (``cancel_unless_shipped``)
rather than a read (``load_order_status``); runs recorded before replay the read
(:meth:`OrderFulfilment._was_shipped`)."""
REJECT_FINDS_CANCELLED = "reject-finds-cancelled"
"""``workflow.patched`` id of ending ``cancelled`` when ``close-order`` went to
reject the order and found the customer had cancelled it (between the failed
reservation and the reject); runs recorded before end ``rejected`` there."""
OUTCOME_COMPLETES = "outcome-completes"
"""``workflow.patched`` id of ending every business outcome as a completed run
with the ``OrderOutcome`` search attribute (:meth:`OrderFulfilment._end`); runs
recorded before replay their failed end and set no attribute."""
FAILED = "failed"
"""``OrderOutcome`` of a run that needs a human (it fails)."""

# ---------------------------------------------------------------- policies (defined once)

STEP_TIMEOUT = timedelta(seconds=30)
"""start_to_close of every activity: one command, or one gateway call and one command."""

STEP_RETRY = RetryPolicy(
    initial_interval=timedelta(milliseconds=200),
    backoff_coefficient=2.0,
    maximum_interval=timedelta(seconds=10),
    maximum_attempts=8,
)
"""Forward steps before the pivot: transient errors are retried for about 25 s,
then the saga gives up and compensates. Final domain errors are never retried."""

MUST_COMPLETE_RETRY = RetryPolicy(
    initial_interval=timedelta(milliseconds=500),
    backoff_coefficient=2.0,
    maximum_interval=timedelta(seconds=60),
    maximum_attempts=0,
)
"""Compensations and the steps after the pivot: retried until they succeed;
only a final domain error stops them."""


class SagaAborted(Exception):
    """Internal: stop the forward steps and compensate."""

    def __init__(self, status: OutcomeStatus, reason: str) -> None:
        self.status = status
        self.reason = reason
        super().__init__(reason)


@dataclass(frozen=True)
class _Compensation:
    name: str
    run: Callable[[str], Awaitable[str]]
    """Called with the reason the saga aborted; returns a note for the status."""


def _failure(err: ActivityError) -> tuple[str | None, dict[str, Any]]:
    """``(type, details)`` of the ApplicationError behind an activity failure."""
    cause = err.cause
    if isinstance(cause, ApplicationError):
        first = cause.details[0] if cause.details else None
        return cause.type, first if isinstance(first, dict) else {}
    return None, {}


def failed_for_good_at(err: ActivityError, steps: Sequence[str]) -> int | None:
    """The index in ``steps`` (a joined activity's, in order) of the step whose
    final error (non-retryable) failed the activity; ``None`` for any other
    failure. After a final error no attempt of the activity got past that step:
    a step done in an earlier attempt answers from its idempotency record, it
    does not fail for good. After a transient one (the last attempt's, once the
    retry policy gave up) an earlier attempt may have got further."""
    cause = err.cause
    failed = _failure(err)[1].get(FAILED_STEP)
    if isinstance(cause, ApplicationError) and cause.non_retryable and failed in steps:
        return steps.index(failed)
    return None


def said_shipped(err: ActivityError) -> bool | None:
    """What a failure of ``ship_and_settle_order`` says of the shipment: ``True``
    when a step after ``ship-order`` failed (the order is shipped), ``False`` when
    ``ship-order`` itself failed for good (a final error: not shipped, in any
    attempt), ``None`` when it cannot tell: ``ship-order`` failed transiently on
    the last attempt (an earlier attempt may have shipped; or the append may
    have committed with its answer lost), or the activity gave no word at all
    (it timed out)."""
    shipped = _failure(err)[1].get(SHIPPED)
    if shipped is True:
        return True
    if shipped is False and failed_for_good_at(err, ["ship-order"]) == 0:
        return False
    return None


def _as_activity_error(fn: Callable[..., Any]) -> ActivityError:
    """A local activity's failure reaches the workflow as the bare error (an
    ``ApplicationError``, a timeout); a remote one's as an ``ActivityError``
    around it. The saga reads every step's failure one way, the latter: raise
    this ``from`` the bare error."""
    return ActivityError(
        f"local activity {fn.__name__} failed",
        scheduled_event_id=0,
        started_event_id=0,
        identity="",
        activity_type=fn.__name__,
        activity_id="",
        retry_state=None,
    )


def _in_round(step: str, round_: int) -> str:
    """Round 1 of the reservation keeps the plain step names; a later round puts
    its number after the step's kind (``reserve-stock/2/MUG``,
    ``mark-stock-reserved/2``), so its commands carry idempotency keys of their
    own (the same key would replay the earlier round's result)."""
    if round_ == 1:
        return step
    kind, slash, rest = step.partition("/")
    return f"{kind}/{round_}{slash}{rest}"


def _same_lines(left: Sequence[Line], right: Sequence[Line]) -> bool:
    return sorted((x.sku, x.quantity) for x in left) == sorted((x.sku, x.quantity) for x in right)


def _message(err: BaseException) -> str:
    cause = err.cause if isinstance(err, ActivityError) and err.cause is not None else err
    message = getattr(cause, "message", None)
    return message if isinstance(message, str) and message else str(cause)


@workflow.defn(name=WORKFLOW_TYPE)
class OrderFulfilment:
    @workflow.init
    def __init__(self, inp: FulfilmentInput) -> None:
        self._inp = inp
        self._state = FulfilmentStatus(order_id=inp.order_id, payment_id=inp.payment_id, step="starting")
        self._compensations: list[_Compensation] = []
        self._payment_result: str | None = None
        self._cancel_reason: str | None = None
        self._shipped = False
        self._cancel_held_off = False
        """A cancellation through Temporal arrived while :meth:`_shielded` steps ran."""
        self._abort_status: OutcomeStatus | None = None
        self._held: dict[str, int] = {}
        """SKU -> quantity reserved for the order so far (every round)."""
        self._joined_steps = False
        """Adjacent steps run as one local activity (set at the start of the run)."""
        self._joined_more = False
        """... and so do round 1 of the reservation, and ship + settle (:data:`JOINED_STEPS_2`)."""
        self._lines: list[Line] = list(inp.lines)
        self._amount: Amount = inp.amount
        """The lines and total the order accepted with ``mark-stock-reserved``
        (until then, those of ``OrderPlaced``): what is charged and committed."""

    # ------------------------------------------------------------------ handlers

    @workflow.signal(name=SIGNAL_PAYMENT_RESULT)
    def payment_result(self, status: str) -> None:
        """``authorised`` or ``declined``: the webhook's answer for a pending
        payment. The first result wins; later ones are ignored."""
        if status not in ("authorised", "declined"):
            workflow.logger.warning("ignoring payment_result %r", status)
        elif self._payment_result is None:
            self._payment_result = status

    @workflow.signal(name=SIGNAL_CANCEL)
    def cancel(self, reason: str) -> None:
        """The customer cancelled the order (``OrderCancelled`` was appended).
        After shipment the order decider refuses that, so a late signal is ignored."""
        if self._shipped:
            workflow.logger.info("order already shipped: ignoring cancel (%s)", reason)
        elif self._cancel_reason is None:
            self._cancel_reason = reason or "cancelled"

    @workflow.query(name=QUERY_STATUS)
    def status(self) -> FulfilmentStatus:
        return self._state

    # ---------------------------------------------------------------------- run

    @workflow.run
    async def run(self, inp: FulfilmentInput) -> FulfilmentOutcome:
        try:
            await self._forward()
        except SagaAborted as abort:
            return await self._compensate_and_end(abort.status, abort.reason)
        except ActivityError as err:
            if self._shipped:
                # Past the pivot nothing is undone: the workflow fails for an operator.
                self._end(FAILED)
                raise
            failure = f"{self._state.step} failed: {_message(err)}"
            return await self._compensate_and_end("compensated", failure)
        except asyncio.CancelledError:
            # Cancelled through Temporal (CLI, Web UI) before ship-order: undo, then
            # end as cancelled. (From ship-order on, the cancellation is held off.)
            outcome = await self._compensate("compensated", TEMPORAL_CANCEL_REASON)
            self._end(FAILED if outcome.compensation_failures else outcome.status)
            raise
        reason = None
        if self._cancel_held_off:
            reason = "cancellation through Temporal ignored: the order was shipped, nothing is undone"
        outcome = FulfilmentOutcome(status="shipped", reason=reason, tracking_number=self._tracking_number)
        self._finish(outcome)
        self._end(outcome.status)
        return outcome

    async def _forward(self) -> None:
        self._joined_steps = workflow.patched(JOINED_STEPS)
        self._joined_more = workflow.patched(JOINED_STEPS_2)
        # Closing the order is the last compensation, so it is registered first (after an
        # unclear ship-order the order is already closed by then: _was_shipped).
        self._register("close-order", self._close_order)

        await self._reserve_stock()

        self._register("void-payment", self._void_payment)
        if self._joined_steps:
            steps = PaymentSteps(
                self._payment_args("request-payment"), self._payment_args("authorise-payment")
            )
            answer = await self._step(
                "request-payment", Acts.request_and_authorise_payment, steps, also=["authorise-payment"]
            )
        else:
            step = "request-payment"
            await self._step(step, Acts.request_payment, self._payment_args(step))
            step = "authorise-payment"
            answer = await self._step(step, Acts.authorise_payment, self._payment_args(step))
        await self._payment_decision(answer)

        if self._joined_steps:
            confirm = ConfirmSteps(
                self._order_args("mark-payment-authorised"), self._order_args("confirm-order")
            )
            await self._step(
                "mark-payment-authorised", Acts.confirm_paid_order, confirm, also=["confirm-order"]
            )
        else:
            step = "mark-payment-authorised"
            await self._step(step, Acts.mark_payment_authorised, self._order_args(step))
            step = "confirm-order"
            await self._step(step, Acts.confirm_order, self._order_args(step))
        await self._shielded(self._ship_and_settle())

    async def _ship_and_settle(self) -> None:
        """The pivot and the steps that must follow it (run shielded)."""
        if self._joined_more:
            await self._ship_and_settle_joined()
            return
        step = "ship-order"
        await self._step(step, Acts.ship_order, self._order_args(step))

        self._pivot()
        if self._joined_steps:
            await self._settle(self._settle_steps())
            return
        step = "capture-payment"
        await self._step(step, Acts.capture_payment, self._payment_args(step), retry=MUST_COMPLETE_RETRY)
        for line in self._lines:
            step = f"commit-stock/{line.sku}"
            args = self._stock_args(step, line.sku)
            await self._step(step, Acts.commit_stock, args, retry=MUST_COMPLETE_RETRY)

    def _pivot(self) -> None:
        """The parcel is on its way: nothing is undone from here on."""
        self._shipped = True
        self._compensations.clear()

    def _settle_steps(self) -> SettleSteps:
        commits = [self._stock_args(f"commit-stock/{line.sku}", line.sku) for line in self._lines]
        return SettleSteps(self._payment_args("capture-payment"), commits)

    async def _settle(self, settle: SettleSteps) -> None:
        """Capture and commit, past the pivot: retried until they succeed."""
        also = [c.ref.step for c in settle.commits]
        await self._step(
            "capture-payment", Acts.settle_shipped_order, settle, retry=MUST_COMPLETE_RETRY, also=also
        )

    async def _ship_and_settle_joined(self) -> None:
        """``ship-order``, capture and commits as one activity (:data:`JOINED_STEPS_2`).

        The activity has the forward retry policy, the pivot's: if it fails for
        good before the order was shipped, the saga compensates as when
        ``ship-order`` ran alone. If it fails after (the capture or a commit
        failed past that policy, or for good), the order is shipped: the saga
        passes the pivot and settles with the separate ``settle_shipped_order``
        step and its retry-until-success policy, as before the join (a retry
        replays the steps already done: their commands answer from their
        idempotency records). Which of the two it was, the failure says
        (:func:`~orderstream.sagas.fulfilment.activities.at_step`,
        :func:`said_shipped`); when it cannot tell (``ship-order`` failed
        transiently on the last attempt, or the activity timed out), the order
        answers (``check-shipped``: cancelled unless shipped, :meth:`_was_shipped`).
        The whole runs in :meth:`_shielded`,
        so a cancellation through Temporal reaches none of these activities
        either."""
        ship = self._order_args("ship-order")
        settle = self._settle_steps()
        also = ["capture-payment", *(c.ref.step for c in settle.commits)]
        try:
            await self._step("ship-order", Acts.ship_and_settle_order, ShipSteps(ship, settle), also=also)
        except ActivityError as err:
            if not await self._was_shipped(err):
                raise
            workflow.logger.warning(
                "shipped, but settling failed (%s): settling on its own, retried until it succeeds",
                _message(err),
            )
            self._pivot()
            await self._settle(settle)
            return
        self._pivot()

    async def _was_shipped(self, err: ActivityError) -> bool:
        """Whether ``ship_and_settle_order`` shipped the order before it failed:
        from the failure (:func:`said_shipped`) or, when it cannot tell, from
        the order itself: ``cancel_unless_shipped`` cancels it unless it is
        shipped, so a ``ShipOrder`` of the failed activity that is still on its
        way (a stalled disk, another process's writer lock) cannot commit after
        the saga took "not shipped" for an answer and released the stock."""
        shipped = said_shipped(err)
        if shipped is not None:
            return shipped
        # Not through _step: a cancel signal must not stop this check.
        self._state.step = step = CHECK_SHIPPED
        if workflow.patched(FENCED_SHIP_CHECK):
            args = self._order_args(step, reason=f"ship-order failed: {_message(err)}")
            status = await self._call(Acts.cancel_unless_shipped, args, retry=MUST_COMPLETE_RETRY)
        else:  # recorded before: the read, which a late ShipOrder could still overtake
            args = self._order_args(step)
            status = await self._call(Acts.load_order_status, args, retry=MUST_COMPLETE_RETRY)
        self._state.completed_steps.append(step)
        if status == "shipped":
            if "ship-order" not in self._state.completed_steps:
                self._state.completed_steps.append("ship-order")
            return True
        self._state.step = "ship-order"  # what failed: the saga compensates
        return False

    async def _shielded(self, steps: Awaitable[None]) -> None:
        """Run ``steps`` to their end even if the workflow is cancelled through
        Temporal meanwhile (Web UI, CLI, ``handle.cancel()``).

        Once ``ship-order`` was sent, the order may be shipped: cancelling its
        activity would not stop the command, and undoing a shipped order is not
        possible. So the cancellation is not passed on to these steps' activities;
        they run on (capture and commit retried until they succeed) and the saga
        ends ``shipped``. Only if ``ship-order`` itself failed (the order is not
        shipped) is the held-off cancellation honoured: compensate, end cancelled.
        With ``ship_and_settle_order`` that is decided inside ``steps``
        (:meth:`_was_shipped`, ``check-shipped`` included) before they end, so
        ``_shipped`` is set by then whichever way the activity ended.
        """
        task = asyncio.ensure_future(steps)
        while True:
            try:
                await asyncio.shield(task)
                return
            except asyncio.CancelledError:
                if task.done():
                    raise  # the steps themselves were cancelled: nothing to hold off
                self._cancel_held_off = True
                workflow.logger.info(
                    "cancellation through Temporal during %s: held off until the steps end",
                    self._state.step,
                )
            except ActivityError:
                if self._cancel_held_off and not self._shipped:
                    raise asyncio.CancelledError(TEMPORAL_CANCEL_REASON) from None
                raise

    # ------------------------------------------------------------- stock reservation

    async def _reserve_stock(self) -> None:
        """Hold stock for the order's lines and have the order accept exactly
        those lines, re-reading them when the customer changed them meanwhile."""
        lines: Sequence[Line] = self._inp.lines
        amount = self._inp.amount
        for round_ in range(1, MAX_RESERVE_ROUNDS + 1):
            last = round_ == MAX_RESERVE_ROUNDS
            try:
                if await self._reserve_round(round_, lines):
                    break
            except SagaAborted as abort:
                # Short of stock (or an unknown product): final only when these are
                # still the order's lines; the customer may have changed them.
                if abort.status != "rejected" or last:
                    raise
                current = await self._load_lines(round_ + 1)
                if _same_lines(current.lines, lines):
                    raise
            else:
                if last:
                    raise SagaAborted(
                        "compensated",
                        f"the order's lines kept changing while stock was reserved ({round_} attempts)",
                    )
                current = await self._load_lines(round_ + 1)
            lines, amount = current.lines, current.amount
        self._lines, self._amount = list(lines), amount
        await self._release_dropped()

    async def _reserve_round(self, round_: int, lines: Sequence[Line]) -> bool:
        """Reserve ``lines`` and mark the stock reserved; ``False`` when the order
        refused the mark because its lines are no longer ``lines``."""
        if round_ == 1 and self._joined_more:
            return await self._reserve_first_round(lines)
        for line in lines:
            if self._held.get(line.sku) == line.quantity:
                continue  # held since an earlier round
            self._register_once(f"release-stock/{line.sku}", self._releaser(line.sku))
            step = _in_round(f"reserve-stock/{line.sku}", round_)
            args = self._stock_args(step, line.sku, quantity=line.quantity)
            await self._step(step, Acts.reserve_stock, args)
            self._held[line.sku] = line.quantity
        step = _in_round("mark-stock-reserved", round_)
        try:
            await self._step(step, Acts.mark_stock_reserved, self._order_args(step, lines=lines))
        except ActivityError as err:
            if _failure(err)[0] == ERR_LINES_CHANGED:
                return False
            raise
        return True

    async def _reserve_first_round(self, lines: Sequence[Line]) -> bool:
        """Round 1 as one activity, ``reserve_and_mark_stock`` (:data:`JOINED_STEPS_2`):
        every line's ``reserve-stock/{sku}``, then ``mark-stock-reserved``, each
        command under its own key. Every line's ``release-stock/{sku}`` is
        registered before it. When the activity fails for good at one of its
        steps, the lines before that step are held and the later ones were never
        tried: their compensations are dropped again, so the saga ends as when
        the steps ran one by one (same ``_held``, same compensations, same
        outcome). Any other failure compensates every line (a release of what
        is not held is a no-op)."""
        for line in lines:
            self._register_once(f"release-stock/{line.sku}", self._releaser(line.sku))
        reserves = [
            self._stock_args(f"reserve-stock/{line.sku}", line.sku, quantity=line.quantity) for line in lines
        ]
        mark = self._order_args("mark-stock-reserved", lines=lines)
        names = [r.ref.step for r in reserves] + [mark.ref.step]
        try:
            steps = ReserveSteps(reserves, mark)
            await self._step(names[0], Acts.reserve_and_mark_stock, steps, also=names[1:])
        except (ActivityError, SagaAborted) as exc:
            err = exc if isinstance(exc, ActivityError) else exc.__cause__
            if err is None:  # the customer cancelled before it started: nothing tried
                self._reserved_before(lines, 0)
            elif isinstance(err, ActivityError):
                # Only a final error tells how far every attempt got; after a
                # transient one the saga compensates every line registered.
                done = failed_for_good_at(err, names)
                if done is not None:
                    self._reserved_before(lines, done)
                if _failure(err)[0] == ERR_LINES_CHANGED and exc is err:
                    return False
            raise
        self._reserved_before(lines, len(lines))
        return True

    def _reserved_before(self, lines: Sequence[Line], done: int) -> None:
        """Round 1 reserved ``lines[:done]`` and stopped there (or before the
        mark: ``done == len(lines)``); the lines after the one that failed were
        not tried, so what compensates them goes (the steps one by one
        registered a line's release just before its reservation)."""
        for line in lines[:done]:
            self._held[line.sku] = line.quantity
        untried = {f"release-stock/{line.sku}" for line in lines[done + 1 :]}
        self._compensations = [c for c in self._compensations if c.name not in untried]

    async def _load_lines(self, round_: int) -> OrderLines:
        step = _in_round("load-order-lines", round_)
        return await self._step(step, Acts.load_order_lines, self._order_args(step))

    async def _release_dropped(self) -> None:
        """Give back what earlier rounds held for SKUs no longer on the order.
        Only now: the order's lines are fixed once it is ``stock_reserved``."""
        wanted = {line.sku for line in self._lines}
        for comp in [c for c in self._compensations if c.name.startswith("release-stock/")]:
            sku = comp.name.removeprefix("release-stock/")
            if sku in wanted:
                continue
            if sku in self._held:
                reason = "no longer on the order (its lines changed)"
                args = self._stock_args(comp.name, sku, reason=reason)
                await self._step(comp.name, Acts.release_stock, args)
                del self._held[sku]
            self._compensations.remove(comp)

    # --------------------------------------------------------------------- steps

    @property
    def _tracking_number(self) -> str:
        return tracking_number_for(workflow.info().workflow_id)

    def _ref(self, step: str) -> StepRef:
        inp = self._inp
        return StepRef(workflow.info().workflow_id, step, inp.correlation_id, inp.causation_id)

    def _stock_args(self, step: str, sku: str, *, quantity: int = 0, reason: str = "") -> StockArgs:
        return StockArgs(self._ref(step), self._inp.order_id, sku, quantity=quantity, reason=reason)

    def _order_args(self, step: str, *, reason: str = "", lines: Sequence[Line] = ()) -> OrderArgs:
        inp = self._inp
        return OrderArgs(
            self._ref(step),
            inp.order_id,
            lines=list(lines),
            payment_id=inp.payment_id,
            tracking_number=self._tracking_number,
            reason=reason,
        )

    def _payment_args(self, step: str, *, reason: str = "") -> PaymentArgs:
        inp = self._inp
        return PaymentArgs(
            self._ref(step),
            inp.payment_id,
            inp.order_id,
            self._amount,
            payment_method_id=inp.payment_method_id,
            reason=reason,
        )

    async def _call(
        self, fn: Callable[[Any, A], Awaitable[T]], args: A, *, retry: RetryPolicy = STEP_RETRY
    ) -> T:
        """One step: a local activity when the input asks for it (the trigger's
        default), else a remote one.

        A local activity runs in the worker that holds the workflow task and is
        recorded as a marker, instead of a schedule/start/complete round trip
        through the server per step. The 9 to 10 steps of an order were about 40
        server requests, which made the Temporal server the sagas' ceiling
        (docs/sagas.md). The price: the ``status`` query and Temporal's
        cancellation see the run only between workflow tasks, i.e. after a
        chain of quick steps rather than between any two of them."""
        if self._inp.local_steps:
            try:
                return await workflow.execute_local_activity_method(
                    fn, args, start_to_close_timeout=STEP_TIMEOUT, retry_policy=retry
                )
            except ActivityError:
                raise
            except FailureError as err:
                raise _as_activity_error(fn) from err
        return await workflow.execute_activity_method(
            fn, args, start_to_close_timeout=STEP_TIMEOUT, retry_policy=retry
        )

    async def _step(
        self,
        name: str,
        fn: Callable[[Any, A], Awaitable[T]],
        args: A,
        *,
        retry: RetryPolicy = STEP_RETRY,
        also: Sequence[str] = (),
    ) -> T:
        """Run one forward step, unless the customer cancelled meanwhile.

        ``also``: the further steps the same activity runs after ``name`` (joined
        steps, see :data:`JOINED_STEPS`); they are completed with it. When such
        an activity fails naming the step that failed (:data:`FAILED_STEP`), the
        steps before that one are completed, and the failure is that step's."""
        self._check_cancelled()
        self._state.step = name
        try:
            result = await self._call(fn, args, retry=retry)
        except ActivityError as err:
            kind, details = _failure(err)
            steps = [name, *also]
            failed = details.get(FAILED_STEP)
            if also and isinstance(failed, str) and failed in steps:
                self._completed(steps[: steps.index(failed)])
                self._state.step = failed
            shipped = self._shipped or details.get(SHIPPED) is True
            # The customer's cancellation landed before its signal reached us; unless it was
            # this saga's own check-shipped (a run re-executing after it): a failed ship-order.
            cancelled = kind == ERR_ILLEGAL_TRANSITION and details.get("status") == "cancelled"
            if cancelled and not shipped and details.get(CANCELLED_BY) != CHECK_SHIPPED:
                raise SagaAborted("cancelled", self._cancelled_reason()) from err
            reserving = self._state.step.startswith("reserve-stock/")
            if kind in (ERR_INSUFFICIENT_STOCK, ERR_NOT_FOUND) and reserving:
                raise SagaAborted("rejected", _message(err)) from err
            raise
        self._completed([name, *also])
        return result

    def _completed(self, steps: Sequence[str]) -> None:
        """Record ``steps`` as completed, once each: a joined activity that failed part way
        reported the steps before its failure, and the step that finishes its work (e.g.
        ``settle_shipped_order`` after ``ship_and_settle_order``) runs some of them again."""
        done = self._state.completed_steps
        done += [step for step in steps if step not in done]

    def _check_cancelled(self) -> None:
        if self._cancel_reason is not None and not self._shipped:
            raise SagaAborted("cancelled", self._cancelled_reason())

    def _cancelled_reason(self) -> str:
        """The order's cancel reason, which the API makes say who cancelled when the
        caller gave none (the saga cannot tell a customer's cancel from support's)."""
        reason = self._cancel_reason or "cancelled"
        return reason if reason.startswith("cancelled") else f"cancelled: {reason}"

    async def _payment_decision(self, answer: AuthorisationResult) -> None:
        if answer.status == "approved":
            return
        if answer.status == "declined":
            raise SagaAborted("compensated", f"payment declined: {answer.reason or 'declined'}")
        # Pending: the webhook's result arrives as the payment_result signal.
        seconds = self._inp.payment_deadline_seconds
        self._state.step = "await-payment-result"
        self._state.payment_deadline = (workflow.now() + timedelta(seconds=seconds)).isoformat()
        try:
            await workflow.wait_condition(
                lambda: self._payment_result is not None or self._cancel_reason is not None,
                timeout=timedelta(seconds=seconds),
                timeout_summary="payment-deadline",
            )
        except TimeoutError:
            await self._payment_deadline_passed(seconds)
        finally:
            self._state.payment_deadline = None
        self._check_cancelled()
        if self._payment_result == "declined":
            raise SagaAborted("compensated", "payment declined (webhook)")
        self._state.completed_steps.append("await-payment-result")

    async def _payment_deadline_passed(self, seconds: float) -> None:
        """No result reached the saga in time; but the payment's stream decides.

        The webhook records the provider's answer on the payment and the trigger
        forwards it as a signal; while Temporal was unreachable the signal may
        still be on its way when the timer fires. ``payment-deadline`` voids the
        payment only if it is still ``requested``, in the payment decider (one
        revision: no gap between the check and the void); an authorisation (or
        decline) recorded meanwhile wins and the saga goes on with it.

        Runs that reached their deadline before this step existed replay without
        it (``workflow.patched``)."""
        reason = f"payment deadline passed: not authorised within {seconds:g} s"
        if not workflow.patched(PAYMENT_DEADLINE_CHECK):
            raise SagaAborted("compensated", reason)
        step = "payment-deadline"
        recorded = await self._step(step, Acts.expire_payment, self._payment_args(step, reason=reason))
        if recorded not in ("authorised", "declined"):
            raise SagaAborted("compensated", reason)
        workflow.logger.info("payment deadline passed, but the payment was %s meanwhile", recorded)
        self._payment_result = self._payment_result or recorded

    # ------------------------------------------------------------- compensations

    def _register(self, name: str, run: Callable[[str], Awaitable[str]]) -> None:
        self._compensations.append(_Compensation(name, run))

    def _register_once(self, name: str, run: Callable[[str], Awaitable[str]]) -> None:
        if all(comp.name != name for comp in self._compensations):
            self._register(name, run)

    def _releaser(self, sku: str) -> Callable[[str], Awaitable[str]]:
        async def release(reason: str) -> str:
            args = self._stock_args(f"release-stock/{sku}", sku, reason=reason)
            return await self._call(Acts.release_stock, args, retry=MUST_COMPLETE_RETRY)

        return release

    async def _void_payment(self, reason: str) -> str:
        args = self._payment_args("void-payment", reason=reason)
        return await self._call(Acts.void_payment, args, retry=MUST_COMPLETE_RETRY)

    async def _close_order(self, reason: str) -> str:
        if self._abort_status == "cancelled":
            return "already cancelled"
        if self._abort_status == "rejected":
            args = self._order_args("reject-order", reason=reason)
            return await self._call(Acts.reject_order, args, retry=MUST_COMPLETE_RETRY)
        args = self._order_args("cancel-order", reason=reason)
        return await self._call(Acts.cancel_order, args, retry=MUST_COMPLETE_RETRY)

    async def _compensate(self, status: OutcomeStatus, reason: str) -> FulfilmentOutcome:
        """Run the registered compensations in reverse. A failing one is recorded
        and the others still run."""
        self._abort_status = status
        outcome = FulfilmentOutcome(status=status, reason=reason)
        self._state.step = "compensating"
        for comp in reversed(self._compensations):
            try:
                note = await comp.run(reason)
            except ActivityError as err:
                workflow.logger.error("compensation %s failed: %s", comp.name, _message(err))
                outcome.compensation_failures.append(f"{comp.name}: {_message(err)}")
                continue
            entry = f"{comp.name}: {note}" if note else comp.name
            self._state.compensations.append(entry)
            outcome.compensations.append(entry)
            if self._cancelled_before_reject(comp.name, note, outcome):
                outcome.status, outcome.reason = "cancelled", self._cancelled_reason()
        self._compensations.clear()
        self._finish(outcome)
        return outcome

    def _cancelled_before_reject(self, step: str, note: str | None, outcome: FulfilmentOutcome) -> bool:
        """``close-order`` went to reject the order and found it cancelled: the
        customer's cancel landed between the failed reservation and the reject (its
        signal not yet here), so the run ends as the order did, ``cancelled``. Only
        after a rejection: the saga itself never cancels before it rejects, while
        after a failed ship its own ``check-shipped`` may have cancelled the order."""
        return (
            step == "close-order"
            and note == "already cancelled"
            and outcome.status == "rejected"
            and workflow.patched(REJECT_FINDS_CANCELLED)
        )

    async def _compensate_and_end(self, status: OutcomeStatus, reason: str) -> FulfilmentOutcome:
        """Compensate; then complete with the outcome, unless a compensation
        failed (a human must finish it): then fail with ``CompensationFailed``."""
        outcome = await self._compensate(status, reason)
        status, reason = outcome.status, outcome.reason or reason  # a reject may find the order cancelled
        completes = self._end(FAILED if outcome.compensation_failures else status)
        if completes and not outcome.compensation_failures:
            return outcome
        kind = COMPENSATION_FAILED if outcome.compensation_failures else FAILURE_TYPES[status]
        raise ApplicationError(
            f"order {self._inp.order_id} {status}: {reason}", outcome, type=kind, non_retryable=True
        )

    def _end(self, order_outcome: str) -> bool:
        """Record how the run ends in the ``OrderOutcome`` search attribute.
        Returns whether this run ends business outcomes as completed runs
        (``False`` while replaying a run recorded before, see :data:`OUTCOME_COMPLETES`).

        Set only when the run was started with the saga's search attributes
        (``OrderId`` among them): the trigger sets them only once the cluster has
        them registered, and an unregistered attribute would fail every workflow
        task of the run."""
        if not workflow.patched(OUTCOME_COMPLETES):
            return False
        if workflow.info().typed_search_attributes.get(ORDER_ID_ATTRIBUTE) is not None:
            workflow.upsert_search_attributes([ORDER_OUTCOME_ATTRIBUTE.value_set(order_outcome)])
        return True

    def _finish(self, outcome: FulfilmentOutcome) -> None:
        self._state.outcome = outcome
        self._state.step = outcome.status
