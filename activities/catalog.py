"""Pricing activity: the cart priced from the catalog, never from the client."""

from __future__ import annotations

from pydantic import BaseModel
from temporalio import activity
from temporalio.exceptions import ApplicationError

from core.catalog import price_cart
from core.db import SessionFactory
from core.errors import ServiceError
from workflows.models import CartItem, LineOut


class PriceCartInput(BaseModel):
    items: list[CartItem]


class PricedCartOut(BaseModel):
    currency: str
    lines: list[LineOut]
    subtotal: int


class CatalogActivities:
    def __init__(self, sessions: SessionFactory) -> None:
        self._sessions = sessions

    @activity.defn(name="price_cart")
    async def price_cart(self, input: PriceCartInput) -> PricedCartOut:
        """Price the merged cart lines; unknown SKUs and mixed currencies fail for good."""
        merged: dict[str, int] = {}
        for item in input.items:
            merged[item.sku] = merged.get(item.sku, 0) + item.quantity
        try:
            cart = await price_cart(self._sessions, merged)
        except ServiceError as exc:
            raise ApplicationError(
                exc.message, exc.details, type=exc.code, non_retryable=True
            ) from exc
        return PricedCartOut(
            currency=cart.currency,
            lines=[
                LineOut(
                    sku=line.sku,
                    name=line.name,
                    unit_price=line.unit_price,
                    quantity=line.quantity,
                    line_total=line.line_total,
                )
                for line in cart.lines
            ],
            subtotal=cart.subtotal,
        )
