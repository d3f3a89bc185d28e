"""``/products``: register products, add stock, read stock levels."""

from __future__ import annotations

from typing import Any

from litestar import Controller, Request, Response, get, post
from litestar.di import NamedDependency
from litestar.params import JSONBody

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
    SearchText,
    SkuPath,
    written,
)
from orderstream.api.plumbing import command_context, etag, parse_if_match
from orderstream.api.problems import problem_responses
from orderstream.api.schemas import ProductPage, ProductRegistration, ProductView, StockAddition, WriteResult
from orderstream.application.queries import Queries
from orderstream.application.use_cases import UseCases
from orderstream.domain.common import Money


class ProductController(Controller):
    path = "/products"
    tags = ["products"]

    @post(
        "/",
        operation_id="registerProduct",
        summary="Register a product",
        description="Creates the product with no stock. The SKU is its id; registering it twice is a 409.",
        status_code=201,
        security=WRITE_SECURITY,
        response_headers=[ETAG_HEADER, LOCATION_HEADER, CORRELATION_HEADER],
        responses=problem_responses(400, 401, 409, 413, 422),
    )
    async def register_product(
        self,
        request: Request[Any, Any, Any],
        data: JSONBody[ProductRegistration],
        use_cases: NamedDependency[UseCases],
    ) -> Response[WriteResult]:
        result = await use_cases.register_product(
            data.sku,
            data.name,
            Money(data.price.amount, data.price.currency),
            command_context(request),
        )
        return written(data.sku, result, location=f"/products/{data.sku}")

    @post(
        "/{sku:str}/stock",
        operation_id="addStock",
        summary="Add stock to a product",
        status_code=200,
        security=WRITE_SECURITY,
        response_headers=[ETAG_HEADER, REPLAYED_HEADER, CORRELATION_HEADER],
        responses=problem_responses(400, 401, 404, 409, 412, 413, 422),
    )
    async def add_stock(
        self,
        request: Request[Any, Any, Any],
        sku: SkuPath,
        data: JSONBody[StockAddition],
        use_cases: NamedDependency[UseCases],
        if_match: IfMatch = None,
        idempotency_key: IdempotencyKey = None,
    ) -> Response[WriteResult]:
        expected = parse_if_match(if_match)
        context = command_context(
            request,
            idempotency_key=idempotency_key,
            request_body={"sku": sku, "body": data},
        )
        result = await use_cases.add_stock(sku, data.quantity, context, expected=expected)
        return written(sku, result)

    @get(
        "/{sku:str}",
        operation_id="getProduct",
        summary="Read a product's stock levels",
        response_headers=[READ_ETAG_HEADER, CORRELATION_HEADER],
        responses=problem_responses(400, 404, 503),
    )
    async def get_product(
        self, sku: SkuPath, queries: NamedDependency[Queries], min_position: MinPosition = None
    ) -> Response[ProductView]:
        view = await queries.get_product(sku, as_type=ProductView, min_position=min_position)
        return Response(view, headers={"ETag": etag(view.revision)})

    @get(
        "/",
        operation_id="listProducts",
        summary="List and search products",
        response_headers=[CORRELATION_HEADER],
        responses=problem_responses(400, 503),
    )
    async def list_products(
        self,
        queries: NamedDependency[Queries],
        q: SearchText = None,
        cursor: Cursor = None,
        limit: Limit = 20,
        min_position: MinPosition = None,
    ) -> ProductPage:
        page = await queries.list_products(
            as_type=ProductView, q=q, cursor=cursor, limit=limit, min_position=min_position
        )
        return ProductPage(items=page.items, next_cursor=page.next_cursor)
