"""The saga's activities: each sends one command through :class:`UseCases`.

Idempotency: every command carries ``CommandContext(idempotency_key=
f"{workflow_id}/{step}")``. The command handler derives the event ids from the
key and answers a replayed key with the earlier result, so an activity that is
retried after its events were appended (worker crash, lost completion) appends
nothing twice. The gateway calls are keyed by the payment id.

Errors: a broken business rule is final, so it becomes a non-retryable
``ApplicationError`` whose ``type`` the workflow matches (``InsufficientStock``,
``IllegalTransition``, ``NotFound``, ``LinesChanged``, ``DomainError``) with the
facts in its details. Anything else (event store down, lost write races,
gateway outage) propagates and is retried by the activity's retry policy.

Joined steps: some activities run several steps in a row, each command under
its own step's key (a retry replays the ones done); a failure names its step
(:func:`at_step`).

Reads: ``load_order_lines`` folds the order's stream through the command
handler (no read model, so no projection lag); reading is idempotent by nature.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Awaitable, Callable, Sequence
from datetime import datetime
from typing import Any, TypeVar

from temporalio import activity
from temporalio.exceptions import ApplicationError

from orderstream.application.commands import CommandContext
from orderstream.application.use_cases import UseCases
from orderstream.domain import orders, payments
from orderstream.domain.common import DomainError, IllegalTransition, Money, NotFound
from orderstream.domain.inventory import InsufficientStock
from orderstream.sagas.fulfilment.inputs import (
    CANCELLED_BY,
    CHECK_SHIPPED,
    ERR_DOMAIN,
    ERR_ILLEGAL_TRANSITION,
    ERR_INSUFFICIENT_STOCK,
    ERR_LINES_CHANGED,
    ERR_NOT_FOUND,
    FAILED_STEP,
    SAGA_ACTOR,
    SHIPPED,
    Amount,
    AuthorisationResult,
    ConfirmSteps,
    Line,
    OrderArgs,
    OrderLines,
    PaymentArgs,
    PaymentSteps,
    ReserveSteps,
    SettleSteps,
    ShipSteps,
    StepRef,
    StockArgs,
)
from orderstream.sagas.fulfilment.payment_gateway import PaymentGateway


def context_for(ref: StepRef) -> CommandContext:
    return CommandContext(
        actor=SAGA_ACTOR,
        correlation_id=ref.correlation_id,
        causation_id=ref.causation_id,
        idempotency_key=ref.idempotency_key,
    )


def final_error(exc: DomainError) -> ApplicationError:
    """The non-retryable ApplicationError for a broken business rule."""
    details: dict[str, Any] = {"code": exc.code}
    match exc:
        case InsufficientStock():
            kind = ERR_INSUFFICIENT_STOCK
            details |= {"sku": exc.sku, "requested": exc.requested, "available": exc.available}
        case IllegalTransition():
            kind = ERR_ILLEGAL_TRANSITION
            details |= {"status": exc.status, "action": exc.action}
        case NotFound():
            kind = ERR_NOT_FOUND
            details |= {"what": exc.what, "id": exc.ident}
        case orders.LinesChanged():
            kind = ERR_LINES_CHANGED
            details |= {
                "reserved": [{"sku": x.sku, "quantity": x.quantity} for x in exc.reserved],
                "current": [{"sku": x.sku, "quantity": x.quantity} for x in exc.current],
            }
        case _:
            kind = ERR_DOMAIN
    return ApplicationError(str(exc), details, type=kind, non_retryable=True)


def at_step(exc: Exception, step: str, **facts: Any) -> ApplicationError:
    """``exc``, the failure of ``step`` within an activity that runs several
    steps, with the step (and ``facts``) added to its details: same message,
    same type (an ``ApplicationError``'s, else the exception's class name, as
    the SDK would report it), same retryability. The workflow learns from it
    which steps before ``step`` were done (:data:`FAILED_STEP`)."""
    if isinstance(exc, ApplicationError):
        first = exc.details[0] if exc.details and isinstance(exc.details[0], dict) else {}
        details = {**first, FAILED_STEP: step, **facts}
        return ApplicationError(exc.message, details, type=exc.type, non_retryable=exc.non_retryable)
    return ApplicationError(str(exc), {FAILED_STEP: step, **facts}, type=type(exc).__name__)


T = TypeVar("T")


async def _in_step(step: str, call: Awaitable[T], **facts: Any) -> T:
    try:
        return await call
    except Exception as exc:
        raise at_step(exc, step, **facts) from exc


def _money(amount: Amount) -> Money:
    return Money(amount.amount, amount.currency)


class FulfilmentActivities:
    """Built once by the worker's composition root with the real dependencies."""

    def __init__(self, use_cases: UseCases, gateway: PaymentGateway) -> None:
        self.use_cases = use_cases
        self.gateway = gateway

    def _now(self) -> datetime:
        return self.use_cases.handler.clock()

    def all(self) -> Sequence[Callable[..., Any]]:
        """The bound activity methods, for ``Worker(activities=...)``."""
        return [
            self.reserve_stock,
            self.release_stock,
            self.commit_stock,
            self.load_order_lines,
            self.cancel_unless_shipped,
            self.mark_stock_reserved,
            self.mark_payment_authorised,
            self.confirm_order,
            self.ship_order,
            self.reject_order,
            self.cancel_order,
            self.request_payment,
            self.authorise_payment,
            self.void_payment,
            self.expire_payment,
            self.capture_payment,
            self.request_and_authorise_payment,
            self.confirm_paid_order,
            self.settle_shipped_order,
            self.reserve_and_mark_stock,
            self.ship_and_settle_order,
            self.load_order_status,
        ]

    # ----------------------------------------------------------------- inventory

    @activity.defn(name="reserve_stock")
    async def reserve_stock(self, args: StockArgs) -> None:
        try:
            await self.use_cases.reserve_stock(args.sku, args.order_id, args.quantity, context_for(args.ref))
        except DomainError as exc:
            raise final_error(exc) from exc

    @activity.defn(name="release_stock")
    async def release_stock(self, args: StockArgs) -> str:
        """Compensation; releasing what is not held is a no-op.

        A replayed key (a retry after the release was appended, e.g. the worker
        died before reporting it) appends nothing, but the release did happen:
        a release with nothing held appends only the inventory's guard (quantity 0)."""
        try:
            result = await self.use_cases.release_stock(
                args.sku, args.order_id, args.reason, context_for(args.ref)
            )
        except NotFound:
            return "nothing reserved (unknown product)"
        except DomainError as exc:
            raise final_error(exc) from exc
        if result.replayed:
            return "released (replayed)"
        # A release of nothing held appends StockReleased(quantity=0): the
        # inventory's guard against a late reservation for this order.
        return "released" if any(event.quantity for event in result.appended) else "nothing reserved"

    @activity.defn(name="commit_stock")
    async def commit_stock(self, args: StockArgs) -> None:
        try:
            await self.use_cases.commit_stock(args.sku, args.order_id, context_for(args.ref))
        except DomainError as exc:
            raise final_error(exc) from exc

    # -------------------------------------------------------------------- orders

    async def _order(self, command: orders.OrderCommand, ref: StepRef) -> None:
        try:
            await self.use_cases.order_command(command, context_for(ref))
        except DomainError as exc:
            raise final_error(exc) from exc

    @activity.defn(name="load_order_lines")
    async def load_order_lines(self, args: OrderArgs) -> OrderLines:
        """The lines and total of the order as it stands (read through the command
        handler, from the event store: no read model lag). Only a ``placed``
        order's lines are worth reserving; any other status is a final
        ``IllegalTransition`` (``cancelled`` is how the saga learns of a
        cancellation that beat its signal)."""
        loaded = await self.use_cases.handler.load(orders.decider, orders.stream_name(args.order_id))
        state = loaded.state
        try:
            if state.status is None:
                raise NotFound("order", args.order_id)
            if state.status != "placed" or state.total is None:
                raise IllegalTransition(state.status, "reserve stock for the order's lines")
        except DomainError as exc:
            raise final_error(exc) from exc
        return OrderLines(
            lines=[Line(line.sku, line.quantity) for line in state.lines],
            amount=Amount(state.total.amount, state.total.currency),
        )

    @activity.defn(name="load_order_status")
    async def load_order_status(self, args: OrderArgs) -> str:
        """The order's status as its stream has it (``shipped``, ...): how the
        saga learned whether ``ship_and_settle_order`` shipped the order when
        that activity's failure could not tell, before :meth:`cancel_unless_shipped`
        (runs recorded then still call it when they replay, ``fenced-ship-check``)."""
        loaded = await self.use_cases.handler.load(orders.decider, orders.stream_name(args.order_id))
        return loaded.state.status or "unknown"

    @activity.defn(name="cancel_unless_shipped")
    async def cancel_unless_shipped(self, args: OrderArgs) -> str:
        """Whether the order was shipped, answered by a write: ``CancelOrder``, which
        the order refuses once it is shipped. Returns ``shipped``, or the closed
        status the order is left in (``cancelled``, or ``rejected`` if it was
        already). Once it answered anything but ``shipped``, no ``ShipOrder`` still
        on its way (queued behind a stalled disk, say) can pass: the order is closed.
        A read (``load_order_status``) could say "not shipped" just before such a
        ``ShipOrder`` committed, and the saga would then release a shipped order."""
        cmd = orders.CancelOrder(order_id=args.order_id, reason=args.reason, now=self._now())
        try:
            result = await self.use_cases.order_command(cmd, context_for(args.ref))
        except IllegalTransition as exc:
            if exc.status in ("shipped", "cancelled", "rejected"):
                return exc.status
            raise final_error(exc) from exc
        except DomainError as exc:
            raise final_error(exc) from exc
        return result.state.status or "unknown"

    @activity.defn(name="mark_stock_reserved")
    async def mark_stock_reserved(self, args: OrderArgs) -> None:
        """Refused with the final ``LinesChanged`` error when ``args.lines`` are no
        longer the order's lines."""
        lines = tuple(orders.StockLine(sku=line.sku, quantity=line.quantity) for line in args.lines)
        cmd = orders.MarkStockReserved(order_id=args.order_id, lines=lines, now=self._now())
        await self._order(cmd, args.ref)

    @activity.defn(name="mark_payment_authorised")
    async def mark_payment_authorised(self, args: OrderArgs) -> None:
        cmd = orders.MarkPaymentAuthorised(
            order_id=args.order_id, payment_id=args.payment_id, now=self._now()
        )
        await self._order(cmd, args.ref)

    @activity.defn(name="confirm_order")
    async def confirm_order(self, args: OrderArgs) -> None:
        await self._order(orders.ConfirmOrder(order_id=args.order_id, now=self._now()), args.ref)

    @activity.defn(name="ship_order")
    async def ship_order(self, args: OrderArgs) -> None:
        """Refused with ``IllegalTransition`` once the order is closed; when this saga's
        own ``check-shipped`` cancelled it, the details say so (:data:`CANCELLED_BY`):
        a run that re-executes after its check (a worker crash, a workflow task the
        server refused) must not take that cancellation for the customer's."""
        cmd = orders.ShipOrder(order_id=args.order_id, tracking_number=args.tracking_number, now=self._now())
        try:
            await self.use_cases.order_command(cmd, context_for(args.ref))
        except IllegalTransition as exc:
            refused = final_error(exc)
            if exc.status == "cancelled" and await self._checked_by_this_saga(args):
                details = {**refused.details[0], CANCELLED_BY: CHECK_SHIPPED}
                refused = ApplicationError(refused.message, details, type=refused.type, non_retryable=True)
            raise refused from exc
        except DomainError as exc:
            raise final_error(exc) from exc

    async def _checked_by_this_saga(self, args: OrderArgs) -> bool:
        """Whether this saga's ``check-shipped`` wrote on the order: its idempotency
        record is there, or (KurrentDB, after a crash between its two writes) its
        event's metadata carries the key."""
        key = dataclasses.replace(args.ref, step=CHECK_SHIPPED).idempotency_key
        stream = orders.stream_name(args.order_id)
        return await self.use_cases.handler.find_idempotency(SAGA_ACTOR, key, stream) is not None

    async def _close(self, command: orders.RejectOrder | orders.CancelOrder, ref: StepRef) -> str:
        """Reject or cancel; an order already closed by someone else is left as it is."""
        try:
            result = await self.use_cases.order_command(command, context_for(ref))
        except IllegalTransition as exc:
            if exc.status in ("cancelled", "rejected"):
                return f"already {exc.status}"
            raise final_error(exc) from exc
        except DomainError as exc:
            raise final_error(exc) from exc
        return result.state.status or "unknown"

    @activity.defn(name="reject_order")
    async def reject_order(self, args: OrderArgs) -> str:
        cmd = orders.RejectOrder(order_id=args.order_id, reason=args.reason, now=self._now())
        return await self._close(cmd, args.ref)

    @activity.defn(name="cancel_order")
    async def cancel_order(self, args: OrderArgs) -> str:
        cmd = orders.CancelOrder(order_id=args.order_id, reason=args.reason, now=self._now())
        return await self._close(cmd, args.ref)

    # ------------------------------------------------------------------ payments

    async def _payment(self, command: payments.PaymentCommand, ref: StepRef) -> payments.Payment:
        try:
            return (await self.use_cases.payment_command(command, context_for(ref))).state
        except DomainError as exc:
            raise final_error(exc) from exc

    @activity.defn(name="request_payment")
    async def request_payment(self, args: PaymentArgs) -> None:
        cmd = payments.RequestPayment(
            payment_id=args.payment_id,
            order_id=args.order_id,
            amount=_money(args.amount),
            payment_method_id=args.payment_method_id,
            now=self._now(),
        )
        await self._payment(cmd, args.ref)

    @activity.defn(name="authorise_payment")
    async def authorise_payment(self, args: PaymentArgs) -> AuthorisationResult:
        """Ask the gateway, then record its answer (approved / declined) on the
        payment stream. ``pending`` records nothing: the webhook will."""
        answer = await self.gateway.authorise(args.payment_id, _money(args.amount), args.payment_method_id)
        now = self._now()
        if answer.status == "approved":
            code = answer.authorisation_code or "approved"
            cmd: payments.PaymentCommand = payments.AuthorisePayment(
                payment_id=args.payment_id, authorisation_code=code, now=now
            )
            await self._payment(cmd, args.ref)
        elif answer.status == "declined":
            reason = answer.reason or "declined"
            cmd = payments.DeclinePayment(payment_id=args.payment_id, reason=reason, now=now)
            await self._payment(cmd, args.ref)
        return AuthorisationResult(answer.status, answer.reason)

    @activity.defn(name="void_payment")
    async def void_payment(self, args: PaymentArgs) -> str:
        """Compensation: record the void, then give the hold back at the gateway.
        A payment never requested, declined or already voided needs nothing."""
        cmd = payments.VoidPayment(payment_id=args.payment_id, reason=args.reason, now=self._now())
        try:
            state = (await self.use_cases.payment_command(cmd, context_for(args.ref))).state
        except NotFound:
            return "no payment requested"
        except DomainError as exc:
            raise final_error(exc) from exc
        if state.status != "voided":
            return f"nothing to void ({state.status})"
        await self.gateway.void(args.payment_id)
        return "voided"

    @activity.defn(name="expire_payment")
    async def expire_payment(self, args: PaymentArgs) -> str:
        """The payment deadline passed: void the payment unless a result was
        recorded while the saga waited (the webhook's, whose signal did not reach
        the saga, e.g. while Temporal was down). Returns the payment's status
        afterwards: ``authorised`` or ``declined`` (that result stands) or
        ``voided``. Read back from the stream, so a retry after the void was
        appended answers the same."""
        cmd = payments.ExpirePayment(payment_id=args.payment_id, reason=args.reason, now=self._now())
        await self._payment(cmd, args.ref)
        loaded = await self.use_cases.handler.load(payments.decider, payments.stream_name(args.payment_id))
        return loaded.state.status or "unknown"

    @activity.defn(name="capture_payment")
    async def capture_payment(self, args: PaymentArgs) -> None:
        await self.gateway.capture(args.payment_id, _money(args.amount))
        cmd = payments.CapturePayment(payment_id=args.payment_id, now=self._now())
        await self._payment(cmd, args.ref)

    # ------------------------------------------------- steps run as one activity
    # Each is the steps above in order, with their own keys: a retry replays the
    # ones already done (their commands answer from the idempotency records).
    # One local activity instead of two or three is one workflow activation and
    # one activity round trip in the worker instead of several (docs/sagas.md).

    @activity.defn(name="request_and_authorise_payment")
    async def request_and_authorise_payment(self, args: PaymentSteps) -> AuthorisationResult:
        await self.request_payment(args.request)
        return await self.authorise_payment(args.authorise)

    @activity.defn(name="confirm_paid_order")
    async def confirm_paid_order(self, args: ConfirmSteps) -> None:
        await self.mark_payment_authorised(args.mark_authorised)
        await self.confirm_order(args.confirm)

    @activity.defn(name="settle_shipped_order")
    async def settle_shipped_order(self, args: SettleSteps) -> None:
        await self.capture_payment(args.capture)
        for commit in args.commits:
            await self.commit_stock(commit)

    # Since patch ``joined-reserve-and-ship``. A failure of one of their steps
    # names that step in its details (:func:`at_step`), so that the workflow
    # knows which steps before it were done.

    @activity.defn(name="reserve_and_mark_stock")
    async def reserve_and_mark_stock(self, args: ReserveSteps) -> None:
        """Round 1 of the reservation: every line's ``reserve-stock/{sku}``, then
        ``mark-stock-reserved`` (refused with ``LinesChanged`` when the lines
        changed meanwhile; every line is held then)."""
        for reserve in args.reserves:
            await _in_step(reserve.ref.step, self.reserve_stock(reserve))
        await _in_step(args.mark.ref.step, self.mark_stock_reserved(args.mark))

    @activity.defn(name="ship_and_settle_order")
    async def ship_and_settle_order(self, args: ShipSteps) -> None:
        """``ship-order`` (the pivot), then ``settle_shipped_order``'s steps. Every
        failure says whether this attempt got past ``ship-order`` (:data:`SHIPPED`):
        the workflow settles when it did, compensates when ``ship-order`` failed
        for good, and asks the order otherwise (``check-shipped``)."""
        await _in_step(args.ship.ref.step, self.ship_order(args.ship), **{SHIPPED: False})
        settle = args.settle
        await _in_step(settle.capture.ref.step, self.capture_payment(settle.capture), **{SHIPPED: True})
        for commit in settle.commits:
            await _in_step(commit.ref.step, self.commit_stock(commit), **{SHIPPED: True})
