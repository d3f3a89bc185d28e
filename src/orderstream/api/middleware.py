"""What every request passes through on its way in and out, in one place.

:class:`RequestMiddleware` (a pure ASGI middleware, installed on the app) runs
after routing, once per request, and in order:

1. binds the request's correlation id to the logging context
   (:func:`orderstream.api.correlation.correlation_id`), and refuses a header sent
   twice that must come once (:func:`orderstream.api.plumbing.refuse_repeated_headers`);
2. checks access (:meth:`orderstream.auth.policy.AccessPolicy.authorize`: the
   route table, the token, the roles, the write rate);
3. times the request into the latency histogram of its method and route template.

:class:`ResponseStartHook` (the app's one ``before_send`` hook) echoes the
correlation id on every answer, 404s and errors too, counts the answer by
method, route and status, and fixes the ``Allow`` header of automatic OPTIONS
answers.

Why one of each instead of a guard, two middlewares and two hooks: each layer is
another coroutine frame per request, and Litestar copies the route handler on
every guard call (5-7% of the API's py-spy samples under ``POST /orders``). With
them, a POST cost about 369 us of CPU in process against ``main``'s 288; with this,
309 (``python -m bench.api_cpu``, issue 7, bench/README.md). The labelled metric
children are looked up once per route (the labelled look-up takes a lock and
builds its key).
"""

from __future__ import annotations

import time
from typing import Any

from litestar.enums import ScopeType
from litestar.types import ASGIApp, Message, Receive, Scope, Send

from orderstream.api.correlation import correlation_id
from orderstream.api.plumbing import refuse_repeated_headers
from orderstream.auth.policy import AccessPolicy
from orderstream.logging_setup import bound
from orderstream.metrics import Metrics


class RequestMiddleware:
    """Correlation id in the logs, access check, latency (see the module docstring).

    Litestar builds one instance per route handler (``DefineMiddleware``), so the
    histogram child of its route is kept on the instance."""

    def __init__(self, app: ASGIApp, access: AccessPolicy, metrics: Metrics) -> None:
        self.app = app
        self.access = access
        self.metrics = metrics
        self._latency: dict[tuple[str, str], Any] = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != ScopeType.HTTP:
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        try:
            with bound(correlation_id=correlation_id(scope)):
                refuse_repeated_headers(scope["headers"])
                await self.access.authorize(scope)
                await self.app(scope, receive, send)
        finally:
            self._histogram(scope).observe(time.perf_counter() - started)

    def _histogram(self, scope: Scope) -> Any:
        key = (str(scope.get("method", "?")), scope.get("path_template") or "unmatched")
        found = self._latency.get(key)
        if found is None:
            found = self._latency[key] = self.metrics.http_duration.labels(method=key[0], route=key[1])
        return found


class ResponseStartHook:
    """The app's ``before_send`` hook (see the module docstring).

    ``allowed_methods`` (route path format -> every method it serves) is filled in
    once the app has built its routes: Litestar 2.x answers OPTIONS on a path served
    by several handlers with the methods of the first one only
    (litestar-org/litestar#4169)."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics
        self.allowed_methods: dict[str, set[str]] = {}
        self._counters: dict[tuple[Any, str, int], Any] = {}

    async def __call__(self, message: Message, scope: Scope) -> None:
        if message["type"] != "http.response.start":
            return
        template = scope.get("path_template") or ""
        headers = list(message.get("headers", []))
        methods = self.allowed_methods.get(template) if scope.get("method") == "OPTIONS" else None
        if methods:
            headers = [(k, v) for k, v in headers if k.lower() != b"allow"]
            headers.append((b"allow", ", ".join(sorted(methods)).encode("latin-1")))
        headers.append((b"x-correlation-id", correlation_id(scope).encode("latin-1")))
        message["headers"] = headers
        self._count(scope, template or "unmatched", message["status"])

    def _count(self, scope: Scope, route: str, status: int) -> None:
        key = (scope.get("method", "?"), route, status)
        counter = self._counters.get(key)
        if counter is None:
            counter = self._counters[key] = self.metrics.http_requests.labels(
                method=key[0], route=route, status=str(status)
            )
        counter.inc()
