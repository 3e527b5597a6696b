"""Order activities: create, pay, close and annotate orders; each idempotent by order id."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

from pydantic import BaseModel
from temporalio import activity

from activities.catalog import PricedCartOut
from core.catalog import PricedCart, PricedLine
from core.orders import NewOrder, OrderStore
from workflows.models import Customer


class CreateOrderInput(BaseModel):
    checkout_id: uuid.UUID
    order_id: uuid.UUID
    customer: Customer
    cart: PricedCartOut
    metadata: dict[str, Any]
    expires_at: datetime


class CloseOrderInput(BaseModel):
    checkout_id: uuid.UUID
    order_id: uuid.UUID
    status: str
    reason: str
    payment_intent_status: str | None = None


class OrderEventInput(BaseModel):
    order_id: uuid.UUID
    type: str
    data: dict[str, Any]
    dedupe_key: str


class OrderActivities:
    def __init__(self, orders: OrderStore) -> None:
        self._orders = orders

    @activity.defn(name="create_order")
    async def create_order(self, input: CreateOrderInput) -> bool:
        """Create the pending order with price and product snapshots; True if new."""
        cart = PricedCart(
            currency=input.cart.currency,
            lines=tuple(
                PricedLine(line.sku, line.name, line.unit_price, line.quantity)
                for line in input.cart.lines
            ),
        )
        return await self._orders.create(
            NewOrder(
                checkout_id=input.checkout_id,
                order_id=input.order_id,
                customer_email=input.customer.email,
                customer_user_id=input.customer.user_id,
                cart=cart,
                metadata=input.metadata,
                expires_at=input.expires_at,
            )
        )

    @activity.defn(name="close_order")
    async def close_order(self, input: CloseOrderInput) -> str:
        """Release the stock and close the order (one transaction); returns the status."""
        return await self._orders.close(
            input.checkout_id,
            input.order_id,
            status=input.status,
            reason=input.reason,
            intent_status=input.payment_intent_status,
        )

    @activity.defn(name="record_order_event")
    async def record_order_event(self, input: OrderEventInput) -> bool:
        """Append to the order's timeline once per dedupe key."""
        return await self._orders.record_event(
            input.order_id, input.type, input.data, input.dedupe_key
        )
