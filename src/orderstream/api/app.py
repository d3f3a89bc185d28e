"""``create_app(container)``: the Litestar application.

Routes are grouped by resource (``ProductController``, ``OrderController``,
``OpsController``). The fulfilment routes (``/payments/{payment_id}/webhook``,
``/orders/{id}/fulfilment``) live in ``orderstream.api.fulfilment``, owned by
the saga work, and come in through ``extra_route_handlers`` (see
:func:`default_extra_route_handlers`). Handlers can ask for ``container``,
``use_cases`` or ``queries`` by parameter name (dependency injection).

OpenAPI: ``/schema/openapi.json``; a Swagger UI page at ``/schema`` (and
``/schema/swagger``) whose JS/CSS are served by this app from the
``swagger-ui-bundle-v2`` package (Apache-2.0), so it works without internet.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import importlib.util
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import msgspec
from litestar import Litestar
from litestar.datastructures import State
from litestar.di import Provide
from litestar.openapi import OpenAPIConfig
from litestar.openapi.plugins import JsonRenderPlugin, SwaggerRenderPlugin
from litestar.openapi.spec import Components, SecurityScheme, Tag
from litestar.static_files import create_static_files_router
from litestar.types import ControllerRouterHandler

import orderstream
from orderstream.api.ops import OpsController
from orderstream.api.orders import OrderController
from orderstream.api.plumbing import make_before_send, strict_body
from orderstream.api.problems import exception_handlers
from orderstream.api.products import ProductController
from orderstream.application.queries import Queries
from orderstream.application.use_cases import UseCases
from orderstream.bootstrap import BackgroundService, Container, run_services

FULFILMENT_MODULE = "orderstream.api.fulfilment"
DOCS_ASSETS = "/schema/assets"

DESCRIPTION = """\
Event-sourced CQRS order service.

* **Writes** answer `{"id", "revision", "position"}` with `ETag: "<revision>"`; POST creates
  answer 201 with `Location`.
* **Optimistic concurrency**: send `If-Match: "<revision>"`; a stale one gets 412 with
  `current_revision`.
* **Idempotency**: `Idempotency-Key` on `POST /orders` and `POST /products/{sku}/stock`.
* **Read your writes**: pass a write's `position` as `min_position` to a query.
* **Errors** are RFC 9457 `application/problem+json` with `type`, `title`, `status`, `detail`.
* When API tokens are configured, writes need `Authorization: Bearer <token>`.
"""


def swagger_assets_dir() -> Path:
    """Where the ``swagger-ui-bundle-v2`` package keeps Swagger UI's files
    (``swagger_ui_bundle/vendor/swagger-ui-<version>/``)."""
    spec = importlib.util.find_spec("swagger_ui_bundle")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the swagger-ui-bundle-v2 package is missing (pip install swagger-ui-bundle-v2)")
    vendor = Path(next(iter(spec.submodule_search_locations))) / "vendor"
    found = sorted(vendor.glob("swagger-ui-*/swagger-ui-bundle.js"))
    if not found:
        raise RuntimeError(f"no Swagger UI bundle under {vendor}")
    return found[-1].parent


def default_extra_route_handlers() -> list[ControllerRouterHandler]:
    """``orderstream.api.fulfilment.route_handlers`` if that module exists."""
    if importlib.util.find_spec(FULFILMENT_MODULE) is None:
        return []
    module = importlib.import_module(FULFILMENT_MODULE)
    return list(getattr(module, "route_handlers", ()))


def openapi_config() -> OpenAPIConfig:
    favicon = f"<link rel='icon' type='image/png' href='{DOCS_ASSETS}/favicon-32x32.png'>"
    return OpenAPIConfig(
        title="orderstream",
        version=orderstream.__version__ if hasattr(orderstream, "__version__") else "0.1.0",
        description=DESCRIPTION,
        path="/schema",
        use_handler_docstrings=False,
        create_examples=False,
        tags=[
            Tag(name="products", description="Products and stock levels."),
            Tag(name="orders", description="Orders: commands, queries, history."),
            Tag(name="operations", description="Health, readiness, metrics."),
        ],
        components=Components(
            security_schemes={
                "BearerToken": SecurityScheme(
                    type="http",
                    scheme="bearer",
                    description="Needed on writes when the server has ORDERSTREAM_API_TOKENS set.",
                )
            }
        ),
        render_plugins=[
            SwaggerRenderPlugin(
                path=["/", "/swagger"],
                js_url=f"{DOCS_ASSETS}/swagger-ui-bundle.js",
                css_url=f"{DOCS_ASSETS}/swagger-ui.css",
                standalone_preset_js_url=f"{DOCS_ASSETS}/swagger-ui-standalone-preset.js",
                favicon=favicon,
            ),
            JsonRenderPlugin(path="/openapi.json"),
        ],
    )


def create_app(
    container: Container,
    *,
    extra_route_handlers: Sequence[ControllerRouterHandler] | None = None,
    background: Sequence[BackgroundService] = (),
    debug: bool = False,
) -> Litestar:
    """The API over ``container``.

    ``extra_route_handlers``: more controllers/routers (``None``: the fulfilment
    routes if their module exists). ``background``: services (e.g.
    ``container.projection_services``) run for the app's lifetime.
    """
    extra = default_extra_route_handlers() if extra_route_handlers is None else list(extra_route_handlers)

    @contextlib.asynccontextmanager
    async def lifespan(_app: Litestar) -> AsyncIterator[None]:
        if not background:
            yield
            return
        stop = asyncio.Event()
        task = asyncio.create_task(run_services(list(background), stop), name="orderstream-background")
        try:
            yield
        finally:
            stop.set()
            await task

    def provide_container() -> Container:
        return container

    def provide_use_cases() -> UseCases:
        return container.use_cases

    def provide_queries() -> Queries:
        return container.queries

    assets = create_static_files_router(
        path=DOCS_ASSETS,
        directories=[swagger_assets_dir()],
        include_in_schema=False,
        name="docs-assets",
    )

    state: dict[str, Any] = {"api_tokens": dict(container.settings.api_tokens), "container": container}
    app = Litestar(
        route_handlers=[ProductController, OrderController, OpsController, assets, *extra],
        dependencies={
            "container": Provide(provide_container, sync_to_thread=False),
            "use_cases": Provide(provide_use_cases, sync_to_thread=False),
            "queries": Provide(provide_queries, sync_to_thread=False),
        },
        exception_handlers=exception_handlers,
        before_request=strict_body,
        before_send=[make_before_send(container.metrics)],
        request_max_body_size=container.settings.max_body_bytes,
        openapi_config=openapi_config(),
        lifespan=[lifespan],
        state=State(state),
        debug=debug,
        # Logging is the process's business (the CLI configures it); unexpected
        # errors are logged by the problem mapping under "orderstream.api".
        logging_config=None,
    )
    close_request_schemas(app)
    return app


def _strict_structs(annotation: Any) -> set[type[msgspec.Struct]]:
    """Every Struct type reachable from ``annotation`` that refuses unknown fields."""
    found: set[type[msgspec.Struct]] = set()
    seen: set[int] = set()

    def walk(info: msgspec.inspect.Type) -> None:
        if id(info) in seen:
            return
        seen.add(id(info))
        if isinstance(info, msgspec.inspect.StructType):
            if info.forbid_unknown_fields:
                found.add(info.cls)
            for f in info.fields:
                walk(f.type)
        elif isinstance(info, msgspec.inspect.Metadata):
            walk(info.type)
        elif isinstance(info, msgspec.inspect.UnionType):
            for t in info.types:
                walk(t)
        elif isinstance(info, msgspec.inspect.TupleType):
            for t in info.item_types:
                walk(t)
        elif isinstance(info, msgspec.inspect.DictType):
            walk(info.key_type)
            walk(info.value_type)
        elif isinstance(
            info, (msgspec.inspect.ListType, msgspec.inspect.SetType, msgspec.inspect.VarTupleType)
        ):
            walk(info.item_type)

    with contextlib.suppress(TypeError, ValueError):
        walk(msgspec.inspect.type_info(annotation))
    return found


def close_request_schemas(app: Litestar) -> None:
    """Mark the request bodies that refuse unknown fields (``forbid_unknown_fields``)
    with ``additionalProperties: false`` in the OpenAPI document, which Litestar
    does not do by itself: a generated client or a schema-based fuzzer must know
    that an extra field is an error, not ignored."""
    strict: set[type[msgspec.Struct]] = set()
    for route in app.routes:
        for handler in getattr(route, "route_handlers", ()):
            data = handler.parsed_fn_signature.parameters.get("data")
            if data is not None:
                strict |= _strict_structs(data.annotation)
    schemas = app.openapi_schema.components.schemas or {}
    names = {cls.__name__ for cls in strict}
    for name, schema in schemas.items():
        short = name.rsplit("_", 1)[-1]
        if name in names or short in names:
            schema.additional_properties = False
