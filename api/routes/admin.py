"""Operator routes: the catalog and its stock."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Coroutine
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Path, Request, Response
from fastapi.routing import APIRoute

from api.deps import CatalogDep, RefundsDep, bearer
from api.schemas import SKU_PATTERN, ErrorBody, OrderStatusOut, ProductIn, ProductOut


class AdminRoute(APIRoute):
    """Checks the admin token before the body is read, so that a caller without it learns
    nothing, not even whether its body would have been valid: 401 without a valid credential,
    403 with a customer's or an order's."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def guarded(request: Request) -> Response:
            auth = request.app.state.services.auth
            auth.require_admin(await auth.authenticate(request.headers.get("authorization")))
            return await handler(request)

        return guarded


router = APIRouter(
    prefix="/admin",
    tags=["admin"],
    route_class=AdminRoute,
    dependencies=[Depends(bearer)],
    responses={
        401: {"model": ErrorBody, "description": "no valid credential"},
        403: {"model": ErrorBody, "description": "a customer or order token: admin only"},
    },
)

SkuPath = Annotated[str, Path(pattern=SKU_PATTERN, description="the product's SKU")]


@router.put(
    "/products/{sku}",
    responses={409: {"model": ErrorBody, "description": "stock_below_reserved"}},
)
async def put_product(sku: SkuPath, body: ProductIn, catalog: CatalogDep) -> ProductOut:
    """Create or update a product and set its physical stock."""
    product = await catalog.put_product(
        sku,
        name=body.name,
        unit_price=body.unit_price,
        currency=body.currency,
        on_hand=body.on_hand,
        max_per_order=body.max_per_order,
    )
    inventory = product.inventory
    return ProductOut(
        sku=product.sku,
        name=product.name,
        unit_price=product.unit_price,
        currency=product.currency,
        on_hand=inventory.on_hand,
        reserved=inventory.reserved,
        available=inventory.available,
        max_per_order=product.max_per_order,
    )


@router.post(
    "/orders/{order_id}/refund",
    responses={
        404: {"model": ErrorBody},
        409: {"model": ErrorBody, "description": "invalid_state: the order is not paid"},
    },
)
async def refund_order(order_id: uuid.UUID, refunds: RefundsDep) -> OrderStatusOut:
    """Refund a paid order in full: answers once Stripe refunded and the stock is back."""
    return OrderStatusOut(order_id=order_id, status=await refunds.refund(order_id))
