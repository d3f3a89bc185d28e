"""``create_app(container)``: the Litestar application.

Routes are grouped by resource (``ProductController``, ``OrderController``,
``OpsController``). The saga's routes (``/payments/{payment_id}/webhook``,
``/orders/{id}/fulfilment``) are its own: ``container.saga.route_handlers()``
(the composition root registered the saga; this module does not import it).
Handlers can ask for ``container``, ``use_cases`` or ``queries`` by parameter
name (dependency injection).

OpenAPI: ``/schema/openapi.json``; a Swagger UI page at ``/schema`` (and
``/schema/swagger``) whose JS/CSS are served by this app from the
``swagger-ui-bundle-v2`` package (Apache-2.0), so it works without internet.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import importlib.util
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import msgspec
from litestar import Litestar
from litestar.datastructures import State
from litestar.di import Provide
from litestar.middleware import DefineMiddleware
from litestar.openapi import OpenAPIConfig
from litestar.openapi.plugins import JsonRenderPlugin, SwaggerRenderPlugin
from litestar.openapi.spec import (
    OpenAPIMediaType,
    OpenAPIResponse,
    OpenAPIType,
    Operation,
    Parameter,
    Reference,
    Schema,
    SecurityScheme,
    Tag,
)
from litestar.params import ParameterKwarg
from litestar.routes import HTTPRoute
from litestar.static_files import create_static_files_router
from litestar.types import ControllerRouterHandler

import orderstream
from orderstream import tracing
from orderstream.api.middleware import RequestMiddleware, ResponseStartHook
from orderstream.api.ops import OpsController
from orderstream.api.orders import OrderController
from orderstream.api.plumbing import strict_request
from orderstream.api.problems import PROBLEM_JSON, exception_handlers, problem_description
from orderstream.api.products import ProductController
from orderstream.application.queries import Queries
from orderstream.application.use_cases import UseCases
from orderstream.auth.policy import AccessPolicy
from orderstream.container import Container
from orderstream.services import BackgroundService, run_services

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
* **Authentication**: every route but `/health`, `/ready` (and `/metrics` unless configured
  otherwise) needs `Authorization: Bearer <JWT>`; the roles in the token (customer, support,
  inventory, admin) decide what it may do. Locally: `orderstream tokens issue --role admin`.
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

    ``extra_route_handlers``: more controllers/routers (``None``: the registered
    saga's, if any). ``background``: services (e.g. ``container.projection_services``)
    run for the app's lifetime.
    """
    if extra_route_handlers is not None:
        extra = list(extra_route_handlers)
    else:
        extra = list(container.saga.route_handlers()) if container.saga is not None else []

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

    access = AccessPolicy(container.settings, container.queries)
    state: dict[str, Any] = {
        "access": access,
        "container": container,
        "body_timeout": container.settings.connections.body_timeout,
    }
    response_start = ResponseStartHook(container.metrics)
    app = Litestar(
        route_handlers=[ProductController, OrderController, OpsController, assets, *extra],
        dependencies={
            "container": Provide(provide_container, sync_to_thread=False),
            "use_cases": Provide(provide_use_cases, sync_to_thread=False),
            "queries": Provide(provide_queries, sync_to_thread=False),
        },
        exception_handlers=exception_handlers,
        before_request=strict_request,
        before_send=[response_start],
        # Access is checked here, not by a Litestar guard: see orderstream.api.middleware.
        middleware=[DefineMiddleware(RequestMiddleware, access=access, metrics=container.metrics)],
        plugins=tracing.http_plugins(),
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
    tighten_parameter_schemas(app)
    document_unsupported_media_type(app)
    document_security(app, access)
    response_start.allowed_methods = {
        route.path_format: {getattr(method, "value", method) for method in route.methods}
        for route in app.routes
        if isinstance(route, HTTPRoute)
    }
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


_PARAMETER_CONSTRAINTS = {
    "ge": "minimum",
    "le": "maximum",
    "gt": "exclusive_minimum",
    "lt": "exclusive_maximum",
    "min_length": "min_length",
    "max_length": "max_length",
    "min_items": "min_items",
    "max_items": "max_items",
    "pattern": "pattern",
}
_CARRIED_KEYWORDS = (*_PARAMETER_CONSTRAINTS.values(), "description", "default", "examples", "format", "enum")


def _without_null(schema: Schema) -> Schema:
    """``{"oneOf": [X, {"type": "null"}], "maxLength": 5}`` -> ``X`` with ``maxLength: 5``."""
    if not schema.one_of:
        return schema
    branches = [s for s in schema.one_of if not (isinstance(s, Schema) and s.type == OpenAPIType.NULL)]
    if len(branches) != 1 or len(branches) == len(schema.one_of) or not isinstance(branches[0], Schema):
        return schema
    inner = copy.copy(branches[0])
    for key in _CARRIED_KEYWORDS:
        value = getattr(schema, key)
        if value is not None and getattr(inner, key) is None:
            setattr(inner, key, value)
    return inner


def _operations(app: Litestar) -> dict[str, Operation]:
    found: dict[str, Operation] = {}
    for item in (app.openapi_schema.paths or {}).values():
        for method in ("get", "put", "post", "delete", "options", "head", "patch", "trace"):
            operation = getattr(item, method, None)
            if isinstance(operation, Operation) and operation.operation_id:
                found[operation.operation_id] = operation
    return found


def tighten_parameter_schemas(app: Litestar) -> None:
    """Make the documented query, path and header parameters say exactly what is accepted.

    Litestar documents an optional parameter (``int | None = None``) as
    ``oneOf: [integer, null]``, but a query string or a header cannot carry a
    JSON ``null``: absence is what ``required: false`` already says, and a
    fuzzer that sends the text ``null`` only finds a 400. It also drops a
    constraint whose value is falsy (``ge=0`` never becomes ``minimum: 0``), so
    a negative ``min_position`` looked valid. Here each optional parameter's
    schema becomes its non-null branch, and every constraint the handler
    declares is written down.
    """
    operations = _operations(app)
    for route in app.routes:
        for handler in getattr(route, "route_handlers", ()):
            operation = (
                operations.get(handler.operation_id) if isinstance(handler.operation_id, str) else None
            )
            if operation is None or not operation.parameters:
                continue
            declared: dict[str, ParameterKwarg] = {}
            for name, field in handler.parsed_fn_signature.parameters.items():
                kwarg = field.kwarg_definition
                if isinstance(kwarg, ParameterKwarg):
                    declared[kwarg.name or name] = kwarg
            for parameter in operation.parameters:
                if not isinstance(parameter, Parameter) or not isinstance(parameter.schema, Schema):
                    continue
                schema = copy.copy(_without_null(parameter.schema))
                kwarg = declared.get(parameter.name)
                if kwarg is not None:
                    for attribute, keyword in _PARAMETER_CONSTRAINTS.items():
                        value = getattr(kwarg, attribute)
                        if value is not None and getattr(schema, keyword) is None:
                            setattr(schema, keyword, value)
                parameter.schema = schema


BEARER_SCHEME = "BearerToken"
PROBLEM_REF = Reference(ref="#/components/schemas/Problem")


def document_security(app: Litestar, access: AccessPolicy) -> None:
    """Declare exactly the authentication in force: the bearer scheme and, on each
    operation that needs a token, its requirement and its 401/403 answers (429 on
    writes); with auth off, no scheme and no requirement anywhere. Generated clients
    and schema-based fuzzers then send a token exactly where the server wants one."""
    schema = app.openapi_schema
    if access.enabled:
        schema.components.security_schemes = {
            BEARER_SCHEME: SecurityScheme(
                type="http",
                scheme="bearer",
                bearer_format="JWT",
                description="A JWT from the configured issuer (locally: `orderstream tokens issue`).",
            )
        }
    else:
        schema.components.security_schemes = None
    for method, operation in _operations_by_method(app):
        assert operation.operation_id is not None
        if not access.needs_token(operation.operation_id):
            operation.security = None
            continue
        operation.security = [{BEARER_SCHEME: []}]
        responses = operation.responses if operation.responses is not None else {}
        statuses = (401, 403) if method in ("get", "head") else (401, 403, 429)
        for status in statuses:
            responses.setdefault(
                str(status),
                OpenAPIResponse(
                    description=problem_description(status),
                    content={PROBLEM_JSON: OpenAPIMediaType(schema=PROBLEM_REF)},
                ),
            )
        operation.responses = responses


def _operations_by_method(app: Litestar) -> list[tuple[str, Operation]]:
    found = []
    for item in (app.openapi_schema.paths or {}).values():
        for method in ("get", "put", "post", "delete", "options", "head", "patch", "trace"):
            operation = getattr(item, method, None)
            if isinstance(operation, Operation) and operation.operation_id:
                found.append((method, operation))
    return found


def document_unsupported_media_type(app: Litestar) -> None:
    """Every operation that takes a JSON body answers 415 to a body of another
    media type (see :func:`orderstream.api.plumbing.strict_body`), 408 to a body
    that does not arrive in time, and 507 when the disk is full: say so, also on
    the routes that other modules add."""
    for operation in _operations(app).values():
        if operation.request_body is None or operation.responses is None:
            continue
        for status in ("408", "415", "507"):
            operation.responses.setdefault(
                status,
                OpenAPIResponse(
                    description=problem_description(int(status)),
                    content={
                        PROBLEM_JSON: OpenAPIMediaType(schema=Reference(ref="#/components/schemas/Problem"))
                    },
                ),
            )
