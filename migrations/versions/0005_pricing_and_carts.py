"""Pricing (shipping methods, tax rates, promotions), promotion uses reserved like stock, and
server-side carts (`carts-and-pricing.md`).

- `promotions`: `code_key` is the code lower-cased (codes match case-insensitively), `code`
  as the operator wrote it. `used` counts paid orders, `reserved` checkouts waiting for
  payment; CHECK `used + reserved <= usage_limit` makes an over-use impossible even through
  a bug, like the stock table's CHECKs make an oversell impossible.
- `promotion_customer_uses`: the same two counters per customer scope (`user:<sub>` or
  `email:<lower>`), with the promotion's `per_customer_limit` copied in so that a CHECK holds
  there too; changing the limit on the promotion updates the copies in the same transaction.
- `promotion_uses`: one row per checkout that reserved a use (`active`, `committed`,
  `released`), so that commit and release are idempotent and counted once.
- `orders` gains the address, the shipping method, the promotion code, `pricing` (the
  shipping method, tax rate and promotion as charged: the snapshot of every figure) and the
  cart it was made from.
- `carts` and `cart_items`: one open cart per customer (partial unique index), guest carts
  found by the hash of their token, a `version` bumped by every change.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-03
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import ARRAY, JSONB, UUID

revision: str = "0005"
down_revision: str | None = "0004"
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
        "shipping_methods",
        sa.Column("code", sa.String(64), primary_key=True),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("price", sa.BigInteger, nullable=False),
        sa.Column("currency", sa.String(3), nullable=False),
        # ISO 3166-1 alpha-2, upper case; empty: ships everywhere.
        sa.Column("countries", ARRAY(sa.String(2)), nullable=False, server_default="{}"),
        sa.Column("free_over", sa.BigInteger),
        sa.Column("active", sa.Boolean, nullable=False, server_default=sa.true()),
        *_timestamps(),
        sa.CheckConstraint("price >= 0", name="ck_shipping_price_nonnegative"),
        sa.CheckConstraint("free_over IS NULL OR free_over >= 0", name="ck_shipping_free_over"),
    )
    op.create_table(
        "tax_rates",
        sa.Column("country", sa.String(2), primary_key=True),
        sa.Column("rate_bps", sa.Integer, nullable=False),
        sa.Column("includes_shipping", sa.Boolean, nullable=False, server_default=sa.false()),
        *_timestamps(),
        sa.CheckConstraint("rate_bps BETWEEN 0 AND 10000", name="ck_tax_rate_bps"),
    )
    op.create_table(
        "promotions",
        sa.Column("code_key", sa.String(64), primary_key=True),
        sa.Column("code", sa.String(64), nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("value", sa.BigInteger, nullable=False),
        sa.Column("currency", sa.String(3)),
        sa.Column("min_subtotal", sa.BigInteger),
        sa.Column("starts_at", sa.DateTime(timezone=True)),
        sa.Column("ends_at", sa.DateTime(timezone=True)),
        sa.Column("usage_limit", sa.Integer),
        sa.Column("per_customer_limit", sa.Integer),
        sa.Column("active", sa.Boolean, nullable=False, server_default=sa.true()),
        sa.Column("used", sa.Integer, nullable=False, server_default="0"),
        sa.Column("reserved", sa.Integer, nullable=False, server_default="0"),
        *_timestamps(),
        sa.CheckConstraint("code_key = lower(code)", name="ck_promotion_code_key"),
        sa.CheckConstraint(
            "(kind = 'percent' AND value BETWEEN 1 AND 100 AND currency IS NULL)"
            " OR (kind = 'fixed' AND value >= 1 AND currency IS NOT NULL)",
            name="ck_promotion_kind_value",
        ),
        sa.CheckConstraint("used >= 0 AND reserved >= 0", name="ck_promotion_counts_nonnegative"),
        sa.CheckConstraint(
            "usage_limit IS NULL OR used + reserved <= usage_limit", name="ck_promotion_usage_limit"
        ),
        sa.CheckConstraint(
            "per_customer_limit IS NULL OR per_customer_limit >= 1",
            name="ck_promotion_per_customer_limit",
        ),
    )
    op.create_table(
        "promotion_customer_uses",
        sa.Column(
            "code_key",
            sa.String(64),
            sa.ForeignKey("promotions.code_key", ondelete="CASCADE"),
            primary_key=True,
        ),
        sa.Column("customer_scope", sa.String(330), primary_key=True),
        sa.Column("used", sa.Integer, nullable=False, server_default="0"),
        sa.Column("reserved", sa.Integer, nullable=False, server_default="0"),
        # The promotion's per_customer_limit, kept equal to it (see the module's docstring).
        sa.Column("customer_limit", sa.Integer),
        sa.CheckConstraint(
            "used >= 0 AND reserved >= 0", name="ck_promotion_customer_counts_nonnegative"
        ),
        sa.CheckConstraint(
            "customer_limit IS NULL OR used + reserved <= customer_limit",
            name="ck_promotion_customer_limit",
        ),
    )
    op.create_table(
        "promotion_uses",
        sa.Column("checkout_id", UUID(as_uuid=True), primary_key=True),
        sa.Column("code_key", sa.String(64), sa.ForeignKey("promotions.code_key"), nullable=False),
        sa.Column("customer_scope", sa.String(330), nullable=False),
        sa.Column("order_id", UUID(as_uuid=True), nullable=False),
        sa.Column("discount", sa.BigInteger, nullable=False),
        sa.Column("status", sa.String(16), nullable=False, server_default="active"),
        *_timestamps(),
        sa.CheckConstraint(
            "status IN ('active', 'committed', 'released')", name="ck_promotion_use_status"
        ),
    )
    op.create_index("ix_promotion_uses_code_status", "promotion_uses", ["code_key", "status"])

    op.add_column("orders", sa.Column("address", JSONB))
    op.add_column("orders", sa.Column("shipping_method", sa.String(64)))
    op.add_column("orders", sa.Column("promotion_code", sa.String(64)))
    op.add_column("orders", sa.Column("pricing", JSONB))
    # The cart the checkout was made from: it becomes `checked_out` when the order is paid.
    op.add_column("orders", sa.Column("cart_id", UUID(as_uuid=True)))

    op.create_table(
        "carts",
        sa.Column("id", UUID(as_uuid=True), primary_key=True),
        # sha256 of a guest cart's token; null for a customer's cart.
        sa.Column("token_hash", sa.String(64), unique=True),
        # The customer's scope (`user:<sub>`); null for a guest cart.
        sa.Column("customer_scope", sa.String(330)),
        sa.Column("status", sa.String(16), nullable=False, server_default="open"),
        sa.Column("version", sa.Integer, nullable=False, server_default="1"),
        # The order of the checkout that took this cart, once paid.
        sa.Column("order_id", UUID(as_uuid=True)),
        sa.Column("expires_at", sa.DateTime(timezone=True)),
        *_timestamps(),
        sa.CheckConstraint(
            "status IN ('open', 'checked_out', 'merged', 'deleted', 'expired')",
            name="ck_cart_status",
        ),
        sa.CheckConstraint(
            "(token_hash IS NULL) <> (customer_scope IS NULL)", name="ck_cart_one_owner"
        ),
    )
    op.create_index(
        "uq_carts_one_open_per_customer",
        "carts",
        ["customer_scope"],
        unique=True,
        postgresql_where=sa.text("status = 'open' AND customer_scope IS NOT NULL"),
    )
    op.create_index(
        "ix_carts_guest_expiry",
        "carts",
        ["expires_at"],
        postgresql_where=sa.text("status = 'open' AND token_hash IS NOT NULL"),
    )
    op.create_table(
        "cart_items",
        sa.Column(
            "cart_id",
            UUID(as_uuid=True),
            sa.ForeignKey("carts.id", ondelete="CASCADE"),
            primary_key=True,
        ),
        sa.Column("sku", sa.String(64), sa.ForeignKey("products.sku"), primary_key=True),
        sa.Column("quantity", sa.Integer, nullable=False),
        *_timestamps(),
        sa.CheckConstraint("quantity BETWEEN 1 AND 1000", name="ck_cart_item_quantity"),
    )


def downgrade() -> None:
    op.drop_table("cart_items")
    op.drop_index("ix_carts_guest_expiry", table_name="carts")
    op.drop_index("uq_carts_one_open_per_customer", table_name="carts")
    op.drop_table("carts")
    for column in ("cart_id", "pricing", "promotion_code", "shipping_method", "address"):
        op.drop_column("orders", column)
    op.drop_index("ix_promotion_uses_code_status", table_name="promotion_uses")
    op.drop_table("promotion_uses")
    op.drop_table("promotion_customer_uses")
    op.drop_table("promotions")
    op.drop_table("tax_rates")
    op.drop_table("shipping_methods")
