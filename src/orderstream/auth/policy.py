"""Who may call what: the route table, and the one check that enforces it.

Every documented operation of the API has a line in :data:`ROUTE_ROLES` (by its
``operation_id``): the roles that may call it, or :data:`PUBLIC`. The table is the
one place roles live. :meth:`AccessPolicy.authorize` runs on every routed request,
called by the API's request middleware (:mod:`orderstream.api.middleware`), and:

1. lets public routes through (and the docs pages, which are not operations);
2. finds the bearer token and verifies it (401, ``WWW-Authenticate: Bearer``);
3. checks the caller holds one of the route's roles (403);
4. scopes a customer to its own orders: a route with an ``order_id`` whose only
   role that lets the caller in is ``customer`` answers 404 for another
   customer's order, the same answer as for an order that does not exist, so
   order ids cannot be probed;
5. counts the caller's writes against the per-identity rate limit (429), in the
   data dir's ``rate-limits.db``, which every API process serving it shares
   (:mod:`orderstream.auth.rate_counts`).

Why a middleware and not a Litestar guard: Litestar hands every guard call a
``copy()`` of the route handler (``BaseRouteHandler.authorize_connection``), which
was 5.6% of the API's CPU under ``POST /orders`` (issue 7). The middleware runs
after routing, with the same route handler and path parameters a guard would see,
before the body is read, and its refusals go through the same problem handlers.

An operation missing from the table is refused to everyone (deny by default); a
test checks that the OpenAPI document and the table list the same operations.

A customer places orders only for itself: ``POST /orders`` with another
``customer_id`` is a 403 (:func:`check_customer`), not silently rewritten, so a
client bug shows. ``GET /orders`` by a customer lists its own orders whatever
``customer_id`` it passes (:func:`visible_customer`).
"""

from __future__ import annotations

import math
import re
import time
from typing import Any

import limits
from litestar import Request
from litestar.handlers.base import BaseRouteHandler
from litestar.types import Scope

from orderstream.api.problems import ApiError
from orderstream.api.schemas import ORDER_ID_PATTERN
from orderstream.application.queries import Queries
from orderstream.auth.principal import ANONYMOUS, Principal, Role
from orderstream.auth.rate_counts import rate_counts
from orderstream.auth.verifier import InvalidToken, KeysUnavailable, TokenVerifier
from orderstream.config import Settings, parse_rate
from orderstream.domain.common import NotFound

PUBLIC: frozenset[Role] = frozenset()
"""No token needed."""
ANYONE = frozenset(Role)
_ORDER_ID = re.compile(ORDER_ID_PATTERN)
_ORDER_READERS = frozenset({Role.CUSTOMER, Role.SUPPORT, Role.ADMIN})
_STOCK_KEEPERS = frozenset({Role.INVENTORY, Role.ADMIN})

ROUTE_ROLES: dict[str, frozenset[Role]] = {
    # operations
    "health": PUBLIC,
    "ready": PUBLIC,
    "metrics": frozenset({Role.ADMIN}),  # PUBLIC when ORDERSTREAM_METRICS_PUBLIC is on (default)
    # products
    "registerProduct": _STOCK_KEEPERS,
    "addStock": _STOCK_KEEPERS,
    "getProduct": ANYONE,
    "listProducts": ANYONE,
    # orders (a customer: its own only)
    "placeOrder": frozenset({Role.CUSTOMER, Role.ADMIN}),
    "changeOrder": frozenset({Role.CUSTOMER, Role.ADMIN}),
    "cancelOrder": _ORDER_READERS,
    "getOrder": _ORDER_READERS,
    "listOrders": _ORDER_READERS,
    "getOrderEvents": _ORDER_READERS,
    "getOrderState": _ORDER_READERS,
    "getOrderFulfilment": _ORDER_READERS,
    # the payment provider calls it without a bearer token: it signs its calls (issue 9 item 4)
    "paymentWebhook": PUBLIC,
}
"""operation_id -> roles that may call it (:data:`PUBLIC`: anyone, no token)."""

DOCS_PATH = "/schema"
READ_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
REALM = "orderstream"
_PERIODS = {
    "second": limits.RateLimitItemPerSecond,
    "minute": limits.RateLimitItemPerMinute,
    "hour": limits.RateLimitItemPerHour,
}


def _rate_item(setting: str) -> limits.RateLimitItem | None:
    parsed = parse_rate(setting)
    if parsed is None:
        return None
    count, period = parsed
    return _PERIODS[period](count)


class AccessPolicy:
    """The state the check needs: the token verifier, the route table as configured,
    the rate limiter and a way to find an order's customer."""

    def __init__(self, settings: Settings, queries: Queries, verifier: TokenVerifier | None = None) -> None:
        self.enabled = settings.auth_enabled
        self.verifier = (verifier or TokenVerifier(settings)) if self.enabled else None
        self.routes = dict(ROUTE_ROLES)
        if settings.metrics_public:
            self.routes["metrics"] = PUBLIC
        self._queries = queries
        self._rate = _rate_item(settings.write_rate_limit)
        self._data_dir = settings.data_dir
        self._limiter: limits.strategies.MovingWindowRateLimiter | None = None

    def needs_token(self, operation_id: str) -> bool:
        return self.enabled and self.routes.get(operation_id, ANYONE) != PUBLIC

    async def authorize(self, scope: Scope) -> None:
        """Let the request of ``scope`` through, or raise the problem that refuses it.

        ``scope`` has been routed (``route_handler``, ``path_params``); the principal
        let in is left in the scope's state for :func:`principal_of`."""
        handler = scope["route_handler"]
        operation_id = getattr(handler, "operation_id", None)
        operation = operation_id if isinstance(operation_id, str) else None
        if operation is None and _not_an_operation(scope, handler):
            return
        allowed = self.routes.get(operation or "")
        if allowed is None:
            raise ApiError(403, "forbidden", "This route is not in the access table; nobody may call it.")
        if allowed == PUBLIC:
            return
        if self.verifier is None:  # auth off
            _remember(scope, ANONYMOUS)
            return
        principal = await self._authenticate(_authorization_header(scope))
        granting = principal.roles & allowed
        if not granting:
            raise ApiError(
                403,
                "forbidden",
                f"Your roles ({principal.roles_text or 'none'}) do not allow {operation}.",
                headers={"WWW-Authenticate": f'Bearer realm="{REALM}", error="insufficient_scope"'},
            )
        order_id = scope["path_params"].get("order_id")
        # An id that is no order id at all is the route's 400 (its path validation), for
        # every caller alike: it cannot name another customer's order.
        if order_id is not None and granting == {Role.CUSTOMER} and _ORDER_ID.match(str(order_id)):
            await self._check_owner(principal, str(order_id))
        if scope.get("method", "GET") not in READ_METHODS and Role.ADMIN not in principal.roles:
            self._count_write(principal)
        _remember(scope, principal)

    async def _authenticate(self, authorization: str) -> Principal:
        assert self.verifier is not None
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise ApiError(
                401,
                "unauthorized",
                "This route needs 'Authorization: Bearer <token>'.",
                headers={"WWW-Authenticate": f'Bearer realm="{REALM}"'},
            )
        try:
            return await self.verifier.verify(token.strip())
        except KeysUnavailable as exc:
            raise ApiError(
                503, "identity-provider-unavailable", f"{exc}; retry later.", headers={"Retry-After": "5"}
            ) from None
        except InvalidToken as exc:
            reason = str(exc)
            raise ApiError(
                401,
                "unauthorized",
                f"The bearer token is not valid: {reason}.",
                headers={
                    "WWW-Authenticate": f'Bearer realm="{REALM}", error="invalid_token", '
                    f'error_description="{reason}"'
                },
            ) from None

    async def _check_owner(self, principal: Principal, order_id: str) -> None:
        """Another customer's order answers exactly like a missing one (404)."""
        state = await self._queries.order_state(order_id, 0)  # NotFound when missing
        if state.state.customer_id != principal.customer_id:
            raise NotFound("order", order_id)

    def _count_write(self, principal: Principal) -> None:
        if self._rate is None:
            return
        if self._limiter is None:  # the shared counts, opened on the first write counted
            self._limiter = limits.strategies.MovingWindowRateLimiter(rate_counts(self._data_dir))
        if self._limiter.hit(self._rate, principal.subject):
            return
        reset_at, _remaining = self._limiter.get_window_stats(self._rate, principal.subject)
        retry_after = max(1, math.ceil(reset_at - time.time()))
        raise ApiError(
            429,
            "too-many-requests",
            f"Too many writes: at most {self._rate}; retry after {retry_after} s.",
            headers={"Retry-After": str(retry_after)},
        )


def _not_an_operation(scope: Scope, handler: BaseRouteHandler) -> bool:
    """The OpenAPI document, its page and assets (under ``/schema``), and Litestar's
    automatic ``OPTIONS`` answers: public, and not in the route table."""
    path = scope.get("path", "")
    return (
        path == DOCS_PATH
        or path.startswith(f"{DOCS_PATH}/")
        or getattr(handler, "http_methods", None) == {"OPTIONS"}
    )


def _authorization_header(scope: Scope) -> str:
    for name, value in scope["headers"]:
        if name.lower() == b"authorization":
            return value.decode("latin-1")
    return ""


def _remember(scope: Scope, principal: Principal) -> None:
    scope.setdefault("state", {})["principal"] = principal


def principal_of(request: Request[Any, Any, Any]) -> Principal:
    """The caller :meth:`AccessPolicy.authorize` let in (:data:`ANONYMOUS` on a public
    route or with auth off). Read from the scope's state dict itself: ``request.state``
    builds a ``State`` around it on every access."""
    found = request.scope.get("state", {}).get("principal")
    return found if isinstance(found, Principal) else ANONYMOUS


def _customer_only(principal: Principal, allowed: frozenset[Role]) -> bool:
    return principal is not ANONYMOUS and (principal.roles & allowed) == {Role.CUSTOMER}


def visible_customer(request: Request[Any, Any, Any], asked: str | None) -> str | None:
    """The ``customer_id`` filter of ``GET /orders``: a customer sees only its own."""
    principal = principal_of(request)
    return principal.customer_id if _customer_only(principal, _ORDER_READERS) else asked


def default_cancel_reason(request: Request[Any, Any, Any]) -> str:
    """The reason of a cancel sent without one: who cancelled, by role (the actor
    itself is in the event's metadata)."""
    principal = principal_of(request)
    if principal is ANONYMOUS:
        return "cancelled"
    if _customer_only(principal, ROUTE_ROLES["cancelOrder"]):
        return "cancelled by the customer"
    return "cancelled by support" if Role.SUPPORT in principal.roles else "cancelled by an administrator"


def check_customer(request: Request[Any, Any, Any], customer_id: str) -> None:
    """A customer places orders for itself only (403 otherwise)."""
    principal = principal_of(request)
    if _customer_only(principal, ROUTE_ROLES["placeOrder"]) and customer_id != principal.customer_id:
        raise ApiError(403, "forbidden", "A customer can place orders only for itself (its customer_id).")
