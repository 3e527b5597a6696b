"""Request and response bodies, exactly as the HTTP contract names them."""

from __future__ import annotations

import math
import uuid
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    AwareDatetime,
    BaseModel,
    ConfigDict,
    EmailStr,
    Field,
    StringConstraints,
    model_validator,
)

from core.events import EventBody, Timestamp

SKU_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"
# Stripe's largest charge for most currencies is 99,999,999 minor units.
MAX_AMOUNT = 99_999_999
MAX_STOCK = 2**31 - 1


def storable(value: str) -> str:
    """Refuse what PostgreSQL cannot store in a text or JSONB value: the NUL character and
    lone surrogates (which have no UTF-8 encoding). Both checks run at C speed."""
    if "\x00" in value:
        raise ValueError("must not contain the NUL character")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("must not contain lone surrogates (invalid Unicode)") from None
    return value


def storable_json(value: Any, depth: int = 0) -> Any:
    """The same for a JSON value, keys included; also NaN and infinities, which JSONB refuses,
    and nesting deeper than 32 levels."""
    if depth > 32:
        raise ValueError("is nested too deeply (more than 32 levels)")
    if isinstance(value, str):
        storable(value)
    elif isinstance(value, float) and not math.isfinite(value):
        raise ValueError("must not contain NaN or Infinity")
    elif isinstance(value, dict):
        for key, item in value.items():
            storable(key)
            storable_json(item, depth + 1)
    elif isinstance(value, list):
        for item in value:
            storable_json(item, depth + 1)
    return value


# Every text field of a request: refused with 422 before anything happens.
Text = Annotated[str, AfterValidator(storable)]
Sku = Annotated[str, StringConstraints(pattern=SKU_PATTERN)]
# Accepted in any case, stored and returned lowercase, as Stripe does.
Currency = Annotated[
    str, StringConstraints(strip_whitespace=True, to_lower=True, pattern=r"^[A-Za-z]{3}$")
]
Money = Annotated[int, Field(strict=True, gt=0, le=MAX_AMOUNT)]


class ErrorBody(BaseModel):
    error: str = Field(description="machine-readable code, e.g. insufficient_stock")
    message: str = Field(description="what went wrong, for a person")
    details: dict[str, Any] | list[Any] | None = None


class ProductIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: Annotated[
        str,
        StringConstraints(strip_whitespace=True, min_length=1, max_length=200),
        AfterValidator(storable),
    ]
    unit_price: Money = Field(description="price of one unit in minor units (cents)")
    currency: Currency = Field(description="ISO 4217 code; stored lowercase", examples=["usd"])
    on_hand: Annotated[int, Field(strict=True, ge=0, le=MAX_STOCK)] = Field(
        description="physical stock; must not fall below what is reserved"
    )
    max_per_order: Annotated[int, Field(strict=True, ge=1, le=1000)] | None = Field(
        default=None, description="at most this many units in one checkout; null: no cap"
    )


class InventoryOut(BaseModel):
    sku: str
    on_hand: int
    reserved: int
    available: int


class ProductOut(InventoryOut):
    name: str
    unit_price: int
    currency: str
    max_per_order: int | None


class HealthOut(BaseModel):
    status: str
    database: str
    temporal: str


# -- checkout -------------------------------------------------------------------------------

IDEMPOTENCY_KEY_PATTERN = r"^[\x20-\x7E]{1,255}$"


class CustomerIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    email: Annotated[EmailStr, AfterValidator(storable)]
    user_id: (
        Annotated[str, StringConstraints(min_length=1, max_length=255), AfterValidator(storable)]
        | None
    ) = None


class ItemIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    sku: Sku
    quantity: Annotated[int, Field(strict=True, ge=1, le=1000)]


class LineOutSchema(BaseModel):
    sku: str
    name: str
    unit_price: int
    quantity: int
    line_total: int


class TotalsOut(BaseModel):
    subtotal: int
    discount: int
    tax: int
    shipping: int
    total: int


class CheckoutPaymentOut(BaseModel):
    provider: str
    payment_intent_id: str
    client_secret: str | None
    status: str


class CheckoutOut(BaseModel):
    checkout_id: uuid.UUID
    order_id: uuid.UUID
    access_token: str = Field(
        description="reaches this order and its checkout (Authorization: Bearer); keep it"
    )
    status: str
    currency: str
    items: list[LineOutSchema]
    totals: TotalsOut
    payment: CheckoutPaymentOut
    expires_at: datetime


class PaymentAttemptOut(BaseModel):
    event_id: str
    at: datetime
    outcome: str = Field(description="succeeded, failed or canceled")
    message: str | None = None


class CheckoutStateOut(BaseModel):
    checkout_id: uuid.UUID
    order_id: uuid.UUID
    status: str = Field(
        description="started, opening_order, creating_payment, pending_payment, "
        "committing, compensating, paid, cancelled, expired or rejected"
    )
    expires_at: datetime | None
    payment_attempts: list[PaymentAttemptOut]


# -- orders ---------------------------------------------------------------------------------


class CustomerOut(BaseModel):
    email: str
    user_id: str | None


class OrderPaymentOut(BaseModel):
    provider: str
    payment_intent_id: str
    status: str
    amount: int


class OrderEventOut(BaseModel):
    type: str
    at: datetime
    data: dict[str, Any]


class OrderSummaryOut(BaseModel):
    order_id: uuid.UUID
    checkout_id: uuid.UUID
    status: str
    customer: CustomerOut
    currency: str
    items: list[LineOutSchema]
    totals: TotalsOut
    address: dict[str, Any] | None = None
    shipping_method: str | None = None
    promotion_code: str | None = None
    pricing: dict[str, Any] | None = Field(
        default=None,
        description="the shipping method, tax rate and promotion as charged (a snapshot)",
    )
    cart_id: uuid.UUID | None = None
    payment: OrderPaymentOut | None
    created_at: datetime
    updated_at: datetime


class OrderOut(OrderSummaryOut):
    events: list[OrderEventOut]


class OrdersPage(BaseModel):
    orders: list[OrderSummaryOut]
    next_cursor: str | None = Field(description="pass as ?cursor= for the next page; null: done")


class EventOut(EventBody):
    """An order event exactly as the broker receives it, and when the broker confirmed it."""

    published_at: Timestamp | None = Field(description="null: not published yet")


class EventsPage(BaseModel):
    events: list[EventOut] = Field(description="in commit order")
    next_cursor: str = Field(
        description="pass as ?after= for the next page; when nothing new has committed yet, "
        "the same cursor again"
    )


class OrderStatusOut(BaseModel):
    order_id: uuid.UUID
    status: str


class WebhookAck(BaseModel):
    received: bool = True
    outcome: str = Field(description="acted, duplicate or ignored")


# -- pricing (carts-and-pricing.md) ---------------------------------------------------------

# Shipping method and promotion codes as operators name them (the admin routes' paths).
PRICING_CODE_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$"
COUNTRY_PATTERN = r"^[A-Za-z]{2}$"
# ISO 3166-1 alpha-2, accepted in any case, stored and returned upper case.
Country = Annotated[
    str, StringConstraints(strip_whitespace=True, to_upper=True, pattern=COUNTRY_PATTERN)
]
MoneyOrZero = Annotated[int, Field(strict=True, ge=0, le=MAX_AMOUNT)]
Count = Annotated[int, Field(strict=True, ge=0, le=MAX_STOCK)]
# A code a client types: any storable text; one that names nothing is the contract's
# `invalid_promotion` (`unknown`) or `shipping_unavailable`, not a validation error.
ClientCode = Annotated[
    str,
    StringConstraints(strip_whitespace=True, min_length=1, max_length=255),
    AfterValidator(storable),
]
_Name = Annotated[
    str,
    StringConstraints(strip_whitespace=True, min_length=1, max_length=200),
    AfterValidator(storable),
]
_AddressLine = Annotated[str, StringConstraints(max_length=200), AfterValidator(storable)]


def _in_utc(value: datetime) -> datetime:
    try:
        return value.astimezone(UTC)
    except OverflowError:  # 9999-12-31T23:00-05:00 has no UTC datetime
        raise ValueError("is out of range") from None


# With its UTC offset, as the contract's timestamps are; kept in UTC.
UtcDatetime = Annotated[AwareDatetime, AfterValidator(_in_utc)]


class ShippingMethodIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: _Name
    price: MoneyOrZero = Field(description="minor units")
    currency: Currency = Field(examples=["usd"])
    countries: list[Country] = Field(
        default_factory=list,
        max_length=250,
        description="ISO 3166-1 alpha-2 codes it ships to; empty: everywhere",
    )
    free_over: MoneyOrZero | None = Field(
        default=None, description="free when subtotal - discount reaches this; null: never"
    )
    active: bool = True


class ShippingMethodOut(BaseModel):
    code: str
    name: str
    price: int
    currency: str
    countries: list[str]
    free_over: int | None
    active: bool


class ShippingOptionOut(BaseModel):
    code: str
    name: str
    price: int
    currency: str
    free_over: int | None


class ShippingMethodsOut(BaseModel):
    methods: list[ShippingOptionOut] = Field(description="active ones, cheapest first")


class TaxRateIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    rate_bps: Annotated[int, Field(strict=True, ge=0, le=10_000)] = Field(
        description="basis points: 2000 is 20%"
    )
    includes_shipping: bool = False


class TaxRateOut(BaseModel):
    country: str
    rate_bps: int
    includes_shipping: bool


class PromotionIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    kind: Literal["percent", "fixed"]
    value: Annotated[int, Field(strict=True, ge=1, le=MAX_AMOUNT)] = Field(
        description="percent: 1..100; fixed: minor units of `currency`"
    )
    currency: Currency | None = Field(default=None, description="fixed only")
    min_subtotal: MoneyOrZero | None = None
    starts_at: UtcDatetime | None = None
    ends_at: UtcDatetime | None = None
    usage_limit: Count | None = Field(default=None, description="uses in total; null: no limit")
    per_customer_limit: Annotated[int, Field(strict=True, ge=1, le=MAX_STOCK)] | None = None
    active: bool = True

    @model_validator(mode="after")
    def _consistent(self) -> PromotionIn:
        if self.kind == "percent" and self.value > 100:
            raise ValueError("a percent promotion's value is 1..100")
        if self.kind == "percent" and self.currency is not None:
            raise ValueError("a percent promotion has no currency (fixed ones only)")
        if self.kind == "fixed" and self.currency is None:
            raise ValueError("a fixed promotion needs a currency")
        if self.starts_at and self.ends_at and self.ends_at <= self.starts_at:
            raise ValueError("ends_at must be after starts_at")
        return self


class PromotionOut(BaseModel):
    code: str
    kind: str
    value: int
    currency: str | None
    min_subtotal: int | None
    starts_at: datetime | None
    ends_at: datetime | None
    usage_limit: int | None
    per_customer_limit: int | None
    active: bool
    used: int = Field(description="uses by paid orders")
    reserved: int = Field(description="uses held by checkouts waiting for payment")


class AddressIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    country: Country = Field(description="ISO 3166-1 alpha-2", examples=["US"])
    postal_code: _AddressLine | None = None
    city: _AddressLine | None = None
    line1: _AddressLine | None = None
    line2: _AddressLine | None = None
    name: _AddressLine | None = None


class QuotePromotionOut(BaseModel):
    code: str
    discount: int


class QuoteOut(BaseModel):
    currency: str
    items: list[LineOutSchema]
    totals: TotalsOut
    promotion: QuotePromotionOut | None
    shipping_methods: list[ShippingOptionOut] = Field(
        description="active methods in the cart's currency that ship to the address (all of "
        "them without an address)"
    )


class PricingIn(BaseModel):
    """What prices a cart besides its lines (carts-and-pricing.md): the quote's and the
    checkout's bodies validate them alike."""

    model_config = ConfigDict(extra="forbid")

    address: AddressIn | None = None
    shipping_method: ClientCode | None = Field(default=None, description="needs `address`")
    promotion_code: ClientCode | None = Field(
        default=None, description="matched case-insensitively"
    )


class LinesIn(PricingIn):
    """The lines to price: the body's `items`, or a server-side cart's."""

    items: list[ItemIn] | None = Field(default=None, min_length=1, max_length=100)
    cart_id: uuid.UUID | None = Field(
        default=None, description="this server-side cart's lines instead of `items`"
    )

    @model_validator(mode="after")
    def _items_or_cart(self) -> LinesIn:
        if (self.items is None) == (self.cart_id is None):
            raise ValueError("give either `items` or `cart_id`, not both and not neither")
        return self


class CheckoutIn(LinesIn):
    customer: CustomerIn
    metadata: Annotated[dict[str, Any], AfterValidator(storable_json)] | None = None


class QuoteIn(LinesIn):
    """The checkout's body, as far as it prices: the same body may be sent to both."""

    customer: CustomerIn | None = Field(
        default=None, description="optional; its per-customer promotion limit is checked"
    )
    metadata: Annotated[dict[str, Any], AfterValidator(storable_json)] | None = Field(
        default=None, description="accepted and ignored, as the checkout's body carries it"
    )
