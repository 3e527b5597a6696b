"""The catalog: products, their prices and their physical stock."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession

from core.db import SessionFactory
from core.errors import ErrorCode, NotFound, ServiceError, StockBelowReserved, UnknownSku


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


_UPSERT_PRODUCT = text(
    "INSERT INTO products (sku, name, unit_price, currency)"
    " VALUES (:sku, :name, :unit_price, :currency)"
    " ON CONFLICT (sku) DO UPDATE SET name = excluded.name, unit_price = excluded.unit_price,"
    " currency = excluded.currency, updated_at = now()"
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
        self, sku: str, *, name: str, unit_price: int, currency: str, on_hand: int
    ) -> ProductView:
        """Create or update a product and set its physical stock, in one transaction.

        Raises `StockBelowReserved` (and changes nothing) if `on_hand` would fall below what
        checkouts hold reserved right now.
        """
        async with self._sessions.begin() as session:
            params = {"sku": sku, "name": name, "unit_price": unit_price, "currency": currency}
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
    currency: str
    lines: tuple[PricedLine, ...]

    @property
    def subtotal(self) -> int:
        return sum(line.line_total for line in self.lines)


# Stripe's largest charge for most currencies, in minor units.
MAX_CHARGE = 99_999_999

_PRICES = text("SELECT sku, name, unit_price, currency FROM products WHERE sku = ANY(:skus)")


async def price_cart(session: AsyncSession, items: Mapping[str, int]) -> PricedCart:
    """Price merged cart lines from the catalog: the server's prices, never the client's.

    Raises `UnknownSku`, or `ServiceError(validation_error)` for products of different
    currencies or a total Stripe could not charge.
    """
    rows = {row.sku: row for row in await session.execute(_PRICES, {"skus": list(items)})}
    missing = sorted(sku for sku in items if sku not in rows)
    if missing:
        raise UnknownSku(missing)
    currencies = sorted({rows[sku].currency for sku in items})
    if len(currencies) > 1:
        raise ServiceError(
            f"the cart mixes currencies ({', '.join(currencies)}); one checkout has one currency",
            code=ErrorCode.VALIDATION_ERROR,
            details=[{"sku": sku, "currency": rows[sku].currency} for sku in sorted(items)],
        )
    cart = PricedCart(
        currency=currencies[0],
        lines=tuple(
            PricedLine(sku, rows[sku].name, rows[sku].unit_price, quantity)
            for sku, quantity in sorted(items.items())
        ),
    )
    if cart.subtotal > MAX_CHARGE:
        raise ServiceError(
            f"the order total {cart.subtotal} exceeds the largest chargeable amount {MAX_CHARGE}",
            code=ErrorCode.VALIDATION_ERROR,
        )
    return cart
