"""ORM models. The schema itself is owned by the Alembic migrations under `migrations/`."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any, cast

from sqlalchemy import (
    ARRAY,
    BigInteger,
    Boolean,
    DateTime,
    ForeignKey,
    Identity,
    Integer,
    String,
    Table,
    Text,
    UniqueConstraint,
    func,
)
from sqlalchemy.dialects.postgresql import JSONB, UUID
from sqlalchemy.dialects.postgresql.base import ischema_names as postgresql_types
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship
from sqlalchemy.types import UserDefinedType


class Base(DeclarativeBase):
    type_annotation_map = {dict[str, Any]: JSONB, uuid.UUID: UUID(as_uuid=True)}


def _created_at() -> Mapped[datetime]:
    return mapped_column(DateTime(timezone=True), server_default=func.now(), nullable=False)


def _updated_at() -> Mapped[datetime]:
    return mapped_column(
        DateTime(timezone=True), server_default=func.now(), onupdate=func.now(), nullable=False
    )


class Product(Base):
    __tablename__ = "products"

    sku: Mapped[str] = mapped_column(String(64), primary_key=True)
    name: Mapped[str] = mapped_column(String(200))
    unit_price: Mapped[int] = mapped_column(BigInteger)
    currency: Mapped[str] = mapped_column(String(3))
    # At most this many units in one checkout (None: no cap).
    max_per_order: Mapped[int | None] = mapped_column(Integer)
    created_at: Mapped[datetime] = _created_at()
    updated_at: Mapped[datetime] = _updated_at()

    stock: Mapped[Stock] = relationship(back_populates="product", uselist=False)


class Stock(Base):
    __tablename__ = "stock"
    # CHECK (reserved >= 0), CHECK (on_hand >= reserved): see the migration; they make an
    # oversell impossible even through a bug in this code.

    sku: Mapped[str] = mapped_column(ForeignKey("products.sku"), primary_key=True)
    on_hand: Mapped[int] = mapped_column(Integer, default=0)
    reserved: Mapped[int] = mapped_column(Integer, default=0)
    updated_at: Mapped[datetime] = _updated_at()

    product: Mapped[Product] = relationship(back_populates="stock")


class Reservation(Base):
    __tablename__ = "reservations"
    __table_args__ = (UniqueConstraint("checkout_id", "sku"),)

    id: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)
    checkout_id: Mapped[uuid.UUID]
    sku: Mapped[str] = mapped_column(ForeignKey("products.sku"))
    quantity: Mapped[int] = mapped_column(Integer)
    status: Mapped[str] = mapped_column(String(16), default="active")
    expires_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    created_at: Mapped[datetime] = _created_at()
    updated_at: Mapped[datetime] = _updated_at()


class Order(Base):
    __tablename__ = "orders"

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True)
    checkout_id: Mapped[uuid.UUID] = mapped_column(unique=True)
    status: Mapped[str] = mapped_column(String(32))
    customer_email: Mapped[str] = mapped_column(String(320))
    customer_user_id: Mapped[str | None] = mapped_column(String(255))
    # Whose order this is for idempotency keys and limits: see core.customers.customer_scope.
    customer_scope: Mapped[str] = mapped_column(String(330))
    currency: Mapped[str] = mapped_column(String(3))
    subtotal: Mapped[int] = mapped_column(BigInteger)
    discount: Mapped[int] = mapped_column(BigInteger, default=0)
    tax: Mapped[int] = mapped_column(BigInteger, default=0)
    shipping: Mapped[int] = mapped_column(BigInteger, default=0)
    total: Mapped[int] = mapped_column(BigInteger)
    # The sequence of the order's last event (see core/events.py).
    event_sequence: Mapped[int] = mapped_column(Integer, default=0)
    metadata_: Mapped[dict[str, Any]] = mapped_column("metadata", default=dict)
    expires_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    # The destination, the shipping method and the promotion code the order was priced with;
    # `pricing`: the method, tax rate and promotion as charged (core/pricing.py).
    address: Mapped[dict[str, Any] | None]
    shipping_method: Mapped[str | None] = mapped_column(String(64))
    promotion_code: Mapped[str | None] = mapped_column(String(64))
    pricing: Mapped[dict[str, Any] | None]
    # The cart this checkout was made from (checked out when the order is paid).
    cart_id: Mapped[uuid.UUID | None]
    created_at: Mapped[datetime] = _created_at()
    updated_at: Mapped[datetime] = _updated_at()

    items: Mapped[list[OrderItem]] = relationship(
        back_populates="order", order_by="OrderItem.sku", lazy="raise"
    )


class OrderItem(Base):
    __tablename__ = "order_items"
    __table_args__ = (UniqueConstraint("order_id", "sku"),)

    id: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)
    order_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("orders.id", ondelete="CASCADE"))
    sku: Mapped[str] = mapped_column(String(64))
    name: Mapped[str] = mapped_column(String(200))
    unit_price: Mapped[int] = mapped_column(BigInteger)
    quantity: Mapped[int] = mapped_column(Integer)
    line_total: Mapped[int] = mapped_column(BigInteger)
    # The product as it was when the order was placed; the catalog may change afterwards.
    product_snapshot: Mapped[dict[str, Any]]

    order: Mapped[Order] = relationship(back_populates="items")


class Payment(Base):
    __tablename__ = "payments"

    id: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)
    order_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("orders.id", ondelete="CASCADE"))
    provider: Mapped[str] = mapped_column(String(32), default="stripe")
    payment_intent_id: Mapped[str] = mapped_column(String(255), unique=True)
    status: Mapped[str] = mapped_column(String(64))
    amount: Mapped[int] = mapped_column(BigInteger)
    amount_refunded: Mapped[int] = mapped_column(BigInteger, default=0)
    currency: Mapped[str] = mapped_column(String(3))
    # The client_secret, encrypted (core.sealing): a replay of the key answers without Stripe.
    client_secret_sealed: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = _created_at()
    updated_at: Mapped[datetime] = _updated_at()


class CheckoutKey(Base):
    """An Idempotency-Key claimed in its scope before its checkout's workflow starts, so that
    duplicates meet in one checkout and a retry answers it whatever Temporal has kept."""

    __tablename__ = "checkout_keys"

    scope: Mapped[str] = mapped_column(String(330), primary_key=True)
    key: Mapped[str] = mapped_column(String(255), primary_key=True)
    # sha256 of the canonical request body: the same key with another body is refused.
    fingerprint: Mapped[str] = mapped_column(String(64))
    checkout_id: Mapped[uuid.UUID] = mapped_column(unique=True)
    order_id: Mapped[uuid.UUID]
    created_at: Mapped[datetime] = _created_at()
    expires_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class ProcessedWebhookEvent(Base):
    __tablename__ = "processed_webhook_events"

    event_id: Mapped[str] = mapped_column(String(255), primary_key=True)
    type: Mapped[str] = mapped_column(String(128))
    checkout_id: Mapped[uuid.UUID | None]
    outcome: Mapped[str] = mapped_column(String(64))
    payload: Mapped[dict[str, Any]]
    received_at: Mapped[datetime] = _created_at()


class OrderEvent(Base):
    """One entry of an order's timeline."""

    __tablename__ = "order_events"

    id: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)
    order_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("orders.id", ondelete="CASCADE"))
    type: Mapped[str] = mapped_column(String(64))
    data: Mapped[dict[str, Any]] = mapped_column(default=dict)
    # Retried activities write the same key again; the unique index turns that into a no-op.
    dedupe_key: Mapped[str] = mapped_column(String(255), unique=True)
    at: Mapped[datetime] = _created_at()


class ShippingMethod(Base):
    __tablename__ = "shipping_methods"

    code: Mapped[str] = mapped_column(String(64), primary_key=True)
    name: Mapped[str] = mapped_column(String(200))
    price: Mapped[int] = mapped_column(BigInteger)
    currency: Mapped[str] = mapped_column(String(3))
    # Upper-case ISO 3166-1 alpha-2 codes; empty: everywhere.
    countries: Mapped[list[str]] = mapped_column(ARRAY(String(2)), default=list)
    free_over: Mapped[int | None] = mapped_column(BigInteger)
    active: Mapped[bool] = mapped_column(Boolean, default=True)
    created_at: Mapped[datetime] = _created_at()
    updated_at: Mapped[datetime] = _updated_at()


class TaxRate(Base):
    __tablename__ = "tax_rates"

    country: Mapped[str] = mapped_column(String(2), primary_key=True)
    rate_bps: Mapped[int] = mapped_column(Integer)
    includes_shipping: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[datetime] = _created_at()
    updated_at: Mapped[datetime] = _updated_at()


class Promotion(Base):
    """A promotion code. CHECK `used + reserved <= usage_limit`: see migration 0005."""

    __tablename__ = "promotions"

    # The code lower-cased: codes match case-insensitively.
    code_key: Mapped[str] = mapped_column(String(64), primary_key=True)
    code: Mapped[str] = mapped_column(String(64))
    kind: Mapped[str] = mapped_column(String(16))
    value: Mapped[int] = mapped_column(BigInteger)
    currency: Mapped[str | None] = mapped_column(String(3))
    min_subtotal: Mapped[int | None] = mapped_column(BigInteger)
    starts_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    ends_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    usage_limit: Mapped[int | None] = mapped_column(Integer)
    per_customer_limit: Mapped[int | None] = mapped_column(Integer)
    active: Mapped[bool] = mapped_column(Boolean, default=True)
    # Paid orders, and checkouts waiting for payment, that hold a use.
    used: Mapped[int] = mapped_column(Integer, default=0)
    reserved: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[datetime] = _created_at()
    updated_at: Mapped[datetime] = _updated_at()


class PromotionCustomerUse(Base):
    """A promotion's uses by one customer; CHECK `used + reserved <= customer_limit`."""

    __tablename__ = "promotion_customer_uses"

    code_key: Mapped[str] = mapped_column(
        ForeignKey("promotions.code_key", ondelete="CASCADE"), primary_key=True
    )
    customer_scope: Mapped[str] = mapped_column(String(330), primary_key=True)
    used: Mapped[int] = mapped_column(Integer, default=0)
    reserved: Mapped[int] = mapped_column(Integer, default=0)
    # A copy of the promotion's per_customer_limit, for the CHECK.
    customer_limit: Mapped[int | None] = mapped_column(Integer)


class PromotionUse(Base):
    """The use of a promotion one checkout holds: `active`, then `committed` or `released`."""

    __tablename__ = "promotion_uses"

    checkout_id: Mapped[uuid.UUID] = mapped_column(primary_key=True)
    code_key: Mapped[str] = mapped_column(ForeignKey("promotions.code_key"))
    customer_scope: Mapped[str] = mapped_column(String(330))
    order_id: Mapped[uuid.UUID]
    discount: Mapped[int] = mapped_column(BigInteger)
    status: Mapped[str] = mapped_column(String(16), default="active")
    created_at: Mapped[datetime] = _created_at()
    updated_at: Mapped[datetime] = _updated_at()


class Cart(Base):
    """A server-side cart: a guest's (found by its token's hash) or a customer's."""

    __tablename__ = "carts"

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True)
    token_hash: Mapped[str | None] = mapped_column(String(64), unique=True)
    customer_scope: Mapped[str | None] = mapped_column(String(330))
    status: Mapped[str] = mapped_column(String(16), default="open")
    version: Mapped[int] = mapped_column(Integer, default=1)
    order_id: Mapped[uuid.UUID | None]
    expires_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    created_at: Mapped[datetime] = _created_at()
    updated_at: Mapped[datetime] = _updated_at()


class CartItem(Base):
    __tablename__ = "cart_items"

    cart_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("carts.id", ondelete="CASCADE"), primary_key=True
    )
    sku: Mapped[str] = mapped_column(ForeignKey("products.sku"), primary_key=True)
    quantity: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[datetime] = _created_at()
    updated_at: Mapped[datetime] = _updated_at()


class Xid8(UserDefinedType[int]):
    """PostgreSQL's 64-bit transaction id (`pg_current_xact_id()`)."""

    cache_ok = True

    def get_col_spec(self, **_: object) -> str:
        return "xid8"


# So that reflection (Alembic's autogenerate, the migration test) knows the type too.
postgresql_types.setdefault("xid8", Xid8)


class OutboxMessage(Base):
    """An order event (`events.md`), written in the same transaction as the change it
    announces; the relay publishes it and records when the broker confirmed it."""

    __tablename__ = "outbox"
    __table_args__ = (UniqueConstraint("aggregate_id", "sequence"),)

    id: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)
    event_id: Mapped[uuid.UUID] = mapped_column(unique=True, server_default=func.gen_random_uuid())
    event_type: Mapped[str] = mapped_column(String(64))
    # The order's id.
    aggregate_id: Mapped[uuid.UUID]
    # Counts the order's events from 1 with no gaps (`orders.event_sequence`).
    sequence: Mapped[int] = mapped_column(Integer)
    payload: Mapped[dict[str, Any]]
    dedupe_key: Mapped[str] = mapped_column(String(255), unique=True)
    occurred_at: Mapped[datetime] = _created_at()
    # The writing transaction: the admin feed's commit order (see core/event_feed.py).
    xid: Mapped[int] = mapped_column(Xid8(), server_default=func.pg_current_xact_id())
    published_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    last_error: Mapped[str | None] = mapped_column(Text)
    retry_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


# Core tables for the checkout's hot write paths: a Core INSERT or UPDATE skips the ORM's
# per-row bookkeeping, which was the largest part of the worker's database CPU (py-spy).
ORDERS = cast(Table, Order.__table__)
ORDER_EVENTS = cast(Table, OrderEvent.__table__)
OUTBOX = cast(Table, OutboxMessage.__table__)
PROCESSED_WEBHOOK_EVENTS = cast(Table, ProcessedWebhookEvent.__table__)
CHECKOUT_KEYS = cast(Table, CheckoutKey.__table__)
