"""Initial schema: catalog, stock ledger, orders, payments, webhooks, timeline, outbox.

Revision ID: 0001
Revises:
Create Date: 2026-11-22
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import JSONB, UUID

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

NOW = sa.text("now()")


def _timestamps() -> list[sa.Column[object]]:
    return [
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=NOW, nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), server_default=NOW, nullable=False),
    ]


def upgrade() -> None:
    op.create_table(
        "products",
        sa.Column("sku", sa.String(64), primary_key=True),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("unit_price", sa.BigInteger, nullable=False),
        sa.Column("currency", sa.String(3), nullable=False),
        *_timestamps(),
        sa.CheckConstraint("unit_price > 0", name="ck_products_unit_price_positive"),
        sa.CheckConstraint("currency ~ '^[a-z]{3}$'", name="ck_products_currency_iso4217"),
    )

    # The stock ledger. The CHECK constraints make an oversell impossible even through a bug:
    # any UPDATE that would reserve more than is on hand fails inside the database.
    op.create_table(
        "stock",
        sa.Column("sku", sa.String(64), sa.ForeignKey("products.sku"), primary_key=True),
        sa.Column("on_hand", sa.Integer, nullable=False, server_default="0"),
        sa.Column("reserved", sa.Integer, nullable=False, server_default="0"),
        sa.Column("updated_at", sa.DateTime(timezone=True), server_default=NOW, nullable=False),
        sa.CheckConstraint("on_hand >= 0", name="ck_stock_on_hand_non_negative"),
        sa.CheckConstraint("reserved >= 0", name="ck_stock_reserved_non_negative"),
        sa.CheckConstraint("on_hand >= reserved", name="ck_stock_reserved_within_on_hand"),
    )

    op.create_table(
        "reservations",
        sa.Column("id", sa.BigInteger, sa.Identity(), primary_key=True),
        sa.Column("checkout_id", UUID(as_uuid=True), nullable=False),
        sa.Column("sku", sa.String(64), sa.ForeignKey("products.sku"), nullable=False),
        sa.Column("quantity", sa.Integer, nullable=False),
        sa.Column("status", sa.String(16), nullable=False, server_default="active"),
        sa.Column("expires_at", sa.DateTime(timezone=True)),
        *_timestamps(),
        sa.UniqueConstraint("checkout_id", "sku", name="uq_reservations_checkout_sku"),
        sa.CheckConstraint("quantity > 0", name="ck_reservations_quantity_positive"),
        sa.CheckConstraint(
            "status IN ('active', 'committed', 'released')", name="ck_reservations_status"
        ),
    )
    # Operators and the invariant check look for active reservations by expiry and by SKU.
    op.create_index(
        "ix_reservations_active_expires_at",
        "reservations",
        ["expires_at"],
        postgresql_where=sa.text("status = 'active'"),
    )
    op.create_index("ix_reservations_sku_status", "reservations", ["sku", "status"])

    op.create_table(
        "orders",
        sa.Column("id", UUID(as_uuid=True), primary_key=True),
        sa.Column("checkout_id", UUID(as_uuid=True), nullable=False, unique=True),
        sa.Column("status", sa.String(32), nullable=False),
        sa.Column("customer_email", sa.String(320), nullable=False),
        sa.Column("customer_user_id", sa.String(255)),
        sa.Column("currency", sa.String(3), nullable=False),
        sa.Column("subtotal", sa.BigInteger, nullable=False),
        sa.Column("discount", sa.BigInteger, nullable=False, server_default="0"),
        sa.Column("tax", sa.BigInteger, nullable=False, server_default="0"),
        sa.Column("shipping", sa.BigInteger, nullable=False, server_default="0"),
        sa.Column("total", sa.BigInteger, nullable=False),
        sa.Column("metadata", JSONB, nullable=False, server_default=sa.text("'{}'::jsonb")),
        sa.Column("expires_at", sa.DateTime(timezone=True)),
        *_timestamps(),
        sa.CheckConstraint(
            "status IN ('pending_payment', 'paid', 'cancelled', 'expired', 'refunded')",
            name="ck_orders_status",
        ),
        sa.CheckConstraint(
            "total = subtotal - discount + tax + shipping AND total >= 0", name="ck_orders_total"
        ),
    )
    op.create_index("ix_orders_status", "orders", ["status"])
    op.create_index("ix_orders_customer_email", "orders", ["customer_email"])

    op.create_table(
        "order_items",
        sa.Column("id", sa.BigInteger, sa.Identity(), primary_key=True),
        sa.Column(
            "order_id",
            UUID(as_uuid=True),
            sa.ForeignKey("orders.id", ondelete="CASCADE"),
            nullable=False,
        ),
        sa.Column("sku", sa.String(64), nullable=False),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("unit_price", sa.BigInteger, nullable=False),
        sa.Column("quantity", sa.Integer, nullable=False),
        sa.Column("line_total", sa.BigInteger, nullable=False),
        sa.Column("product_snapshot", JSONB, nullable=False),
        sa.UniqueConstraint("order_id", "sku", name="uq_order_items_order_sku"),
        sa.CheckConstraint("quantity > 0", name="ck_order_items_quantity_positive"),
        sa.CheckConstraint("line_total = unit_price * quantity", name="ck_order_items_line_total"),
    )

    op.create_table(
        "payments",
        sa.Column("id", sa.BigInteger, sa.Identity(), primary_key=True),
        sa.Column(
            "order_id",
            UUID(as_uuid=True),
            sa.ForeignKey("orders.id", ondelete="CASCADE"),
            nullable=False,
        ),
        sa.Column("provider", sa.String(32), nullable=False, server_default="stripe"),
        sa.Column("payment_intent_id", sa.String(255), nullable=False, unique=True),
        sa.Column("status", sa.String(64), nullable=False),
        sa.Column("amount", sa.BigInteger, nullable=False),
        sa.Column("amount_refunded", sa.BigInteger, nullable=False, server_default="0"),
        sa.Column("currency", sa.String(3), nullable=False),
        *_timestamps(),
        sa.CheckConstraint(
            "amount_refunded >= 0 AND amount_refunded <= amount", name="ck_payments_refund_bounds"
        ),
    )
    op.create_index("ix_payments_order_id", "payments", ["order_id"])

    op.create_table(
        "processed_webhook_events",
        sa.Column("event_id", sa.String(255), primary_key=True),
        sa.Column("type", sa.String(128), nullable=False),
        sa.Column("checkout_id", UUID(as_uuid=True)),
        sa.Column("outcome", sa.String(64), nullable=False),
        sa.Column("payload", JSONB, nullable=False),
        sa.Column("received_at", sa.DateTime(timezone=True), server_default=NOW, nullable=False),
    )

    op.create_table(
        "order_events",
        sa.Column("id", sa.BigInteger, sa.Identity(), primary_key=True),
        sa.Column(
            "order_id",
            UUID(as_uuid=True),
            sa.ForeignKey("orders.id", ondelete="CASCADE"),
            nullable=False,
        ),
        sa.Column("type", sa.String(64), nullable=False),
        sa.Column("data", JSONB, nullable=False, server_default=sa.text("'{}'::jsonb")),
        sa.Column("dedupe_key", sa.String(255), nullable=False, unique=True),
        sa.Column("at", sa.DateTime(timezone=True), server_default=NOW, nullable=False),
    )
    op.create_index("ix_order_events_order_id_at", "order_events", ["order_id", "at", "id"])

    op.create_table(
        "outbox",
        sa.Column("id", sa.BigInteger, sa.Identity(), primary_key=True),
        sa.Column("topic", sa.String(128), nullable=False),
        sa.Column("aggregate_id", sa.String(64), nullable=False),
        sa.Column("payload", JSONB, nullable=False),
        sa.Column("dedupe_key", sa.String(255), nullable=False, unique=True),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=NOW, nullable=False),
        sa.Column("published_at", sa.DateTime(timezone=True)),
        sa.Column("attempts", sa.Integer, nullable=False, server_default="0"),
        sa.Column("last_error", sa.Text),
    )
    # The publisher polls only what is still unpublished.
    op.create_index(
        "ix_outbox_unpublished", "outbox", ["id"], postgresql_where=sa.text("published_at IS NULL")
    )


def downgrade() -> None:
    for table in (
        "outbox",
        "order_events",
        "processed_webhook_events",
        "payments",
        "order_items",
        "orders",
        "reservations",
        "stock",
        "products",
    ):
        op.drop_table(table)
