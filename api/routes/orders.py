"""Orders: list a customer's own (or, for admin, anyone's), read one with its timeline, cancel."""

from __future__ import annotations

import base64
import binascii
import json
import uuid
from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, Query
from pydantic import AwareDatetime, TypeAdapter

from api.auth import CallerKind
from api.deps import AccessDep, CallerDep, CheckoutsDep, OrdersDep
from api.schemas import (
    ErrorBody,
    OrderOut,
    OrdersPage,
    OrderStatusOut,
    OrderSummaryOut,
    Text,
)
from core.errors import ErrorCode, ServiceError, Unauthorized
from core.orders import OrderView

router = APIRouter(tags=["orders"])

CREDENTIAL_ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"model": ErrorBody},
    404: {"model": ErrorBody},
}


@router.get("/orders", responses={401: {"model": ErrorBody}, 422: {"model": ErrorBody}})
async def list_orders(
    caller: CallerDep,
    orders: OrdersDep,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    cursor: Annotated[Text | None, Query(max_length=200)] = None,
    email: Annotated[Text | None, Query(max_length=320, description="admin only")] = None,
    user_id: Annotated[Text | None, Query(max_length=255, description="admin only")] = None,
) -> OrdersPage:
    """A customer's own orders (customer token), or anyone's by email / user id (admin)."""
    if caller.kind == CallerKind.CUSTOMER:
        # A customer sees its own orders whatever filters it sends.
        user_id, email = caller.user_id, None
    elif caller.kind != CallerKind.ADMIN:
        raise Unauthorized("listing orders needs a customer token or the admin token")
    views = await orders.list(limit=limit + 1, user_id=user_id, email=email, before=_decode(cursor))
    page = views[:limit]
    more = len(views) > limit
    return OrdersPage(
        orders=[OrderSummaryOut.model_validate(_summary(view)) for view in page],
        next_cursor=_encode(page[-1]) if more and page else None,
    )


@router.get("/orders/{order_id}", responses=CREDENTIAL_ERRORS)
async def get_order(order_id: uuid.UUID, caller: CallerDep, access: AccessDep) -> OrderOut:
    """The order, its items (price snapshots), its payment and its timeline, oldest first."""
    view = await access.order(order_id, caller)
    return OrderOut.model_validate(
        {
            **_summary(view),
            "events": [{"type": e.type, "at": e.at, "data": e.data} for e in view.events],
        }
    )


@router.post(
    "/orders/{order_id}/cancel",
    responses={
        **CREDENTIAL_ERRORS,
        409: {"model": ErrorBody, "description": "invalid_state: paid, refunded or expired"},
    },
)
async def cancel_order(
    order_id: uuid.UUID, caller: CallerDep, checkouts: CheckoutsDep
) -> OrderStatusOut:
    """Cancel a pending order: answers once the PaymentIntent is canceled and stock released."""
    return OrderStatusOut(order_id=order_id, status=await checkouts.cancel(order_id, caller))


def _summary(view: OrderView) -> dict[str, object]:
    order = view.order
    return {
        "order_id": order.id,
        "checkout_id": order.checkout_id,
        "status": order.status,
        "customer": {"email": order.customer_email, "user_id": order.customer_user_id},
        "currency": order.currency,
        "items": [
            {
                "sku": i.sku,
                "name": i.name,
                "unit_price": i.unit_price,
                "quantity": i.quantity,
                "line_total": i.line_total,
            }
            for i in view.items
        ],
        "totals": {
            "subtotal": order.subtotal,
            "discount": order.discount,
            "tax": order.tax,
            "shipping": order.shipping,
            "total": order.total,
        },
        "address": order.address,
        "shipping_method": order.shipping_method,
        "promotion_code": order.promotion_code,
        "pricing": order.pricing,
        "cart_id": order.cart_id,
        "payment": (
            {
                "provider": view.payment.provider,
                "payment_intent_id": view.payment.payment_intent_id,
                "status": view.payment.status,
                "amount": view.payment.amount,
            }
            if view.payment
            else None
        ),
        "created_at": order.created_at,
        "updated_at": order.updated_at,
    }


# The cursor is the last order of a page, (created_at, id), opaque to clients.
def _encode(view: OrderView) -> str:
    raw = json.dumps([view.order.created_at.isoformat(), str(view.order.id)])
    return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")


_CURSOR = TypeAdapter(tuple[AwareDatetime, uuid.UUID])


def _decode(cursor: str | None) -> tuple[datetime, uuid.UUID] | None:
    if cursor is None:
        return None
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        return _CURSOR.validate_json(raw)
    except (ValueError, binascii.Error) as exc:  # pydantic's ValidationError is a ValueError
        raise ServiceError(
            "invalid cursor: pass next_cursor from the previous page",
            code=ErrorCode.VALIDATION_ERROR,
        ) from exc
