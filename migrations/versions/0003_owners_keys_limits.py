"""v2: who owns an order, idempotency keys that outlive Temporal, per-order quantity caps.

- `orders.customer_scope`: the customer an order belongs to for idempotency and limits
  (`user:<sub>`, else `email:<lowercased email>`), with indexes for a customer's pending
  checkouts and for listing orders newest first.
- `checkout_keys`: an `Idempotency-Key` claimed in its scope before the checkout's workflow
  starts: the request's fingerprint and the checkout and order ids, kept until `expires_at`.
- `payments.client_secret_sealed`: the PaymentIntent's client_secret, encrypted under a key
  derived from SECRET_KEY, so a replay of the key answers without asking Stripe.
- `products.max_per_order`: at most this many units of the SKU in one checkout.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-01
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import UUID

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

NOW = sa.text("now()")


def upgrade() -> None:
    op.add_column("products", sa.Column("max_per_order", sa.Integer))
    op.create_check_constraint(
        "ck_products_max_per_order_positive", "products", "max_per_order >= 1"
    )

    op.add_column("orders", sa.Column("customer_scope", sa.String(330)))
    op.execute(
        "UPDATE orders SET customer_scope = CASE WHEN customer_user_id IS NOT NULL"
        " THEN 'user:' || customer_user_id ELSE 'email:' || lower(customer_email) END"
    )
    op.alter_column("orders", "customer_scope", nullable=False)
    # Counting a customer's checkouts that wait for payment (MAX_PENDING_CHECKOUTS).
    op.create_index(
        "ix_orders_pending_by_scope",
        "orders",
        ["customer_scope"],
        postgresql_where=sa.text("status = 'pending_payment'"),
    )
    # GET /orders: a customer's own, and customer support's lookup by email, newest first.
    op.create_index("ix_orders_user_created", "orders", ["customer_user_id", "created_at", "id"])
    op.create_index(
        "ix_orders_email_created",
        "orders",
        [sa.text("lower(customer_email)"), "created_at", "id"],
    )
    op.create_index("ix_orders_created", "orders", ["created_at", "id"])
    op.drop_index("ix_orders_customer_email", "orders")

    op.create_table(
        "checkout_keys",
        sa.Column("scope", sa.String(330), nullable=False),
        sa.Column("key", sa.String(255), nullable=False),
        sa.Column("fingerprint", sa.String(64), nullable=False),
        sa.Column("checkout_id", UUID(as_uuid=True), nullable=False, unique=True),
        sa.Column("order_id", UUID(as_uuid=True), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=NOW, nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("scope", "key", name="pk_checkout_keys"),
    )
    op.create_index("ix_checkout_keys_expires_at", "checkout_keys", ["expires_at"])

    op.add_column("payments", sa.Column("client_secret_sealed", sa.Text))


def downgrade() -> None:
    op.drop_column("payments", "client_secret_sealed")
    op.drop_table("checkout_keys")
    op.create_index("ix_orders_customer_email", "orders", ["customer_email"])
    for index in (
        "ix_orders_created",
        "ix_orders_email_created",
        "ix_orders_user_created",
        "ix_orders_pending_by_scope",
    ):
        op.drop_index(index, "orders")
    op.drop_column("orders", "customer_scope")
    op.drop_constraint("ck_products_max_per_order_positive", "products", type_="check")
    op.drop_column("products", "max_per_order")
