"""Order events per `events.md`: a per-order sequence, the outbox rebuilt for the contract.

- `orders.event_sequence`: the sequence of the order's last event. The statement that changes
  an order's status (or records a declined attempt or a partial refund) increments it and
  writes the event with the new value, under the order's row lock: per order, sequences count
  from 1 with no gaps, in the order the changes committed.
- `outbox` is rebuilt: one row per event with the contract's envelope as columns (`event_id`,
  `event_type`, `occurred_at`, `aggregate_id`, `sequence`) and its `payload`; `xid` (the
  writing transaction's id) orders the admin feed by commit; `published_at`, `attempts`,
  `last_error` and `retry_at` are the relay's. The old rows are dropped: they had another
  body, were never published and no consumer exists. Orders written before this migration
  have no events; their next change is their sequence 1.
- A statement-level trigger NOTIFYs `outbox` on insert: a waiting relay wakes at commit.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-02
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import JSONB, UUID
from sqlalchemy.types import UserDefinedType

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

NOW = sa.text("now()")


class _Xid8(UserDefinedType[int]):
    cache_ok = True

    def get_col_spec(self, **_: object) -> str:
        return "xid8"


def upgrade() -> None:
    op.add_column(
        "orders", sa.Column("event_sequence", sa.Integer, nullable=False, server_default="0")
    )

    op.drop_table("outbox")
    op.create_table(
        "outbox",
        sa.Column("id", sa.BigInteger, sa.Identity(), primary_key=True),
        sa.Column(
            "event_id",
            UUID(as_uuid=True),
            nullable=False,
            unique=True,
            server_default=sa.text("gen_random_uuid()"),
        ),
        sa.Column("event_type", sa.String(64), nullable=False),
        sa.Column("aggregate_id", UUID(as_uuid=True), nullable=False),
        sa.Column("sequence", sa.Integer, nullable=False),
        sa.Column("payload", JSONB, nullable=False),
        sa.Column("dedupe_key", sa.String(255), nullable=False, unique=True),
        # The transaction's now(): its start, a few milliseconds before its commit.
        sa.Column("occurred_at", sa.DateTime(timezone=True), server_default=NOW, nullable=False),
        # The writing transaction's id (the top-level one, also from a subtransaction).
        sa.Column("xid", _Xid8(), server_default=sa.text("pg_current_xact_id()"), nullable=False),
        sa.Column("published_at", sa.DateTime(timezone=True)),
        sa.Column("attempts", sa.Integer, nullable=False, server_default="0"),
        sa.Column("last_error", sa.Text),
        # Not before this time (an unroutable message backs off); null: now.
        sa.Column("retry_at", sa.DateTime(timezone=True)),
        sa.UniqueConstraint("aggregate_id", "sequence", name="uq_outbox_aggregate_sequence"),
        sa.CheckConstraint("sequence >= 1", name="ck_outbox_sequence_positive"),
    )
    # The relay claims the oldest unpublished rows; the unique (aggregate_id, sequence) index
    # answers its "no earlier unpublished event of this order" check.
    op.create_index(
        "ix_outbox_unpublished", "outbox", ["id"], postgresql_where=sa.text("published_at IS NULL")
    )
    # GET /admin/events pages in (xid, id) order.
    op.create_index("ix_outbox_commit_order", "outbox", ["xid", "id"])

    # One notification per statement, delivered at commit (PostgreSQL folds identical ones
    # of a transaction into one): a relay waiting on LISTEN wakes as soon as it can see them.
    op.execute(
        """
        CREATE FUNCTION outbox_notify() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            PERFORM pg_notify('outbox', '');
            RETURN NULL;
        END
        $$
        """
    )
    op.execute(
        "CREATE TRIGGER outbox_notify AFTER INSERT ON outbox"
        " FOR EACH STATEMENT EXECUTE FUNCTION outbox_notify()"
    )


def downgrade() -> None:
    op.execute("DROP TRIGGER outbox_notify ON outbox")
    op.execute("DROP FUNCTION outbox_notify()")
    op.drop_table("outbox")
    # The table as 0001 made it (empty: the events do not fit its old bodies).
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
    op.create_index(
        "ix_outbox_unpublished", "outbox", ["id"], postgresql_where=sa.text("published_at IS NULL")
    )
    op.drop_column("orders", "event_sequence")
