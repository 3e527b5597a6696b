"""The catalog: products, their prices and their physical stock."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession

from core.db import SessionFactory, Sql
from core.errors import (
    ErrorCode,
    NotFound,
    QuantityLimitExceeded,
    ServiceError,
    StockBelowReserved,
    UnknownSku,
)


@dataclass(frozen=True)
class Inventory:
    sku: str
    on_hand: int
    reserved: int

    @property
    def available(self) -> int:
        return max(self.on_hand - self.reserved, 0)


@dataclass(frozen=True)
class ProductView:
    sku: str
    name: str
    unit_price: int
    currency: str
    inventory: Inventory
    max_per_order: int | None = None


_UPSERT_PRODUCT = text(
    "INSERT INTO products (sku, name, unit_price, currency, max_per_order)"
    " VALUES (:sku, :name, :unit_price, :currency, :max_per_order)"
    " ON CONFLICT (sku) DO UPDATE SET name = excluded.name, unit_price = excluded.unit_price,"
    " currency = excluded.currency, max_per_order = excluded.max_per_order, updated_at = now()"
)
_ENSURE_STOCK = text(
    "INSERT INTO stock (sku, on_hand, reserved) VALUES (:sku, 0, 0) ON CONFLICT (sku) DO NOTHING"
)
_LOCK_STOCK_ROW = text("SELECT on_hand, reserved FROM stock WHERE sku = :sku FOR UPDATE")
_SET_ON_HAND = text("UPDATE stock SET on_hand = :on_hand, updated_at = now() WHERE sku = :sku")
_INVENTORY = text("SELECT sku, on_hand, reserved FROM stock WHERE sku = :sku")


class Catalog:
    def __init__(self, sessions: SessionFactory) -> None:
        self._sessions = sessions

    async def put_product(
        self,
        sku: str,
        *,
        name: str,
        unit_price: int,
        currency: str,
        on_hand: int,
        max_per_order: int | None = None,
    ) -> ProductView:
        """Create or update a product and set its physical stock, in one transaction.

        Raises `StockBelowReserved` (and changes nothing) if `on_hand` would fall below what
        checkouts hold reserved right now.
        """
        async with self._sessions.begin() as session:
            params = {
                "sku": sku,
                "name": name,
                "unit_price": unit_price,
                "currency": currency,
                "max_per_order": max_per_order,
            }
            await session.execute(_UPSERT_PRODUCT, params)
            await session.execute(_ENSURE_STOCK, {"sku": sku})
            row = (await session.execute(_LOCK_STOCK_ROW, {"sku": sku})).one()
            if on_hand < row.reserved:
                raise StockBelowReserved(
                    f"on_hand {on_hand} is below the {row.reserved} units reserved for {sku}",
                    details={"sku": sku, "on_hand": on_hand, "reserved": row.reserved},
                )
            await session.execute(_SET_ON_HAND, {"sku": sku, "on_hand": on_hand})
        return ProductView(
            sku=sku,
            name=name,
            unit_price=unit_price,
            currency=currency,
            inventory=Inventory(sku=sku, on_hand=on_hand, reserved=row.reserved),
            max_per_order=max_per_order,
        )

    async def inventory(self, sku: str) -> Inventory:
        async with self._sessions() as session:
            row = (await session.execute(_INVENTORY, {"sku": sku})).one_or_none()
        if row is None:
            raise NotFound(f"no product with SKU {sku}", details={"sku": sku})
        return Inventory(sku=row.sku, on_hand=row.on_hand, reserved=row.reserved)


@dataclass(frozen=True)
class PricedLine:
    sku: str
    name: str
    unit_price: int
    quantity: int

    @property
    def line_total(self) -> int:
        return self.unit_price * self.quantity


@dataclass(frozen=True)
class PricedCart:
    """Priced lines and, once its terms are applied (core/pricing.py), the rest of its totals."""

    currency: str
    lines: tuple[PricedLine, ...]
    discount: int = 0
    shipping: int = 0
    tax: int = 0

    @property
    def subtotal(self) -> int:
        return sum(line.line_total for line in self.lines)

    @property
    def total(self) -> int:
        return self.subtotal - self.discount + self.shipping + self.tax


# Stripe's largest charge for most currencies, in minor units.
MAX_CHARGE = 99_999_999

_PRICES = Sql(
    "SELECT sku, name, unit_price, currency, max_per_order FROM products WHERE sku = ANY(:skus)"
)
# The same, first taking the customer's transaction-scoped advisory lock: a customer's
# checkouts open one at a time, so the count of their pending ones (read by the next statement,
# with a snapshot taken after the lock) cannot be raced past MAX_PENDING_CHECKOUTS. Folded into
# this statement to save the round trip of a statement of its own.
_PRICES_LOCKING_CUSTOMER = Sql(
    """
    WITH customer AS MATERIALIZED (SELECT pg_advisory_xact_lock(hashtextextended(:scope, 0)))
    SELECT p.sku, p.name, p.unit_price, p.currency, p.max_per_order
    FROM customer, products p WHERE p.sku = ANY(:skus)
    """
)


async def load_products(
    session: AsyncSession, skus: list[str], *, lock_customer: str | None = None
) -> dict[str, Any]:
    """The catalog rows of these SKUs (missing ones are absent); with `lock_customer`, also
    takes that customer's advisory lock for the rest of the transaction."""
    if lock_customer is None:
        rows = await _PRICES.rows(session, {"skus": skus})
    else:
        rows = await _PRICES_LOCKING_CUSTOMER.rows(session, {"skus": skus, "scope": lock_customer})
    return {row.sku: row for row in rows}


def check_quantity_limits(products: Mapping[str, Any], items: Mapping[str, int]) -> None:
    """`QuantityLimitExceeded` for the lines above their product's max_per_order (all of them
    in the details); the products must be there."""
    over = [
        {"sku": sku, "requested": quantity, "max": products[sku].max_per_order}
        for sku, quantity in sorted(items.items())
        if products[sku].max_per_order is not None and quantity > products[sku].max_per_order
    ]
    if over:
        raise QuantityLimitExceeded(over)


def price(products: Mapping[str, Any], items: Mapping[str, int]) -> PricedCart:
    """Price merged cart lines from catalog rows: the server's prices, never the client's.

    Raises `UnknownSku`, `QuantityLimitExceeded` (a line above its product's max_per_order), or
    `ServiceError(validation_error)` for products of different currencies or a total Stripe
    could not charge.
    """
    missing = sorted(sku for sku in items if sku not in products)
    if missing:
        raise UnknownSku(missing)
    currencies = sorted({products[sku].currency for sku in items})
    if len(currencies) > 1:
        raise ServiceError(
            f"the cart mixes currencies ({', '.join(currencies)}); one checkout has one currency",
            code=ErrorCode.VALIDATION_ERROR,
            details=[{"sku": sku, "currency": products[sku].currency} for sku in sorted(items)],
        )
    check_quantity_limits(products, items)
    cart = PricedCart(
        currency=currencies[0],
        lines=tuple(
            PricedLine(sku, products[sku].name, products[sku].unit_price, quantity)
            for sku, quantity in sorted(items.items())
        ),
    )
    if cart.subtotal > MAX_CHARGE:
        raise ServiceError(
            f"the order total {cart.subtotal} exceeds the largest chargeable amount {MAX_CHARGE}",
            code=ErrorCode.VALIDATION_ERROR,
        )
    return cart


async def price_cart(session: AsyncSession, items: Mapping[str, int]) -> PricedCart:
    """Price merged cart lines from the catalog (see `price`)."""
    return price(await load_products(session, list(items)), items)
