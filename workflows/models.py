"""Payloads of the checkout workflow: its input, updates, signals, query and result.

Pydantic models carried by Temporal's pydantic data converter. Fields are only ever added
(with defaults), so that checkouts already running keep decoding.
"""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

from pydantic import BaseModel, Field


class Customer(BaseModel):
    email: str
    user_id: str | None = None


class CartItem(BaseModel):
    sku: str
    quantity: int


class Address(BaseModel):
    """Where the order ships; its country sets the tax rate (carts-and-pricing.md)."""

    country: str
    postal_code: str | None = None
    city: str | None = None
    line1: str | None = None
    line2: str | None = None
    name: str | None = None


class CheckoutInput(BaseModel):
    checkout_id: uuid.UUID
    order_id: uuid.UUID
    customer: Customer
    items: list[CartItem]
    metadata: dict[str, Any] = Field(default_factory=dict)
    # Fixed at start, so that changing CHECKOUT_PAYMENT_TIMEOUT never alters a running checkout.
    payment_timeout_seconds: int
    # sha256 of the request body: the same Idempotency-Key with another body is refused.
    request_fingerprint: str
    # Refuse the checkout if its customer already has this many waiting for payment (None:
    # no limit, as for checkouts started before the limit existed).
    max_pending_checkouts: int | None = None
    # Pricing terms (carts-and-pricing.md); absent from checkouts started before them.
    address: Address | None = None
    shipping_method: str | None = None
    promotion_code: str | None = None
    # The server-side cart the items were taken from.
    cart_id: uuid.UUID | None = None


class LineOut(BaseModel):
    sku: str
    name: str
    unit_price: int
    quantity: int
    line_total: int


class Totals(BaseModel):
    subtotal: int
    discount: int = 0
    tax: int = 0
    shipping: int = 0
    total: int


class PaymentOut(BaseModel):
    provider: str = "stripe"
    payment_intent_id: str
    # Sealed (core.sealing), as the activity returned it: the update's answer and the
    # workflow's result are kept in its history. The API unseals it for the client.
    client_secret_sealed: str | None = None
    # In clear: in answers recorded before sealing, and in the API's answer to the client.
    client_secret: str | None = None
    status: str


class CheckoutCreated(BaseModel):
    """What `POST /checkout` answers once stock, order and PaymentIntent exist."""

    checkout_id: uuid.UUID
    order_id: uuid.UUID
    status: str
    currency: str
    items: list[LineOut]
    totals: Totals
    payment: PaymentOut
    expires_at: datetime


class CheckoutFailure(BaseModel):
    """Why a checkout was refused: an `ErrorCode`, a sentence, details."""

    code: str
    message: str
    details: Any = None


class StartResult(BaseModel):
    """The answer of the `start` update: the checkout, or why it was refused."""

    created: CheckoutCreated | None = None
    failure: CheckoutFailure | None = None
    # No longer set (the API knows which request claimed the Idempotency-Key); kept so that
    # answers recorded in histories before still decode.
    first: bool = False


class PaymentEvent(BaseModel):
    """A Stripe event about this checkout's PaymentIntent, signalled by the webhook route."""

    event_id: str
    type: str
    payment_intent_id: str
    status: str
    amount: int
    currency: str
    message: str | None = None
    # When the webhook reached the API: the start of the payment-to-paid latency.
    received_at: datetime | None = None


class PaymentAttempt(BaseModel):
    event_id: str
    at: datetime
    outcome: str
    message: str | None = None


class CheckoutState(BaseModel):
    """The live state of the saga (the `state` query, `GET /checkouts/{id}`)."""

    checkout_id: uuid.UUID
    order_id: uuid.UUID
    status: str
    expires_at: datetime | None = None
    payment_attempts: list[PaymentAttempt] = Field(default_factory=list)
    request_fingerprint: str
    start: StartResult | None = None


class CancelResult(BaseModel):
    order_id: uuid.UUID
    status: str
