"""``/orders``: place, change, cancel; read, list, history, state at a revision."""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec
from litestar import Controller, Request, Response, delete, get, patch, post
from litestar.di import NamedDependency
from litestar.params import JSONBody, QueryParameter

from orderstream.api.common import (
    CORRELATION_HEADER,
    ETAG_HEADER,
    LOCATION_HEADER,
    READ_ETAG_HEADER,
    REPLAYED_HEADER,
    WRITE_SECURITY,
    Cursor,
    IdempotencyKey,
    IfMatch,
    Limit,
    MinPosition,
    OrderIdPath,
    SearchText,
    id_of,
    written,
)
from orderstream.api.plumbing import command_context, etag, parse_if_match, use_cases_of
from orderstream.api.problems import problem_responses, unprocessable
from orderstream.api.schemas import (
    TEXT_PATTERN,
    EventView,
    OrderChange,
    OrderEvents,
    OrderLineRequest,
    OrderPage,
    OrderPlacement,
    OrderStateSnapshot,
    OrderStateView,
    OrderStatus,
    OrderView,
    ShippingAddress,
    StatusFacets,
    WriteResult,
)
from orderstream.application.queries import ORDER_SORT_FIELDS, Queries, event_data
from orderstream.application.use_cases import LineRequest
from orderstream.auth.policy import check_customer, default_cancel_reason, visible_customer
from orderstream.domain import orders

CancelReason = Annotated[
    str | None,
    QueryParameter(
        required=False,
        min_length=1,
        max_length=200,
        pattern=TEXT_PATTERN,
        description="Why the order is cancelled (printable text, as the body's text fields).",
    ),
]
StatusFilter = Annotated[
    list[OrderStatus] | None,
    QueryParameter(
        required=False, description="Only orders in these statuses (repeat the parameter for several)."
    ),
]
_SORT_FIELD = rf"[+-]?({'|'.join(sorted(ORDER_SORT_FIELDS))})"
Sort = Annotated[
    str | None,
    QueryParameter(
        required=False,
        max_length=200,
        pattern=rf"^{_SORT_FIELD}(,{_SORT_FIELD})*$",
        description=(
            "Comma-separated fields, `-` for descending: placed_at, updated_at, total_amount, "
            "customer_id, status. Default `-placed_at`."
        ),
    ),
]
FacetsParameter = Annotated[
    list[Literal["status"]] | None,
    QueryParameter(
        required=False,
        description="`status`: count the matching orders per status (over all pages). Omitted: "
        "`facets.status` is empty, which keeps a list over many orders fast.",
    ),
]
CustomerFilter = Annotated[
    str | None, QueryParameter(required=False, max_length=100, description="Only this customer.")
]
RevisionQuery = Annotated[
    int | None,
    QueryParameter(
        required=False,
        ge=0,
        description="Fold the events up to and including this revision (default: all).",
    ),
]


def _address(a: ShippingAddress) -> orders.Address:
    return orders.Address(
        name=a.name, line1=a.line1, line2=a.line2, city=a.city, postal_code=a.postal_code, country=a.country
    )


def _lines(lines: list[OrderLineRequest]) -> list[LineRequest]:
    return [LineRequest(sku=line.sku, quantity=line.quantity) for line in lines]


def _snapshot(state: orders.Order) -> OrderStateSnapshot:
    assert state.status is not None
    return msgspec.convert(
        {
            "status": state.status,
            "customer_id": state.customer_id,
            "lines": [
                {**msgspec.to_builtins(line), "subtotal": msgspec.to_builtins(line.subtotal)}
                for line in state.lines
            ],
            "total": msgspec.to_builtins(state.total),
            "shipping_address": msgspec.to_builtins(state.shipping_address),
            "payment_id": state.payment_id,
            "cancel_reason": state.cancel_reason,
        },
        OrderStateSnapshot,
    )


class OrderController(Controller):
    path = "/orders"
    tags = ["orders"]

    # -------------------------------------------------------------------- commands

    @post(
        "/",
        operation_id="placeOrder",
        summary="Place an order",
        description=(
            "Prices the lines from the products' current prices and places the order; the fulfilment "
            "saga (reserve stock, authorise payment, confirm) starts from the OrderPlaced event. "
            "With an Idempotency-Key a retried request returns the first answer."
        ),
        status_code=201,
        security=WRITE_SECURITY,
        response_headers=[ETAG_HEADER, LOCATION_HEADER, REPLAYED_HEADER, CORRELATION_HEADER],
        responses=problem_responses(400, 401, 409, 412, 413, 422),
    )
    async def place_order(
        self,
        request: Request[Any, Any, Any],
        data: JSONBody[OrderPlacement],
        idempotency_key: IdempotencyKey = None,
    ) -> Response[WriteResult]:
        check_customer(request, data.customer_id)
        context = command_context(request, idempotency_key=idempotency_key, request_body=data)
        result = await use_cases_of(request).place_order(
            customer_id=data.customer_id,
            lines=_lines(data.lines),
            shipping_address=_address(data.shipping_address),
            payment_token=data.payment_method.token,
            context=context,
        )
        order_id = id_of(result.stream)
        return written(order_id, result, location=f"/orders/{order_id}")

    @patch(
        "/{order_id:str}",
        operation_id="changeOrder",
        summary="Change an order's shipping address and/or lines",
        description=(
            "Lines can change while the order is `placed`; the address until it is shipped. "
            "Send If-Match with the ETag you read to make sure nobody changed it in between."
        ),
        security=WRITE_SECURITY,
        response_headers=[ETAG_HEADER, CORRELATION_HEADER],
        responses=problem_responses(400, 401, 404, 409, 412, 413, 422),
    )
    async def change_order(
        self,
        request: Request[Any, Any, Any],
        order_id: OrderIdPath,
        data: JSONBody[OrderChange],
        if_match: IfMatch = None,
    ) -> Response[WriteResult]:
        expected = parse_if_match(if_match)
        if data.shipping_address is None and data.lines is None:
            raise unprocessable("nothing-to-change", "Give shipping_address and/or lines.")
        result = await use_cases_of(request).change_order(
            order_id,
            shipping_address=None if data.shipping_address is None else _address(data.shipping_address),
            lines=None if data.lines is None else _lines(data.lines),
            context=command_context(request),
            expected=expected,
        )
        return written(order_id, result)

    @delete(
        "/{order_id:str}",
        operation_id="cancelOrder",
        summary="Cancel an order",
        description="The order becomes `cancelled`; the saga releases its stock and voids its payment.",
        status_code=200,
        security=WRITE_SECURITY,
        response_headers=[ETAG_HEADER, CORRELATION_HEADER],
        responses=problem_responses(400, 401, 404, 409, 412),
    )
    async def cancel_order(
        self,
        request: Request[Any, Any, Any],
        order_id: OrderIdPath,
        reason: CancelReason = None,
        if_match: IfMatch = None,
    ) -> Response[WriteResult]:
        expected = parse_if_match(if_match)
        result = await use_cases_of(request).cancel_order(
            order_id, reason or default_cancel_reason(request), command_context(request), expected=expected
        )
        return written(order_id, result)

    # --------------------------------------------------------------------- queries

    @get(
        "/{order_id:str}",
        operation_id="getOrder",
        summary="Read an order",
        response_headers=[READ_ETAG_HEADER, CORRELATION_HEADER],
        responses=problem_responses(400, 404, 503),
    )
    async def get_order(
        self, order_id: OrderIdPath, queries: NamedDependency[Queries], min_position: MinPosition = None
    ) -> Response[OrderView]:
        view = await queries.get_order(order_id, as_type=OrderView, min_position=min_position)
        return Response(view, headers={"ETag": etag(view.revision)})

    @get(
        "/",
        operation_id="listOrders",
        summary="List, filter and search orders",
        description="With `facets=status`, counts per status cover every matching order, not only the page. "
        "A customer's token lists its own orders only, whatever `customer_id` says.",
        response_headers=[CORRELATION_HEADER],
        responses=problem_responses(400, 503),
    )
    async def list_orders(
        self,
        request: Request[Any, Any, Any],
        queries: NamedDependency[Queries],
        customer_id: CustomerFilter = None,
        status: StatusFilter = None,
        q: SearchText = None,
        sort: Sort = None,
        cursor: Cursor = None,
        limit: Limit = 20,
        min_position: MinPosition = None,
        facets: FacetsParameter = None,
    ) -> OrderPage:
        page = await queries.list_orders(
            as_type=OrderView,
            customer_id=visible_customer(request, customer_id),
            status=list(status or ()),
            q=q,
            sort=sort,
            cursor=cursor,
            limit=limit,
            min_position=min_position,
            facets=list(facets or ()),
        )
        return OrderPage(
            items=page.items,
            next_cursor=page.next_cursor,
            facets=StatusFacets(status=dict(page.facets.get("status", {}))),
        )

    @get(
        "/{order_id:str}/events",
        operation_id="getOrderEvents",
        summary="The order's events, from the event store",
        responses=problem_responses(400, 404),
        response_headers=[CORRELATION_HEADER],
    )
    async def get_order_events(self, order_id: OrderIdPath, queries: NamedDependency[Queries]) -> OrderEvents:
        views = []
        for event in await queries.order_events(order_id):
            data, metadata = event_data(event)
            views.append(
                EventView(
                    id=str(event.id),
                    type=event.type,
                    schema_version=event.schema_version,
                    revision=event.revision,
                    position=event.position,
                    recorded_at=event.recorded_at,
                    data=data,
                    metadata=metadata,
                )
            )
        return OrderEvents(events=views)

    @get(
        "/{order_id:str}/state",
        operation_id="getOrderState",
        summary="The order as the write side sees it, at a revision",
        description=(
            "Folds the order's events from the event store (not the read model) up to `revision`. "
            "A revision beyond the stream's end is a 404 carrying `current_revision`."
        ),
        responses=problem_responses(400, 404),
        response_headers=[CORRELATION_HEADER],
    )
    async def get_order_state(
        self, order_id: OrderIdPath, queries: NamedDependency[Queries], revision: RevisionQuery = None
    ) -> OrderStateView:
        at = await queries.order_state(order_id, revision)
        return OrderStateView(
            id=order_id,
            revision=at.revision,
            current_revision=at.current_revision,
            state=_snapshot(at.state),
        )
