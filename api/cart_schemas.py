"""Cart request and response bodies (`carts-and-pricing.md`, "Carts")."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from api.schemas import ItemIn, TotalsOut
from core.carts import CART_TOKEN_PATTERN, MAX_LINE_QUANTITY, CartView


class CartIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    items: list[ItemIn] = Field(
        default_factory=list,
        max_length=100,
        description="lines to start with; the same SKU twice counts together",
    )

    def lines(self) -> dict[str, int]:
        merged: dict[str, int] = {}
        for item in self.items:
            merged[item.sku] = merged.get(item.sku, 0) + item.quantity
        return merged


class CartItemIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    quantity: Annotated[int, Field(strict=True, ge=0, le=MAX_LINE_QUANTITY)] = Field(
        description="the line's new quantity; 0 removes it"
    )


class CartMergeIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    guest_cart_token: Annotated[str, StringConstraints(pattern=CART_TOKEN_PATTERN)] = Field(
        description="the cart_token of the guest cart whose lines join this cart"
    )


class CartLineOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    sku: str
    name: str
    unit_price: int = Field(description="today's price of one unit, in minor units")
    quantity: int
    line_total: int
    available: bool = Field(description="whether the stock there now covers this quantity")


class CartOut(BaseModel):
    cart_id: uuid.UUID
    version: int = Field(description="bumped by every change; send it back as If-Match")
    status: str = Field(description="open, checked_out, merged, deleted or expired")
    currency: str | None = Field(description="the lines' currency; null for an empty cart")
    items: list[CartLineOut]
    totals: TotalsOut
    updated_at: datetime

    @classmethod
    def of(cls, view: CartView) -> CartOut:
        return cls.model_validate(_fields(view))


class CartCreatedOut(CartOut):
    """A new guest cart: its token, shown this once (only its hash is stored)."""

    cart_token: str = Field(
        description="reaches this cart (X-Cart-Token, or Authorization: Bearer); keep it"
    )

    @classmethod
    def of(cls, view: CartView) -> CartCreatedOut:
        return cls.model_validate({**_fields(view), "cart_token": view.token})


def _fields(view: CartView) -> dict[str, object]:
    return {
        "cart_id": view.id,
        "version": view.version,
        "status": view.status,
        "currency": view.currency,
        "items": [CartLineOut.model_validate(line) for line in view.lines],
        "totals": view.totals.as_dict(),
        "updated_at": view.updated_at,
    }
