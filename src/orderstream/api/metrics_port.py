"""The metrics port: ``GET /metrics`` of a process that serves no API.

``orderstream project`` and ``orderstream worker`` listen on no HTTP port, so in the
split topology (``api``, ``project`` and ``worker`` as processes or containers of
their own) what they count was seen nowhere: the saga worker's commands
(``ReserveStock``, ``ShipOrder``...), the saga starts and outcomes, hence no
``OrderstreamSagaFailed`` alert. Given ``ORDERSTREAM_METRICS_PORT`` (or
``--metrics-port``), they answer ``GET /metrics`` there, on
``ORDERSTREAM_METRICS_HOST`` (``127.0.0.1`` by default; a container needs
``0.0.0.0``). A process started by another (``--worker-of``) never opens it: its
values go to the shared directory and its first process answers for it.

What a scrape gets is what the API's ``/metrics`` gives: the store-derived gauges
refreshed first (projections' and the saga trigger's, as ``/metrics`` does), then
prometheus_client's own exposition (:func:`prometheus_client.make_asgi_app`: text or
OpenMetrics by ``Accept``, gzip, ``name[]`` filters) of :meth:`Metrics.scraped`:
this process's registry, or with ``PROMETHEUS_MULTIPROC_DIR`` set, the sum over every
process sharing it (``worker`` with ``ORDERSTREAM_SAGA_WORKER_PROCESSES``: the saga
worker processes it starts, whose activities run the saga's commands).

The HTTP server is uvicorn in the process's event loop, as for the API and with the
same connection limits (header timeout, head size, connection cap): the refresh
awaits the runners and the store there. Not prometheus_client's
``start_http_server``: its thread could not await the refresh, and its ``wsgiref``
server has no timeouts against a client that never finishes its request.

Authentication: the same rule as the API's ``/metrics``. Public by default (the
metrics hold no customer data: command names, route templates, projection names,
counts). With ``ORDERSTREAM_METRICS_PUBLIC=false`` the port too wants a bearer token
with the admin role, verified as the API verifies it (the OIDC issuer's keys; or the
local issuer's key, in the data dir the process then must share with the API):
otherwise the setting would close one door and leave another open. The default
address, loopback, keeps the port off the network either way.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

import msgspec
from prometheus_client import make_asgi_app

from orderstream.api.ops import refresh_projection_metrics, refresh_saga_metrics
from orderstream.api.problems import PROBLEM_JSON, Problem, _title, problem_type
from orderstream.auth.policy import REALM
from orderstream.auth.principal import Role
from orderstream.auth.verifier import InvalidToken, KeysUnavailable, TokenVerifier
from orderstream.container import Container

log = logging.getLogger("orderstream.metrics")

Scope = MutableMapping[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

METRICS_PATH = "/metrics"
METHODS = ("GET", "HEAD")


class Refused(Exception):
    """A request the port does not answer with metrics: its problem and headers."""

    def __init__(self, status: int, code: str, detail: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(detail)
        self.problem = Problem(
            type=problem_type(code), title=_title(code, status), status=status, detail=detail
        )
        self.headers = headers or {}


class MetricsApp:
    """The ASGI application of the metrics port: ``/metrics`` and nothing else."""

    def __init__(self, container: Container, verifier: TokenVerifier | None = None) -> None:
        self.container = container
        self.verifier = verifier
        """``None``: public (no token asked)."""

    @classmethod
    def for_settings(cls, container: Container) -> MetricsApp:
        """Public, or behind the admin role as the settings say (see the module)."""
        settings = container.settings
        protected = settings.auth_enabled and not settings.metrics_public
        return cls(container, TokenVerifier(settings) if protected else None)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await _lifespan(receive, send)
            return
        if scope["type"] != "http":
            return  # a websocket: uvicorn refuses it (403)
        try:
            if scope["path"] != METRICS_PATH:
                raise Refused(404, "no-such-route", f"Only {METRICS_PATH} is served on this port.")
            if scope["method"] not in METHODS:
                raise Refused(
                    405,
                    "method-not-allowed",
                    f"{METRICS_PATH} answers {' and '.join(METHODS)}.",
                    {"Allow": ", ".join(METHODS)},
                )
            if self.verifier is not None:
                await self._authorize(self.verifier, _authorization(scope))
        except Refused as refused:
            await _answer(send, refused)
            return
        await self.refresh()
        await make_asgi_app(self.container.metrics.scraped())(scope, receive, send)

    async def refresh(self) -> None:
        """The gauges the API's ``/metrics`` sets before it answers (from the store)."""
        try:
            await refresh_projection_metrics(self.container)
            await refresh_saga_metrics(self.container)
        except Exception as exc:  # a scrape still answers with what it has
            log.warning("metrics: projection or saga status failed: %s", exc)

    async def _authorize(self, verifier: TokenVerifier, authorization: str) -> None:
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise Refused(
                401,
                "unauthorized",
                f"{METRICS_PATH} needs 'Authorization: Bearer <token>' of the admin role "
                "(ORDERSTREAM_METRICS_PUBLIC=false).",
                {"WWW-Authenticate": f'Bearer realm="{REALM}"'},
            )
        try:
            principal = await verifier.verify(token.strip())
        except KeysUnavailable as exc:
            raise Refused(
                503,
                "identity-provider-unavailable",
                f"{exc}; retry later.",
                {"Retry-After": "5"},
            ) from None
        except InvalidToken as exc:
            raise Refused(
                401,
                "unauthorized",
                f"The bearer token is not valid: {exc}.",
                {"WWW-Authenticate": f'Bearer realm="{REALM}", error="invalid_token"'},
            ) from None
        if Role.ADMIN not in principal.roles:
            raise Refused(
                403,
                "forbidden",
                f"Your roles ({principal.roles_text or 'none'}) do not allow {METRICS_PATH}: admin only.",
                {"WWW-Authenticate": f'Bearer realm="{REALM}", error="insufficient_scope"'},
            )


def _authorization(scope: Scope) -> str:
    for name, value in scope["headers"]:
        if name.lower() == b"authorization":
            return str(value.decode("latin-1"))
    return ""


async def _answer(send: Send, refused: Refused) -> None:
    body = msgspec.json.encode(refused.problem)
    headers: list[tuple[bytes, bytes]] = [
        (b"content-type", PROBLEM_JSON.encode()),
        (b"content-length", str(len(body)).encode()),
    ]
    headers += [(k.lower().encode(), v.encode("latin-1")) for k, v in refused.headers.items()]
    await send({"type": "http.response.start", "status": refused.problem.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


async def _lifespan(receive: Receive, send: Send) -> None:
    """Nothing to set up or tear down: the container is the process's."""
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return
