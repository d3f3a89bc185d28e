"""The reference for ``bench.load``: a bare Litestar + msgspec app with the order routes.

It decodes the same request bodies as the service (the service's own
``OrderPlacement`` and ``OrderChange`` structs, so the validation work is the
same) and answers with small canned JSON: no event store, no read model, no
guards, no middleware, no OpenAPI. Whatever ``orderstream api`` costs beyond this
app on the same server runner is the cost of the service itself, not of the
framework or the server.

The routes mirror what the wrk scripts in ``bench/wrk`` send, so the same script
runs against both:

- ``POST /orders`` -> 201 ``{"id", "revision", "position"}`` and ``Location``
- ``GET /orders/{id}``, ``GET /orders`` (search), ``PATCH /orders/{id}``,
  ``DELETE /orders/{id}`` -> 200
- ``GET /health`` -> 200 (the readiness probe of ``bench.load``)

Run it as ``uvicorn bench.bare_app:app`` (or any ASGI server); ``bench.load``
starts it with the runner given by ``--runner``.
"""

from __future__ import annotations

import itertools
import uuid

import msgspec
from litestar import Litestar, Response, delete, get, patch, post

from orderstream.api.schemas import OrderChange, OrderPlacement

_positions = itertools.count()


class Written(msgspec.Struct, frozen=True):
    id: str
    revision: int
    position: int


class Page(msgspec.Struct, frozen=True):
    items: list[Written]
    next_cursor: str | None


@post("/orders", status_code=201)
async def place_order(data: OrderPlacement) -> Response[Written]:
    order_id = uuid.uuid4().hex
    return Response(
        Written(order_id, 0, next(_positions)),
        status_code=201,
        headers={"Location": f"/orders/{order_id}", "ETag": '"0"'},
    )


@get("/orders/{order_id:str}")
async def get_order(order_id: str) -> Written:
    return Written(order_id, 0, 0)


@get("/orders")
async def list_orders(q: str | None = None, limit: int = 20) -> Page:
    return Page(items=[], next_cursor=None)


@patch("/orders/{order_id:str}")
async def change_order(order_id: str, data: OrderChange) -> Written:
    return Written(order_id, 1, next(_positions))


@delete("/orders/{order_id:str}", status_code=200)
async def cancel_order(order_id: str) -> Written:
    return Written(order_id, 1, next(_positions))


@get("/health")
async def health() -> dict[str, str]:
    return {"status": "ok"}


app = Litestar(
    route_handlers=[place_order, get_order, list_orders, change_order, cancel_order, health],
    openapi_config=None,
)
