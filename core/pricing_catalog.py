"""The pricing catalog (`carts-and-pricing.md`): shipping methods, tax rates and promotions as
operators set them, and the quote, which prices a cart by the one rule of `core.pricing`
without reserving anything.

Lock order, shared with the checkouts that reserve promotion uses: the promotion's row, then
its customers' rows. An operator lowering a limit takes both before checking it, so no
reservation can slip in between the check and the change.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import cast

from sqlalchemy import ARRAY, String, Table, any_, bindparam, func, or_, select, text
from sqlalchemy.ext.asyncio import AsyncSession

from core.catalog import PricedCart, load_products, price
from core.db import SessionFactory
from core.errors import InvalidState, NotFound
from core.models import ShippingMethod
from core.pricing import (
    PromotionTerms,
    ShippingTerms,
    TaxTerms,
    TermsRequest,
    Totals,
    load_terms,
)
from core.promotion_ledger import refuse_if_exhausted

SHIPPING_METHODS = cast(Table, ShippingMethod.__table__)


@dataclass(frozen=True)
class PromotionView:
    """A promotion as operators see it: its terms and the uses it holds."""

    terms: PromotionTerms
    used: int  # paid orders
    reserved: int  # checkouts waiting for payment


@dataclass(frozen=True)
class Quote:
    cart: PricedCart
    totals: Totals
    promotion: PromotionTerms | None
    shipping_methods: list[ShippingTerms]


_UPSERT_SHIPPING = text(
    "INSERT INTO shipping_methods (code, name, price, currency, countries, free_over, active)"
    " VALUES (:code, :name, :price, :currency, :countries, :free_over, :active)"
    " ON CONFLICT (code) DO UPDATE SET name = excluded.name, price = excluded.price,"
    " currency = excluded.currency, countries = excluded.countries,"
    " free_over = excluded.free_over, active = excluded.active, updated_at = now()"
).bindparams(bindparam("countries", type_=ARRAY(String(2))))
_UPSERT_TAX = text(
    "INSERT INTO tax_rates (country, rate_bps, includes_shipping)"
    " VALUES (:country, :rate_bps, :includes_shipping)"
    " ON CONFLICT (country) DO UPDATE SET rate_bps = excluded.rate_bps,"
    " includes_shipping = excluded.includes_shipping, updated_at = now()"
)

# A new code: inserted as given (it holds no use yet). An existing one: nothing here, then
# locked, checked and updated below.
_INSERT_PROMOTION = text(
    "INSERT INTO promotions (code_key, code, kind, value, currency, min_subtotal, starts_at,"
    " ends_at, usage_limit, per_customer_limit, active) VALUES (lower(:code), :code, :kind, :value,"
    " :currency, :min_subtotal, :starts_at, :ends_at, :usage_limit, :per_customer_limit, :active)"
    " ON CONFLICT (code_key) DO NOTHING RETURNING used, reserved"
)
_LOCK_PROMOTION = text(
    "SELECT used, reserved, per_customer_limit FROM promotions"
    " WHERE code_key = lower(:code) FOR UPDATE"
)
# Every customer row of the promotion locked (their counters cannot move until we commit),
# then the most uses one customer holds and how many hold more than the new limit.
_LOCK_CUSTOMER_USES = text(
    "SELECT coalesce(max(held), 0) AS most, count(*) FILTER (WHERE held > :limit) AS over"
    " FROM (SELECT used + reserved AS held FROM promotion_customer_uses"
    "       WHERE code_key = lower(:code) FOR UPDATE) AS locked"
)
_UPDATE_PROMOTION = text(
    "UPDATE promotions SET code = :code, kind = :kind, value = :value, currency = :currency,"
    " min_subtotal = :min_subtotal, starts_at = :starts_at, ends_at = :ends_at,"
    " usage_limit = :usage_limit, per_customer_limit = :per_customer_limit, active = :active,"
    " updated_at = now() WHERE code_key = lower(:code) RETURNING used, reserved"
)
# The copy the customer rows' CHECK holds them to (migration 0005).
_COPY_CUSTOMER_LIMIT = text(
    "UPDATE promotion_customer_uses SET customer_limit = :limit"
    " WHERE code_key = lower(:code) AND customer_limit IS DISTINCT FROM :limit"
)
_SELECT_PROMOTION = text(
    "SELECT code_key, code, kind, value, currency, min_subtotal, starts_at, ends_at, usage_limit,"
    " per_customer_limit, active, used, reserved FROM promotions WHERE code_key = lower(:code)"
)
# Uses held in total and by one customer, for the quote's advisory check (no lock).
_HELD = text(
    "SELECT p.used + p.reserved AS held,"
    " (SELECT c.used + c.reserved FROM promotion_customer_uses c"
    "  WHERE c.code_key = p.code_key AND c.customer_scope = :scope) AS customer_held"
    " FROM promotions p WHERE p.code_key = :code_key"
)


async def shipping_methods(
    session: AsyncSession, *, country: str | None, currency: str | None
) -> list[ShippingTerms]:
    """Active methods, cheapest first; those that ship to `country` (any case; a method with no
    countries ships everywhere) and are priced in `currency`, when given."""
    t = SHIPPING_METHODS
    query = select(t).where(t.c.active).order_by(t.c.price, t.c.code)
    if country is not None:
        query = query.where(
            or_(func.cardinality(t.c.countries) == 0, any_(t.c.countries) == country.upper())
        )
    if currency is not None:
        query = query.where(t.c.currency == currency.lower())
    return [ShippingTerms.from_row(row) for row in await session.execute(query)]


class PricingCatalog:
    def __init__(self, sessions: SessionFactory) -> None:
        self._sessions = sessions

    async def put_shipping_method(
        self,
        code: str,
        *,
        name: str,
        price: int,
        currency: str,
        countries: Sequence[str],
        free_over: int | None,
        active: bool,
    ) -> ShippingTerms:
        """Create or replace a shipping method; countries are stored upper case, sorted."""
        method = ShippingTerms(
            code=code,
            name=name,
            price=price,
            currency=currency.lower(),
            countries=tuple(sorted({c.upper() for c in countries})),
            free_over=free_over,
            active=active,
        )
        async with self._sessions.begin() as session:
            await session.execute(
                _UPSERT_SHIPPING,
                {
                    "code": method.code,
                    "name": method.name,
                    "price": method.price,
                    "currency": method.currency,
                    "countries": list(method.countries),
                    "free_over": method.free_over,
                    "active": method.active,
                },
            )
        return method

    async def list_shipping_methods(
        self, country: str | None = None, currency: str | None = None
    ) -> list[ShippingTerms]:
        """Active shipping methods, cheapest first (see `shipping_methods`)."""
        async with self._sessions() as session:
            return await shipping_methods(session, country=country, currency=currency)

    async def put_tax_rate(
        self, country: str, *, rate_bps: int, includes_shipping: bool
    ) -> TaxTerms:
        """Create or replace a destination country's tax rate."""
        rate = TaxTerms(
            country=country.upper(), rate_bps=rate_bps, includes_shipping=includes_shipping
        )
        async with self._sessions.begin() as session:
            await session.execute(
                _UPSERT_TAX,
                {
                    "country": rate.country,
                    "rate_bps": rate_bps,
                    "includes_shipping": includes_shipping,
                },
            )
        return rate

    async def put_promotion(
        self,
        code: str,
        *,
        kind: str,
        value: int,
        currency: str | None,
        min_subtotal: int | None,
        starts_at: datetime | None,
        ends_at: datetime | None,
        usage_limit: int | None,
        per_customer_limit: int | None,
        active: bool,
    ) -> PromotionView:
        """Create or replace a promotion, matched by its code in any case; `code` is kept as
        written this time.

        Raises `InvalidState` (and changes nothing) if `usage_limit` would fall below the uses
        held now (used + reserved), or `per_customer_limit` below what some customer holds.
        """
        # As the database answers them later: in UTC.
        starts_at = starts_at.astimezone(UTC) if starts_at else None
        ends_at = ends_at.astimezone(UTC) if ends_at else None
        terms = PromotionTerms(
            code_key=code.lower(),
            code=code,
            kind=kind,
            value=value,
            currency=currency.lower() if currency else None,
            min_subtotal=min_subtotal,
            starts_at=starts_at,
            ends_at=ends_at,
            usage_limit=usage_limit,
            per_customer_limit=per_customer_limit,
            active=active,
        )
        params = {
            "code": code,
            "kind": kind,
            "value": value,
            "currency": terms.currency,
            "min_subtotal": min_subtotal,
            "starts_at": starts_at,
            "ends_at": ends_at,
            "usage_limit": usage_limit,
            "per_customer_limit": per_customer_limit,
            "active": active,
        }
        async with self._sessions.begin() as session:
            created = (await session.execute(_INSERT_PROMOTION, params)).one_or_none()
            if created is not None:
                return PromotionView(terms, used=created.used, reserved=created.reserved)
            # Checked under the row lock rather than left to the CHECK constraints: the caller
            # gets the figures, and the CHECK (a bug's last line of defence) a 500 never.
            current = (await session.execute(_LOCK_PROMOTION, {"code": code})).one()
            held = current.used + current.reserved
            if usage_limit is not None and usage_limit < held:
                raise InvalidState(
                    f"usage_limit {usage_limit} is below the {held} uses promotion {code} holds"
                    f" ({current.used} used, {current.reserved} reserved)",
                    details={
                        "code": code,
                        "usage_limit": usage_limit,
                        "used": current.used,
                        "reserved": current.reserved,
                    },
                )
            if per_customer_limit != current.per_customer_limit:
                await self._check_customer_limit(session, code, per_customer_limit)
                await session.execute(
                    _COPY_CUSTOMER_LIMIT, {"code": code, "limit": per_customer_limit}
                )
            row = (await session.execute(_UPDATE_PROMOTION, params)).one()
        return PromotionView(terms, used=row.used, reserved=row.reserved)

    @staticmethod
    async def _check_customer_limit(session: AsyncSession, code: str, limit: int | None) -> None:
        # Locks the customer rows even when the limit rises: the copy is updated next anyway.
        row = (
            await session.execute(_LOCK_CUSTOMER_USES, {"code": code, "limit": limit or 0})
        ).one()
        if limit is not None and row.most > limit:
            raise InvalidState(
                f"per_customer_limit {limit} is below the {row.most} uses a customer of promotion"
                f" {code} holds (used + reserved; {row.over} customers above it)",
                details={
                    "code": code,
                    "per_customer_limit": limit,
                    "customer_held": row.most,
                    "customers_above": row.over,
                },
            )

    async def get_promotion(self, code: str) -> PromotionView:
        """A promotion by its code in any case; `NotFound` if there is none."""
        async with self._sessions() as session:
            row = (await session.execute(_SELECT_PROMOTION, {"code": code})).one_or_none()
        if row is None:
            raise NotFound(f"no promotion with code {code}", details={"code": code})
        values = row._asdict()
        used, reserved = values.pop("used"), values.pop("reserved")
        return PromotionView(PromotionTerms(**values), used=used, reserved=reserved)

    async def quote(
        self,
        items: Mapping[str, int],
        request: TermsRequest,
        *,
        now: datetime,
        customer_scope: str | None = None,
    ) -> Quote:
        """Price merged cart lines with the terms the request names, as a checkout opened now
        would, in a read-only transaction: nothing is reserved, stock is not checked.

        Raises what `price`, `load_terms` and `Terms.price` raise, and `PromotionExhausted`
        when no use of the promotion is left (in total, or for `customer_scope`): advisory, read
        without a lock; the checkout decides under its own.
        """
        async with self._sessions() as session:
            await session.connection(execution_options={"postgresql_readonly": True})
            cart = price(await load_products(session, list(items)), items)
            terms = await load_terms(session, request)
            totals = terms.price(cart, now=now)
            if terms.promotion is not None:
                await _check_uses_left(session, terms.promotion, customer_scope)
            # Without an address: every active method in the cart's currency; the address
            # then decides which of them ship there.
            methods = await shipping_methods(session, country=terms.country, currency=cart.currency)
        return Quote(cart=cart, totals=totals, promotion=terms.promotion, shipping_methods=methods)


async def _check_uses_left(
    session: AsyncSession, promotion: PromotionTerms, customer_scope: str | None
) -> None:
    row = (
        await session.execute(_HELD, {"code_key": promotion.code_key, "scope": customer_scope})
    ).one()
    refuse_if_exhausted(
        promotion.code,
        usage_limit=promotion.usage_limit,
        held=row.held,
        per_customer_limit=promotion.per_customer_limit,
        customer_held=row.customer_held or 0,  # none: no customer, or no use of theirs yet
    )
