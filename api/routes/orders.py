"""Orders: read one with its timeline, or cancel it."""

from __future__ import annotations

import uuid

from fastapi import APIRouter

from api.deps import CheckoutsDep, OrdersDep
from api.schemas import ErrorBody, OrderOut, OrderStatusOut
from core.orders import OrderView

router = APIRouter(tags=["orders"])


@router.get("/orders/{order_id}", responses={404: {"model": ErrorBody}})
async def get_order(order_id: uuid.UUID, orders: OrdersDep) -> OrderOut:
    """The order, its items (price snapshots), its payment and its timeline, oldest first."""
    return order_out(await orders.get(order_id))


@router.post(
    "/orders/{order_id}/cancel",
    responses={
        404: {"model": ErrorBody},
        409: {"model": ErrorBody, "description": "invalid_state: paid, refunded or expired"},
    },
)
async def cancel_order(order_id: uuid.UUID, checkouts: CheckoutsDep) -> OrderStatusOut:
    """Cancel a pending order: answers once the PaymentIntent is canceled and stock released."""
    return OrderStatusOut(order_id=order_id, status=await checkouts.cancel(order_id))


def order_out(view: OrderView) -> OrderOut:
    order = view.order
    return OrderOut.model_validate(
        {
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
            "events": [{"type": e.type, "at": e.at, "data": e.data} for e in view.events],
        }
    )
