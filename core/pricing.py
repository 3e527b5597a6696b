"""Totals, one rule everywhere (`carts-and-pricing.md`): the quote, the cart and the checkout
all price through `compute_totals`, from the service's own tables.

    subtotal = sum of unit_price x quantity
    discount = percent of subtotal, or the fixed amount; never above subtotal; half up
    shipping = the method's price, or 0 when subtotal - discount >= free_over
    tax      = (subtotal - discount [+ shipping if the rate includes shipping]) x bps / 10000,
               half up
    total    = subtotal - discount + shipping + tax

Money is integer minor units; every division rounds half up, exactly, in integers.
Where the contract is silent: without an address there is no tax (no destination) and no
shipping method may be chosen; with an address and no method, shipping is 0 (the client
chose none: digital goods, collection). A destination without a tax rate is taxed at 0.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from datetime import datetime
from typing import Any

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession

from core.catalog import MAX_CHARGE, PricedCart
from core.errors import ErrorCode, InvalidPromotion, ServiceError, ShippingUnavailable

PERCENT = "percent"
FIXED = "fixed"

# Stripe's smallest charge per currency, in minor units (its "minimum and maximum charge
# amounts"); a PaymentIntent below it is refused. Other currencies: 50 minor units.
MINIMUM_CHARGE = {
    "usd": 50, "eur": 50, "gbp": 30, "aud": 50, "cad": 50, "chf": 50, "nzd": 50, "sgd": 50,
    "brl": 50, "inr": 50, "jpy": 50, "aed": 200, "bgn": 100, "czk": 1500, "dkk": 250,
    "hkd": 400, "huf": 17500, "mxn": 1000, "myr": 200, "nok": 300, "pln": 200, "ron": 200,
    "sek": 300, "thb": 1000,
}  # fmt: skip
DEFAULT_MINIMUM_CHARGE = 50


def minimum_charge(currency: str) -> int:
    return MINIMUM_CHARGE.get(currency.lower(), DEFAULT_MINIMUM_CHARGE)


def half_up(numerator: int, denominator: int) -> int:
    """numerator / denominator rounded half up, for numerator >= 0 and denominator > 0."""
    assert numerator >= 0
    assert denominator > 0
    return (2 * numerator + denominator) // (2 * denominator)


@dataclass(frozen=True)
class ShippingTerms:
    code: str
    name: str
    price: int
    currency: str
    countries: tuple[str, ...]
    free_over: int | None
    active: bool

    @classmethod
    def from_row(cls, row: Any, prefix: str = "") -> ShippingTerms:
        """From a row of `shipping_methods` whose columns are named `prefix` + field."""
        values = {f.name: getattr(row, prefix + f.name) for f in fields(cls)}
        return cls(**{**values, "countries": tuple(values["countries"])})

    def ships_to(self, country: str) -> bool:
        return not self.countries or country.upper() in self.countries


@dataclass(frozen=True)
class TaxTerms:
    country: str
    rate_bps: int
    includes_shipping: bool


@dataclass(frozen=True)
class PromotionTerms:
    code_key: str
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

    def discount(self, subtotal: int) -> int:
        amount = half_up(subtotal * self.value, 100) if self.kind == PERCENT else self.value
        return min(amount, subtotal)

    def check(self, *, currency: str, subtotal: int, now: datetime) -> None:
        """Raise `InvalidPromotion` (with the contract's reason) unless it applies."""
        if not self.active:
            raise InvalidPromotion(self.code, "inactive", f"promotion {self.code} is not active")
        if self.starts_at is not None and now < self.starts_at:
            raise InvalidPromotion(
                self.code, "not_started", f"promotion {self.code} starts at {self.starts_at}"
            )
        if self.ends_at is not None and now >= self.ends_at:
            raise InvalidPromotion(
                self.code, "ended", f"promotion {self.code} ended at {self.ends_at}"
            )
        if self.kind == FIXED and self.currency != currency:
            raise InvalidPromotion(
                self.code,
                "currency",
                f"promotion {self.code} is in {str(self.currency).upper()}, the cart in "
                f"{currency.upper()}",
            )
        if self.min_subtotal is not None and subtotal < self.min_subtotal:
            raise InvalidPromotion(
                self.code,
                "min_subtotal",
                f"promotion {self.code} needs a subtotal of at least {self.min_subtotal}",
            )


@dataclass(frozen=True)
class Totals:
    subtotal: int
    discount: int
    shipping: int
    tax: int

    @property
    def total(self) -> int:
        return self.subtotal - self.discount + self.shipping + self.tax

    def as_dict(self) -> dict[str, int]:
        return {
            "subtotal": self.subtotal,
            "discount": self.discount,
            "tax": self.tax,
            "shipping": self.shipping,
            "total": self.total,
        }


def compute_totals(
    subtotal: int,
    *,
    promotion: PromotionTerms | None = None,
    shipping: ShippingTerms | None = None,
    tax: TaxTerms | None = None,
) -> Totals:
    """The contract's rule. The terms are assumed to apply (see `Terms.check`)."""
    discount = promotion.discount(subtotal) if promotion is not None else 0
    discounted = subtotal - discount
    shipping_cost = 0
    if shipping is not None and not (
        shipping.free_over is not None and discounted >= shipping.free_over
    ):
        shipping_cost = shipping.price
    tax_amount = 0
    if tax is not None and tax.rate_bps:
        taxable = discounted + (shipping_cost if tax.includes_shipping else 0)
        tax_amount = half_up(taxable * tax.rate_bps, 10_000)
    return Totals(subtotal=subtotal, discount=discount, shipping=shipping_cost, tax=tax_amount)


@dataclass(frozen=True)
class Terms:
    """What a cart is priced with besides its lines: the destination's tax rate, the chosen
    shipping method and the promotion, as read from the tables."""

    country: str | None = None
    shipping: ShippingTerms | None = None
    tax: TaxTerms | None = None
    promotion: PromotionTerms | None = None

    def price(self, cart: PricedCart, *, now: datetime) -> Totals:
        """Check the terms against the cart, then compute its totals. Raises
        `ShippingUnavailable`, `InvalidPromotion` or `ServiceError(validation_error)` (a total
        above what Stripe can charge)."""
        if self.shipping is not None and self.shipping.currency != cart.currency:
            raise ShippingUnavailable(
                f"shipping method {self.shipping.code} is priced in "
                f"{self.shipping.currency.upper()}, the cart in {cart.currency.upper()}",
                details={"shipping_method": self.shipping.code, "reason": "currency"},
            )
        if self.promotion is not None:
            self.promotion.check(currency=cart.currency, subtotal=cart.subtotal, now=now)
        totals = compute_totals(
            cart.subtotal, promotion=self.promotion, shipping=self.shipping, tax=self.tax
        )
        minimum = minimum_charge(cart.currency)
        if totals.total < minimum:
            # A PaymentIntent cannot charge it (a free order, a discount down to pennies):
            # refused here, at once, rather than by Stripe after the stock is reserved.
            raise ServiceError(
                f"the order total {totals.total} is below the smallest amount that can be "
                f"charged in {cart.currency.upper()} ({minimum})",
                code=ErrorCode.VALIDATION_ERROR,
                details={"total": totals.total, "minimum": minimum, "currency": cart.currency},
            )
        if totals.total > MAX_CHARGE:
            raise ServiceError(
                f"the order total {totals.total} exceeds the largest chargeable amount "
                f"{MAX_CHARGE}",
                code=ErrorCode.VALIDATION_ERROR,
            )
        return totals

    def snapshot(self, totals: Totals) -> dict[str, Any]:
        """The terms as charged, stored on the order (`orders.pricing`)."""
        return {
            "shipping": None
            if self.shipping is None
            else {
                "code": self.shipping.code,
                "name": self.shipping.name,
                "price": self.shipping.price,
                "free_over": self.shipping.free_over,
                "charged": totals.shipping,
            },
            "tax": None
            if self.country is None
            else {
                "country": self.country,
                "rate_bps": self.tax.rate_bps if self.tax else 0,
                "includes_shipping": self.tax.includes_shipping if self.tax else False,
                "charged": totals.tax,
            },
            "promotion": None
            if self.promotion is None
            else {
                "code": self.promotion.code,
                "kind": self.promotion.kind,
                "value": self.promotion.value,
                "discount": totals.discount,
            },
        }


@dataclass(frozen=True)
class TermsRequest:
    """What the client asked for: a destination country, a shipping method code and a
    promotion code (any of them absent)."""

    country: str | None = None
    shipping_method: str | None = None
    promotion_code: str | None = None


# The three terms a request may name, in one round trip: each join matches nothing when its
# parameter is null (or names nothing).
_TERMS = text(
    """
    SELECT s.code AS s_code, s.name AS s_name, s.price AS s_price, s.currency AS s_currency,
           s.countries AS s_countries, s.free_over AS s_free_over, s.active AS s_active,
           t.country AS t_country, t.rate_bps AS t_rate_bps,
           t.includes_shipping AS t_includes_shipping,
           p.code_key, p.code, p.kind, p.value, p.currency, p.min_subtotal, p.starts_at,
           p.ends_at, p.usage_limit, p.per_customer_limit, p.active
    FROM (SELECT 1) AS one
    LEFT JOIN shipping_methods s ON s.code = CAST(:shipping AS text)
    LEFT JOIN tax_rates t ON t.country = CAST(:country AS text)
    LEFT JOIN promotions p ON p.code_key = lower(CAST(:promotion AS text))
    """
)


async def load_terms(session: AsyncSession, request: TermsRequest) -> Terms:
    """Read the terms a request names. Raises `ShippingUnavailable` (unknown or inactive
    method, a method without an address, or one that does not ship there) and
    `InvalidPromotion(unknown)`; the rest is checked against the cart by `Terms.price`."""
    country = request.country.upper() if request.country else None
    if country is None and request.shipping_method is not None:
        raise ShippingUnavailable(
            "a shipping method needs an address to ship to",
            details={"shipping_method": request.shipping_method, "reason": "no_address"},
        )
    if country is None and request.shipping_method is None and request.promotion_code is None:
        return Terms()
    row = (
        await session.execute(
            _TERMS,
            {
                "shipping": request.shipping_method,
                "country": country,
                "promotion": request.promotion_code,
            },
        )
    ).one()
    shipping = None
    if request.shipping_method is not None:
        if row.s_code is None or not row.s_active:
            raise ShippingUnavailable(
                f"unknown shipping method {request.shipping_method}",
                details={"shipping_method": request.shipping_method, "reason": "unknown"},
            )
        shipping = ShippingTerms.from_row(row, "s_")
        assert country is not None
        if not shipping.ships_to(country):
            raise ShippingUnavailable(
                f"shipping method {shipping.code} does not ship to {country}",
                details={"shipping_method": shipping.code, "reason": "country"},
            )
    tax = None
    if row.t_country is not None:
        tax = TaxTerms(row.t_country, row.t_rate_bps, row.t_includes_shipping)
    promotion = None
    if request.promotion_code is not None:
        if row.code_key is None:
            raise InvalidPromotion(
                request.promotion_code,
                "unknown",
                f"unknown promotion code {request.promotion_code}",
            )
        values = row._mapping
        promotion = PromotionTerms(**{f.name: values[f.name] for f in fields(PromotionTerms)})
    return Terms(country=country, shipping=shipping, tax=tax, promotion=promotion)
