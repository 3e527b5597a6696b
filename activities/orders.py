"""Order activities: open, close and annotate orders; each idempotent by checkout or order id."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

from pydantic import BaseModel
from temporalio import activity

from activities.refusals import refused_at_once
from core.catalog import PricedCart
from core.orders import NewOrder, OrderStore
from workflows.models import Address, CartItem, Customer, LineOut, Totals


class OpenOrderInput(BaseModel):
    checkout_id: uuid.UUID
    order_id: uuid.UUID
    customer: Customer
    items: list[CartItem]
    metadata: dict[str, Any]
    expires_at: datetime
    max_pending: int | None = None
    address: Address | None = None
    shipping_method: str | None = None
    promotion_code: str | None = None
    cart_id: uuid.UUID | None = None


class PricedCartOut(BaseModel):
    currency: str
    lines: list[LineOut]
    subtotal: int
    # Absent from the results recorded before pricing had shipping, tax and promotions: their
    # total was the subtotal.
    discount: int = 0
    shipping: int = 0
    tax: int = 0
    total: int | None = None

    @property
    def amount(self) -> int:
        """What the customer pays: the PaymentIntent's amount."""
        return self.subtotal if self.total is None else self.total

    def totals(self) -> Totals:
        return Totals(
            subtotal=self.subtotal,
            discount=self.discount,
            tax=self.tax,
            shipping=self.shipping,
            total=self.amount,
        )

    @classmethod
    def of(cls, cart: PricedCart) -> PricedCartOut:
        return cls(
            currency=cart.currency,
            lines=[LineOut.model_validate(line, from_attributes=True) for line in cart.lines],
            subtotal=cart.subtotal,
            discount=cart.discount,
            shipping=cart.shipping,
            tax=cart.tax,
            total=cart.total,
        )


class CloseOrderInput(BaseModel):
    checkout_id: uuid.UUID
    order_id: uuid.UUID
    status: str
    reason: str
    payment_intent_status: str | None = None
    # A refused checkout (nothing kept) frees its Idempotency-Key.
    release_key: bool = False


class OrderEventInput(BaseModel):
    order_id: uuid.UUID
    type: str
    data: dict[str, Any]
    dedupe_key: str


class OrderActivities:
    def __init__(self, orders: OrderStore) -> None:
        self._orders = orders

    @activity.defn(name="open_order")
    async def open_order(self, input: OpenOrderInput) -> PricedCartOut:
        """Price the cart, reserve its stock (all or none) and create the pending order, in one
        transaction; a retry returns the cart as first recorded. Refusals are not retried."""
        with refused_at_once(input.checkout_id):
            cart, _ = await self._orders.open(
                NewOrder(
                    checkout_id=input.checkout_id,
                    order_id=input.order_id,
                    customer_email=input.customer.email,
                    customer_user_id=input.customer.user_id,
                    items=[(item.sku, item.quantity) for item in input.items],
                    metadata=input.metadata,
                    expires_at=input.expires_at,
                    max_pending=input.max_pending,
                    address=input.address.model_dump(exclude_none=True) if input.address else None,
                    shipping_method=input.shipping_method,
                    promotion_code=input.promotion_code,
                    cart_id=input.cart_id,
                )
            )
        return PricedCartOut.of(cart)

    @activity.defn(name="close_order")
    async def close_order(self, input: CloseOrderInput) -> str:
        """Release the stock and close the order (one transaction); returns the status."""
        return await self._orders.close(
            input.checkout_id,
            input.order_id,
            status=input.status,
            reason=input.reason,
            intent_status=input.payment_intent_status,
            release_key=input.release_key,
        )

    @activity.defn(name="record_order_event")
    async def record_order_event(self, input: OrderEventInput) -> bool:
        """Append to the order's timeline once per dedupe key."""
        return await self._orders.record_event(
            input.order_id, input.type, input.data, input.dedupe_key
        )
