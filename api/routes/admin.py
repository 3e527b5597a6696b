"""Operator routes: the catalog and its stock, refunds, the feed of order events."""

from __future__ import annotations

import base64
import binascii
import json
import uuid
from collections.abc import Callable, Coroutine
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Path, Query, Request, Response
from fastapi.routing import APIRoute
from pydantic import Field, TypeAdapter

from api.deps import CatalogDep, EventsDep, RefundsDep, authenticate, bearer
from api.schemas import (
    SKU_PATTERN,
    ErrorBody,
    EventOut,
    EventsPage,
    OrderStatusOut,
    ProductIn,
    ProductOut,
    Text,
)
from core.errors import ErrorCode, ServiceError
from core.event_feed import FeedPosition


class AdminRoute(APIRoute):
    """Checks the admin token before the body is read, so that a caller without it learns
    nothing, not even whether its body would have been valid: 401 without a valid credential,
    403 with a customer's or an order's."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def guarded(request: Request) -> Response:
            services = request.app.state.services
            caller = await authenticate(request, services, request.headers.get("authorization"))
            services.auth.require_admin(caller)
            return await handler(request)

        return guarded


def admin_router(responses: dict[int | str, dict[str, Any]] | None = None) -> APIRouter:
    """A router of operator routes under /admin, each behind `AdminRoute`'s check."""
    return APIRouter(
        prefix="/admin",
        tags=["admin"],
        route_class=AdminRoute,
        dependencies=[Depends(bearer)],
        responses={
            401: {"model": ErrorBody, "description": "no valid credential"},
            403: {"model": ErrorBody, "description": "a customer or order token: admin only"},
            **(responses or {}),
        },
    )


router = admin_router()

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


@router.get("/events", responses={422: {"model": ErrorBody, "description": "validation_error"}})
async def list_events(
    feed: EventsDep,
    after: Annotated[
        Text | None, Query(max_length=200, description="next_cursor of the previous page")
    ] = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 100,
) -> EventsPage:
    """Order events in commit order, each as the broker receives it, with its published_at."""
    position = _decode(after)
    events = await feed.page(position, limit)
    return EventsPage(
        events=[EventOut(**dict(e.body), published_at=e.published_at) for e in events],
        next_cursor=_encode(events[-1].position if events else position),
    )


# The cursor is the (xid, id) of the last event served (core/event_feed.py), opaque to clients.
_BIGINT = Annotated[int, Field(strict=True, ge=0, le=2**63 - 1)]
_CURSOR = TypeAdapter(tuple[_BIGINT, _BIGINT])


def _encode(position: FeedPosition) -> str:
    raw = json.dumps([position.xid, position.id], separators=(",", ":"))
    return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")


def _decode(cursor: str | None) -> FeedPosition:
    if cursor is None:
        return FeedPosition()
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        xid, id = _CURSOR.validate_json(raw)
    except (ValueError, binascii.Error) as exc:  # pydantic's ValidationError is a ValueError
        raise ServiceError(
            "invalid cursor: pass next_cursor from the previous page",
            code=ErrorCode.VALIDATION_ERROR,
        ) from exc
    return FeedPosition(xid, id)
