"""The saga's HTTP surface: the payment provider's webhook, and the fulfilment
status of an order.

:meth:`FulfilmentSaga.route_handlers <orderstream.sagas.fulfilment.saga.FulfilmentSaga.route_handlers>`
mounts :class:`FulfilmentController` with two dependencies of the saga: its
``payment_gateway`` and its ``fulfilment_client`` (the
:class:`~orderstream.sagas.fulfilment.client.FulfilmentClient`; 503 while the
process has no Temporal connection).

The webhook appends ``PaymentAuthorised`` / ``PaymentDeclined`` through the
payment decider; the saga trigger turns that event into the workflow's
``payment_result`` signal. The event store stays the source of truth, and the
webhook works (and is recorded) even while Temporal is down.

The webhook takes no bearer token: the provider is not one of our users. Its
guard, :func:`require_webhook_signature`, checks the ``Orderstream-Signature``
header over the raw body (``application/webhook_signature.py``) before anything
decodes it. The signature covers the body, not the URL, so the body names its
payment (``payment_id``) and a delivery sent to another payment's URL is a 422.
The provider's ``event_id`` is the command's idempotency key, so a delivery
repeated (by the provider, or by someone who captured it) is answered as the
first one was and appends nothing: the key is recorded in the same append as the
effect.

An authorisation for a payment the saga already voided (the webhook came after
the payment deadline) means the provider holds money the order will never take:
the webhook voids that hold at the gateway and records
``LateAuthorisationVoided`` (a 200; a gateway outage is a 503 and the provider
retries the webhook).
"""

from __future__ import annotations

import logging
import time
from typing import Annotated, Any, Literal

import msgspec
from litestar import Controller, Request, Response, get, post
from litestar.connection import ASGIConnection
from litestar.di import NamedDependency
from litestar.handlers.base import BaseRouteHandler
from litestar.params import HeaderParameter, JSONBody, PathParameter

from orderstream.api.common import CORRELATION_HEADER, ETAG_HEADER, REPLAYED_HEADER, OrderIdPath, written
from orderstream.api.plumbing import command_context
from orderstream.api.problems import ApiError, FieldError, problem_responses, unprocessable
from orderstream.api.schemas import WriteResult
from orderstream.application import webhook_signature
from orderstream.application.commands import CommandContext, CommandResult
from orderstream.application.use_cases import UseCases
from orderstream.auth.principal import Principal
from orderstream.domain import payments
from orderstream.domain.common import IllegalTransition
from orderstream.sagas.fulfilment.client import FulfilmentClient, FulfilmentReport
from orderstream.sagas.fulfilment.payment_gateway import (
    PaymentGateway,
    PaymentGatewayUnavailable,
)

PaymentIdPath = Annotated[
    str,
    PathParameter(
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$(?![\s\S])",
        max_length=100,
        description="The payment's id (`payment_id` in `GET /orders/{id}/fulfilment`).",
    ),
]
PaymentId = Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$(?![\s\S])")]
Note = Annotated[str, msgspec.Meta(min_length=1, max_length=200)]
EventId = Annotated[str, msgspec.Meta(pattern=r"^[!-~]{1,200}$(?![\s\S])")]
SignatureHeader = Annotated[
    str,
    HeaderParameter(
        name=webhook_signature.HEADER,
        max_length=webhook_signature.MAX_HEADER_LENGTH,
        description=(
            '`t=<unix seconds>,v1=<hex HMAC-SHA256 of "<t>.<raw body>" with the shared secret>`; '
            "several `v1=` while a secret is rotated. Missing, wrong, or more than 300 s off: 401."
        ),
    ),
]
SIGNATURE_CHALLENGE = {"WWW-Authenticate": f'{webhook_signature.HEADER} realm="payment-webhook"'}
"""A 401 names the scheme it wants (RFC 9110): here the signature, not a bearer token."""
log = logging.getLogger("orderstream.api")

PROVIDER = Principal(subject="payment-provider", roles=frozenset())
"""Who a signed webhook call is: no bearer token, no role; its signature is its identity."""
"""The ``actor`` in the metadata of the events a verified webhook appends."""


class PaymentWebhook(msgspec.Struct, frozen=True, forbid_unknown_fields=True, omit_defaults=True):
    """The payment provider's final answer for a pending authorisation."""

    payment_id: PaymentId
    """The payment this answer is for; it must be the path's. The signature covers the
    body only, so without it a delivery captured for one payment could be replayed,
    within its 300 s, to any other payment's URL and authorise that one."""
    event_id: EventId
    """The provider's id of this delivery: a repeated delivery has no second effect."""
    status: Literal["authorised", "declined"]
    authorisation_code: Note | None = None
    """The provider's authorisation code (``authorised``)."""
    reason: Note | None = None
    """Why it was declined (``declined``)."""


class FulfilmentOutcomeView(msgspec.Struct, frozen=True, kw_only=True):
    status: Literal["shipped", "rejected", "cancelled", "compensated"]
    reason: str | None
    tracking_number: str | None
    compensations: list[str]
    compensation_failures: list[str]


class FulfilmentView(msgspec.Struct, frozen=True, kw_only=True):
    """Where the order's saga stands, from the workflow itself."""

    order_id: str
    workflow_id: str
    run_id: str
    status: str
    """The workflow's: running, completed, failed, cancelled, terminated, timed_out.
    ``completed`` whatever the business outcome (``outcome.status``); ``failed``
    only when a human is needed (``outcome.compensation_failures``, or a step
    after shipment failed for good); ``cancelled``: cancelled through Temporal."""
    step: str
    """The step running now, or how it ended (shipped, rejected, cancelled, compensated)."""
    outcome: FulfilmentOutcomeView | None
    """Set once the saga has ended: ``shipped``, or ``rejected``/``cancelled``/``compensated``
    after every step was undone (listed in ``compensations``)."""
    completed_steps: list[str]
    compensations: list[str]
    payment_id: str
    """Where the payment provider's webhook goes: ``POST /payments/{payment_id}/webhook``."""
    payment_deadline: str | None
    """While waiting for a pending authorisation: until when (ISO 8601 UTC)."""
    web_ui_url: str | None
    """The workflow in the Temporal Web UI."""


def fulfilment_view(report: FulfilmentReport) -> FulfilmentView:
    outcome = None
    if report.outcome is not None:
        o = report.outcome
        outcome = FulfilmentOutcomeView(
            status=o.status,
            reason=o.reason,
            tracking_number=o.tracking_number,
            compensations=list(o.compensations),
            compensation_failures=list(o.compensation_failures),
        )
    return FulfilmentView(
        order_id=report.order_id,
        workflow_id=report.workflow_id,
        run_id=report.run_id,
        status=report.status,
        step=report.step,
        outcome=outcome,
        completed_steps=list(report.completed_steps),
        compensations=list(report.compensations),
        payment_id=report.payment_id,
        payment_deadline=report.payment_deadline,
        web_ui_url=report.web_ui_url,
    )


def _webhook_secrets(connection: ASGIConnection[Any, Any, Any, Any]) -> tuple[str, ...]:
    """The configured secrets, or the data dir's (read, or generated, once per app)."""
    found: tuple[str, ...] | None = connection.app.state.get("webhook_secrets")
    if found is None:
        settings = connection.app.state["container"].settings
        try:
            found = webhook_signature.webhook_secrets(settings.webhook_secrets, settings.data_dir)
        except OSError as exc:  # e.g. a read-only data dir and no ORDERSTREAM_WEBHOOK_SECRET
            log.error("the webhook secret cannot be read or created: %s", exc)
            raise ApiError(503, "unavailable", "Webhooks cannot be verified: no secret is set up.") from None
        connection.app.state["webhook_secrets"] = found
    return found


async def require_webhook_signature(
    connection: ASGIConnection[Any, Any, Any, Any], _handler: BaseRouteHandler
) -> None:
    """Guard of the webhook: 401 unless the raw body is signed with our shared secret.

    Guards run before the body is decoded (``strict_request``) and before the
    parameters are parsed, so an unsigned call is a 401 whatever its body."""
    if not isinstance(connection, Request):  # pragma: no cover - an HTTP route's guard gets the request
        raise TypeError("the webhook guard needs the HTTP request")
    body = await connection.body()  # kept by Litestar for the decoding that follows
    try:
        webhook_signature.verify(
            connection.headers.get(webhook_signature.HEADER),
            body,
            _webhook_secrets(connection),
            now=time.time(),
        )
    except webhook_signature.InvalidSignature as exc:
        raise ApiError(401, "invalid-signature", str(exc), headers=SIGNATURE_CHALLENGE) from None
    connection.state["principal"] = PROVIDER  # the actor of what the call records (auth.policy.principal_of)


async def void_late_authorisation(
    payment_id: str,
    authorisation_code: str,
    gateway: PaymentGateway,
    use_cases: UseCases,
    context: CommandContext,
) -> CommandResult[payments.Payment]:
    """The provider authorised a payment that was voided: give the hold back at
    the gateway first, then record it, so a recorded void is a done void. A
    retried webhook voids again (idempotent at the gateway) and records nothing twice."""
    try:
        await gateway.void(payment_id)
    except PaymentGatewayUnavailable as exc:
        raise ApiError(
            503,
            "unavailable",
            f"The payment was voided and its late authorisation must be given back, but the gateway "
            f"cannot be reached ({exc}); retry the webhook.",
            headers={"Retry-After": "5"},
        ) from exc
    command = payments.VoidLateAuthorisation(
        payment_id=payment_id, authorisation_code=authorisation_code, now=use_cases.handler.clock()
    )
    return await use_cases.payment_command(command, context)


class FulfilmentController(Controller):
    path = "/"
    tags = ["fulfilment"]

    @post(
        "/payments/{payment_id:str}/webhook",
        operation_id="paymentWebhook",
        summary="The payment provider's result for a pending authorisation",
        description=(
            "Called by the payment provider, signed with the secret shared with it (header "
            "`Orderstream-Signature`; no bearer token). The body's `payment_id` must be the path's (a "
            "delivery signed for another payment is a 422). Records the result on the payment "
            "(`PaymentAuthorised` / `PaymentDeclined`); the order's fulfilment saga is told through "
            "the event. The same delivery (`event_id`) again is answered as the first time and has no "
            "second effect; a different result after the first is a 409. An authorisation for a "
            "payment that was voided (it came after the payment deadline) is voided at the gateway "
            "and recorded (`LateAuthorisationVoided`, 200); 503 while the gateway cannot be reached."
        ),
        status_code=200,
        guards=[require_webhook_signature],
        response_headers=[ETAG_HEADER, REPLAYED_HEADER, CORRELATION_HEADER],
        responses=problem_responses(400, 401, 404, 409, 413, 422, 503),
    )
    async def payment_webhook(
        self,
        request: Request[Any, Any, Any],
        payment_id: PaymentIdPath,
        data: JSONBody[PaymentWebhook],
        use_cases: NamedDependency[UseCases],
        signature: SignatureHeader,
        payment_gateway: NamedDependency[PaymentGateway],
    ) -> Response[WriteResult]:
        """``signature`` is checked by the guard; declared here for the OpenAPI document."""
        if data.payment_id != payment_id:
            raise unprocessable(
                "invalid-body",
                "The delivery is for another payment than the URL's.",
                errors=[FieldError("must be the payment_id of the path", "$.payment_id", "body")],
            )
        now = use_cases.handler.clock()
        context = command_context(request, idempotency_key=f"webhook:{data.event_id}", request_body=data)
        if data.status == "declined":
            reason = data.reason or "declined by the payment provider"
            declined = payments.DeclinePayment(payment_id=payment_id, reason=reason, now=now)
            return written(payment_id, await use_cases.payment_command(declined, context))
        code = data.authorisation_code or "webhook"
        authorised = payments.AuthorisePayment(payment_id=payment_id, authorisation_code=code, now=now)
        try:
            result = await use_cases.payment_command(authorised, context)
        except IllegalTransition as exc:
            if exc.status != "voided":
                raise
            result = await void_late_authorisation(payment_id, code, payment_gateway, use_cases, context)
        return written(payment_id, result)

    @get(
        "/orders/{order_id:str}/fulfilment",
        operation_id="getOrderFulfilment",
        summary="The order's fulfilment saga: step, outcome, compensations, Web UI link",
        response_headers=[CORRELATION_HEADER],
        responses=problem_responses(400, 404, 503),
    )
    async def get_fulfilment(
        self, order_id: OrderIdPath, fulfilment_client: NamedDependency[FulfilmentClient]
    ) -> FulfilmentView:
        return fulfilment_view(await fulfilment_client.report(order_id))
